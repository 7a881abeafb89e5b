#include "jose/jwk.h"

#include <string>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "jose/base64url.h"
#include "jose/json.h"
#include "openssl/evp.h"

namespace custody::jose {
namespace {

// RFC 7638 §3.1 example JWK (also RFC 7517 Appendix A.1 key "2011-04-29").
constexpr char kRfc7638Jwk[] =
    R"({"kty":"RSA",)"
    R"("n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",)"
    R"("e":"AQAB","alg":"RS256","kid":"2011-04-29"})";
constexpr char kRfc7638Thumbprint[] = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs";

// RFC 8037 Appendix A.2 public key and A.3 thumbprint.
constexpr char kRfc8037Jwk[] =
    R"({"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"})";
constexpr char kRfc8037Thumbprint[] = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k";

Json MustParse(const std::string& text) {
  absl::StatusOr<Json> parsed = ParseJson(text);
  EXPECT_TRUE(parsed.ok()) << parsed.status();
  return parsed.ok() ? *parsed : Json();
}

PkeyPtr GenerateEc(const char* curve) {
  return PkeyPtr(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", curve));
}

PkeyPtr GenerateRsa(size_t bits) {
  return PkeyPtr(EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", bits));
}

PkeyPtr GenerateEd25519() { return PkeyPtr(EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519")); }

// The key pair is generated with the older EVP_PKEY_keygen interface too, so both paths are
// covered.
PkeyPtr GenerateWithKeygenCtx(const char* type) {
  EVP_PKEY_CTX* raw_ctx = EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr);
  std::unique_ptr<EVP_PKEY_CTX, decltype(&EVP_PKEY_CTX_free)> ctx(raw_ctx, EVP_PKEY_CTX_free);
  EVP_PKEY* out = nullptr;
  if (ctx == nullptr || EVP_PKEY_keygen_init(ctx.get()) != 1 ||
      EVP_PKEY_keygen(ctx.get(), &out) != 1) {
    return nullptr;
  }
  return PkeyPtr(out);
}

void ExpectRoundTrip(const EVP_PKEY* key) {
  ASSERT_NE(key, nullptr);
  absl::StatusOr<Json> jwk = PublicJwkFromPkey(key);
  ASSERT_TRUE(jwk.ok()) << jwk.status();
  EXPECT_EQ(jwk->Find("d"), nullptr) << "private part emitted";
  absl::StatusOr<PkeyPtr> back = PkeyFromPublicJwk(*jwk);
  ASSERT_TRUE(back.ok()) << back.status() << " for " << jwk->Serialize();
  EXPECT_EQ(EVP_PKEY_eq(key, back->get()), 1) << jwk->Serialize();
  // The rebuilt key is public only.
  absl::StatusOr<Json> again = PublicJwkFromPkey(back->get());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->Serialize(), jwk->Serialize());
}

size_t DecodedSize(const Json& jwk, const char* member) {
  const Json* v = jwk.Find(member);
  if (v == nullptr) return 0;
  absl::StatusOr<std::string> bytes = Base64UrlDecode(v->as_string());
  return bytes.ok() ? bytes->size() : 0;
}

TEST(JwkTest, Rfc7638ThumbprintExample) {
  absl::StatusOr<std::string> thumbprint = Rfc7638Thumbprint(MustParse(kRfc7638Jwk));
  ASSERT_TRUE(thumbprint.ok()) << thumbprint.status();
  EXPECT_EQ(*thumbprint, kRfc7638Thumbprint);
}

TEST(JwkTest, Rfc8037Ed25519ThumbprintExample) {
  absl::StatusOr<std::string> thumbprint = Rfc7638Thumbprint(MustParse(kRfc8037Jwk));
  ASSERT_TRUE(thumbprint.ok()) << thumbprint.status();
  EXPECT_EQ(*thumbprint, kRfc8037Thumbprint);
}

TEST(JwkTest, ThumbprintRequiresMembers) {
  EXPECT_FALSE(Rfc7638Thumbprint(MustParse(R"({"kty":"RSA","n":"AQAB"})")).ok());
  EXPECT_FALSE(Rfc7638Thumbprint(MustParse(R"({"kty":"EC","crv":"P-256","x":"AA"})")).ok());
  EXPECT_FALSE(Rfc7638Thumbprint(MustParse(R"({"kty":"oct","k":"AA"})")).ok());
  EXPECT_FALSE(Rfc7638Thumbprint(MustParse(R"({"kty":"RSA","n":"AQAB","e":1})")).ok());
}

TEST(JwkTest, Rfc7638KeyImportsAsRsa) {
  absl::StatusOr<PkeyPtr> key = PkeyFromPublicJwk(MustParse(kRfc7638Jwk));
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_TRUE(EVP_PKEY_is_a(key->get(), "RSA"));
  EXPECT_EQ(EVP_PKEY_get_bits(key->get()), 2048);
}

TEST(JwkTest, EcP256RoundTrip) {
  PkeyPtr key = GenerateEc("P-256");
  ExpectRoundTrip(key.get());
  absl::StatusOr<Json> jwk = PublicJwkFromPkey(key.get());
  ASSERT_TRUE(jwk.ok());
  EXPECT_EQ(jwk->Find("crv")->as_string(), "P-256");
  EXPECT_EQ(DecodedSize(*jwk, "x"), 32u);
  EXPECT_EQ(DecodedSize(*jwk, "y"), 32u);
}

TEST(JwkTest, EcP384RoundTrip) {
  PkeyPtr key = GenerateEc("P-384");
  ExpectRoundTrip(key.get());
  absl::StatusOr<Json> jwk = PublicJwkFromPkey(key.get());
  ASSERT_TRUE(jwk.ok());
  EXPECT_EQ(jwk->Find("crv")->as_string(), "P-384");
  EXPECT_EQ(DecodedSize(*jwk, "x"), 48u);
}

TEST(JwkTest, EcP521RoundTripPadsCoordinatesTo66Bytes) {
  // Several keys so that at least some have a short coordinate that needs padding.
  for (int i = 0; i < 8; ++i) {
    PkeyPtr key = GenerateEc("P-521");
    ExpectRoundTrip(key.get());
    absl::StatusOr<Json> jwk = PublicJwkFromPkey(key.get());
    ASSERT_TRUE(jwk.ok());
    EXPECT_EQ(jwk->Find("crv")->as_string(), "P-521");
    EXPECT_EQ(DecodedSize(*jwk, "x"), 66u);
    EXPECT_EQ(DecodedSize(*jwk, "y"), 66u);
  }
}

TEST(JwkTest, RsaRoundTripHasNoLeadingZeros) {
  PkeyPtr key = GenerateRsa(2048);
  ExpectRoundTrip(key.get());
  absl::StatusOr<Json> jwk = PublicJwkFromPkey(key.get());
  ASSERT_TRUE(jwk.ok());
  EXPECT_EQ(jwk->Find("e")->as_string(), "AQAB");  // 65537
  EXPECT_EQ(DecodedSize(*jwk, "n"), 256u);
}

TEST(JwkTest, Ed25519RoundTrip) {
  PkeyPtr key = GenerateEd25519();
  ExpectRoundTrip(key.get());
  absl::StatusOr<Json> jwk = PublicJwkFromPkey(key.get());
  ASSERT_TRUE(jwk.ok());
  EXPECT_EQ(jwk->Find("kty")->as_string(), "OKP");
  EXPECT_EQ(jwk->Find("crv")->as_string(), "Ed25519");
  EXPECT_EQ(DecodedSize(*jwk, "x"), 32u);
}

TEST(JwkTest, KeysFromEvpPkeyKeygenRoundTrip) {
  ExpectRoundTrip(GenerateWithKeygenCtx("ED25519").get());
  ExpectRoundTrip(GenerateWithKeygenCtx("RSA").get());  // default 2048 bits
}

TEST(JwkTest, Rfc8037PublicKeyImports) {
  absl::StatusOr<PkeyPtr> key = PkeyFromPublicJwk(MustParse(kRfc8037Jwk));
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_TRUE(EVP_PKEY_is_a(key->get(), "ED25519"));
}

TEST(JwkTest, RefusesOffCurveEcPoint) {
  PkeyPtr key = GenerateEc("P-256");
  absl::StatusOr<Json> jwk = PublicJwkFromPkey(key.get());
  ASSERT_TRUE(jwk.ok());
  absl::StatusOr<std::string> y = Base64UrlDecode(jwk->Find("y")->as_string());
  ASSERT_TRUE(y.ok());
  y->back() ^= 1;
  jwk->Set("y", Json::String(Base64UrlEncode(*y)));
  EXPECT_EQ(PkeyFromPublicJwk(*jwk).status().code(), absl::StatusCode::kInvalidArgument);

  // The all-zero point is not on P-256 either.
  jwk->Set("x", Json::String(Base64UrlEncode(std::string(32, '\0'))));
  jwk->Set("y", Json::String(Base64UrlEncode(std::string(32, '\0'))));
  EXPECT_EQ(PkeyFromPublicJwk(*jwk).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(JwkTest, RefusesPrivateMemberD) {
  PkeyPtr ec = GenerateEc("P-256");
  PkeyPtr ed = GenerateEd25519();
  for (const EVP_PKEY* key : {ec.get(), ed.get()}) {
    absl::StatusOr<Json> jwk = PublicJwkFromPkey(key);
    ASSERT_TRUE(jwk.ok());
    jwk->Set("d", Json::String("AAAA"));
    absl::StatusOr<PkeyPtr> back = PkeyFromPublicJwk(*jwk);
    EXPECT_EQ(back.status().code(), absl::StatusCode::kInvalidArgument);
  }
  Json rsa = MustParse(kRfc7638Jwk);
  rsa.Set("p", Json::String("AQAB"));
  EXPECT_EQ(PkeyFromPublicJwk(rsa).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(JwkTest, RefusesWrongCoordinateLength) {
  PkeyPtr key = GenerateEc("P-384");
  absl::StatusOr<Json> jwk = PublicJwkFromPkey(key.get());
  ASSERT_TRUE(jwk.ok());
  jwk->Set("crv", Json::String("P-256"));
  EXPECT_EQ(PkeyFromPublicJwk(*jwk).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(JwkTest, RefusesUnsupportedCurvesAndTypes) {
  EXPECT_FALSE(
      PkeyFromPublicJwk(MustParse(R"({"kty":"EC","crv":"secp256k1","x":"AAAA","y":"AAAA"})")).ok());
  EXPECT_FALSE(PkeyFromPublicJwk(MustParse(R"({"kty":"OKP","crv":"X25519","x":"AAAA"})")).ok());
  EXPECT_FALSE(PkeyFromPublicJwk(MustParse(R"({"kty":"oct","k":"AAAA"})")).ok());
  EXPECT_FALSE(PkeyFromPublicJwk(MustParse(R"({"crv":"P-256"})")).ok());
  EXPECT_FALSE(PkeyFromPublicJwk(MustParse(R"(["kty"])")).ok());

  PkeyPtr x25519(EVP_PKEY_Q_keygen(nullptr, nullptr, "X25519"));
  ASSERT_NE(x25519, nullptr);
  EXPECT_EQ(PublicJwkFromPkey(x25519.get()).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(JwkTest, RefusesRsaModulusBelow2048Bits) {
  PkeyPtr key = GenerateRsa(1024);
  ASSERT_NE(key, nullptr);
  absl::StatusOr<Json> jwk = PublicJwkFromPkey(key.get());
  ASSERT_TRUE(jwk.ok());
  EXPECT_EQ(PkeyFromPublicJwk(*jwk).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(JwkTest, RefusesRsaModulusWithLeadingZeroOctet) {
  Json jwk = MustParse(kRfc7638Jwk);
  absl::StatusOr<std::string> n = Base64UrlDecode(jwk.Find("n")->as_string());
  ASSERT_TRUE(n.ok());
  jwk.Set("n", Json::String(Base64UrlEncode(std::string(1, '\0') + *n)));
  EXPECT_EQ(PkeyFromPublicJwk(jwk).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(JwkTest, RefusesNonCanonicalBase64InMembers) {
  Json jwk = MustParse(kRfc8037Jwk);
  jwk.Set("x", Json::String(jwk.Find("x")->as_string() + "="));
  EXPECT_EQ(PkeyFromPublicJwk(jwk).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace custody::jose
