#!/usr/bin/env bash
# Deployment acceptance (issue 7): images built locally (no registry), the compose stack up with a
# self-signed certificate, two agent containers on separate networks join with the printed setup
# key and ping each other's overlay addresses; the stack restarts with its data; `down -v` leaves
# nothing behind. Skipped (exit 0, with a message) where there is no Docker engine.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
  echo "deploy test skipped: no Docker engine on this machine"
  exit 0
fi
if command -v docker-compose >/dev/null 2>&1; then COMPOSE=(docker-compose); else COMPOSE=(docker compose); fi
deploy/build-base.sh
POSTGRES=1 deploy/build-images.sh >/dev/null
P=terndt$(printf '%04x' $RANDOM)
W=$(mktemp -d)
cp deploy/docker-compose.yml "$W/"
# docker0's address: every container reaches the host (and its published ports) there.
HOST_IP=$(ip -4 -o addr show docker0 | awk '{print $4}' | cut -d/ -f1 | head -1)
[ -n "$HOST_IP" ] || { echo "deploy test: docker0 has no IPv4 address"; exit 1; }
HTTPS=$((20000 + RANDOM % 9000))
RMIN=$((HTTPS + 1)) RMAX=$((HTTPS + 40))
PUB=$((HTTPS + 41))
deploy/gen-selfsigned.sh "$HOST_IP" "$W/certs" >/dev/null
cat >"$W/.env" <<ENV
TERN_PUBLIC_URL=https://$HOST_IP:$HTTPS
TERN_RELAY_PUBLIC_IP=$HOST_IP
TERN_ADMIN_PASSWORD=deploy-test-password
TERN_RELAY_SECRET=$(openssl rand -base64 24)
TERN_HTTPS_PORT=$HTTPS
TERN_TURN_PORT=3478
TERN_RELAY_PORT_MIN=$RMIN
TERN_RELAY_PORT_MAX=$RMAX
TERN_PUBLIC_PORT_MIN=$PUB
TERN_PUBLIC_PORT_MAX=$((PUB + 1))
TERN_CERT_DIR=$W/certs
ENV
compose() { (cd "$W" && "${COMPOSE[@]}" -p "$P" "$@"); }
cleanup() {
  docker rm -f "$P-a1" "$P-a2" >/dev/null 2>&1 || true
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  docker network rm "$P-na" "$P-nb" >/dev/null 2>&1 || true
  rm -rf "$W"
}
trap cleanup EXIT
fail() { echo "deploy test FAILED: $*"; compose logs --tail 50 || true; exit 1; }

compose config -q || fail "docker-compose config"
compose up -d >/dev/null
SRV=$(compose ps -q tern-server)
healthy() {
  for _ in $(seq 60); do
    [ "$(docker inspect -f '{{.State.Health.Status}}' "$SRV")" = healthy ] && return 0
    sleep 1
  done
  fail "tern-server not healthy"
}
healthy
KEY=$(docker logs "$SRV" 2>/dev/null | sed -n 's/.*Setup key: *\([^ ]*\).*/\1/p' | head -1)
[ -n "$KEY" ] || fail "no setup key printed"
docker network create "$P-na" >/dev/null
docker network create "$P-nb" >/dev/null
i=0
for net in "$P-na" "$P-nb"; do
  i=$((i + 1))
  docker run -d --name "$P-a$i" --network "$net" --cap-add NET_ADMIN --device /dev/net/tun \
    -v "$W/certs/fullchain.pem:/ca.pem:ro" -e TERN_CA_FILE=/ca.pem tern/agent:local \
    up --management-url "https://$HOST_IP:$HTTPS" --setup-key "$KEY" --hostname "agent$i" >/dev/null
done
ip_of() {
  for _ in $(seq 60); do
    a=$(docker exec "$1" tern status --json 2>/dev/null | sed -n 's/.*"overlay_address":"\([0-9.]*\)\/.*/\1/p')
    [ -n "$a" ] && { echo "$a"; return 0; }
    sleep 1
  done
  docker logs "$1" | tail -20
  return 1
}
A1=$(ip_of "$P-a1") || fail "agent 1 did not come up"
A2=$(ip_of "$P-a2") || fail "agent 2 did not come up"
ok=""
for _ in $(seq 60); do
  if docker exec "$P-a1" ping -c 1 -W 1 "$A2" >/dev/null 2>&1; then ok=1; break; fi
done
[ -n "$ok" ] || { docker exec "$P-a1" tern status --detail || true; fail "agent1 cannot ping agent2 ($A2)"; }
docker exec "$P-a2" ping -c 3 -W 2 "$A1" >/dev/null || fail "agent2 cannot ping agent1"
echo "deploy: agents $A1 <-> $A2 ping through the compose stack ($(docker exec "$P-a1" tern status --json | sed -n 's/.*"connection":"\([a-z_]*\)".*/\1/p'))"

# Restart with data intact: the registered peers are still there.
# A public service: the server in its container carries a connection from outside to an echo
# server in agent 1's container (perl-base is in every Debian image), through the published range.
docker exec -d "$P-a1" perl -MIO::Socket::INET -e '
  my $l = IO::Socket::INET->new(LocalPort => 7000, Listen => 5, ReuseAddr => 1) or die;
  while (my $c = $l->accept) { while (my $x = <$c>) { print $c "echo: $x" } close $c }'
TOKEN=$(curl -fsk "https://127.0.0.1:$HTTPS/api/auth/login" -H 'content-type: application/json' \
  -d '{"username":"admin","password":"deploy-test-password"}' | sed -n 's/.*"token":"\([^"]*\)".*/\1/p')
curl -fsk "https://127.0.0.1:$HTTPS/api/services" -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' \
  -d "{\"name\":\"agent1-echo\",\"protocol\":\"tcp\",\"public_port\":$PUB,\"target_ip\":\"$A1\",\"target_port\":7000,\"allowed_sources\":[\"0.0.0.0/0\"]}" \
  >/dev/null || fail "create a public service"
echoed=""
for _ in $(seq 30); do
  echoed=$(timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$PUB; echo hello >&3; read -t 4 -r line <&3; echo \"\$line\"" 2>/dev/null || true)
  [ "$echoed" = "echo: hello" ] && break
  sleep 1
done
[ "$echoed" = "echo: hello" ] || { docker logs "$SRV" | tail -20; fail "public service through the container: got '$echoed'"; }
echo "deploy: public service port $PUB reaches agent1's port 7000 through the server container"

compose down >/dev/null
compose up -d >/dev/null
SRV=$(compose ps -q tern-server)
healthy
TOKEN=$(curl -fsk "https://127.0.0.1:$HTTPS/api/auth/login" -H 'content-type: application/json' \
  -d '{"username":"admin","password":"deploy-test-password"}' | sed -n 's/.*"token":"\([^"]*\)".*/\1/p')
PEERS=$(curl -fsk "https://127.0.0.1:$HTTPS/api/peers" -H "authorization: Bearer $TOKEN")
echo "$PEERS" | grep -q '"agent1"' && echo "$PEERS" | grep -q '"agent2"' || fail "peers lost across the restart: $PEERS"
echo "deploy: peers survived a stack restart"
# The console is served by the image over TLS, with its assets and a strict CSP.
curl -fsk "https://127.0.0.1:$HTTPS/" | grep -q '<title>Tern</title>' || fail "console page not served"
curl -fsk -o /dev/null "https://127.0.0.1:$HTTPS/assets/app.js" || fail "console script not served"
curl -fsk -D - -o /dev/null "https://127.0.0.1:$HTTPS/" | grep -qi "content-security-policy: default-src 'self'" \
  || fail "console served without its CSP"
echo "deploy: console served over TLS"

docker rm -f "$P-a1" "$P-a2" >/dev/null
compose down -v >/dev/null
left=$(docker ps -a --format '{{.Names}}' | grep "^$P" || true; docker volume ls --format '{{.Name}}' | grep "^$P" || true)
[ -z "$left" ] || fail "left behind: $left"
echo "deploy: down -v left nothing behind"

# The PostgreSQL profile: the server on PostgreSQL, healthy, data kept across a restart.
cat >>"$W/.env" <<ENV
POSTGRES_PASSWORD=deploy-test-pg
TERN_DATABASE_URL=postgres://tern:deploy-test-pg@postgres/tern
ENV
compose --profile postgres up -d postgres >/dev/null
PG=$(compose ps -q postgres)
for _ in $(seq 60); do [ "$(docker inspect -f '{{.State.Health.Status}}' "$PG")" = healthy ] && break; sleep 1; done
compose --profile postgres up -d >/dev/null
SRV=$(compose ps -q tern-server)
healthy
login() {
  curl -fsk "https://127.0.0.1:$HTTPS/api/auth/login" -H 'content-type: application/json' \
    -d '{"username":"admin","password":"deploy-test-password"}' | sed -n 's/.*"token":"\([^"]*\)".*/\1/p'
}
TOKEN=$(login)
curl -fsk "https://127.0.0.1:$HTTPS/api/groups" -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' \
  -d '{"name":"on-postgres"}' >/dev/null || fail "create group on PostgreSQL"
compose --profile postgres restart >/dev/null
healthy
TOKEN=$(login)
curl -fsk "https://127.0.0.1:$HTTPS/api/groups" -H "authorization: Bearer $TOKEN" | grep -q on-postgres \
  || fail "group lost across a PostgreSQL-profile restart"
docker logs "$SRV" 2>&1 | grep -q "postgres" || true
compose --profile postgres down -v >/dev/null
echo "deploy: PostgreSQL profile works and keeps data"
echo "deploy test passed"
