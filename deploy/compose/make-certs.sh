#!/bin/sh
# The compose demo's NATS TLS material, made once by the one-shot `certs` service into the
# named volume it is given (sh make-certs.sh DIR; runs on a host with openssl too):
#   DIR/ca.pem               the CA: nodes verify NATS with it (cluster.tls_ca), and NATS
#                            servers verify each other's routes with it
#   DIR/nats-server.pem      one certificate for nats1..nats3 (client port and routes: NATS
#   DIR/nats-server-key.pem  routes are mutual TLS, so it is for serverAuth and clientAuth)
# The CA's private key is made in a temporary directory and thrown away: nothing can issue
# another certificate this CA signs. The server key is readable by root only (the NATS
# image runs as root; the Switchboard nodes run as uid 10001 and mount the same volume for
# ca.pem). A second run keeps what is there; to make new ones, remove the volume
# (docker compose down -v).
set -eu

out="${1:-/certs}"
if [ -s "$out/ca.pem" ] && [ -s "$out/nats-server.pem" ] && [ -s "$out/nats-server-key.pem" ]; then
  echo "make-certs: $out already holds the certificates"
  exit 0
fi
command -v openssl >/dev/null 2>&1 || apk add --no-cache openssl >/dev/null

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
umask 077

# The CA: P-256, ten years, for signing certificates only.
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/ca-key.pem"
openssl req -x509 -new -key "$tmp/ca-key.pem" -sha256 -days 3650 \
  -subj "/CN=Switchboard compose NATS CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$tmp/ca.pem"

# The servers' certificate: the names the nodes and the routes dial (rustls checks the
# subjectAltName, not the CN).
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/nats-server-key.pem"
openssl req -new -key "$tmp/nats-server-key.pem" -subj "/CN=nats" -out "$tmp/nats-server.csr"
cat > "$tmp/nats-server.ext" <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:nats1, DNS:nats2, DNS:nats3, DNS:localhost, IP:127.0.0.1
EOF
openssl x509 -req -in "$tmp/nats-server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca-key.pem" \
  -CAcreateserial -CAserial "$tmp/ca.srl" -sha256 -days 825 \
  -extfile "$tmp/nats-server.ext" -out "$tmp/nats-server.pem"
openssl verify -CAfile "$tmp/ca.pem" "$tmp/nats-server.pem" >/dev/null

mkdir -p "$out"
cp "$tmp/ca.pem" "$tmp/nats-server.pem" "$tmp/nats-server-key.pem" "$out/"
chmod 0644 "$out/ca.pem" "$out/nats-server.pem"
chmod 0600 "$out/nats-server-key.pem"
echo "make-certs: wrote $out/ca.pem, $out/nats-server.pem, $out/nats-server-key.pem"
