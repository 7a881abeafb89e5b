// A FAPI 2.0 client against a live authorization server, every key in custody: PAR (a signed
// request object, private_key_jwt, PKCE S256, DPoP) → authorization (redirects followed with a
// cookie jar up to the redirect_uri) → code exchange with DPoP → the encrypted ID token decrypted
// through custody and verified against the server's JWKS → userinfo with the DPoP-bound token.
// Server DPoP nonces are honoured (RFC 9449 §8). Prints one line per step, the last
// "flow ok signing_kid=K decryption_kid=K dpop_kid=K sub=S"; exit 1 on failure, with the
// server's answer.
//
// DPoP proofs are signed by --dpop_ring when given, else by the signing ring. A DPoP-bound access
// token is bound to the key that signed the proofs of its token request (cnf.jkt), so it stays
// usable only while that key signs: with the signing ring, until that ring rotates; with a
// dedicated DPoP ring (its own, slower cadence), across rotations of the signing ring.
// --reuse_token_after=PATH shows it: once the flow is done, wait until PATH exists (the caller
// rotates keys meanwhile), then call userinfo again with the same access token and a new proof.
//
//   fapi_flow --addr=ADDR --issuer=URL --client_id=ID --redirect_uri=URI
//       [--signing_ring=clients/acme/sign] [--decryption_ring=clients/acme/id-token-enc]
//       [--dpop_ring=RING] [--reuse_token_after=PATH]
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "client/fapi.h"
#include "client/jws_verifier.h"
#include "examples/http_session.h"
#include "jose/base64url.h"
#include "jose/jwk.h"

ABSL_FLAG(std::string, addr, "", "custodyd address: unix:PATH or HOST:PORT");
ABSL_FLAG(std::string, issuer, "", "the authorization server's issuer identifier");
ABSL_FLAG(std::string, client_id, "", "our client_id at the authorization server");
ABSL_FLAG(std::string, redirect_uri, "", "our registered redirect_uri (never fetched)");
ABSL_FLAG(std::string, signing_ring, "clients/acme/sign",
          "ES256 ring: client assertions, request objects (and DPoP proofs without --dpop_ring)");
ABSL_FLAG(std::string, decryption_ring, "clients/acme/id-token-enc", "ID token JWE ring");
ABSL_FLAG(std::string, dpop_ring, "", "ring that signs DPoP proofs (default: --signing_ring)");
ABSL_FLAG(std::string, reuse_token_after, "",
          "after the flow, wait (up to 60 s) until this file exists, then call userinfo again "
          "with the same access token");

namespace {

using namespace custody::client;    // NOLINT: example brevity
using namespace custody::examples;  // NOLINT: HttpSession, HttpResponse, JsonBody, Member
using custody::jose::Json;

// The kid in a compact JWS's protected header; for a DPoP proof, which carries its key as "jwk",
// that key's RFC 7638 thumbprint (what custody's kids are, and what cnf.jkt binds).
std::string KidOf(const std::string& jws) {
  auto header = custody::jose::Base64UrlDecode(jws.substr(0, jws.find('.')));
  auto json = header.ok() ? custody::jose::ParseJson(*header) : header.status();
  if (!json.ok()) return "";
  const Json* jwk = json->Find("jwk");
  if (jwk == nullptr) return Member(*json, "kid");
  return custody::jose::Rfc7638Thumbprint(*jwk).value_or("");
}

class Flow {
 public:
  explicit Flow(const Client& client) : client_(client) {}

  absl::Status Run() {
    auto meta = JsonBody(http_.Send(f_.issuer + "/.well-known/openid-configuration"), 200);
    if (!meta.ok()) return meta.status();
    const std::string verifier = *RandomJti() + *RandomJti();  // 44 chars, RFC 7636 §4.1
    const std::string nonce = *RandomJti(), state = *RandomJti();

    // 1. PAR: the signed request object, private_key_jwt, and a DPoP proof (binds dpop_jkt).
    RequestObjectOptions ro;
    ro.client_id = f_.client_id;
    ro.audience = f_.issuer;
    for (auto [name, value] : Fields{{"response_type", "code"},
                                     {"scope", "openid profile"},
                                     {"redirect_uri", f_.redirect_uri},
                                     {"state", state},
                                     {"nonce", nonce},
                                     {"code_challenge", AccessTokenHash(verifier)},  // S256
                                     {"code_challenge_method", "S256"}}) {
      ro.claims.Set(name, Json::String(value));
    }
    auto request = RequestObject(client_, f_.signing_ring, ro);
    if (!request.ok()) return request.status();
    auto par = JsonBody(Authenticated(Member(*meta, "pushed_authorization_request_endpoint"),
                                      {{"request", *request}}),
                        201);
    if (!par.ok()) return par.status();
    std::printf("par: request_uri=%s\n", Member(*par, "request_uri").c_str());

    // 2. Authorization: follow the redirects (interaction, login, consent) to the redirect_uri.
    auto url = http_.FollowRedirects(
        absl::StrCat(Member(*meta, "authorization_endpoint"), "?",
                     http_.Form({{"client_id", f_.client_id},
                                 {"request_uri", Member(*par, "request_uri")}})),
        f_.redirect_uri + "?");
    if (!url.ok()) return url.status();
    const std::string code = http_.QueryParam(*url, "code");
    if (code.empty() || http_.QueryParam(*url, "state") != state ||
        http_.QueryParam(*url, "iss") != f_.issuer) {
      return absl::FailedPreconditionError("bad authorization response: " + *url);
    }
    std::printf("authorization: code received, state and iss (RFC 9207) match\n");

    // 3. Token: the code with its PKCE verifier, private_key_jwt, DPoP.
    auto token = JsonBody(
        Authenticated(Member(*meta, "token_endpoint"), {{"grant_type", "authorization_code"},
                                                        {"code", code},
                                                        {"redirect_uri", f_.redirect_uri},
                                                        {"code_verifier", verifier}}),
        200);
    if (!token.ok()) return token.status();
    const std::string access_token = Member(*token, "access_token");
    if (Member(*token, "token_type") != "DPoP") return absl::FailedPreconditionError("not DPoP");

    // 4. The ID token: a JWE to our custody key, around a JWS by the server's key.
    auto id_token = client_.DecryptJwe(f_.decryption_ring, Member(*token, "id_token"));
    if (!id_token.ok()) return id_token.status();
    auto op_jwks = http_.Send(Member(*meta, "jwks_uri"));
    if (!op_jwks.ok()) return op_jwks.status();
    JwsVerifierOptions checks;  // signature by the server's key, iss, aud, exp, iat
    checks.issuer = f_.issuer;
    checks.audience = f_.client_id;
    auto verifier_op = JwsVerifier::FromJwks(op_jwks->body, checks);
    if (!verifier_op.ok()) return verifier_op.status();
    auto claims = verifier_op->Verify(id_token->plaintext);
    if (!claims.ok()) return claims.status();
    if (Member(*claims, "nonce") != nonce) return absl::FailedPreconditionError("nonce mismatch");
    const std::string sub = Member(*claims, "sub");
    std::printf("token: DPoP; id_token %s decrypted by kid %s, verified, sub=%s\n",
                id_token->protected_header.c_str(), id_token->kid.c_str(), sub.c_str());

    // 5. Userinfo with the DPoP-bound access token (the proof carries ath).
    auto userinfo =
        JsonBody(Dpop("GET", Member(*meta, "userinfo_endpoint"), {}, access_token), 200);
    if (!userinfo.ok()) return userinfo.status();
    if (Member(*userinfo, "sub") != sub) return absl::FailedPreconditionError("userinfo sub");
    std::printf("userinfo: %s\nflow ok signing_kid=%s decryption_kid=%s dpop_kid=%s sub=%s\n",
                userinfo->Serialize().c_str(), KidOf(*request).c_str(), id_token->kid.c_str(),
                dpop_kid_.c_str(), sub.c_str());
    std::fflush(stdout);
    return f_.reuse_token_after.empty() ? absl::OkStatus()
                                        : Reuse(Member(*meta, "userinfo_endpoint"), access_token);
  }

 private:
  using Fields = std::vector<std::pair<std::string, std::string>>;

  // Once f_.reuse_token_after exists: userinfo again with the access token the flow obtained.
  absl::Status Reuse(const std::string& userinfo_endpoint, const std::string& access_token) {
    namespace fs = std::filesystem;
    for (int i = 0; !fs::exists(f_.reuse_token_after); ++i) {
      if (i == 6000) return absl::DeadlineExceededError("no " + f_.reuse_token_after + " in 60 s");
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    auto userinfo = JsonBody(Dpop("GET", userinfo_endpoint, {}, access_token), 200);
    if (!userinfo.ok()) return userinfo.status();
    std::printf("reuse ok dpop_kid=%s sub=%s\n", dpop_kid_.c_str(),
                Member(*userinfo, "sub").c_str());
    return absl::OkStatus();
  }

  // A request with a DPoP proof; `form` (POST when it returns non-empty) is rebuilt for each
  // attempt. Retried once with the server's nonce when it answers use_dpop_nonce.
  absl::StatusOr<HttpResponse> Dpop(const std::string& method, const std::string& url,
                                    const std::function<absl::StatusOr<std::string>()>& form,
                                    const std::string& access_token = "") {
    for (int attempt = 0;; ++attempt) {
      DpopProofOptions dpop;
      dpop.htm = method;
      dpop.htu = url;
      dpop.access_token = access_token;  // sets ath
      dpop.nonce = dpop_nonce_;
      auto proof = DpopProof(client_, f_.dpop_ring.empty() ? f_.signing_ring : f_.dpop_ring, dpop);
      if (proof.ok()) dpop_kid_ = KidOf(*proof);
      auto body = form ? form() : absl::StatusOr<std::string>("");
      if (!proof.ok() || !body.ok()) return proof.ok() ? body.status() : proof.status();
      std::vector<std::string> headers = {"DPoP: " + *proof};
      if (!access_token.empty()) headers.push_back("Authorization: DPoP " + access_token);
      auto r = http_.Send(url, *body, headers);
      if (!r.ok()) return r;
      if (!r->dpop_nonce.empty()) dpop_nonce_ = r->dpop_nonce;
      if (attempt > 0 || !absl::StrContains(r->body + r->www_authenticate, "use_dpop_nonce")) {
        return r;
      }
    }
  }

  // POST `fields` with a fresh private_key_jwt client assertion (single use) and DPoP.
  absl::StatusOr<HttpResponse> Authenticated(const std::string& url, Fields fields) {
    return Dpop("POST", url, [&]() -> absl::StatusOr<std::string> {
      ClientAssertionOptions ca;
      ca.client_id = f_.client_id;
      ca.audience = f_.issuer;  // FAPI 2.0: the issuer identifier
      auto assertion = ClientAssertion(client_, f_.signing_ring, ca);
      if (!assertion.ok()) return assertion.status();
      Fields all = fields;
      all.insert(all.end(), {{"client_id", f_.client_id},
                             {"client_assertion_type",
                              "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"},
                             {"client_assertion", *assertion}});
      return http_.Form(all);
    });
  }

  const Client& client_;
  const struct {
    std::string issuer, client_id, redirect_uri, signing_ring, decryption_ring, dpop_ring,
        reuse_token_after;
  } f_{absl::GetFlag(FLAGS_issuer),           absl::GetFlag(FLAGS_client_id),
       absl::GetFlag(FLAGS_redirect_uri),     absl::GetFlag(FLAGS_signing_ring),
       absl::GetFlag(FLAGS_decryption_ring),  absl::GetFlag(FLAGS_dpop_ring),
       absl::GetFlag(FLAGS_reuse_token_after)};
  HttpSession http_;
  std::string dpop_nonce_;
  std::string dpop_kid_;  // of the last DPoP proof
};

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  if (absl::GetFlag(FLAGS_addr).empty() || absl::GetFlag(FLAGS_issuer).empty() ||
      absl::GetFlag(FLAGS_client_id).empty() || absl::GetFlag(FLAGS_redirect_uri).empty()) {
    std::fprintf(stderr, "--addr, --issuer, --client_id and --redirect_uri are required\n");
    return 2;
  }
  curl_global_init(CURL_GLOBAL_DEFAULT);
  ChannelOptions channel;
  channel.address = absl::GetFlag(FLAGS_addr);
  auto client = Client::Connect(channel);
  absl::Status status = client.ok() ? Flow(**client).Run() : client.status();
  if (!status.ok()) std::fprintf(stderr, "fapi_flow: %s\n", status.ToString().c_str());
  return status.ok() ? 0 : 1;
}
