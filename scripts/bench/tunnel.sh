#!/usr/bin/env bash
# Tunnel throughput benchmark (prints figures; not a test). iperf3 TCP between two network
# namespaces A and B on one "internet" bridge, side by side in one run:
#   veth (ceiling) | tern direct (ICE host pair) | tern via TURN (direct UDP A<->B dropped)
#   | tern via the TCP relay (all UDP from A dropped) | a plain WireGuard device (wireguard-go)
#   hosted by tern-server to agent b | wireguard-go (Debian)
#   | boringtun-cli -t 1 (crates.io; the WireGuard engine tern is built on)
# with CPU seconds used by the tunnel processes (and per GB moved), and, for the direct tunnels,
# packets per second of 64-byte UDP payloads (iperf3 -u -l 64, unlimited rate; delivered / s).
# Release binaries are built first. PAUSE=N sleeps N s after set-up (to profile by hand).
#   DUR=10 STREAMS="1 4" scripts/bench/tunnel.sh
# Needs root, iperf3, jq; wireguard-go + wireguard-tools and boringtun-cli are optional references
# (apt-get install wireguard-go wireguard-tools; cargo install boringtun-cli --locked).
set -euo pipefail
umask 077
cd "$(dirname "$0")/../.."
DUR=${DUR:-10}
STREAMS=${STREAMS:-1 4}
MTU=${MTU:-1280}
P=tb$(printf '%04x' $((RANDOM)))
N=$P-n S=$P-s A=$P-a B=$P-b
WORK=$(mktemp -d)
PIDS=()
HZ=$(getconf CLK_TCK)
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for ns in $A $B $S $N; do ip netns del "$ns" 2>/dev/null || true; done
  rm -f /var/run/wireguard/$P-*.sock
  rm -rf "$WORK"
}
trap cleanup EXIT
trap "exit 130" INT TERM
for t in iperf3 jq ip nft; do command -v $t >/dev/null || { echo "need $t"; exit 1; }; done

# TERN_BIN=DIR: tern and tern-server from DIR instead (e.g. an earlier build, side by side).
if [ -n "${TERN_BIN:-}" ]; then
  BIN=$TERN_BIN
else
  cargo build -q --release -p tern-management -p tern-agent --bin tern-server --bin tern
  BIN=${CARGO_TARGET_DIR:-target}/release
fi

nsx() { ip netns exec "$@"; }
ip netns add $N; nsx $N ip link set lo up
ip -n $N link add br0 type bridge; ip -n $N link set br0 up
nsx $N sysctl -qw net.bridge.bridge-nf-call-iptables=0 2>/dev/null || true
i=0
for pair in "$S 203.0.113.10" "$A 203.0.113.1" "$B 203.0.113.2"; do
  set -- $pair; i=$((i+1))
  ip netns add $1; nsx $1 ip link set lo up
  ip link add ${P}x$i type veth peer name ${P}y$i
  ip link set ${P}x$i netns $1; ip link set ${P}y$i netns $N
  ip -n $1 link set ${P}x$i name eth0; ip -n $1 link set eth0 up
  ip -n $1 addr add $2/24 dev eth0
  ip -n $N link set ${P}y$i master br0 up
done

# tern: server in S, agents in A and B.
TERN_ADMIN_PASSWORD=bench-admin-pw ip netns exec $S "$BIN/tern-server" --listen 203.0.113.10:443 \
  --data-dir "$WORK/srv" --relay-udp-listen 203.0.113.10:3478 --relay-public-ip 203.0.113.10 \
  --relay-ports 50000-50999 --log warn,turn::server=off >"$WORK/server.log" 2>&1 &
PIDS+=($!); SERVER_PID=$!
for _ in $(seq 100); do grep -q "Setup key:" "$WORK/server.log" && break; sleep 0.1; done
KEY=$(sed -n 's/.*Setup key: *\([^ ]*\).*/\1/p' "$WORK/server.log")
start_tern() { # NS NAME (ip netns exec execs tern: $! is tern's PID)
  ip netns exec $1 "$BIN/tern" --state-dir "$WORK/$2" --run-dir "$WORK/$2/run" --interface tern0 --log warn \
    up --management-url http://203.0.113.10:443 --setup-key "$KEY" --hostname $2 >"$WORK/$2.log" 2>&1 &
  PIDS+=($!)
  eval "PID_$2=$!"
}
start_tern $A a; start_tern $B b
status() { nsx $1 "$BIN/tern" --state-dir "$WORK/$2" --run-dir "$WORK/$2/run" --interface tern0 status --json 2>/dev/null; }
for _ in $(seq 100); do status $B b >/dev/null && break; sleep 0.2; done
TB=$(status $B b | jq -r '.overlay_address' | cut -d/ -f1)
wait_conn() { # KIND
  for _ in $(seq 150); do
    [ "$(status $A a | jq -r '.peers[0].connection + "/" + .peers[0].state')" = "$1/connected" ] && return 0
    sleep 0.2
  done
  echo "tern did not reach $1: $(status $A a)"; return 1
}

ticks() { local t=0; for p in "$@"; do [ -r /proc/$p/stat ] && t=$((t + $(awk '{print $14+$15}' /proc/$p/stat))); done; echo $t; }
measure() { # LABEL DEST PIDS...
  local label=$1 dest=$2; shift 2
  for st in $STREAMS; do
    nsx $B timeout $((DUR + 20)) iperf3 -s -1 >/dev/null 2>&1 &
    local srv=$!
    sleep 0.5
    local t0; t0=$(ticks "$@")
    if nsx $A timeout $((DUR + 20)) iperf3 -c "$dest" -t "$DUR" -P "$st" -J >"$WORK/ip.json" 2>/dev/null; then
      local t1; t1=$(ticks "$@")
      local cpu; cpu=$(awk -v a=$t0 -v b=$t1 -v hz=$HZ 'BEGIN{printf "%.1f", (b-a)/hz}')
      jq -r --arg l "$label" --arg s "$st" --arg cpu "$cpu" \
        '"\($l)\t\($s)\t\(.end.sum_received.bits_per_second/1e9*100|floor/100)\t\(.end.sum_sent.retransmits)\t\($cpu)\t\(if ($cpu|tonumber) > 0 then (($cpu|tonumber) / (.end.sum_received.bytes/1e9) * 10 | round / 10) else "-" end)"' "$WORK/ip.json"
    else
      printf '%s\t%s\tfailed\n' "$label" "$st"
    fi
    wait $srv 2>/dev/null || true
  done
}

# Packets per second of 64-byte UDP payloads through a tunnel (delivered at the receiver).
PPS=()
measure_pps() { # LABEL DEST
  nsx $B timeout $((DUR + 20)) iperf3 -s -1 >/dev/null 2>&1 &
  local srv=$!
  sleep 0.5
  if nsx $A timeout $((DUR + 20)) iperf3 -c "$2" -u -b 0 -l 64 -t "$DUR" -J >"$WORK/pps.json" 2>/dev/null; then
    PPS+=("$(jq -r --arg l "$1" '"\($l)\t\((.end.sum.packets - .end.sum.lost_packets) / .end.sum.seconds | floor)\t\(.end.sum.lost_percent*10|round/10)%"' "$WORK/pps.json")")
  else
    PPS+=("$1	failed")
  fi
  wait $srv 2>/dev/null || true
}

if [ -n "${PAUSE:-}" ]; then echo "A=$A B=$B a=$PID_a b=$PID_b TB=$TB"; sleep $PAUSE; fi
echo "# tunnel benchmark $(date -u +%FT%TZ): $(nproc) cores, iperf3 TCP ${DUR}s, tunnel MTU $MTU"
printf 'path\tstreams\tGbit/s\tretrans\ttunnel_cpu_s\tcpu_s_per_GB (both ends; tern-turn includes the relay)\n'
# The tunnel settles first: ICE checks lost on a link saturated by the veth run could leave it
# on TURN (the agent retries direct only when a path fails).
wait_conn direct
measure veth 203.0.113.2
wait_conn direct && measure tern-direct "$TB" $PID_a $PID_b && measure_pps tern-direct "$TB"
# TURN: drop direct UDP between A and B so ICE settles on relay candidates.
nsx $A nft -f - <<NFT
table inet $P {
  chain output {
    type filter hook output priority 0; policy accept;
    ip daddr 203.0.113.2 meta l4proto udp drop
  }
}
NFT
for _ in $(seq 100); do [ "$(status $A a | jq -r '.peers[0].connection')" != direct ] && break; sleep 0.2; done
if wait_conn turn_relay; then
  echo "# TURN pair at a: $(status $A a | jq -r '.peers[0] | .local_candidate + " -> " + .remote_candidate')"
  measure tern-turn "$TB" $PID_a $PID_b $SERVER_PID
fi
nsx $A nft delete table inet $P
# TCP relay: A sends no UDP at all, so neither ICE nor TURN can work.
nsx $A nft -f - <<NFT
table inet $P {
  chain output {
    type filter hook output priority 0; policy accept;
    meta l4proto udp drop
  }
}
NFT
for _ in $(seq 150); do [ "$(status $A a | jq -r '.peers[0].connection')" = tcp_relay ] && break; sleep 0.2; done
if wait_conn tcp_relay; then
  measure tern-tcp-relay "$TB" $PID_a $PID_b $SERVER_PID
fi
nsx $A nft delete table inet $P

# A plain WireGuard device hosted by the server (wireguard-go in A, added through the API) to
# agent b: WireGuard to tern-server's endpoint, then the server's core for the device and the
# TCP relay to b.
if command -v wireguard-go >/dev/null && command -v wg >/dev/null; then
  API=http://203.0.113.10:443
  TOKEN=$(nsx $S curl -sS -H 'content-type: application/json' -d '{"username":"admin","password":"bench-admin-pw"}' $API/api/auth/login | jq -r .token)
  nsx $S curl -sS -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' \
    -d '{"name":"bench-device"}' $API/api/wireguard-devices >"$WORK/device.json"
  DEVIP=$(jq -r .peer.overlay_ip "$WORK/device.json")
  jq -r .config "$WORK/device.json" >"$WORK/device.conf"
  IFD=$P-wd
  mkdir -p /var/run/wireguard
  ip netns exec $A wireguard-go -f $IFD >"$WORK/$IFD.log" 2>&1 &
  PIDS+=($!); PID_dev=$!
  for _ in $(seq 50); do [ -S /var/run/wireguard/$IFD.sock ] && break; sleep 0.1; done
  nsx $A wg setconf $IFD <(wg-quick strip "$WORK/device.conf")
  nsx $A ip addr add $DEVIP/32 dev $IFD; nsx $A ip link set $IFD mtu $MTU up
  # A's own agent routes the overlay through tern0: the device takes b's address only.
  nsx $A ip route add $TB/32 dev $IFD src $DEVIP
  for _ in $(seq 50); do nsx $A ping -c1 -W1 -I $DEVIP $TB >/dev/null 2>&1 && break; sleep 0.2; done
  measure wg-device-via-server "$TB" $PID_dev $PID_b $SERVER_PID
  nsx $A ip link del $IFD
fi

if command -v wireguard-go >/dev/null && command -v wg >/dev/null; then
  wg genkey >"$WORK/ka"; wg genkey >"$WORK/kb"
  mkdir -p /var/run/wireguard
  start_wg() { # NS IF CMD...
    local ns=$1 ifn=$2; shift 2
    ip netns exec $ns "$@" $ifn >"$WORK/$ifn.log" 2>&1 &
    PIDS+=($!); LASTPID=$!
    for _ in $(seq 50); do [ -S /var/run/wireguard/$ifn.sock ] && return 0; sleep 0.1; done
    return 1
  }
  setup_ref() { # LABEL IFPREFIX PORT NET CMD...
    local label=$1 ifa=$P-$2a ifb=$P-$2b port=$3 net=$4; shift 4
    start_wg $A $ifa "$@" || { echo "$label: did not start"; return; }; local pa=$LASTPID
    start_wg $B $ifb "$@" || { echo "$label: did not start"; return; }; local pb=$LASTPID
    nsx $A wg set $ifa private-key "$WORK/ka" listen-port $port peer "$(wg pubkey <"$WORK/kb")" endpoint 203.0.113.2:$port allowed-ips $net.2/32
    nsx $B wg set $ifb private-key "$WORK/kb" listen-port $port peer "$(wg pubkey <"$WORK/ka")" endpoint 203.0.113.1:$port allowed-ips $net.1/32
    nsx $A ip addr add $net.1/24 dev $ifa; nsx $A ip link set $ifa mtu $MTU up
    nsx $B ip addr add $net.2/24 dev $ifb; nsx $B ip link set $ifb mtu $MTU up
    sleep 2
    measure "$label" $net.2 $pa $pb
    measure_pps "$label" $net.2
  }
  setup_ref wireguard-go g 51820 10.77.1 wireguard-go -f
  BT=$(command -v boringtun-cli || echo "$HOME/.cargo/bin/boringtun-cli")
  if [ -x "$BT" ]; then
    setup_ref boringtun-cli-t1 b 51821 10.77.2 env WG_SUDO=1 "$BT" -f --disable-drop-privileges --threads 1
  else
    echo "(boringtun-cli not installed: cargo install boringtun-cli --locked)"
  fi
else
  echo "(wireguard-go/wg not installed: apt-get install wireguard-go wireguard-tools)"
fi

echo
printf 'path\tpps (64-byte UDP payloads, delivered)\tloss\n'
for l in "${PPS[@]}"; do echo "$l"; done
