#!/bin/bash
# Initialises the cluster on first start (user/password/db from the environment), then runs it.
set -euo pipefail
: "${POSTGRES_USER:?}" "${POSTGRES_PASSWORD:?}" "${POSTGRES_DB:?}"
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
DATA=/var/lib/postgresql/data/pgdata
mkdir -p "$DATA" && chown -R postgres:postgres /var/lib/postgresql/data
if [ ! -s "$DATA/PG_VERSION" ]; then
  pw=$(mktemp); echo "$POSTGRES_PASSWORD" >"$pw"; chown postgres "$pw"
  su postgres -c "$BIN/initdb -D $DATA -U $POSTGRES_USER --pwfile=$pw --auth-host=scram-sha-256 --auth-local=trust" >/dev/null
  rm -f "$pw"
  echo "host all all 0.0.0.0/0 scram-sha-256" >>"$DATA/pg_hba.conf"
  su postgres -c "$BIN/pg_ctl -D $DATA -o '-c listen_addresses=127.0.0.1' -w start" >/dev/null
  su postgres -c "$BIN/createdb -U $POSTGRES_USER $POSTGRES_DB"
  su postgres -c "$BIN/pg_ctl -D $DATA -w stop" >/dev/null
fi
exec su postgres -c "exec $BIN/postgres -D $DATA -c listen_addresses='*'"
