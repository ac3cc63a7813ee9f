#!/usr/bin/env bash
# Soak test: allocations created, refreshed, deleted and expired in churn, with traffic flowing,
# against the release build of turnserver on loopback; then checks that the server's resources
# and counters come back to where they started.
#
#   scripts/soak.sh [DURATION_SECONDS (default 300)] [CLIENTS (default 2000)]
#
# Not part of `cargo test`. Needs Linux (/proc), bash, cargo, awk, ss. Everything stays on
# 127.0.0.0/8: the server listens on 127.0.0.1, relays from 127.0.0.1 (ports 40000-59999), the
# load generator (examples/soak.rs) binds its clients to 127.a.b.c addresses and runs its own UDP
# echo peer on 127.0.0.1.
#
# Steps: build (`cargo build --release --bin turnserver --example soak`); start the server with a
# temporary configuration (default-allocate-lifetime 60, max-allocate-lifetime 120, stale-nonce
# 30 so that refreshes meet 438, allow-loopback-peers, one user, log-level info); record the
# baseline RSS (VmRSS) and open file descriptors; run the load for DURATION seconds, sampling
# RSS, fds and CPU every SAMPLE_EVERY seconds into samples.csv; after the load, wait until every
# allocation has ended (at most max-allocate-lifetime + 30 s: abandoned allocations expire);
# record the final RSS and fds; count the server's "allocation created" and "allocation deleted"
# log lines by reason; print a summary. Ends within DURATION + about 3 minutes (plus the build).
#
# Exit status 1, naming the reason, when:
#   - created != expired + deleted_by_client + connection_closed + active, or active != 0 at
#     the end (the counters do not balance, or allocations outlive their lifetime);
#   - the final fd count differs from the baseline by more than FD_MARGIN (default 2);
#   - the final RSS exceeds the baseline by more than RSS_MARGIN_MB (default 20);
#   - the load generator saw corrupted echoes, responses with bad integrity, or made no
#     allocation at all; or the server died.
# Packet loss is reported, not judged: on a busy machine the server's UDP listener overflows its
# receive buffer; the summary shows how many datagrams the kernel dropped there.
#
# Environment: RSS_MARGIN_MB, FD_MARGIN, SAMPLE_EVERY (10), SOAK_OUT (the directory for the
# server log, samples.csv, client.json and summary.txt; default target/soak/<date>), and
# SOAK_ARGS (extra arguments for the load generator, e.g. "--rate-min 2 --rate-max 10").
set -euo pipefail
cd "$(dirname "$0")/.."

duration=${1:-300}
clients=${2:-2000}
case "$duration$clients" in *[!0-9]*) echo "usage: $0 [DURATION_SECONDS] [CLIENTS]" >&2; exit 2 ;; esac
if [ "$duration" -lt 10 ] || [ "$clients" -lt 1 ]; then
  echo "usage: $0 [DURATION_SECONDS >= 10] [CLIENTS >= 1]" >&2
  exit 2
fi
rss_margin_mb=${RSS_MARGIN_MB:-20}
fd_margin=${FD_MARGIN:-2}
sample_every=${SAMPLE_EVERY:-10}
default_lifetime=60
max_lifetime=120
stale_nonce=30
user=soak
password="soak-$RANDOM$RANDOM"
out=${SOAK_OUT:-target/soak/$(date +%Y%m%d-%H%M%S)}

echo "== building (release)"
cargo build --release --quiet --bin turnserver --example soak
bin=target/release/turnserver
gen=target/release/examples/soak

mkdir -p "$out"
out=$(cd "$out" && pwd)
log=$out/server.log
csv=$out/samples.csv
json=$out/client.json

# Enough descriptors for a relay socket per allocation (live + abandoned, not yet expired) on
# the server and a socket per client in the load generator.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
need=$((clients * 3 + 256))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need" ]; then
  echo "warning: open file limit $(ulimit -n) is below $need; allocations may fail" >&2
fi

server=""
sampler=""
loadgen=""
cleanup() {
  for p in $loadgen $sampler $server; do
    kill "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_free() {
  ! ss -Hlun "sport = :$1" 2>/dev/null | grep -q . && ! ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
}

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$server/status" 2>/dev/null || echo 0; }
fds() { find "/proc/$server/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
# utime + stime of the server, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$server/stat" 2>/dev/null || echo 0; }
count() { grep -c -- "$1" "$log" 2>/dev/null || true; }
alive() { kill -0 "$server" 2>/dev/null; }

# Start the server on a free port (the listener), retrying if the port was taken meanwhile.
for attempt in 1 2 3 4 5; do
  port=$((20000 + RANDOM % 10000))
  port_free "$port" || continue
  cat >"$out/turnserver.toml" <<EOF
listening-ips = ["127.0.0.1"]
listening-port = $port
min-port = 40000
max-port = 59999
realm = "soak.local"
allow-loopback-peers = true
default-allocate-lifetime = $default_lifetime
max-allocate-lifetime = $max_lifetime
stale-nonce = $stale_nonce
log-level = "info"

[users]
$user = "$password"
EOF
  "$bin" --config "$out/turnserver.toml" 2>"$log" >/dev/null &
  server=$!
  for _ in $(seq 100); do
    grep -q "relay ports" "$log" && break
    alive || break
    sleep 0.1
  done
  if alive && grep -q "relay ports" "$log"; then break; fi
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  server=""
done
if [ -z "$server" ]; then
  echo "FAIL: the server did not start; log:" >&2
  cat "$log" >&2
  exit 1
fi
echo "== server pid $server on 127.0.0.1:$port (udp), output in $out"

sleep 1
base_rss=$(rss_kb)
base_fds=$(fds)
echo "== baseline: RSS ${base_rss} kB, ${base_fds} fds"

t0=$(date +%s)
echo "t_s,phase,rss_kb,fds,cpu_ticks,created,deleted" >"$csv"
(
  phase=load
  while alive; do
    [ -e "$out/.drain" ] && phase=drain
    echo "$(($(date +%s) - t0)),$phase,$(rss_kb),$(fds),$(cpu_ticks),$(count 'allocation created'),$(count 'allocation deleted')" >>"$csv"
    sleep "$sample_every"
  done
) &
sampler=$!

snmp() { awk '/^Udp: [0-9]/ {print $2, $4, $6}' /proc/net/snmp; }
read -r udp_in0 udp_err0 udp_rcvbuf0 <<<"$(snmp)"

echo "== load: $clients clients for $duration s"
# shellcheck disable=SC2086
timeout --signal=INT $((duration + 60)) "$gen" --server "127.0.0.1:$port" --user "$user" \
  --password "$password" --duration "$duration" --clients "$clients" \
  --lifetime-min "$default_lifetime" --lifetime-max "$max_lifetime" ${SOAK_ARGS:-} >"$json" &
loadgen=$!
gen_status=0
wait "$loadgen" || gen_status=$?
loadgen=""
read -r udp_in1 udp_err1 udp_rcvbuf1 <<<"$(snmp)"
# Datagrams the kernel dropped at the server's UDP listener (its receive buffer was full).
listener_drops=$(awk -v a="$(printf '0100007F:%04X' "$port")" '$2 == a {print $NF}' /proc/net/udp | head -1)
touch "$out/.drain"
load_end=$(date +%s)

# Abandoned allocations expire at most max-allocate-lifetime after their last refresh.
echo "== waiting for allocations to end (at most $((max_lifetime + 30)) s)"
deadline=$((load_end + max_lifetime + 30))
while alive && [ "$(date +%s)" -lt "$deadline" ]; do
  c=$(count 'allocation created')
  d=$(count 'allocation deleted')
  [ "$c" -eq "$d" ] && break
  sleep 2
done
# Closed relay sockets are released when their tasks next run; let the process settle.
sleep 3
server_alive=yes
alive || server_alive=no
final_rss=$(rss_kb)
final_fds=$(fds)
final_cpu=$(cpu_ticks)
echo "$(($(date +%s) - t0)),final,$final_rss,$final_fds,$final_cpu,$(count 'allocation created'),$(count 'allocation deleted')" >>"$csv"
kill "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
sampler=""
rm -f "$out/.drain"

created=$(count 'allocation created')
expired=$(grep 'allocation deleted' "$log" | grep -cE 'reason="?expired\b' || true)
by_client=$(grep 'allocation deleted' "$log" | grep -cE 'reason="?deleted_by_client\b' || true)
closed=$(grep 'allocation deleted' "$log" | grep -cE 'reason="?connection_closed\b' || true)
deleted=$(count 'allocation deleted')
other=$((deleted - expired - by_client - closed))
active=$((created - deleted))
peak_rss=$(awk -F, 'NR > 1 && $3 > m {m = $3} END {print m + 0}' "$csv")
peak_fds=$(awk -F, 'NR > 1 && $4 > m {m = $4} END {print m + 0}' "$csv")
peak_live=$(awk -F, 'NR > 1 && $6 - $7 > m {m = $6 - $7} END {print m + 0}' "$csv")
refused=$(grep -c 'request refused' "$log" || true)
warnings=$(grep -cE ' (WARN|ERROR) ' "$log" || true)

j() { # a number from the load generator's JSON line
  grep -o "\"$1\":[0-9.]*" "$json" | head -1 | cut -d: -f2
}
jobj() { grep -o "\"$1\":{[^}]*}" "$json" | head -1 | cut -d: -f2-; }

{
  echo "== soak summary ($clients clients, $duration s of load, $(($(date +%s) - t0)) s in all)"
  echo "server (from its log):"
  echo "  allocations created          $created"
  echo "  deleted: expired             $expired"
  echo "  deleted: deleted_by_client   $by_client"
  echo "  deleted: connection_closed   $closed"
  [ "$other" -ne 0 ] && echo "  deleted: other reasons       $other"
  echo "  still active at the end      $active"
  echo "  peak live allocations        $peak_live (sampled)"
  echo "  'request refused' lines      $refused, WARN/ERROR lines $warnings"
  echo "  RSS   baseline ${base_rss} kB, peak ${peak_rss} kB, final ${final_rss} kB ($(((final_rss - base_rss))) kB vs baseline)"
  echo "  fds   baseline ${base_fds}, peak ${peak_fds}, final ${final_fds}"
  echo "  CPU   $((final_cpu / $(getconf CLK_TCK))) s user+system"
  if [ -s "$json" ]; then
    echo "load generator (examples/soak.rs, exit status $gen_status):"
    echo "  client sessions              $(j sessions) (peak $(j peak_active) allocations at once)"
    echo "  allocations made             $(j allocations) (timeouts $(j allocate_timeouts))"
    echo "  refused by code              $(jobj refused)"
    echo "  deleted by client            $(j deleted_by_client) (failed $(j delete_failed))"
    echo "  abandoned (left to expire)   $(j abandoned), vanished early $(j vanished)"
    echo "  refreshes                    $(j refreshes), 438 stale nonce $(j stale_nonce_438), 401 $(j challenges_401)"
    echo "  channel binds                $(j channel_binds)"
    echo "  retransmits / timeouts       $(j retransmits) / $(j timeouts)"
    echo "  datagrams sent               $(j packets_sent) ($(j bytes_sent) bytes)"
    echo "  datagrams echoed back        $(j packets_received) ($(j bytes_received) bytes)"
    echo "  datagrams lost               $(j packets_lost) ($(awk -v l="$(j packets_lost)" -v s="$(j packets_sent)" 'BEGIN {if (s > 0) printf "%.3f", 100 * l / s; else printf "0"}')%; the echo peer got $(j peer_received), echoed $(j peer_echoed))"
    echo "  corrupt / duplicate echoes   $(j packets_corrupt) / $(j packets_duplicate)"
    echo "  bad integrity / unexpected   $(j bad_integrity) / $(j unexpected)"
  else
    echo "load generator: no output (exit status $gen_status)"
  fi
  echo "UDP during the load: system-wide InDatagrams +$((udp_in1 - udp_in0)), RcvbufErrors +$((udp_rcvbuf1 - udp_rcvbuf0)); dropped at the server's listener (receive buffer full) ${listener_drops:-?}"
} | tee "$out/summary.txt"

fail=()
[ "$server_alive" = yes ] || fail+=("the server died (see $log)")
[ "$other" -eq 0 ] || fail+=("$other deletions with an unknown reason")
[ "$created" -eq $((expired + by_client + closed + active)) ] ||
  fail+=("counters do not balance: created $created != expired $expired + deleted $by_client + closed $closed + active $active")
[ "$active" -eq 0 ] ||
  fail+=("$active allocations still active $(($(date +%s) - load_end)) s after the load ended (max lifetime $max_lifetime s)")
[ "$created" -gt 0 ] || fail+=("no allocation was created")
fd_diff=$((final_fds - base_fds))
[ "${fd_diff#-}" -le "$fd_margin" ] ||
  fail+=("open fds did not return to baseline: $final_fds vs $base_fds (margin $fd_margin)")
[ $((final_rss - base_rss)) -le $((rss_margin_mb * 1024)) ] ||
  fail+=("RSS grew by $(((final_rss - base_rss) / 1024)) MB (margin $rss_margin_mb MB)")
if [ -s "$json" ]; then
  [ "$(j packets_corrupt)" = 0 ] || fail+=("$(j packets_corrupt) echoes were corrupted")
  [ "$(j bad_integrity)" = 0 ] || fail+=("$(j bad_integrity) responses failed integrity or fingerprint checks")
else
  fail+=("the load generator printed no totals (exit status $gen_status)")
fi

if [ "${#fail[@]}" -gt 0 ]; then
  for f in "${fail[@]}"; do echo "FAIL: $f"; done | tee -a "$out/summary.txt"
  exit 1
fi
echo "PASS: counters balance, fds back to baseline (±$fd_margin), RSS within $rss_margin_mb MB of baseline" |
  tee -a "$out/summary.txt"
