#!/usr/bin/env bash
# A private CA and a SuperLink certificate for a TLS Flower federation (docs/flower.md, "TLS").
#
# Usage: scripts/flower_certificates.sh OUT_DIR NAME_OR_IP [NAME_OR_IP ...]
#   every NAME_OR_IP the SuperNodes and the `flwr` CLI use to reach the SuperLink goes into
#   the certificate's subjectAltName (IPv4 addresses as IP:, everything else as DNS:), e.g.
#   scripts/flower_certificates.sh certs server.example.org 203.0.113.7 localhost 127.0.0.1
#
# Writes OUT_DIR/ca.crt (copy to every SuperNode and CLI machine), OUT_DIR/ca.key,
# OUT_DIR/server.pem and OUT_DIR/server.key (these three stay on the SuperLink host).
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "usage: $0 OUT_DIR NAME_OR_IP [NAME_OR_IP ...]" >&2
  exit 2
fi
out=$1
shift
san=""
for host in "$@"; do
  if [[ $host =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
    san+="IP:$host,"
  else
    san+="DNS:$host,"
  fi
done
san=${san%,}
mkdir -p "$out"
cd "$out"
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 365 \
  -subj "/CN=fedalign-ca" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
  -subj "/CN=superlink" 2>/dev/null
printf "subjectAltName=%s\n" "$san" > san.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
  -out server.pem -days 365 -extfile san.ext 2>/dev/null
rm -f server.csr san.ext ca.srl
chmod 600 ca.key server.key
echo "wrote $out/ca.crt, $out/ca.key, $out/server.pem, $out/server.key (SAN: $san)"
