# Sourced, not run. What the bash scripts that run a throwaway mesh on loopback share:
#   hcc_free_port           prints a loopback port nothing listens on
#   hcc_track PID           stops PID when the script exits (TERM, up to 10 s, then KILL), in
#                           reverse order of tracking; only what the script itself started
#   hcc_stop_tracked        what the EXIT trap runs (call it from your own trap if you have one)
#   hcc_consul_dev DIR [CONSUL_BIN] [EXTRA_JSON]
#                           starts `consul agent -dev` with its data and log in DIR on free
#                           loopback ports (EXTRA_JSON merged into its config), tracks it, waits
#                           for a raft leader and a Connect CA root, and sets HCC_CONSUL_ADDR
#                           (host:port) and HCC_CONSUL_PID. Adapts to the version: Consul 1.14+
#                           gets its gRPC TLS port turned off (1.8 rejects that key).

hcc_tracked=()

hcc_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

hcc_track() { hcc_tracked+=("$1"); }

hcc_stop_tracked() {
  local i p
  for ((i = ${#hcc_tracked[@]} - 1; i >= 0; i--)); do
    kill -TERM "${hcc_tracked[$i]}" 2>/dev/null || true
  done
  for p in "${hcc_tracked[@]}"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  hcc_tracked=()
}

hcc_consul_dev() {
  local dir="$1" bin="${2:-consul}" extra="${3:-{\}}" version modern=0
  version="$("$bin" version 2>/dev/null | head -n 1 | sed -n 's/^Consul v\([0-9.]*\).*/\1/p')"
  [ -n "$version" ] || { echo "cannot tell the version of $bin" >&2; return 1; }
  case "$version" in 1.[0-9].* | 1.1[0-3].*) ;; *) modern=1 ;; esac
  local http
  http="$(hcc_free_port)"
  python3 - "$dir" "$http" "$modern" "$extra" \
    "$(hcc_free_port)" "$(hcc_free_port)" "$(hcc_free_port)" >"$dir/consul.json" <<'PY'
import json, sys
d, http, modern, extra, serf, server, grpc = sys.argv[1:8]
cfg = {
    "node_name": "node1", "datacenter": "dc1", "data_dir": d + "/consul-data",
    "bind_addr": "127.0.0.1", "client_addr": "127.0.0.1", "advertise_addr": "127.0.0.1",
    # No checkpoint calls to hashicorp.com: these scripts talk to loopback only.
    "disable_update_check": True, "disable_anonymous_signature": True,
    "ports": {"http": int(http), "dns": -1, "serf_lan": int(serf), "serf_wan": -1,
              "server": int(server), "grpc": int(grpc)},
    "connect": {"enabled": True},
}
if modern == "1":
    cfg["ports"]["grpc_tls"] = -1
for k, v in json.loads(extra).items():
    if isinstance(v, dict) and isinstance(cfg.get(k), dict):
        cfg[k].update(v)
    else:
        cfg[k] = v
json.dump(cfg, sys.stdout)
PY
  "$bin" agent -dev -config-file "$dir/consul.json" >"$dir/consul.log" 2>&1 &
  HCC_CONSUL_PID=$!
  hcc_track "$HCC_CONSUL_PID"
  HCC_CONSUL_ADDR="127.0.0.1:$http"
  local leader
  for _ in $(seq 300); do
    kill -0 "$HCC_CONSUL_PID" 2>/dev/null || { tail -n 20 "$dir/consul.log" >&2; return 1; }
    leader="$(curl -sf "http://$HCC_CONSUL_ADDR/v1/status/leader" || true)"
    if [ -n "$leader" ] && [ "$leader" != '""' ] &&
      curl -sf "http://$HCC_CONSUL_ADDR/v1/agent/connect/ca/roots" |
      python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin).get("ActiveRootID") else 1)' 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "Consul at $HCC_CONSUL_ADDR had no leader and CA root after 30 s" >&2
  return 1
}
