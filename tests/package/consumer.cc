// Built against the installed custody package by tests/package/run.sh. Uses the client library
// without a server: RFC 9449's `ath` example (client/fapi.h, which calls into jose and OpenSSL)
// and the generated custody.v1 API, so that headers, libraries and dependencies all resolve.
#include <cstdio>
#include <string>

#include "custody/client/client.h"
#include "custody/client/fapi.h"
#include "custody/v1/custody.grpc.pb.h"

int main() {
  // RFC 9449 section 7.1: ath of this access token.
  const std::string ath =
      custody::client::AccessTokenHash("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU");
  if (ath != "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo") {
    std::fprintf(stderr, "ath: %s\n", ath.c_str());
    return 1;
  }
  custody::v1::SignJwsRequest request;  // the generated API is usable
  request.set_ring("op/id-token");
  std::printf("ok %s %s\n", ath.c_str(), request.ring().c_str());
  return 0;
}
