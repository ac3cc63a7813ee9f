#!/usr/bin/env bash
# Side-by-side benchmark of coturn and turnserver on loopback.
#
# Both servers run at once with equivalent configurations (realm bench.local, user alice,
# long-term credentials, relay on 127.0.0.1 with 12,000 ports each (coturn 40000-51999,
# turnserver 52000-63999), loopback peers allowed, no TLS/DTLS, no quotas, default logging to a
# file), and every test drives one, then the other, with the same turnserver-bench run
# (target/release/turnserver-bench, from this repository), the order swapped from one test to
# the next, so that other work on the machine weighs on both alike:
#
#   * allocations: 10,000 setups (401, Allocate, CreatePermission, ChannelBind), 64 at a time,
#     on the freshly started servers: setups per second, and RSS per allocation held;
#   * bursts (closed loop, 8 packets in flight per client, 50 clients): UDP ChannelData with
#     100- and 1200-byte payloads, UDP Send/Data indications, TCP ChannelData 100 and 1200:
#     relayed packets per second and server CPU per relayed packet;
#   * paced: 200 clients x 50 packets/s, UDP ChannelData, 100 bytes: loss, CPU per packet,
#     latency;
#   * peak: paced offered load raised step by step until more than 0.1% is lost (twice in a
#     row); the highest rate relayed with at most 0.1% loss, then latency at half of it, and
#     latency of both at one same load (half of the lower peak);
#   * cross-check: coturn's own turnutils_uclient (-z 0 -c) through each server to
#     turnutils_peer, server CPU per relayed packet;
#   * instructions: with hardware counters, `perf stat -e instructions:u,instructions:k` on the
#     server during the bursts; without them (virtual machines often have none),
#     `valgrind --tool=callgrind` on the server (alone) for two runs that differ only in the
#     number of packets (startup and setup cancel out): user-space instructions per relayed
#     packet, in all and by function.
#
# Every run is bounded; the whole script takes about 4 minutes plus the build (--quick: about
# 2). Everything stays on 127.0.0.1. Results: one table on stdout (and in --out FILE as
# Markdown), the raw JSON of each run in the work directory (kept with --keep).
#
# Usage: scripts/bench.sh [--pin] [--quick] [--no-callgrind] [--out FILE] [--keep]
#   --pin           servers on CPU 0, load generator on CPU 1 (taskset)
#   --quick         shorter runs (a check of the script, not a measurement)
#   --no-callgrind  skip the callgrind instruction counts
#   --out FILE      also write the table and the machine description to FILE
#   --keep          keep the work directory (JSON of every run, logs, callgrind files)
#   --report DIR    print the table again from a kept work directory, running nothing
set -euo pipefail
cd "$(dirname "$0")/.."

PIN=0 QUICK=0 CALLGRIND=1 OUT="" KEEP=0 REPORT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --pin) PIN=1 ;;
    --quick) QUICK=1 ;;
    --no-callgrind) CALLGRIND=0 ;;
    --out) OUT=$2; shift ;;
    --keep) KEEP=1 ;;
    --report) REPORT=$2; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

TARGET=${CARGO_TARGET_DIR:-target}
OURS=$TARGET/release/turnserver
GEN=$TARGET/release/turnserver-bench
COTURN=/usr/bin/turnserver
USER_NAME=alice PASS=wonderland REALM=bench.local
PEER_PORT=3690
declare -A PORT=([coturn]=3678 [turnserver]=3578)
declare -A MIN_PORT=([coturn]=40000 [turnserver]=52000)
declare -A MAX_PORT=([coturn]=51999 [turnserver]=63999)
declare -A PID=([coturn]="" [turnserver]="")
declare -A WRAPPER=([coturn]="" [turnserver]="")

if [ "$QUICK" = 1 ]; then
  BURST_S=2 PACED_S=3 STEP_S=2 ALLOCS=2000 CG_CLIENTS=4 CG_N1=50 CG_N2=300 UC_N=500
else
  BURST_S=5 PACED_S=5 STEP_S=3 ALLOCS=10000 CG_CLIENTS=10 CG_N1=200 CG_N2=1200 UC_N=2000
fi

say() { printf '== %s\n' "$*" >&2; }

# ---------------------------------------------------------------- tools

HW=0
if [ -z "$REPORT" ]; then
  cargo build --release --bins --quiet
  apt_install() {
    apt-get install -y "$@" >/dev/null 2>&1 ||
      { apt-get update >/dev/null 2>&1 && apt-get install -y "$@" >/dev/null 2>&1; }
  }
  if [ ! -x "$COTURN" ] || ! command -v turnutils_uclient >/dev/null; then
    say "installing coturn"
    apt_install coturn
  fi
  command -v jq >/dev/null || apt_install jq
  command -v perf >/dev/null || apt_install linux-perf || true
  if [ "$CALLGRIND" = 1 ] && ! command -v valgrind >/dev/null; then
    apt_install valgrind || CALLGRIND=0
  fi
  # Hardware instruction counters: perf prints "<not supported>" without them.
  if command -v perf >/dev/null; then
    probe=$(perf stat -e instructions:u true 2>&1 || true)
    case $probe in
      *"not supported"* | *"not counted"*) ;;
      *instructions*) HW=1 ;;
    esac
  fi
  # 10,000 allocations need 10,000 relay sockets in a server and as many client sockets here.
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
fi

SRV_PIN=() GEN_PIN=()
if [ "$PIN" = 1 ]; then
  SRV_PIN=(taskset -c 0)
  GEN_PIN=(taskset -c 1)
fi

if [ -n "$REPORT" ]; then
  WORK=$REPORT KEEP=1
  # shellcheck disable=SC1091
  . "$WORK/flags"
else
  WORK=$(mktemp -d /tmp/turnserver-bench.XXXXXX)
fi
PEER_PID=""
cleanup() {
  local p
  for p in "${PID[@]}"; do
    [ -n "$p" ] && kill -KILL "$p" 2>/dev/null || true
  done
  [ -n "$PEER_PID" ] && kill "$PEER_PID" 2>/dev/null || true
  if [ "$KEEP" = 1 ]; then
    [ -n "$REPORT" ] || echo "work directory kept: $WORK" >&2
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

cat >"$WORK/ours.toml" <<EOF
listening-ips = ["127.0.0.1"]
listening-port = ${PORT[turnserver]}
min-port = ${MIN_PORT[turnserver]}
max-port = ${MAX_PORT[turnserver]}
realm = "$REALM"
allow-loopback-peers = true
no-tls = true
no-dtls = true
[users]
$USER_NAME = "$PASS"
EOF

# ---------------------------------------------------------------- servers

# start_server NAME [WRAPPER...]: starts coturn or turnserver (under WRAPPER, e.g. valgrind)
# and waits until a full allocation setup through it succeeds.
start_server() {
  local name=$1
  shift
  WRAPPER[$name]="$*"
  case $name in
    turnserver)
      "${SRV_PIN[@]}" "$@" "$OURS" --config "$WORK/ours.toml" >"$WORK/turnserver.log" 2>&1 &
      ;;
    coturn)
      "${SRV_PIN[@]}" "$@" "$COTURN" -n --listening-ip 127.0.0.1 --listening-port "${PORT[coturn]}" \
        --relay-ip 127.0.0.1 --min-port "${MIN_PORT[coturn]}" --max-port "${MAX_PORT[coturn]}" \
        --lt-cred-mech --user "$USER_NAME:$PASS" --realm "$REALM" --fingerprint \
        --allow-loopback-peers --no-cli --no-tls --no-dtls --total-quota 0 --user-quota 0 \
        --no-stdout-log --log-file "$WORK/coturn.log" --simple-log \
        --pidfile "$WORK/coturn.pid" --userdb "$WORK/coturn.db" >"$WORK/coturn.out" 2>&1 &
      ;;
  esac
  PID[$name]=$!
  local tries=0
  until "$GEN" --server "127.0.0.1:${PORT[$name]}" --user "$USER_NAME" --password "$PASS" \
    --mode alloc --allocations 1 --rto-ms 300 --sends 3 --first-address 16000000 \
    --json >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ $tries -gt 120 ] || ! kill -0 "${PID[$name]}" 2>/dev/null; then
      echo "bench.sh: $name did not start; log:" >&2
      tail -20 "$WORK/$name".{log,out} >&2 2>/dev/null || true
      exit 1
    fi
    sleep 0.5
  done
}

stop_server() {
  local name=$1 p=${PID[$1]} i
  kill -TERM "$p" 2>/dev/null || true
  for i in $(seq 1 240); do
    kill -0 "$p" 2>/dev/null || break
    sleep 0.25
  done
  kill -KILL "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  PID[$name]=""
}

# ---------------------------------------------------------------- runs

ADDR=0
# gen NAME TEST [ARGS...]: one turnserver-bench run against server NAME; its JSON goes to
# $WORK/NAME-TEST.json.
gen() {
  local name=$1 test=$2
  shift 2
  # Something else on the machine may end a server (it has happened): start it again, and
  # say so in the results.
  if ! kill -0 "${PID[$name]}" 2>/dev/null; then
    say "$name is gone before $test (see its log); starting it again"
    echo "$name was gone before $test and was started again" >>"$WORK/restarts.txt"
    wait "${PID[$name]}" 2>/dev/null || true
    # shellcheck disable=SC2086
    start_server "$name" ${WRAPPER[$name]}
  fi
  local pid=${PID[$name]} perf_pid=""
  if [ "$HW" = 1 ]; then
    perf stat -x, -e instructions:u,instructions:k -p "$pid" -o "$WORK/$name-$test.perf" &
    perf_pid=$!
  fi
  "${GEN_PIN[@]}" "$GEN" --server "127.0.0.1:${PORT[$name]}" --user "$USER_NAME" \
    --password "$PASS" --server-pid "$pid" --first-address "$ADDR" --label "$name-$test" \
    --json "$@" >"$WORK/$name-$test.json" || true
  if [ -n "$perf_pid" ]; then
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" 2>/dev/null || true
  fi
  ADDR=$((ADDR + 20000))
  local line
  line=$(jq -r '"\(.label): " + (if .mode == "alloc" then "\(.allocations_per_s|floor) allocations/s, \(.server_process.rss_bytes_per_allocation|floor) B RSS per allocation" else "\(.relayed_pps|floor) relayed/s, loss \(.loss_pct)%, p50 \(.latency_us.p50) us, p99 \(.latency_us.p99) us, server \(.server_process.cpu_us_per_packet) us CPU per packet" end)' \
    "$WORK/$name-$test.json" 2>/dev/null || echo "$name-$test: failed ($(cat "$WORK/$name-$test.json"))")
  say "$line"
}

# The order of the two servers, swapped after every test.
ORDER=(coturn turnserver)
swap() { ORDER=("${ORDER[1]}" "${ORDER[0]}"); }

# run_both TEST [ARGS...]: the same run against each server, in the current order, then swap.
run_both() {
  local name
  for name in "${ORDER[@]}"; do
    gen "$name" "$@"
  done
  swap
}

# j NAME TEST FILTER: a figure from a run's JSON ("-" when missing).
j() {
  jq -r "($3) // \"-\"" "$WORK/$1-$2.json" 2>/dev/null || echo "-"
}

# cpu_ticks PID: utime + stime of a process, in clock ticks.
cpu_ticks() {
  awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0
}

# passes NAME TEST: whether the run lost at most 0.1%.
passes() {
  awk -v l="$(j "$1" "$2" '.loss_pct')" 'BEGIN { exit !(l != "-" && l <= 0.1) }'
}

bench_both() {
  say "starting coturn and turnserver"
  start_server coturn
  start_server turnserver
  run_both alloc --mode alloc --allocations "$ALLOCS" --concurrency 64 --threads 2
  local size
  for size in 100 1200; do
    run_both burst-udp-$size --clients 50 --window 8 --size $size --duration "$BURST_S"
    run_both burst-tcp-$size --clients 50 --window 8 --size $size --duration "$BURST_S" \
      --transport tcp
  done
  run_both burst-udp-ind-100 --clients 50 --window 8 --size 100 --duration "$BURST_S" --indications
  run_both paced-200x50 --clients 200 --rate 50 --size 100 --duration "$PACED_S"

  # Peak: paced offered load in steps relative to each server's burst throughput, both servers
  # step by step in turn, each until it loses more than 0.1% (a failing step is tried once more:
  # other work on the machine can cost a step its packets).
  declare -A peak=([coturn]=0 [turnserver]=0) peak_rate=([coturn]=0 [turnserver]=0)
  declare -A searching=([coturn]=1 [turnserver]=1)
  local f name rate try passed pps
  for f in 0.5 0.7 0.8 0.9 1.0 1.1 1.2 1.35 1.5; do
    for name in "${ORDER[@]}"; do
      [ "${searching[$name]}" = 1 ] || continue
      rate=$(awk -v b="$(j "$name" burst-udp-100 '.round_trips_per_s')" -v f="$f" \
        'BEGIN { printf "%.1f", b * f / 100 }')
      if [ "$rate" = "0.0" ]; then
        searching[$name]=0
        continue
      fi
      passed=0
      for try in a b; do
        gen "$name" "step-$f$try" --clients 100 --rate "$rate" --size 100 --duration "$STEP_S"
        if passes "$name" "step-$f$try"; then
          passed=1
          pps=$(j "$name" "step-$f$try" '.relayed_pps')
          if awk -v p="$pps" -v q="${peak[$name]}" 'BEGIN { exit !(p > q) }'; then
            peak[$name]=$pps peak_rate[$name]=$rate
          fi
          break
        fi
      done
      [ "$passed" = 1 ] || searching[$name]=0
    done
    swap
  done
  for name in "${ORDER[@]}"; do
    echo "${peak[$name]}" >"$WORK/$name-peak.txt"
    if [ "${peak_rate[$name]}" != 0 ]; then
      gen "$name" half-peak --clients 100 --size 100 --duration "$PACED_S" \
        --rate "$(awk -v r="${peak_rate[$name]}" 'BEGIN { printf "%.1f", r / 2 }')"
    fi
  done
  swap
  # The same offered load for both: half of the lower of the two peaks.
  local low
  low=$(awk -v a="${peak_rate[coturn]}" -v b="${peak_rate[turnserver]}" \
    'BEGIN { m = (a < b ? a : b); printf "%.1f", m / 2 }')
  if [ "$low" != "0.0" ]; then
    for name in "${ORDER[@]}"; do
      gen "$name" half-low-peak --clients 100 --size 100 --duration "$PACED_S" --rate "$low"
    done
    swap
  fi

  # Cross-check with coturn's own client: 20 clients, UC_N messages each, as fast as it goes.
  local before after recv lost
  for name in "${ORDER[@]}"; do
    before=$(cpu_ticks "${PID[$name]}")
    timeout 120 turnutils_uclient -u "$USER_NAME" -w "$PASS" -p "${PORT[$name]}" -e 127.0.0.1 \
      -r "$PEER_PORT" -n "$UC_N" -m 20 -l 100 -z 0 -c 127.0.0.1 >"$WORK/$name-uclient.txt" 2>&1 || true
    after=$(cpu_ticks "${PID[$name]}")
    recv=$(grep -o 'tot_recv_msgs=[0-9]*' "$WORK/$name-uclient.txt" | tail -1 | cut -d= -f2 || true)
    lost=$(grep -o 'Total lost packets [0-9]*' "$WORK/$name-uclient.txt" | tail -1 |
      awk '{ print $4 }' || true)
    awk -v r="${recv:-0}" -v t="$((after - before))" -v l="${lost:--}" \
      'BEGIN { printf "%s %s %.3f\n", r, l, (r > 0 ? t * 10000 / (2 * r) : -1) }' \
      >"$WORK/$name-uclient.res"
    say "$name-uclient: received ${recv:-?}, lost ${lost:-?}, $(cut -d' ' -f3 "$WORK/$name-uclient.res") us server CPU per relayed packet"
  done
  stop_server coturn
  stop_server turnserver
}

# callgrind_run NAME TEST COUNT [ARGS...]: the server under callgrind, COUNT packets per client;
# prints "instructions received".
callgrind_run() {
  local name=$1 test=$2 count=$3
  shift 3
  local out="$WORK/cg-$name-$test-$count.out"
  start_server "$name" valgrind --tool=callgrind --callgrind-out-file="$out"
  gen "$name" "cg-$test-$count" --clients "$CG_CLIENTS" --count "$count" --window 2 \
    --duration 120 --stall-ms 5000 --drain-ms 5000 --rto-ms 2000 --threads 1 "$@"
  stop_server "$name"
  local ir
  ir=$(grep -E '^(summary|totals):' "$out" | head -1 | awk '{ print $2 }' || true)
  echo "${ir:-0} $(j "$name" "cg-$test-$count" '.received')"
}

callgrind_server() {
  local name=$1 test=$2
  shift 2
  local a b
  a=$(callgrind_run "$name" "$test" "$CG_N1" "$@")
  b=$(callgrind_run "$name" "$test" "$CG_N2" "$@")
  # Instructions per relayed packet: two relayed packets per round trip.
  echo "$a $b" | awk '{ d = 2 * ($4 - $2); printf "%.0f\n", (d > 0 ? ($3 - $1) / d : -1) }' \
    >"$WORK/$name-ir-$test.txt"
  say "$name: $(cat "$WORK/$name-ir-$test.txt") user-space instructions per relayed packet ($test, callgrind)"
  functions "$name" "$test" "$a" "$b"
}

# functions NAME TEST "IR1 RECV1" "IR2 RECV2": instructions per relayed packet by function,
# from the difference between the two callgrind runs, into $WORK/NAME-ir-TEST-functions.txt.
functions() {
  local name=$1 test=$2 f1 f2 packets
  f1="$WORK/cg-$name-$test-$CG_N1.out" f2="$WORK/cg-$name-$test-$CG_N2.out"
  command -v callgrind_annotate >/dev/null || return 0
  packets=$(echo "$3 $4" | awk '{ print 2 * ($4 - $2) }')
  [ "$packets" -gt 0 ] || return 0
  { callgrind_annotate --auto=no --threshold=100 "$f1" 2>/dev/null | sed 's/^/A /'
    callgrind_annotate --auto=no --threshold=100 "$f2" 2>/dev/null | sed 's/^/B /'; } |
    awk -v p="$packets" '
      /^[AB] +[0-9,]+ +\( *[0-9.]+%\) / {
        ir = $2; gsub(",", "", ir)
        fn = $0; sub(/^[AB] +[0-9,]+ +\( *[0-9.]+%\) +/, "", fn); sub(/ \[[^]]*\]$/, "", fn)
        sub(/^[^:]*:/, "", fn)
        if (fn == "PROGRAM TOTALS") next
        if ($1 == "A") a[fn] += ir; else b[fn] += ir
        seen[fn] = 1
      }
      END { for (f in seen) { d = (b[f] - a[f]) / p; if (d >= 1) printf "%8.1f  %s\n", d, f } }' |
    sort -rn | sed -n '1,60p' >"$WORK/$name-ir-$test-functions.txt"
}

# ---------------------------------------------------------------- the table

# row LABEL COTURN OURS BETTER: BETTER is "lower" or "higher" (the ratio is turnserver/coturn).
row() {
  local ratio
  ratio=$(awk -v c="$2" -v o="$3" 'BEGIN {
    if (c + 0 > 0 && o != "-" && c != "-") printf "%.2f", o / c; else printf "-" }')
  if [ "$4" = "-" ]; then
    printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$ratio"
  else
    printf '| %s | %s | %s | %s (%s is better) |\n' "$1" "$2" "$3" "$ratio" "$4"
  fi
}
fmt() { awk -v v="$1" -v d="${2:-0}" 'BEGIN { if (v == "-" || v == "") print "-"; else printf "%." d "f\n", v }'; }
both() { # both TEST FILTER DECIMALS
  fmt "$(j coturn "$1" "$2")" "$3"
  fmt "$(j turnserver "$1" "$2")" "$3"
}

table() {
  echo "| metric | coturn | turnserver | ratio |"
  echo "|---|---|---|---|"
  local t label c o
  for t in udp-100 udp-1200 udp-ind-100 tcp-100 tcp-1200; do
    case $t in
      udp-100) label="UDP ChannelData 100 B" ;;
      udp-1200) label="UDP ChannelData 1200 B" ;;
      udp-ind-100) label="UDP Send/Data 100 B" ;;
      tcp-100) label="TCP ChannelData 100 B" ;;
      tcp-1200) label="TCP ChannelData 1200 B" ;;
    esac
    mapfile -t v < <(both "burst-$t" '.relayed_pps' 0)
    row "burst, $label: relayed packets/s" "${v[0]}" "${v[1]}" higher
    mapfile -t v < <(both "burst-$t" '.server_process.cpu_us_per_packet' 3)
    row "burst, $label: server CPU us per relayed packet (user+sys)" "${v[0]}" "${v[1]}" lower
    mapfile -t v < <(both "burst-$t" '.server_process.user_us_per_packet' 3)
    row "burst, $label: server user CPU us per relayed packet" "${v[0]}" "${v[1]}" lower
    if [ "$HW" = 1 ]; then
      for k in u k; do
        c=$(awk -F, -v k="instructions:$k" '$3 == k { print $1 }' "$WORK/coturn-burst-$t.perf" 2>/dev/null)
        o=$(awk -F, -v k="instructions:$k" '$3 == k { print $1 }' "$WORK/turnserver-burst-$t.perf" 2>/dev/null)
        c=$(awk -v i="$c" -v p="$(j coturn "burst-$t" '.server_process.relayed_packets')" 'BEGIN { printf "%.0f", i / p }')
        o=$(awk -v i="$o" -v p="$(j turnserver "burst-$t" '.server_process.relayed_packets')" 'BEGIN { printf "%.0f", i / p }')
        row "burst, $label: instructions:$k per relayed packet (perf)" "$c" "$o" lower
      done
    fi
  done
  mapfile -t v < <(both paced-200x50 '.loss_pct' 4)
  row "paced 200 clients x 50/s (UDP, 100 B): loss %" "${v[0]}" "${v[1]}" lower
  mapfile -t v < <(both paced-200x50 '.server_process.cpu_us_per_packet' 3)
  row "paced 200 x 50/s: server CPU us per relayed packet" "${v[0]}" "${v[1]}" lower
  mapfile -t v < <(both paced-200x50 '.latency_us.p50' 1)
  row "paced 200 x 50/s: round-trip latency p50 us" "${v[0]}" "${v[1]}" lower
  mapfile -t v < <(both paced-200x50 '.latency_us.p99' 1)
  row "paced 200 x 50/s: round-trip latency p99 us" "${v[0]}" "${v[1]}" lower
  row "peak relayed packets/s with loss <= 0.1% (UDP, 100 B, paced, 100 clients)" \
    "$(fmt "$(cat "$WORK/coturn-peak.txt" 2>/dev/null || echo -)")" \
    "$(fmt "$(cat "$WORK/turnserver-peak.txt" 2>/dev/null || echo -)")" higher
  mapfile -t v < <(both half-peak '.relayed_pps' 0)
  row "half of each server's peak: offered relayed packets/s" "${v[0]}" "${v[1]}" "-"
  mapfile -t v < <(both half-peak '.latency_us.p50' 1)
  row "half of peak: round-trip latency p50 us" "${v[0]}" "${v[1]}" lower
  mapfile -t v < <(both half-peak '.latency_us.p99' 1)
  row "half of peak: round-trip latency p99 us" "${v[0]}" "${v[1]}" lower
  mapfile -t v < <(both half-low-peak '.relayed_pps' 0)
  row "same load for both (half of the lower peak): offered relayed packets/s" "${v[0]}" "${v[1]}" "-"
  mapfile -t v < <(both half-low-peak '.latency_us.p50' 1)
  row "same load: round-trip latency p50 us" "${v[0]}" "${v[1]}" lower
  mapfile -t v < <(both half-low-peak '.latency_us.p99' 1)
  row "same load: round-trip latency p99 us" "${v[0]}" "${v[1]}" lower
  mapfile -t v < <(both alloc '.allocations_per_s' 0)
  row "allocations/s (401, Allocate, CreatePermission, ChannelBind; 64 at a time)" "${v[0]}" "${v[1]}" higher
  mapfile -t v < <(both alloc '.server_process.cpu_us_per_allocation' 1)
  row "server CPU us per allocation setup" "${v[0]}" "${v[1]}" lower
  mapfile -t v < <(both alloc '.server_process.rss_bytes_per_allocation' 0)
  row "RSS bytes per allocation ($(j turnserver alloc '.allocations') held)" "${v[0]}" "${v[1]}" lower
  if [ "$CALLGRIND" = 1 ]; then
    row "user-space instructions per relayed packet, UDP ChannelData (callgrind)" \
      "$(cat "$WORK/coturn-ir-udp.txt")" "$(cat "$WORK/turnserver-ir-udp.txt")" lower
    row "user-space instructions per relayed packet, UDP Send/Data (callgrind)" \
      "$(cat "$WORK/coturn-ir-udp-ind.txt")" "$(cat "$WORK/turnserver-ir-udp-ind.txt")" lower
  fi
  read -r cr cl cc <"$WORK/coturn-uclient.res"
  read -r or ol oc <"$WORK/turnserver-uclient.res"
  row "turnutils_uclient -z 0 -c, 20 x $UC_N x 100 B: messages echoed" "$cr" "$or" higher
  row "turnutils_uclient: lost packets" "$cl" "$ol" lower
  row "turnutils_uclient: server CPU us per relayed packet" "$cc" "$oc" lower
}

describe() {
  echo "- date: $START; script wall time ${ELAPSED} s"
  echo "- machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, $(free -g | awk '/^Mem:/ { print $2 }') GiB; kernel $(uname -r)"
  echo "- load average before/after: $LOAD_BEFORE / $LOAD_AFTER"
  echo "- coturn: $("$COTURN" --version 2>/dev/null | head -1); turnserver: $("$OURS" --version 2>/dev/null | head -1)"
  echo "- command: scripts/bench.sh$([ "$PIN" = 1 ] && echo ' --pin')$([ "$QUICK" = 1 ] && echo ' --quick')$([ "$CALLGRIND" = 0 ] && echo ' --no-callgrind'); pinning: $([ "$PIN" = 1 ] && echo 'servers on CPU 0, generator on CPU 1' || echo 'none (servers and generator share both cores)')"
  echo "- hardware instruction counters: $([ "$HW" = 1 ] && echo 'yes (perf stat)' || echo 'not supported here (perf prints <not supported>): CPU time from /proc, instructions from callgrind')"
  [ -s "$WORK/restarts.txt" ] && sed 's/^/- note: /' "$WORK/restarts.txt"
  echo "- loopback baseline, no server (generator to its echo peer): $(jq -r '"\(.round_trips_per_s|floor) round trips/s, p50 \(.latency_us.p50) us, p99 \(.latency_us.p99) us"' "$WORK/loopback-direct.json" 2>/dev/null)"
}

if [ -z "$REPORT" ]; then
  START=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
  LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
  turnutils_peer -L 127.0.0.1 -p "$PEER_PORT" >/dev/null 2>&1 &
  PEER_PID=$!
  T0=$SECONDS

  "${GEN_PIN[@]}" "$GEN" --mode direct --clients 50 --window 8 --size 100 --duration "$BURST_S" \
    --label direct --json >"$WORK/loopback-direct.json" || true
  say "loopback baseline (no server): $(jq -r '"\(.round_trips_per_s|floor) round trips/s, p50 \(.latency_us.p50) us"' "$WORK/loopback-direct.json")"

  bench_both
  if [ "$CALLGRIND" = 1 ]; then
    for name in coturn turnserver; do
      callgrind_server "$name" udp
      callgrind_server "$name" udp-ind --indications
    done
  fi
  LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
  ELAPSED=$((SECONDS - T0))
  echo "HW=$HW CALLGRIND=$CALLGRIND UC_N=$UC_N" >"$WORK/flags"
  describe >"$WORK/describe.txt"
fi

{
  echo
  cat "$WORK/describe.txt"
  echo
  table
} | tee "${OUT:-/dev/null}"
