#!/usr/bin/env bash
# The versioning check's own test: on copies of custody.proto with one change each, a removed
# field, a renumbered field, a changed type, a removed enum value and a removed RPC must fail;
# an added field and an added RPC must pass.
#   check_compat_selftest.sh PROTOC SOURCE_DIR
set -euo pipefail
protoc=$1
src=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/custody/v1"
proto=$src/proto/custody/v1/custody.proto
check() {  # expected-rc description sed-args...
  local want=$1 what=$2
  shift 2
  sed "$@" "$proto" >"$work/custody/v1/custody.proto"
  cmp -s "$proto" "$work/custody/v1/custody.proto" && { echo "FAIL: '$what' changed nothing"; exit 1; }
  set +e
  /usr/bin/python3 "$src/tests/proto/check_compat.py" --protoc "$protoc" --proto_path "$work" \
    --proto custody/v1/custody.proto --baseline "$src/proto/custody/v1/baseline.txtpb" \
    >"$work/out" 2>&1
  local rc=$?
  set -e
  if [ "$rc" != "$want" ]; then
    echo "FAIL: $what: exit $rc, expected $want"; cat "$work/out"; exit 1
  fi
  echo "ok: $what (exit $rc): $(grep -m1 -e INCOMPATIBLE -e added "$work/out" || true)"
}
check 1 "removed field" -e '/^  string kid = 2;/d'
check 1 "renumbered field" -e 's/^  bool rotated = 2;/  bool rotated = 99;/'
check 1 "changed type" -e 's/^  string etag = 2;/  bytes etag = 2;/'
check 1 "repeated made singular" -e 's/^  repeated string rings = 1;  \/\/ empty: every ring$/  string rings = 1;/'
check 1 "removed enum value" -e '/^  DESTROYING = 8;/d'
check 1 "removed rpc" -e '/rpc SignJwsBatch/d'
check 0 "added field" -e 's/^  string message = 4;$/  string message = 4;\n  uint32 added_for_the_test = 99;/'
check 0 "added rpc" -e 's/^service Signer {$/service Signer {\n  rpc Added(GetJwksRequest) returns (GetJwksResponse);/'
