#!/usr/bin/env bash
# Manual interop check: starts turnserver with the demo configuration and relays through it with
# coturn's turnutils_uclient to turnutils_peer, over UDP and TCP, with channels and with Send
# indications. Needs `apt-get install coturn`. Everything stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=target/release/turnserver
port=${PORT:-3478}
peer_port=${PEER_PORT:-3480}

"$bin" --config turnserver.toml.example &
server=$!
turnutils_peer -L 127.0.0.1 -p "$peer_port" >/dev/null 2>&1 &
peer=$!
trap 'kill $server $peer 2>/dev/null || true' EXIT
sleep 0.5

for flags in "" "-s" "-t" "-t -s"; do
  echo "== turnutils_uclient ${flags:-(udp, channels)}"
  # shellcheck disable=SC2086
  timeout 120 turnutils_uclient $flags -u demo -w demo-password -p "$port" \
    -e 127.0.0.1 -r "$peer_port" -n 200 -m 10 -l 1000 127.0.0.1 2>&1 |
    grep -E "Total lost packets|tot_send_msgs=.*tot_recv_msgs" | tail -2
done
