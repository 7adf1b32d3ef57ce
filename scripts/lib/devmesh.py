"""Imported, not run. What the Python scripts that run a throwaway mesh on loopback share, as the
bash ones share dev-mesh.sh (same configuration, same waits):

  free_port()             a loopback port nothing listens on right now
  consul_dev(binary, work, start, node_name, extra=None)
                          writes WORK/consul.json for `consul agent -dev` on free loopback ports
                          (EXTRA merged in, one level deep), starts it through the caller's
                          start(args, log) so the caller stops it, waits for a raft leader and a
                          Connect CA root, and returns ("127.0.0.1:<http port>", version).
                          Consul 1.14+ gets its gRPC TLS port turned off (1.8 rejects the key).

A script imports it with sys.path pointing at this directory and sys.dont_write_bytecode set,
so no __pycache__ lands in the tree.
"""
import json
import os
import socket
import subprocess
import time
import urllib.request


def free_port():
    # The port is free when this returns; whoever binds it later may lose it to another process.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def consul_version(binary):
    """`1.16.3` for Consul v1.16.3."""
    out = subprocess.run([binary, "version"], capture_output=True, text=True, check=True).stdout
    return out.split()[1].lstrip("v")


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def consul_dev(binary, work, start, node_name, extra=None):
    version = consul_version(binary)
    http_port = free_port()
    cfg = {"node_name": node_name, "data_dir": os.path.join(work, "data"), "bind_addr": "127.0.0.1",
           "client_addr": "127.0.0.1", "advertise_addr": "127.0.0.1",
           # No checkpoint calls to hashicorp.com: these scripts talk to loopback only.
           "disable_update_check": True, "disable_anonymous_signature": True,
           "ports": {"http": http_port, "dns": -1, "serf_lan": free_port(), "serf_wan": -1,
                     "server": free_port(), "grpc": free_port()},
           "connect": {"enabled": True}}
    if tuple(int(x) for x in version.split(".")[:2]) >= (1, 14):
        cfg["ports"]["grpc_tls"] = -1
    for k, v in (extra or {}).items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    path = os.path.join(work, "consul.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    start([binary, "agent", "-dev", "-config-file", path], "consul.log")
    addr = "127.0.0.1:%d" % http_port
    for _ in range(300):
        try:
            if _get("http://%s/v1/status/leader" % addr).strip() not in ("", '""'):
                if json.loads(_get("http://%s/v1/agent/connect/ca/roots" % addr)).get("ActiveRootID"):
                    return addr, version
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("Consul at %s had no leader and CA root after 30 s (log: %s)"
                     % (addr, os.path.join(work, "consul.log")))
