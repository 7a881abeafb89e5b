#!/usr/bin/env bash
# Three custodyd replicas on one local PostgreSQL 15 and one shared SoftHSM2 token, then a
# failover: a ring created on replica 0 signs on 1 and 2, replica 1 is killed, custodyctl with
# every replica's address keeps signing. State in .state-ha/ (removed first); everything is
# stopped at the end. See docs/replicas.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/build.sh >/dev/null

ROOT="$PWD/.state-ha"
PGBIN=/usr/lib/postgresql/15/bin
rm -rf "$ROOT"
mkdir -p "$ROOT/pg"
RUN_AS=()
if [ "$(id -u)" -eq 0 ]; then
  # PostgreSQL refuses to run as root: the throw-away cluster belongs to nobody.
  chown nobody:nogroup "$ROOT/pg"
  RUN_AS=(setpriv --reuid=nobody --regid=nogroup --clear-groups)
fi
chmod 0700 "$ROOT/pg"
PASSWORD="$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')"
umask 077
printf '%s\n' "$PASSWORD" >"$ROOT/pg/initdb-password"
printf '%s\n' "$PASSWORD" >"$ROOT/pg-password"   # custodyd reads it (mode 0600), never argv
[ "$(id -u)" -eq 0 ] && chown nobody:nogroup "$ROOT/pg/initdb-password"
(cd "$ROOT/pg" && "${RUN_AS[@]}" "$PGBIN/initdb" -D "$ROOT/pg/data" -U custody -A scram-sha-256 \
  --pwfile="$ROOT/pg/initdb-password" -E UTF8 --locale=C >"$ROOT/pg/initdb.log")
rm -f "$ROOT/pg/initdb-password"
(cd "$ROOT/pg" && "${RUN_AS[@]}" "$PGBIN/pg_ctl" -D "$ROOT/pg/data" -l "$ROOT/pg/server.log" -w \
  -o "-k $ROOT/pg -c listen_addresses=" start >/dev/null)
SOCKDIR_URI="$(printf '%s' "$ROOT/pg" | sed 's|/|%2F|g')"
METADATA="postgresql://custody@$SOCKDIR_URI/postgres"

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  (cd "$ROOT/pg" && "${RUN_AS[@]}" "$PGBIN/pg_ctl" -D "$ROOT/pg/data" -m fast stop >/dev/null) || true
}
trap cleanup EXIT

start_replica() {  # N [extra flags...]
  local n=$1
  shift
  mkdir -p "$ROOT/r$n"
  build/bin/custodyd --state_dir="$ROOT/r$n" --metadata="$METADATA" \
    --metadata_password_file="$ROOT/pg-password" --replica_id="r$n" "$@" \
    2>>"$ROOT/r$n/custodyd.log" &
  PIDS[$n]=$!
  for _ in $(seq 100); do [ -S "$ROOT/r$n/custodyd.sock" ] && break; sleep 0.1; done
}
# Replica 0 creates the embedded token; 1 and 2 use the same token directory and PIN.
start_replica 0
for _ in $(seq 100); do [ -f "$ROOT/r0/pin" ] && break; sleep 0.1; done
export SOFTHSM2_CONF="$ROOT/r0/softhsm2.conf"
for n in 1 2; do
  start_replica "$n" --pkcs11_module=/usr/lib/softhsm/libsofthsm2.so --token_label=custody \
    --pin_file="$ROOT/r0/pin"
done
sleep 1
ALL="unix:$ROOT/r0/custodyd.sock,unix:$ROOT/r1/custodyd.sock,unix:$ROOT/r2/custodyd.sock"
ctl() { build/bin/custodyctl "$@"; }

echo "== ring created on replica 0"
ctl --addr="unix:$ROOT/r0/custodyd.sock" ring create op/id-token --purpose=sign --alg=ES256 >/dev/null
sleep 0.2
for n in 1 2; do
  echo "== signed on replica $n:"
  echo -n '{"sub":"alice"}' | ctl --addr="unix:$ROOT/r$n/custodyd.sock" sign op/id-token --typ=JWT
done
echo "== killing replica 1 (SIGKILL)"
kill -9 "${PIDS[1]}"
for i in 1 2 3; do
  echo "== signed through every replica's address, call $i:"
  echo -n '{"sub":"bob"}' | ctl --addr="$ALL" sign op/id-token --typ=JWT
done
echo "== JWKS (any replica):"
ctl --addr="$ALL" jwks op/id-token
echo "== audit chains of the replicas:"
ctl audit verify "$ROOT"/r*/audit/audit-r*.jsonl
