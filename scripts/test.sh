#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine: install what is missing, build, ctest.
# CUSTODY_SANITIZE=1 builds with ASan+UBSan into build-asan/ and runs the same suite there.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
# npm packages (tests/js, pinned by package-lock.json): `jose`, an independent JOSE implementation
# the interop tests use, and oidc-provider, the authorization server of the end-to-end test.
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
# examples/node's own dependencies (@grpc/grpc-js, @grpc/proto-loader; jose for its test).
(cd examples/node && npm ci --no-audit --no-fund --loglevel=error)
if [ "${CUSTODY_SANITIZE:-0}" = 1 ]; then
  export BUILD_DIR=build-asan
  # Full unwinding: SoftHSM2 and libcrypto have no frame pointers, and a truncated stack would
  # hide the library a suppression names.
  export LSAN_OPTIONS="suppressions=$PWD/tests/lsan.supp:print_suppressions=0:fast_unwind_on_malloc=0"
  export ASAN_OPTIONS="detect_odr_violation=0:abort_on_error=0"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
  scripts/build.sh -DCUSTODY_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug
else
  export BUILD_DIR=${BUILD_DIR:-build}
  scripts/build.sh
fi
cd "$BUILD_DIR"
# Under the sanitizers everything runs several times slower; one test at a time keeps the
# timing-sensitive tests (rotation soak, mTLS deadlines) measuring custody, not contention.
JOBS=2
EXCLUDE=()
if [ "${CUSTODY_SANITIZE:-0}" = 1 ]; then
  JOBS=1
  # Checks that run no custody code, or only measure it, add nothing under the sanitizers: the
  # benchmark smoke run (throughput under ASan is meaningless; the same code paths run in the
  # integration tests), the docs/flags check, the installed package's consumer build, the
  # Prometheus rules, the manifests, the unit file and the OCI image. They run in the normal
  # pass above. The startup stress test starts and kills custodyd 10 times instead of 20: the
  # sanitizers look at the start path, which each start walks; the count is the normal pass's.
  export CUSTODY_STARTUP_STRESS_ITERATIONS=${CUSTODY_STARTUP_STRESS_ITERATIONS:-10}
  # Also left to the normal pass: the conformance cells of the third-party modules (NSS, tpm2,
  # opencryptoki, p11-kit: 216 s under ASan), whose custody code paths the SoftHSM2 cell and the
  # fault-module tests run under the sanitizers, and the Python/Node clients (the bytes they send
  # are the C++ stub's, and MalformedInputTest sends custodyd the hostile ones).
  EXCLUDE=(-E '^(bench_quick|cli_docs|package_consumer|promtool_check_rules|promtool_test_rules|kubernetes_manifests|systemd_unit|oci_image|hsm_conformance_test[.](nss_softokn|tpm2_pkcs11|opencryptoki_swtok|p11_kit_client)|LanguageClientsTest[.].*)$')
fi
ctest --output-on-failure -j "$JOBS" --timeout 900 "${EXCLUDE[@]}"
