#!/usr/bin/env bash
# Relay benchmark (prints figures; not a test). coturn's turnserver and tern-relay, side by side in
# one run, each driven by the same turnutils_uclient load: client-to-client relaying (-y) of
# 1,200-byte messages, so every message is relayed by the server once. Runs alternate between the
# two servers; medians over REPEAT rounds. Then capacity with our own generator
# (relay/examples/turn_load.rs: PAIRS allocation pairs exchanging ChannelData, unpaced and paced
# in steps of 1.25x until more than 0.1% is lost; turnutils_uclient reports whole seconds and
# saturates before the relay does), for two ways of sending (MODES below). Then the TCP/WebSocket
# relay throughput (plain + TLS).
# Everything stays on 127.0.0.1.
#
#   scripts/bench/relay.sh            # REPEAT=3 CLIENTS=10 MSGS=3000 INTERVAL_MS=1 PAIRS=16 STEP_S=3
#                                     # ORDER="coturn tern" MODES=... (see below)
#   TERN_RELAY=path/to/tern-relay     # measure another build of the relay (an earlier commit's)
set -euo pipefail
cd "$(dirname "$0")/../.."
REPEAT=${REPEAT:-3}
EFF_S=${EFF_S:-5}
CLIENTS=${CLIENTS:-10}
MSGS=${MSGS:-3000}
INTERVAL_MS=${INTERVAL_MS:-1}
LEN=${LEN:-1200}
SECRET=bench-secret-$$
COTURN_PORT=34780
TERN_PORT=34790
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

for t in turnserver turnutils_uclient; do
  command -v $t >/dev/null || { echo "need $t: apt-get install coturn"; exit 1; }
done
cargo build -q --release -p tern-relay --bin tern-relay --example bench_tcp --example turn_load
bin=${CARGO_TARGET_DIR:-target}/release

turnserver -n --listening-ip=127.0.0.1 --listening-port=$COTURN_PORT --relay-ip=127.0.0.1 \
  --min-port=50000 --max-port=54999 --use-auth-secret --static-auth-secret=$SECRET --realm=tern \
  --no-tls --no-dtls --no-tcp --no-cli --allow-loopback-peers --no-multicast-peers \
  --log-file="$work/coturn.log" --simple-log >/dev/null 2>&1 &
pids+=($!); coturn_pid=$!
TERN_RELAY_SECRET=$SECRET "${TERN_RELAY:-$bin/tern-relay}" --udp-listen 127.0.0.1:$TERN_PORT --http-listen 127.0.0.1:0 \
  --public-ip 127.0.0.1 --ports 55000-59999 --allow-peers 127.0.0.0/8 --max-allocations-per-user 1000 \
  --log warn,turn::server=off 2>"$work/tern.log" &
pids+=($!); tern_pid=$!
sleep 1

cpu_s() { awk '{printf "%.2f", ($14+$15)/100}' "/proc/$1/stat"; }

# One uclient run; prints "msgs_per_s loss_pct cpu_s".
run_one() {
  local port=$1 pid=$2 c0 c1 out t lost
  c0=$(cpu_s "$pid")
  out=$(timeout 300 turnutils_uclient -y -c -n "$MSGS" -m "$CLIENTS" -l "$LEN" -z "$INTERVAL_MS" \
        -u bench -W $SECRET -p "$port" 127.0.0.1 2>&1 || true)
  c1=$(cpu_s "$pid")
  t=$(echo "$out" | sed -n 's/.*Total transmit time is \([0-9]*\).*/\1/p' | tail -1)
  lost=$(echo "$out" | sed -n 's/.*Total lost packets [0-9]* (\([0-9.]*\)%.*/\1/p' | tail -1)
  if [ -z "$t" ] || [ -z "$lost" ]; then echo "NA NA NA"; echo "$out" | tail -5 >&2; return; fi
  [ "$t" -lt 1 ] && t=1
  awk -v n=$((CLIENTS * MSGS)) -v t="$t" -v l="$lost" -v c0="$c0" -v c1="$c1" \
    'BEGIN { printf "%.0f %.3f %.2f\n", n*(1-l/100)/t, l, c1-c0 }'
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR==0) print "NA"; else print a[int((NR+1)/2)]}'; }

echo "# relay benchmark $(date -u +%FT%TZ): $CLIENTS clients x $MSGS msgs x $LEN B, interval ${INTERVAL_MS} ms, $REPEAT rounds"
: >"$work/coturn.txt"; : >"$work/tern.txt"
for r in $(seq 1 "$REPEAT"); do
  if [ $((r % 2)) -eq 1 ]; then order="coturn tern"; else order="tern coturn"; fi
  for s in $order; do
    if [ $s = coturn ]; then res=$(run_one $COTURN_PORT $coturn_pid); else res=$(run_one $TERN_PORT $tern_pid); fi
    echo "round $r $s: msgs/s loss% cpu_s = $res"
    echo "$res" >>"$work/$s.txt"
  done
done
printf '\n%-10s %12s %10s %12s\n' server "msgs/s(med)" "loss%(med)" "cpu_s(med)"
for s in coturn tern; do
  printf '%-10s %12s %10s %12s\n' $s "$(cut -d' ' -f1 "$work/$s.txt" | median)" \
    "$(cut -d' ' -f2 "$work/$s.txt" | median)" "$(cut -d' ' -f3 "$work/$s.txt" | median)"
done
paste -d' ' "$work/coturn.txt" "$work/tern.txt" | awk '$1 > 0 && $4 != "NA" { print $4/$1 }' | median \
  | xargs printf 'ratio tern/coturn msgs/s (median of per-round ratios): %s\n'
# Capacity, per way clients send (MODES, "name:turn_load flags" separated by ';'): one datagram
# per send with clients interleaved message by message (any TURN client), and bursts of 8 as one
# UDP GSO send each (how a Tern agent sends relayed WireGuard; a server that did not ask for GRO
# reads them one by one).
MODES=${MODES:-"per-datagram:--burst 1;agent-gso-runs:--burst 8 --gso"}
IFS=';' read -r -a modes <<<"$MODES"
for m in "${modes[@]}"; do
  name=${m%%:*} flags=${m#*:}
  echo
  echo "# TURN capacity, $name clients ($flags): ${PAIRS:-16} allocation pairs, $LEN-byte ChannelData, highest paced rate at <= 0.1% loss"
  # ORDER="tern coturn" runs ours first (the machine warms and cools between runs).
  for s in ${ORDER:-coturn tern}; do
    if [ $s = coturn ]; then port=$COTURN_PORT pid=$coturn_pid; else port=$TERN_PORT pid=$tern_pid; fi
    c0=$(cpu_s "$pid")
    # shellcheck disable=SC2086 # flags are words
    timeout 600 "$bin/examples/turn_load" --server 127.0.0.1:$port --secret $SECRET --pairs "${PAIRS:-16}" \
      --len "$LEN" --seconds "${STEP_S:-3}" $flags >"$work/load-$s.txt" 2>&1 || true
    c1=$(cpu_s "$pid")
    sed "s/^/$s: /" "$work/load-$s.txt" | grep -a -v '^[a-z]*: #'
    echo "$s: server CPU over all steps $(awk -v a="$c0" -v b="$c1" 'BEGIN{printf "%.1f", b-a}') s"
  done
  best() { sed -n 's/^RESULT highest_rate_within_loss \([0-9]*\).*/\1/p' "$work/load-$1.txt"; }
  unpaced() { sed -n 's/^RESULT .*unpaced_delivered \([0-9]*\).*/\1/p' "$work/load-$1.txt"; }
  bound() { grep -q 'sender_bound true' "$work/load-$1.txt" && echo " (tern: the generator could send no faster)" || true; }
  awk -v c="$(best coturn)" -v t="$(best tern)" -v uc="$(unpaced coturn)" -v ut="$(unpaced tern)" \
    -v name="$name" -v note="$(bound tern)" 'BEGIN {
    if (c > 0) printf "ratio tern/coturn, %s, highest rate at <= 0.1%% loss: %.2f (%d vs %d msgs/s)%s\n", name, t / c, t, c, note
    if (uc > 0) printf "ratio tern/coturn, %s, unpaced delivered: %.2f (%d vs %d msgs/s)\n", name, ut / uc, ut, uc
  }'
  # The servers' CPU per relayed message at one rate both carried (0.8x the lower of the two
  # highest rates): how much of a machine each needs, apart from the generator sharing this one.
  common=$(awk -v c="$(best coturn)" -v t="$(best tern)" 'BEGIN { m = (c < t ? c : t); printf "%d", m * 0.8 }')
  if [ "${common:-0}" -gt 0 ]; then
    for s in ${ORDER:-coturn tern}; do
      if [ $s = coturn ]; then port=$COTURN_PORT pid=$coturn_pid; else port=$TERN_PORT pid=$tern_pid; fi
      # Twice at most: the allocations of the round before may still hold the server's
      # per-source request budget (an allocation refused: no figure).
      for attempt in 1 2; do
        [ "$attempt" = 2 ] && sleep 5
        c0=$(cpu_s "$pid")
        # shellcheck disable=SC2086 # flags are words
        timeout 120 "$bin/examples/turn_load" --server 127.0.0.1:$port --secret $SECRET --pairs "${PAIRS:-16}" \
          --len "$LEN" --seconds "${EFF_S:-5}" $flags --fixed "$common" >"$work/fixed-$s.txt" 2>&1 || true
        c1=$(cpu_s "$pid")
        grep -q '^RESULT fixed_rate' "$work/fixed-$s.txt" && break
      done
      awk -v a="$c0" -v b="$c1" -v s=$s -v name="$name" '/^RESULT fixed_rate/ {
        printf "%s, %s, at %d msgs/s for %s s: server CPU %.2f s, %.1f us per message relayed (loss %s%%)\n",
          s, name, $3, '"${EFF_S:-5}"', b - a, (b - a) * 1e6 / ($3 * '"${EFF_S:-5}"'), $9 }' "$work/fixed-$s.txt"
      grep -q '^RESULT fixed_rate' "$work/fixed-$s.txt" || { echo "$s, $name: no figure at $common msgs/s:"; grep -a -m3 -E "panicked|rror" "$work/fixed-$s.txt" || tail -3 "$work/fixed-$s.txt"; }
    done
  fi
done

echo
echo "# TCP/WebSocket relay throughput (two local clients, one direction)"
"$bin/examples/bench_tcp"
