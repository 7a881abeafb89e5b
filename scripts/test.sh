#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine: install what is missing, build, ctest.
# CUSTODY_SANITIZE=1 builds with ASan+UBSan into build-asan/ and runs the same suite there.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
# The npm `jose` package: an independent JOSE implementation the interop tests encrypt with.
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
if [ "${CUSTODY_SANITIZE:-0}" = 1 ]; then
  export BUILD_DIR=build-asan
  scripts/build.sh -DCUSTODY_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug
else
  export BUILD_DIR=${BUILD_DIR:-build}
  scripts/build.sh
fi
cd "$BUILD_DIR"
ctest --output-on-failure -j 2 --timeout 600
