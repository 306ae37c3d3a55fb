#!/usr/bin/env bash
# A self-signed certificate for local trials: deploy/certs/{fullchain,privkey}.pem for NAME.
set -euo pipefail
NAME=${1:-localhost}
DIR=${2:-$(dirname "$0")/certs}
mkdir -p "$DIR"
if [[ $NAME =~ ^[0-9.]+$ || $NAME == *:* ]]; then SAN="IP:$NAME,DNS:localhost,IP:127.0.0.1"; else SAN="DNS:$NAME,DNS:localhost,IP:127.0.0.1"; fi
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=$NAME" \
  -addext "subjectAltName=$SAN" -addext "basicConstraints=critical,CA:FALSE" \
  -addext "extendedKeyUsage=serverAuth" \
  -keyout "$DIR/privkey.pem" -out "$DIR/fullchain.pem" 2>/dev/null
chmod 644 "$DIR/privkey.pem" "$DIR/fullchain.pem"   # read by the container's tern user
echo "self-signed certificate for $NAME in $DIR"
