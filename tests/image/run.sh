#!/usr/bin/env bash
# The OCI image test (ctest: oci_image): builds the image with deploy/image/build.sh from the
# Debian mirror, then runs the image's own custodyd and custodyctl from its filesystem with
# chroot (containers cannot be run in this sandbox: crun cannot set RLIMIT_NOFILE there), as
# the image's user 10001, on the embedded default: creates a ring, signs, and verifies the JWS
# with python3-jwcrypto outside the image. Checks the image has no shell and that custodyd runs
# as non-root. Exit 77 (ctest: skipped) when mmdebstrap is missing or the mirror is unreachable.
#
# usage: tests/image/run.sh SOURCE_DIR BUILD_DIR
set -euo pipefail
SRC=$1
BUILD=$2
command -v mmdebstrap >/dev/null || { echo "SKIP: mmdebstrap not installed (scripts/deps.sh)"; exit 77; }
MIRROR=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
if ! /usr/bin/python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/dists/bookworm/InRelease', timeout=15)" "$MIRROR" 2>/dev/null; then
  echo "SKIP: the Debian mirror $MIRROR is unreachable"
  exit 77
fi
WORK=$(mktemp -d)
PID=
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; [ -f "$WORK/custodyd.log" ] && tail -20 "$WORK/custodyd.log"; exit 1; }

start=$(date +%s)
"$SRC/deploy/image/build.sh" "$BUILD" "$WORK/out" 2>&1 | tee "$WORK/build.log"
echo "image built in $(( $(date +%s) - start )) s"
ROOT=$WORK/root
mkdir "$ROOT"
tar -xf "$WORK/out/rootfs.tar" -C "$ROOT"

# No shell, and only the two binaries of ours.
for sh in bin/sh bin/bash bin/dash usr/bin/sh usr/bin/bash usr/bin/dash; do
  [ ! -e "$ROOT/$sh" ] || fail "the image has a shell: /$sh"
done
[ -x "$ROOT/usr/bin/custodyd" ] && [ -x "$ROOT/usr/bin/custodyctl" ] || fail "binaries missing"
grep -q '^custody:x:10001:10001:' "$ROOT/etc/passwd" || fail "no custody user"

# custodyd of the image, as the image's user, on the embedded default.
SOCK=/var/lib/custody/custodyd.sock
ctl() { chroot --userspec=10001:10001 "$ROOT" /usr/bin/custodyctl --addr=unix:$SOCK "$@"; }
chroot --userspec=10001:10001 "$ROOT" /usr/bin/custodyd --state_dir=/var/lib/custody \
  >"$WORK/custodyd.log" 2>&1 &
PID=$!
for _ in $(seq 1 100); do
  grep -q custodyd.ready "$WORK/custodyd.log" 2>/dev/null && break
  kill -0 "$PID" 2>/dev/null || fail "custodyd exited"
  sleep 0.2
done
grep -q custodyd.ready "$WORK/custodyd.log" || fail "custodyd not ready"
[ "$(stat -c %u /proc/$PID)" = 10001 ] || fail "custodyd does not run as 10001"
[ "$(ctl health)" = SERVING ] || fail "health"
ctl ring create image/es256 --purpose=sign --alg=ES256 >/dev/null || fail "ring create"
printf '{"sub":"image-test"}' | ctl sign image/es256 --typ=JWT >"$WORK/jws" || fail "sign"
ctl jwks image/es256 >"$WORK/jwks" || fail "jwks"
out=$(/usr/bin/python3 "$SRC/tests/tools/jwcrypto_verify.py" "$WORK/jwks" "$WORK/jws" ES256) ||
  fail "the JWS does not verify with python3-jwcrypto"
[ "$(echo "$out" | tail -1)" = '{"sub":"image-test"}' ] || fail "payload: $out"
# The token and the key live in the image's state directory, owned by the image's user.
[ "$(stat -c %u "$ROOT/var/lib/custody/tokens")" = 10001 ] || fail "token not owned by 10001"
echo "image: custodyd (uid 10001, no shell in the image) signed an ES256 JWS that python3-jwcrypto verified"
grep -h "custody image:" "$WORK/build.log"
