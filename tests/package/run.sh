#!/usr/bin/env bash
# Installs the build tree BUILD_DIR into scratch prefixes and uses it as projects outside the tree
# would:
#   1. everything (no --component) into one prefix: the installed CMake files name neither the
#      source nor the build tree;
#   2. the client component alone into another: no custodyd, custodyctl or custody.so in it; the
#      consumer project next to this script (find_package(custody)) builds and runs; the example
#      of docs/client-library.md (the block after "<!-- example: sign_and_verify.cc -->") builds
#      from that prefix with CMake and with pkg-config (custody-client.pc), and both binaries
#      sign and verify against a custodyd started from the build tree (not the prefix); every
#      installed header compiles by its prefixed name ("custody/client/client.h") with only the
#      pkg-config flags.
#   run.sh BUILD_DIR [EXTRA_CXX_FLAGS]   (the sanitizer flags of a sanitized build)
set -euo pipefail
build=$(cd "$1" && pwd)
flags=${2:-}
here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/../.." && pwd)
work=$build/package-test
rm -rf "$work"
mkdir -p "$work"
cmake --install "$build" --prefix "$work/prefix" >"$work/install.log" 2>&1 ||
  { cat "$work/install.log"; exit 1; }
# Nothing of the source tree may leak into the installed package.
if grep -rl --include='*.cmake' --include='*.pc' -e "$src" -e "$build" "$work/prefix"; then
  echo "the installed CMake/pkg-config files above name the source or build tree" >&2
  exit 1
fi

client=$work/client-prefix
cmake --install "$build" --component client --prefix "$client" >"$work/install-client.log" 2>&1 ||
  { cat "$work/install-client.log"; exit 1; }
for unwanted in custodyd custodyctl custody.so; do
  if found=$(find "$client" -name "$unwanted" | grep .); then
    echo "the client component installed $found" >&2
    exit 1
  fi
done
libdir=$(dirname "$(find "$client" -name custody-client.pc)")/..
[ -f "$libdir/pkgconfig/custody-client.pc" ] || { echo "no custody-client.pc" >&2; exit 1; }

cmake -S "$here" -B "$work/build" -G Ninja -DCMAKE_PREFIX_PATH="$client" \
  -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="$flags"
cmake --build "$work/build"
"$work/build/consumer"

# The documented example, exactly as docs/client-library.md shows it.
example=$work/example
mkdir -p "$example"
awk '/<!-- example: sign_and_verify.cc -->/ {found=1; next}
     found && /^```cpp/ {copy=1; next}
     copy && /^```/ {exit}
     copy {print}' "$src/docs/client-library.md" >"$example/sign_and_verify.cc"
[ -s "$example/sign_and_verify.cc" ] || { echo "no example block in docs/client-library.md" >&2; exit 1; }
cat >"$example/CMakeLists.txt" <<'EOF'
cmake_minimum_required(VERSION 3.25)
project(sign_and_verify LANGUAGES CXX)
set(CMAKE_CXX_STANDARD 20)
find_package(custody 0.1 CONFIG REQUIRED)
add_executable(sign_and_verify sign_and_verify.cc)
target_link_libraries(sign_and_verify custody::client)
EOF
cmake -S "$example" -B "$example/build" -G Ninja -DCMAKE_PREFIX_PATH="$client" \
  -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="$flags" >/dev/null
cmake --build "$example/build" >/dev/null
# shellcheck disable=SC2046,SC2086
c++ -std=c++20 $flags "$example/sign_and_verify.cc" -o "$example/sign_and_verify_pc" \
  $(PKG_CONFIG_PATH="$libdir/pkgconfig" pkg-config --cflags --libs custody-client)

# Every installed header, by its prefixed name, with nothing but the pkg-config flags: each one
# (and what it includes) is found under PREFIX/include/custody, and none reaches back into the
# source tree or a name an application could collide with.
headers=$work/all_headers.cc
(cd "$client/include" && find custody -name '*.h' -not -path 'custody/third_party/*' | sort |
  sed 's/.*/#include "&"/') >"$headers"
[ "$(grep -c . "$headers")" -ge 20 ] || { echo "too few installed headers:"; cat "$headers"; exit 1; } >&2
grep -q '"custody/client/client.h"' "$headers" || { echo "custody/client/client.h not installed" >&2; exit 1; }
if find "$client/include" -maxdepth 1 -mindepth 1 | grep -v "/custody$"; then
  echo "the client component installed headers outside include/custody (above)" >&2
  exit 1
fi
# shellcheck disable=SC2046
c++ -std=c++20 -fsyntax-only "$headers" \
  $(PKG_CONFIG_PATH="$libdir/pkgconfig" pkg-config --cflags custody-client)

# Against a real custodyd from the build tree, on a ring made with custodyctl.
state=$(mktemp -d)
chmod 700 "$state"
"$build/bin/custodyd" --state_dir="$state" --listen="unix:$state/custodyd.sock" \
  2>"$state/custodyd.log" &
custodyd=$!
trap 'kill $custodyd 2>/dev/null; wait $custodyd 2>/dev/null; rm -rf "$state"' EXIT
addr="unix:$state/custodyd.sock"
for _ in $(seq 100); do
  "$build/bin/custodyctl" --addr="$addr" --timeout_ms=1000 health >/dev/null 2>&1 && break
  sleep 0.1
done
"$build/bin/custodyctl" --addr="$addr" ring create op/id-token --purpose=sign --alg=ES256 >/dev/null
"$example/build/sign_and_verify" "$addr" op/id-token | tee "$work/example-cmake.out"
LD_LIBRARY_PATH="$libdir" "$example/sign_and_verify_pc" "$addr" op/id-token |
  tee "$work/example-pkgconfig.out"
grep -q "^verified: kid .*, sub alice$" "$work/example-cmake.out"
grep -q "^verified: kid .*, sub alice$" "$work/example-pkgconfig.out"
echo "package: client component alone: consumer, example (CMake and pkg-config) ok"
