"""A real gRPC server and client (grpcio) for tests/e2e/grpc.rs, with no generated code: the
methods take and return raw bytes.

  grpc_app.py serve PORT NAME
      h2c server on 127.0.0.1:PORT. /hcc.Test/Echo and /hcc.Test/Other answer NAME;
      /hcc.Test/Stream sends NAME every 50 ms, as many times as the request's decimal number.
      Prints "ready" once serving; stops on SIGTERM.
  grpc_app.py call ADDR METHOD N
      N unary calls on ONE channel; prints one JSON object: answers per body, errors per
      status code name.
  grpc_app.py stream ADDR N
      one server-streaming call of N messages; prints one line per message ("msg NAME"), then
      "end OK" or "end <STATUS CODE NAME> <details>".
"""

import json
import signal
import sys
import time
from concurrent import futures

import grpc


def ident(b):
    return b


def serve(port, name):
    body = name.encode()

    def unary(request, context):
        return body

    def stream(request, context):
        n = int(request.decode() or "1")
        for _ in range(n):
            if not context.is_active():
                return
            yield body
            time.sleep(0.05)

    handler = grpc.method_handlers_generic_handler(
        "hcc.Test",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(unary, ident, ident),
            "Other": grpc.unary_unary_rpc_method_handler(unary, ident, ident),
            "Stream": grpc.unary_stream_rpc_method_handler(stream, ident, ident),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    print("ready", flush=True)
    server.wait_for_termination()


def call(addr, method, n):
    answers, errors = {}, {}
    with grpc.insecure_channel(addr) as channel:
        rpc = channel.unary_unary(
            method, request_serializer=ident, response_deserializer=ident
        )
        for _ in range(n):
            try:
                b = rpc(b"", timeout=10).decode()
                answers[b] = answers.get(b, 0) + 1
            except grpc.RpcError as e:
                code = e.code().name
                errors[code] = errors.get(code, 0) + 1
    print(json.dumps({"answers": answers, "errors": errors}), flush=True)


def stream(addr, n):
    with grpc.insecure_channel(addr) as channel:
        rpc = channel.unary_stream(
            "/hcc.Test/Stream", request_serializer=ident, response_deserializer=ident
        )
        try:
            for b in rpc(str(n).encode(), timeout=120):
                print("msg", b.decode(), flush=True)
            print("end OK", flush=True)
        except grpc.RpcError as e:
            print("end", e.code().name, e.details(), flush=True)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "serve":
        serve(int(sys.argv[2]), sys.argv[3])
    elif cmd == "call":
        call(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif cmd == "stream":
        stream(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(f"unknown command {cmd}")
