#!/usr/bin/env bash
# Public-service benchmark (prints figures; not a test). One topology, side by side in one run:
#
#   O 203.0.113.20 (outside host, no agent) ── internet bridge ── S 203.0.113.10 (server)
#                                                   └── R 203.0.113.12 (symmetric NAT)
#                                                        └── H 198.51.100.2 (routing peer)
#                                                             └── L 192.168.50.10 (LAN device)
#
#   direct   O -> S:5201/5020 (a plain TCP connection to the server itself: the ceiling)
#   tern     O -> S:10001/10003, a Tern public service carried by the agent on H to L
#   rathole  O -> S:10002/10004, rathole (plain TCP transport) with its client on H, to L
#
# Throughput: iperf3 TCP, 1 and 8 connections, DUR s, REPEAT rounds interleaved (median shown).
# Set-up time: 200 sequential connects, each until a 1-byte echo from the target (p50/p99).
# CPU: seconds used by the tunnel's processes (server + agent, or rathole server + client).
#   DUR=10 REPEAT=3 scripts/bench/services.sh
# Needs root, iperf3, and rathole (`cargo install rathole --locked`).
set -euo pipefail
umask 077
cd "$(dirname "$0")/../.."
DUR=${DUR:-10}
REPEAT=${REPEAT:-3}
CONNECTS=${CONNECTS:-200}
P=sb$(printf '%04x' $((RANDOM)))
N=$P-n S=$P-s O=$P-o R=$P-r H=$P-h L=$P-l
WORK=$(mktemp -d)
PIDS=()
HZ=$(getconf CLK_TCK)
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for ns in $L $H $R $O $S $N; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap "exit 130" INT TERM
RATHOLE=${RATHOLE:-$(command -v rathole || echo "$HOME/.cargo/bin/rathole")}
for t in iperf3 jq ip nft curl "$RATHOLE"; do command -v "$t" >/dev/null || { echo "need $t"; exit 1; }; done

cargo build -q --release -p tern-management -p tern-agent -p tern-tests --bin tern-server --bin tern --bin tern-nettool
BIN=${CARGO_TARGET_DIR:-target}/release
nsx() { ip netns exec "$@"; }

# --- topology
ip netns add $N; nsx $N ip link set lo up
ip -n $N link add br0 type bridge; ip -n $N link set br0 up
nsx $N sysctl -qw net.bridge.bridge-nf-call-iptables=0 2>/dev/null || true
v=0
veth() { # NS_A IF_A NS_B IF_B
  v=$((v+1))
  ip link add ${P}x$v type veth peer name ${P}y$v
  ip link set ${P}x$v netns $1; ip link set ${P}y$v netns $3
  ip -n $1 link set ${P}x$v name $2; ip -n $1 link set $2 up
  ip -n $3 link set ${P}y$v name $4; ip -n $3 link set $4 up
}
for ns in $S $O $R $H $L; do ip netns add $ns; nsx $ns ip link set lo up; done
i=0
for pair in "$S 203.0.113.10" "$O 203.0.113.20" "$R 203.0.113.12"; do
  set -- $pair; i=$((i+1))
  veth $1 eth0 $N p$i; ip -n $N link set p$i master br0
  ip -n $1 addr add $2/24 dev eth0
done
veth $R eth1 $H eth0
ip -n $R addr add 198.51.100.1/24 dev eth1; ip -n $H addr add 198.51.100.2/24 dev eth0
ip -n $H route add default via 198.51.100.1
nsx $R sysctl -qw net.ipv4.ip_forward=1
nsx $R nft -f - <<'EOF'
table ip nat {
  chain post { type nat hook postrouting priority srcnat; policy accept; oifname "eth0" masquerade random,fully-random; }
}
table inet fw {
  chain input { type filter hook input priority filter; policy accept; iifname "eth0" ct state established,related accept; iifname "eth0" drop; }
  chain forward { type filter hook forward priority filter; policy accept; iifname "eth0" ct state new,invalid drop; }
}
EOF
veth $H eth1 $L eth0
ip -n $H addr add 192.168.50.1/24 dev eth1; ip -n $L addr add 192.168.50.10/24 dev eth0

# --- targets: iperf3 and an echo server on the LAN device, the same on the server (direct)
# (Background processes start with `ip netns exec` itself, which execs them: $! is their PID.)
ip netns exec $L "$BIN/tern-nettool" echo 5020 >/dev/null 2>&1 & PIDS+=($!)
ip netns exec $S "$BIN/tern-nettool" echo 5020 >/dev/null 2>&1 & PIDS+=($!)

# --- tern: server in S, routing peer agent in H, route + services through the API
TERN_ADMIN_PASSWORD=bench-admin-pw ip netns exec $S "$BIN/tern-server" --listen 203.0.113.10:443 \
  --data-dir "$WORK/srv" --relay-udp-listen 203.0.113.10:3478 --relay-public-ip 203.0.113.10 \
  --relay-ports 50000-50999 --public-ports 10000-10099 --log warn,turn::server=off >"$WORK/server.log" 2>&1 &
PIDS+=($!); PID_SERVER=$!
for _ in $(seq 100); do grep -q "Setup key:" "$WORK/server.log" && break; sleep 0.1; done
KEY=$(sed -n 's/.*Setup key: *\([^ ]*\).*/\1/p' "$WORK/server.log")
ip netns exec $H "$BIN/tern" --state-dir "$WORK/h" --run-dir "$WORK/h/run" --interface tern0 --log warn \
  up --management-url http://203.0.113.10:443 --setup-key "$KEY" --hostname gw >"$WORK/gw.log" 2>&1 &
PIDS+=($!); PID_AGENT=$!
for _ in $(seq 100); do
  nsx $H "$BIN/tern" --state-dir "$WORK/h" --run-dir "$WORK/h/run" --interface tern0 status --json >/dev/null 2>&1 && break
  sleep 0.2
done
api() { # METHOD PATH [BODY]
  local tok
  tok=$(nsx $S curl -s -H 'content-type: application/json' -d '{"username":"admin","password":"bench-admin-pw"}' \
    http://203.0.113.10:443/api/auth/login | jq -r .token)
  nsx $S curl -s -X "$1" -H "authorization: Bearer $tok" -H 'content-type: application/json' \
    ${3:+-d "$3"} "http://203.0.113.10:443$2"
}
GW=$(nsx $H "$BIN/tern" --state-dir "$WORK/h" --run-dir "$WORK/h/run" --interface tern0 status --json | jq -r .peer_id)
api POST /api/routes "{\"network\":\"192.168.50.0/24\",\"routing_peer\":\"$GW\",\"groups\":[\"all\"]}" >/dev/null
svc() { api POST /api/services "{\"name\":\"$1\",\"protocol\":\"tcp\",\"public_port\":$2,\"target_ip\":\"192.168.50.10\",\"target_port\":$3,\"allowed_sources\":[\"0.0.0.0/0\"]}" | jq -r .public_address; }
echo "tern services: $(svc iperf 10001 5201) $(svc echo 10003 5020)"

# --- rathole: server in S, client in H (plain TCP transport, as a hand-built reverse tunnel)
cat >"$WORK/rh-server.toml" <<EOF
[server]
bind_addr = "203.0.113.10:2333"
default_token = "bench-token"
[server.services.iperf]
bind_addr = "203.0.113.10:10002"
[server.services.echo]
bind_addr = "203.0.113.10:10004"
EOF
cat >"$WORK/rh-client.toml" <<EOF
[client]
remote_addr = "203.0.113.10:2333"
default_token = "bench-token"
[client.services.iperf]
local_addr = "192.168.50.10:5201"
[client.services.echo]
local_addr = "192.168.50.10:5020"
EOF
RUST_LOG=warn ip netns exec $S "$RATHOLE" --server "$WORK/rh-server.toml" >"$WORK/rh-server.log" 2>&1 & PIDS+=($!); PID_RHS=$!
RUST_LOG=warn ip netns exec $H "$RATHOLE" --client "$WORK/rh-client.toml" >"$WORK/rh-client.log" 2>&1 & PIDS+=($!); PID_RHC=$!

ready() { nsx $O "$BIN/tern-nettool" connects "$1" 1 >/dev/null 2>&1; }
for a in 203.0.113.10:10003 203.0.113.10:10004 203.0.113.10:5020; do
  for _ in $(seq 150); do ready $a && break; sleep 0.2; done
  ready $a || { echo "no path through $a"; tail -5 "$WORK"/*.log; exit 1; }
done

ticks() { local t=0; for p in "$@"; do [ -r /proc/$p/stat ] && t=$((t + $(awk '{print $14+$15}' /proc/$p/stat))); done; echo $t; }
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }
wait_idle() { # until the machine is below 15% busy (other work on the 2 shared cores)
  for _ in $(seq 30); do
    read -r b1 t1 < <(busy); sleep 1; read -r b2 t2 < <(busy)
    [ $(( (b2 - b1) * 100 / (t2 - t1 + 1) )) -lt 15 ] && return 0
  done
}
declare -A GBPS CPU P50 P99
iperf() { # LABEL DEST_IP DEST_PORT SERVER_NS STREAMS PIDS...
  local label=$1 ip=$2 port=$3 ns=$4 st=$5; shift 5
  ip netns exec $ns timeout $((DUR + 20)) iperf3 -s -1 -p 5201 >/dev/null 2>&1 &
  local srv=$!
  sleep 0.3
  local t0; t0=$(ticks "$@")
  local out
  out=$(nsx $O timeout $((DUR + 20)) iperf3 -c $ip -p $port -t $DUR -P $st -J 2>/dev/null || echo '{}')
  local t1; t1=$(ticks "$@")
  wait $srv 2>/dev/null || true
  local g; g=$(echo "$out" | jq -r '(.end.sum_received.bits_per_second // 0) / 1e9 * 100 | round / 100')
  local bytes; bytes=$(echo "$out" | jq -r '(.end.sum_received.bytes // 0)')
  GBPS[$label/$st]+="$g "
  if [ $# -gt 0 ]; then
    CPU[$label/$st]+="$(awk -v t=$((t1 - t0)) -v hz=$HZ -v b="$bytes" 'BEGIN{ if (b > 0) printf "%.2f", t/hz/(b/1e9); else print "-" }') "
  fi
}
median() { tr ' ' '\n' | { grep -v '^$' || true; } | sort -g | awk '{a[NR]=$1} END{ if (NR==0) print "-"; else print a[int((NR+1)/2)] }'; }

echo "bench: DUR=${DUR}s REPEAT=$REPEAT; iperf3 O -> target; CPU-s/GB of the tunnel processes"
paths=(direct tern rathole)
for r in $(seq $REPEAT); do
  for st in 1 8; do
    for k in 0 1 2; do
      p=${paths[$(( (k + r) % 3 ))]}
      wait_idle
      case $p in
        direct) iperf direct 203.0.113.10 5201 $S $st ;;
        tern) iperf tern 203.0.113.10 10001 $L $st $PID_SERVER $PID_AGENT ;;
        rathole) iperf rathole 203.0.113.10 10002 $L $st $PID_RHS $PID_RHC ;;
      esac
    done
  done
  for k in 0 1 2; do
    p=${paths[$(( (k + r) % 3 ))]}
    case $p in direct) a=203.0.113.10:5020 ;; tern) a=203.0.113.10:10003 ;; rathole) a=203.0.113.10:10004 ;; esac
    wait_idle
    out=$(nsx $O "$BIN/tern-nettool" connects $a $CONNECTS)
    P50[$p]+="$(echo "$out" | awk '{print $2}') "; P99[$p]+="$(echo "$out" | awk '{print $4}') "
  done
done
printf '\n| path | 1 conn Gbit/s | 8 conns Gbit/s | CPU-s/GB (1 / 8) | set-up p50 / p99 ms (%s connects, median of rounds) |\n|---|---|---|---|---|\n' "$CONNECTS"
for p in "${paths[@]}"; do
  g1=$(echo "${GBPS[$p/1]}" | median); g8=$(echo "${GBPS[$p/8]}" | median)
  c1=$(echo "${CPU[$p/1]}" | median); c8=$(echo "${CPU[$p/8]}" | median)
  s="$(echo "${P50[$p]}" | median) / $(echo "${P99[$p]}" | median)"
  echo "| $p | $g1 (runs: ${GBPS[$p/1]% }) | $g8 (runs: ${GBPS[$p/8]% }) | $c1 / $c8 | $s |"
done
t1=$(echo "${GBPS[tern/1]}" | median); r1=$(echo "${GBPS[rathole/1]}" | median)
t8=$(echo "${GBPS[tern/8]}" | median); r8=$(echo "${GBPS[rathole/8]}" | median)
echo
echo "tern / rathole throughput: 1 conn $(awk -v a=$t1 -v b=$r1 'BEGIN{printf "%.2fx", a/b}'), 8 conns $(awk -v a=$t8 -v b=$r8 'BEGIN{printf "%.2fx", a/b}')"
echo "set-up p50 (median of $REPEAT rounds): tern $(echo "${P50[tern]}" | median) ms, rathole $(echo "${P50[rathole]}" | median) ms"
