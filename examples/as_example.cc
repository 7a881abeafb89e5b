// Authorization-server side of FAPI with custody: signs an ID token (with at_hash and c_hash)
// and decrypts an encrypted request object, then verifies the request object's signature.
//
//   custodyctl --addr=A ring create op/id-token --purpose=sign --alg=ES256
//   custodyctl --addr=A ring create op/request-object-enc --purpose=decrypt --alg=ECDH-ES
//   custodyctl --addr=A ring create clients/acme/private-key-jwt --purpose=sign --alg=ES256
//   as_example --addr=unix:/run/custodyd.sock [--id_token_ring=op/id-token]
//       [--enc_ring=op/request-object-enc] [--client_ring=clients/acme/private-key-jwt]
//
// The encrypted request object is made here too (as a client would, with client_ring), so that
// the example is self-contained.
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "client/client.h"
#include "client/fapi.h"
#include "client/jws_verifier.h"

ABSL_FLAG(std::string, addr, "", "custodyd address: unix:PATH or HOST:PORT");
ABSL_FLAG(std::string, id_token_ring, "op/id-token", "ES256/PS256 ring that signs ID tokens");
ABSL_FLAG(std::string, enc_ring, "op/request-object-enc",
          "DECRYPT ring request objects are encrypted to");
ABSL_FLAG(std::string, client_ring, "clients/acme/private-key-jwt",
          "the client's signing ring (makes the request object)");

namespace {

int Fail(const char* what, const absl::Status& status) {
  std::fprintf(stderr, "%s: %s\n", what, status.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "as_example --addr=unix:PATH|HOST:PORT [--id_token_ring=R] [--enc_ring=R] [--client_ring=R]");
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
  if (absl::Status s = (*client)->Health(); !s.ok()) return Fail("health", s);

  // 1. An ID token for the code flow: at_hash and c_hash with the ring's hash.
  IdTokenOptions id;
  id.issuer = "https://op.example";
  id.subject = "user-42";
  id.audience = "acme";
  id.nonce = "n-0S6_WzA2Mj";
  id.auth_time = absl::Now() - absl::Minutes(1);
  id.access_token = "jHkWEdUXMU1BwAsC4vtUsZwnNM5rRWyKl9uRlCxMS";
  id.code = "Qcb0Orv1zh30vL1MPRsbm-diHiMwcLyZvn1arpZv-Jxf_11jnpEX3Tgfvk";
  auto id_token = IdToken(**client, absl::GetFlag(FLAGS_id_token_ring), id);
  if (!id_token.ok()) return Fail("id token", id_token.status());
  std::printf("ID token:\n%s\n\n", id_token->c_str());

  // 2. A request object as a client would send it: signed, then encrypted to our enc ring.
  auto op_jwks = (*client)->GetJwks({absl::GetFlag(FLAGS_enc_ring)});
  if (!op_jwks.ok()) return Fail("GetJwks(enc)", op_jwks.status());
  RequestObjectOptions ro;
  ro.client_id = "acme";
  ro.audience = "https://op.example";
  auto claims = custody::jose::ParseJson(
      R"({"response_type":"code","redirect_uri":"https://acme.example/cb","scope":"openid",)"
      R"("state":"af0ifjsldkj","nonce":"n-0S6_WzA2Mj"})");
  if (!claims.ok()) return Fail("claims", claims.status());
  ro.claims = *claims;
  ro.encrypt_to_jwks = op_jwks->jwks;
  auto jwe = RequestObject(**client, absl::GetFlag(FLAGS_client_ring), ro);
  if (!jwe.ok()) return Fail("request object", jwe.status());
  std::printf("Encrypted request object:\n%s\n\n", jwe->c_str());

  // 3. The OP decrypts it in the HSM and verifies the nested JWT against the client's JWKS.
  auto decrypted = (*client)->DecryptJwe(absl::GetFlag(FLAGS_enc_ring), *jwe);
  if (!decrypted.ok()) return Fail("decrypt", decrypted.status());
  std::printf("Decrypted with kid %s (version %u); header %s\n", decrypted->kid.c_str(),
              decrypted->version, decrypted->protected_header.c_str());
  auto client_jwks = (*client)->GetJwks({absl::GetFlag(FLAGS_client_ring)});
  if (!client_jwks.ok()) return Fail("GetJwks(client)", client_jwks.status());
  JwsVerifierOptions vo;
  vo.issuer = "acme";
  vo.audience = "https://op.example";
  vo.typ = "oauth-authz-req+jwt";
  auto verifier = JwsVerifier::FromJwks(client_jwks->jwks, vo);
  if (!verifier.ok()) return Fail("verifier", verifier.status());
  auto verified = verifier->Verify(decrypted->plaintext);
  if (!verified.ok()) return Fail("verify request object", verified.status());
  std::printf("Verified request object claims:\n%s\n", verified->Serialize().c_str());
  return 0;
}
