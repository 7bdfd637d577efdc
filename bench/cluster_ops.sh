#!/bin/bash
# Usage: bench/cluster_ops.sh (needs nginx, redis-server, oha, valgrind; a debug or release
# build in target/). VG=env skips valgrind (Redis op counts only). Writes in /tmp/cm.
# Ops count for the [cluster] bench row: Redis commands and latchkey instructions per request.
set -e
W=/tmp/cm; mkdir -p $W; BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/debug/latchkey}
cd $W
ec="-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
openssl req -x509 $ec -keyout up-ca.key -out up-ca.pem -days 2 -subj "/CN=up ca" 2>/dev/null
openssl req $ec -keyout up.key -out up.csr -subj /CN=127.0.0.1 2>/dev/null
printf "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n" > ext
openssl x509 -req -in up.csr -CA up-ca.pem -CAkey up-ca.key -CAcreateserial -out up.pem -days 2 -extfile ext 2>/dev/null
UP=18443; RP=16390
cat > nginx.conf <<N
worker_processes 1; pid $W/nginx.pid; error_log $W/nginx.err warn; daemon off;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP ssl; ssl_certificate $W/up.pem; ssl_certificate_key $W/up.key;
    location = / { return 200 "hello\n"; } } }
N
nginx -c $W/nginx.conf & NG=$!
redis-server --port $RP --bind 127.0.0.1 --save "" --appendonly no --dir $W >/dev/null & RD=$!
sleep 1
conf() { # name port tail
cat > $W/$1.toml <<C
[proxy]
port = $2
ca_dir = "$W/ca"
allow_private = ["127.0.0.1/32"]
[upstream]
ca_file = "$W/up-ca.pem"
[credentials.bench]
header = "x-api-key"
value = "secret-0123456789"
domains = ["127.0.0.1:$UP"]
requests_per_minute = 1000000000
$3
C
chmod 600 $W/$1.toml
}
conf limited 18001 ""
conf shared 18002 "[cluster]
redis = \"redis://127.0.0.1:$RP/0\""
N=${N:-2000}
for name in limited shared; do
  port=$([ $name = limited ] && echo 18001 || echo 18002)
  redis-cli -p $RP CONFIG RESETSTAT >/dev/null
  RUST_LOG=warn ${VG:-valgrind --tool=callgrind --callgrind-out-file=$W/cg.$name.out} $BIN run --config $W/$name.toml 2>$W/$name.err &
  VP=$!
  for i in $(seq 1 200); do curl -s -o /dev/null http://127.0.0.1:$port/ca.crt && break; sleep 0.5; done
  # warm-up (connection, leaf), then N keep-alive requests on 4 connections
  oha -n 20 -c 1 --no-tui --insecure -x http://127.0.0.1:$port -H "x-api-key: latchkey-bench" https://127.0.0.1:$UP/ >/dev/null
  redis-cli -p $RP CONFIG RESETSTAT >/dev/null
  oha -n $N -c 4 --no-tui --insecure -x http://127.0.0.1:$port -H "x-api-key: latchkey-bench" https://127.0.0.1:$UP/ | grep -E "Success rate|Requests/sec" || true
  echo "$name: redis commands during $N requests:"; redis-cli -p $RP INFO commandstats | grep cmdstat || echo "  (none)"
  kill -INT $VP; wait $VP || true
done
kill $NG $RD; wait 2>/dev/null || true
for name in limited shared; do echo "$name: $(callgrind_annotate $W/cg.$name.out 2>/dev/null | grep -m1 'PROGRAM TOTALS')"; done
