// Client side of FAPI with custody: a private_key_jwt client assertion (RFC 7523), a signed
// request object (RFC 9101) and a DPoP proof (RFC 9449), all signed in the HSM by one ring.
//
//   client_example --addr=unix:/run/custodyd.sock [--ring=clients/acme/private-key-jwt]
//       [--client_id=acme] [--issuer=https://op.example]
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "client/client.h"
#include "client/fapi.h"

ABSL_FLAG(std::string, addr, "", "custodyd address: unix:PATH or HOST:PORT");
ABSL_FLAG(std::string, ring, "clients/acme/private-key-jwt", "the client's signing ring");
ABSL_FLAG(std::string, client_id, "acme", "our client_id at the authorization server");
ABSL_FLAG(std::string, issuer, "https://op.example",
          "the authorization server's issuer identifier");

namespace {

int Fail(const char* what, const absl::Status& status) {
  std::fprintf(stderr, "%s: %s\n", what, status.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "client_example --addr=unix:PATH|HOST:PORT [--ring=R] [--client_id=ID] [--issuer=URL]");
  absl::ParseCommandLine(argc, argv);
  const std::string addr = absl::GetFlag(FLAGS_addr);
  if (addr.empty()) {
    std::fprintf(stderr, "--addr is required (unix:PATH or HOST:PORT)\n");
    return 2;
  }
  using namespace custody::client;  // NOLINT: example brevity
  ChannelOptions channel;
  channel.address = addr;
  auto client = Client::Connect(channel);
  if (!client.ok()) return Fail("connect", client.status());

  // private_key_jwt for the token / PAR endpoint.
  ClientAssertionOptions ca;
  ca.client_id = absl::GetFlag(FLAGS_client_id);
  ca.audience = absl::GetFlag(FLAGS_issuer);
  auto assertion = ClientAssertion(**client, absl::GetFlag(FLAGS_ring), ca);
  if (!assertion.ok()) return Fail("client assertion", assertion.status());
  std::printf("client_assertion (private_key_jwt):\n%s\n\n", assertion->c_str());

  // A signed request object for PAR.
  RequestObjectOptions ro;
  ro.client_id = absl::GetFlag(FLAGS_client_id);
  ro.audience = absl::GetFlag(FLAGS_issuer);
  auto claims = custody::jose::ParseJson(
      R"({"response_type":"code","redirect_uri":"https://acme.example/cb","scope":"openid",)"
      R"("state":"af0ifjsldkj","nonce":"n-0S6_WzA2Mj",)"
      R"("code_challenge":"E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",)"
      R"("code_challenge_method":"S256"})");
  if (!claims.ok()) return Fail("claims", claims.status());
  ro.claims = *claims;
  auto request = RequestObject(**client, absl::GetFlag(FLAGS_ring), ro);
  if (!request.ok()) return Fail("request object", request.status());
  std::printf("request object:\n%s\n\n", request->c_str());

  // A DPoP proof for a resource request bound to an access token.
  DpopProofOptions dp;
  dp.htm = "GET";
  dp.htu = "https://rs.example/accounts?page=2";
  dp.access_token = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU";
  auto proof = DpopProof(**client, absl::GetFlag(FLAGS_ring), dp);
  if (!proof.ok()) return Fail("DPoP proof", proof.status());
  std::printf("DPoP proof:\n%s\n", proof->c_str());
  return 0;
}
