#!/usr/bin/env bash
# Installs the Debian 12 packages custody builds and tests with, only those missing.
set -euo pipefail
PACKAGES=(
  build-essential cmake ninja-build pkg-config
  libssl-dev openssl
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler grpc-proto
  libabsl-dev libgtest-dev libgmock-dev libsqlite3-dev sqlite3 zlib1g-dev
  libp11-kit-dev softhsm2 opensc
  python3 python3-jwcrypto clang-14 libclang-rt-14-dev
)
# Node.js and npm run the npm `jose` interop tests; a machine that has them (any source) keeps them.
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || PACKAGES+=(nodejs npm)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "custody: installing ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
