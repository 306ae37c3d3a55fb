#!/usr/bin/env bash
# Starts the machine's PostgreSQL cluster (Debian packaging) and creates a role for Tern's tests.
#   scripts/test-postgres.sh start   # start the cluster, create role tern_test (CREATEDB)
#   scripts/test-postgres.sh env     # print `export TERN_TEST_POSTGRES_URL=...`
set -euo pipefail
PORT="${TERN_TEST_PG_PORT:-5432}"
PASS="tern_test_pw"
case "${1:-}" in
  start)
    ver=$(ls /usr/lib/postgresql | sort -n | tail -1)
    if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -q "^$ver main$"; then
      pg_createcluster "$ver" main >/dev/null
    fi
    pg_ctlcluster "$ver" main start 2>/dev/null || true
    for _ in $(seq 1 50); do
      runuser -u postgres -- pg_isready -q -p "$PORT" && break
      sleep 0.2
    done
    runuser -u postgres -- psql -q -p "$PORT" -v ON_ERROR_STOP=1 <<SQL
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tern_test') THEN
    CREATE ROLE tern_test LOGIN CREATEDB PASSWORD '$PASS';
  END IF;
END \$\$;
SQL
    runuser -u postgres -- psql -q -p "$PORT" -tc "SELECT 1 FROM pg_database WHERE datname = 'tern_test'" | grep -q 1 \
      || runuser -u postgres -- createdb -p "$PORT" -O tern_test tern_test
    echo "postgres: ready on 127.0.0.1:$PORT (role tern_test)" >&2
    ;;
  env)
    echo "export TERN_TEST_POSTGRES_URL=postgres://tern_test:$PASS@127.0.0.1:$PORT/tern_test"
    ;;
  *)
    echo "usage: $0 start|env" >&2
    exit 2
    ;;
esac
