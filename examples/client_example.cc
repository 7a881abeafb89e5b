// Client side of FAPI with custody: a private_key_jwt client assertion (RFC 7523), a signed
// request object (RFC 9101) and a DPoP proof (RFC 9449), all signed in the HSM by one ring.
//
//   client_example --addr=unix:/run/custodyd.sock [--ring=clients/acme/private-key-jwt]
//       [--client_id=acme] [--issuer=https://op.example]
#include <cstdio>
#include <string>

#include "client/client.h"
#include "client/fapi.h"

namespace {

struct Flags {
  std::string addr;
  std::string ring = "clients/acme/private-key-jwt";
  std::string client_id = "acme";
  std::string issuer = "https://op.example";
};

bool ParseFlags(int argc, char** argv, Flags& flags) {
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&](const char* name, std::string& out) {
      std::string prefix = std::string("--") + name + "=";
      if (arg.rfind(prefix, 0) != 0) return false;
      out = arg.substr(prefix.size());
      return true;
    };
    if (!value("addr", flags.addr) && !value("ring", flags.ring) &&
        !value("client_id", flags.client_id) && !value("issuer", flags.issuer)) {
      std::fprintf(stderr, "unknown flag %s\n", argv[i]);
      return false;
    }
  }
  return !flags.addr.empty();
}

int Fail(const char* what, const absl::Status& status) {
  std::fprintf(stderr, "%s: %s\n", what, status.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  Flags flags;
  if (!ParseFlags(argc, argv, flags)) {
    std::fprintf(stderr,
                 "usage: %s --addr=unix:PATH|HOST:PORT [--ring=R] [--client_id=ID] "
                 "[--issuer=URL]\n",
                 argv[0]);
    return 2;
  }
  using namespace custody::client;  // NOLINT: example brevity
  ChannelOptions channel;
  channel.address = flags.addr;
  auto client = Client::Connect(channel);
  if (!client.ok()) return Fail("connect", client.status());

  // private_key_jwt for the token / PAR endpoint.
  ClientAssertionOptions ca;
  ca.client_id = flags.client_id;
  ca.audience = flags.issuer;
  auto assertion = ClientAssertion(**client, flags.ring, ca);
  if (!assertion.ok()) return Fail("client assertion", assertion.status());
  std::printf("client_assertion (private_key_jwt):\n%s\n\n", assertion->c_str());

  // A signed request object for PAR.
  RequestObjectOptions ro;
  ro.client_id = flags.client_id;
  ro.audience = flags.issuer;
  auto claims = custody::jose::ParseJson(
      R"({"response_type":"code","redirect_uri":"https://acme.example/cb","scope":"openid",)"
      R"("state":"af0ifjsldkj","nonce":"n-0S6_WzA2Mj",)"
      R"("code_challenge":"E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",)"
      R"("code_challenge_method":"S256"})");
  if (!claims.ok()) return Fail("claims", claims.status());
  ro.claims = *claims;
  auto request = RequestObject(**client, flags.ring, ro);
  if (!request.ok()) return Fail("request object", request.status());
  std::printf("request object:\n%s\n\n", request->c_str());

  // A DPoP proof for a resource request bound to an access token.
  DpopProofOptions dp;
  dp.htm = "GET";
  dp.htu = "https://rs.example/accounts?page=2";
  dp.access_token = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU";
  auto proof = DpopProof(**client, flags.ring, dp);
  if (!proof.ok()) return Fail("DPoP proof", proof.status());
  std::printf("DPoP proof:\n%s\n", proof->c_str());
  return 0;
}
