#!/bin/bash
# Full TLS 1.3 handshakes per second with the server key (a) in custody through the custody
# provider, (b) in a PEM file, (c) in the SoftHSM2 token used in-process through libp11's PKCS#11
# engine (Debian libengine-pkcs11-openssl) — the SAME token object custodyd signs with — for
# ECDSA P-256 and RSA-2048 (RSA-PSS), all in one run on the same machine (issue 16).
#
#   bench/tls_handshakes.sh [BUILD_DIR] [SECONDS]      (defaults: build, 8)
#   CUSTODY_BENCH_TMPFS=1 bench/tls_handshakes.sh ...  custodyd's state (audit log, metadata,
#                                                      token) on /dev/shm: no disk flush cost
#
# Each row: `openssl s_server -tls1_3 -www` with the key, `openssl s_time -new -time SECONDS`
# against it (a new full handshake per connection, no resumption); client, server, custodyd and
# SoftHSM2 share the machine's cores. Prints one line per row and the ratios, and checks that
# the custody rows produced exactly one audit `sign` line per handshake.
set -euo pipefail
build=$(cd "${1:-build}" && pwd)
seconds=${2:-8}
[ -e /usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so ] || {
  echo "libengine-pkcs11-openssl is not installed (apt-get install libengine-pkcs11-openssl)" >&2
  exit 2
}
if [ "${CUSTODY_BENCH_TMPFS:-0}" = 1 ]; then work=$(mktemp -d -p /dev/shm); else work=$(mktemp -d); fi
cleanup() {
  [ -n "${server:-}" ] && kill "$server" 2>/dev/null || true
  [ -n "${custodyd:-}" ] && kill "$custodyd" 2>/dev/null && wait "$custodyd" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

state=$work/state
mkdir -p -m 700 "$state"
"$build/bin/custodyd" --state_dir="$state" --listen="unix:$state/custodyd.sock" \
  2> "$work/custodyd.log" &
custodyd=$!
ctl() { "$build/bin/custodyctl" --addr="unix:$state/custodyd.sock" "$@"; }
for _ in $(seq 1 300); do ctl ring list > /dev/null 2>&1 && break; sleep 0.1; done
ctl ring create bench/ec --purpose=sign --alg=ES256 > /dev/null
ctl ring create bench/rsa --purpose=sign --alg=PS256 --rsa_bits=2048 > /dev/null

export OPENSSL_MODULES=$build/lib/ossl-modules CUSTODY_ADDR=unix:$state/custodyd.sock
prov=(-provider custody -provider default -propquery "?provider=default")
# The engine reaches custodyd's own SoftHSM2 token (same objects); its PIN goes into the engine
# configuration (mode 0600 in the 0700 work directory), not onto a command line.
umask 077
cat > "$work/engine.cnf" <<EOF
openssl_conf = openssl_init
[openssl_init]
engines = engine_section
[engine_section]
pkcs11 = pkcs11_section
[pkcs11_section]
engine_id = pkcs11
MODULE_PATH = /usr/lib/softhsm/libsofthsm2.so
PIN = $(tr -d '\n' < "$state/pin")
init = 0
EOF
export SOFTHSM2_CONF=$state/softhsm2.conf
object_uri() {  # pkcs11: URI of the ACTIVE version's private key of ring $1
  local id
  id=$(ctl ring get "$1" | /usr/bin/python3 -c '
import json, sys
r = json.load(sys.stdin)
v = [v for v in r["versions"] if v["state"] == "ACTIVE"][0]
print("".join("%" + v["token_object_id"][i:i + 2] for i in range(0, len(v["token_object_id"]), 2)))')
  echo "pkcs11:token=custody;id=$id;type=private"
}

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/ec.pem" 2> /dev/null
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$work/rsa.pem" 2> /dev/null
for kind in ec rsa; do
  openssl req -x509 -key "$work/$kind.pem" -subj /CN=pem -days 1 -out "$work/$kind-pem.crt"
  sigopt=()  # a PS256 ring signs RSA-PSS only
  [ "$kind" = rsa ] && sigopt=(-sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:digest)
  openssl req "${prov[@]}" -x509 -key "custody:ring=bench/$kind" "${sigopt[@]}" -subj /CN=custody \
    -days 1 -out "$work/$kind-custody.crt"
done

port=$((20000 + RANDOM % 20000))
run() {  # run NAME CERT KEY-ARGS... → handshakes/s
  local name=$1 cert=$2
  shift 2
  port=$((port + 1))
  openssl s_server "$@" -cert "$cert" -accept "127.0.0.1:$port" -tls1_3 -www -quiet \
    > "$work/server-$name.log" 2>&1 < /dev/null &
  server=$!
  for _ in $(seq 1 100); do
    (echo > "/dev/tcp/127.0.0.1/$port") 2> /dev/null && break
    sleep 0.1
  done
  local out
  out=$(openssl s_time -connect "127.0.0.1:$port" -new -time "$seconds" 2>&1 || true)
  kill "$server" 2> /dev/null || true
  wait "$server" 2> /dev/null || true
  server=
  local n secs
  n=$(echo "$out" | sed -n 's/^\([0-9]*\) connections in \([0-9.]*\) real seconds.*/\1/p' | head -1)
  secs=$(echo "$out" | sed -n 's/^\([0-9]*\) connections in \([0-9.]*\) real seconds.*/\2/p' | head -1)
  if [ -z "$n" ]; then
    echo "$name: no result" >&2
    echo "$out" | tail -5 >&2
    tail -5 "$work/server-$name.log" >&2
    echo 0
    return
  fi
  echo "$n $secs" | awk '{ printf "%.1f\n", $1 / $2 }'
  echo "$n" > "$work/count-$name"
}
audit_signs() {
  cat "$state"/audit/* | grep -c "\"operation\":\"sign\",\"ring\":\"$1\".*\"result\":\"OK\"" || true
}

declare -A rate audited cpu
for kind in ec rsa; do
  rate[$kind-pem]=$(run "$kind-pem" "$work/$kind-pem.crt" -key "$work/$kind.pem")
  before=$(audit_signs "bench/$kind")
  cpu_before=$(awk '{ print $14 + $15 }' "/proc/$custodyd/stat")
  rate[$kind-custody]=$(run "$kind-custody" "$work/$kind-custody.crt" "${prov[@]}" \
    -key "custody:ring=bench/$kind")
  cpu_after=$(awk '{ print $14 + $15 }' "/proc/$custodyd/stat")
  after=$(audit_signs "bench/$kind")
  audited[$kind]=$((after - before))
  cpu[$kind]=$((cpu_after - cpu_before))
  # The engine: same token object as custodyd's ACTIVE version, same certificate.
  rate[$kind-engine]=$(OPENSSL_CONF=$work/engine.cnf run "$kind-engine" "$work/$kind-custody.crt" \
    -engine pkcs11 -keyform engine -key "$(object_uri "bench/$kind")")
done 2> "$work/errors.log" || true
cat "$work/errors.log" >&2

printf '%-10s %12s %12s %12s %14s %14s\n' key custody/s pem/s engine/s custody/pem custody/engine
for kind in ec rsa; do
  c=${rate[$kind-custody]} p=${rate[$kind-pem]} e=${rate[$kind-engine]}
  label=$([ "$kind" = ec ] && echo "ECDSA-P256" || echo "RSA-2048")
  awk -v l="$label" -v c="$c" -v p="$p" -v e="$e" 'BEGIN {
    printf "%-10s %12.1f %12.1f %12.1f %13.2fx %13.2fx\n", l, c, p, e, (p > 0 ? c / p : 0),
      (e > 0 ? c / e : 0) }'
done
status=0
for row in "${!rate[@]}"; do
  [ "${rate[$row]}" = 0 ] && { echo "$row: no result" >&2; status=1; }
done
for kind in ec rsa; do
  n=$(cat "$work/count-$kind-custody" 2> /dev/null || echo 0)
  # s_time counts completed connections; the server may have signed one more that it aborted.
  if [ "${audited[$kind]}" -lt "$n" ] || [ "${audited[$kind]}" -gt $((n + 2)) ]; then
    echo "audit: $kind custody handshakes $n, sign lines ${audited[$kind]}" >&2
    status=1
  else
    echo "audit: $kind custody handshakes $n, sign lines ${audited[$kind]} (one per handshake)"
    awk -v t="${cpu[$kind]}" -v n="$n" -v hz="$(getconf CLK_TCK)" 'BEGIN {
      if (n > 0) printf "custodyd CPU per %s handshake: %.0f us\n", "'"$kind"'", t / hz / n * 1e6 }'
  fi
done
exit $status
