#!/usr/bin/env bash
# Installs the build tree BUILD_DIR into a scratch prefix, then configures, builds and runs the
# consumer project next to this script against it (find_package(custody)).
#   run.sh BUILD_DIR [EXTRA_CXX_FLAGS]   (the sanitizer flags of a sanitized build)
set -euo pipefail
build=$(cd "$1" && pwd)
flags=${2:-}
here=$(cd "$(dirname "$0")" && pwd)
work=$build/package-test
rm -rf "$work"
cmake --install "$build" --prefix "$work/prefix" >"$work.install.log" 2>&1 ||
  { cat "$work.install.log"; exit 1; }
# Nothing of the source tree may leak into the installed package.
src=$(cd "$here/../.." && pwd)
if grep -rl --include='*.cmake' -e "$src" -e "$build" "$work/prefix"; then
  echo "the installed CMake files above name the source or build tree" >&2
  exit 1
fi
cmake -S "$here" -B "$work/build" -G Ninja -DCMAKE_PREFIX_PATH="$work/prefix" \
  -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="$flags"
cmake --build "$work/build"
"$work/build/consumer"
