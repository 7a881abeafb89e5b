#!/usr/bin/env bash
# Builds custody, starts custodyd on the embedded default (SoftHSM2 token + metadata under
# .state/, created on first start), creates a demo ES256 key ring, signs a JWT and prints the
# JWS and the JWKS. Idempotent: a second run reuses the running custodyd and the ring.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/build.sh
STATE=.state
ADDR="unix:$PWD/$STATE/custodyd.sock"
CTL=(build/bin/custodyctl --addr="$ADDR")

running() { [ -f "$STATE/custodyd.pid" ] && kill -0 "$(cat "$STATE/custodyd.pid")" 2>/dev/null; }
if ! running; then
  mkdir -p "$STATE" && chmod 700 "$STATE"
  nohup build/bin/custodyd --state_dir="$STATE" --listen="$ADDR" >>"$STATE/custodyd.log" 2>&1 &
  echo $! >"$STATE/custodyd.pid"
  for _ in $(seq 1 100); do
    "${CTL[@]}" --timeout_ms=200 ring list >/dev/null 2>&1 && break
    running || { echo "custodyd did not start; see $STATE/custodyd.log" >&2; tail -5 "$STATE/custodyd.log" >&2; exit 1; }
    sleep 0.1
  done
fi
echo "== custodyd is running (pid $(cat "$STATE/custodyd.pid"), log $STATE/custodyd.log)"

RING=demo/id-token
if ! "${CTL[@]}" ring get "$RING" >/dev/null 2>&1; then
  echo "== creating key ring $RING (ES256, key generated in the SoftHSM2 token)"
  "${CTL[@]}" ring create "$RING" --purpose=sign --alg=ES256 >/dev/null
fi
"${CTL[@]}" ring get "$RING"

now=$(date +%s)
claims=$(printf '{"iss":"https://op.example","sub":"demo-user","aud":"demo-client","iat":%d,"exp":%d}' "$now" $((now + 300)))
echo "== signed JWT (payload: $claims)"
jws=$(printf '%s' "$claims" | "${CTL[@]}" sign "$RING" --typ=JWT)
echo "$jws"
echo "== JWKS"
jwks=$("${CTL[@]}" jwks "$RING")
echo "$jwks"
if [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import jwcrypto' 2>/dev/null; then
  echo "== verified independently with python3-jwcrypto:"
  JWS="$jws" JWKS="$jwks" /usr/bin/python3 - <<'PY'
import json, os
from jwcrypto import jwk, jws
keys = jwk.JWKSet.from_json(os.environ["JWKS"])
token = jws.JWS()
token.deserialize(os.environ["JWS"])
kid = token.jose_header["kid"]
token.verify(keys.get_key(kid), alg="ES256")
print("signature OK, kid", kid, "payload", token.payload.decode())
PY
fi
echo "== stop custodyd with: kill $(cat "$STATE/custodyd.pid")"
