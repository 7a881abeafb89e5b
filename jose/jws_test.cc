#include "jose/jws.h"

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "jose/base64url.h"
#include "jose/json.h"
#include "jose/jwk.h"
#include "openssl/bn.h"
#include "openssl/ec.h"
#include "openssl/evp.h"
#include "openssl/rsa.h"

namespace custody::jose {
namespace {

const std::vector<JwsAlg> kAllAlgs = {JwsAlg::kES256, JwsAlg::kES384, JwsAlg::kES512,
                                      JwsAlg::kPS256, JwsAlg::kPS384, JwsAlg::kPS512,
                                      JwsAlg::kRS256, JwsAlg::kEdDSA};

using MdCtxPtr = std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)>;
using EcdsaSigPtr = std::unique_ptr<ECDSA_SIG, decltype(&ECDSA_SIG_free)>;

Json MustParse(const std::string& text) {
  absl::StatusOr<Json> parsed = ParseJson(text);
  EXPECT_TRUE(parsed.ok()) << parsed.status();
  return parsed.ok() ? *parsed : Json();
}

const EVP_PKEY* Rsa2048() {
  static EVP_PKEY* const key = EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", size_t{2048});
  return key;
}

PkeyPtr GenerateEc(const char* curve) {
  return PkeyPtr(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", curve));
}

PkeyPtr GenerateEd25519() { return PkeyPtr(EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519")); }

// Signs with OpenSSL directly (the library under test has no signing code). md is nullptr for
// Ed25519; pss_saltlen < -100 means PKCS#1 v1.5.
std::string OpensslSign(const EVP_PKEY* key, const char* md, std::string_view input,
                        int pss_saltlen = -1000) {
  MdCtxPtr ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  EVP_PKEY_CTX* pctx = nullptr;
  if (EVP_DigestSignInit_ex(ctx.get(), &pctx, md, nullptr, nullptr, const_cast<EVP_PKEY*>(key),
                            nullptr) != 1) {
    ADD_FAILURE() << "EVP_DigestSignInit_ex";
    return "";
  }
  if (pss_saltlen > -100) {
    EVP_MD* mgf1 = EVP_MD_fetch(nullptr, md, nullptr);
    EXPECT_EQ(EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING), 1);
    EXPECT_EQ(EVP_PKEY_CTX_set_rsa_mgf1_md(pctx, mgf1), 1);
    EXPECT_EQ(EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, pss_saltlen), 1);
    EVP_MD_free(mgf1);
  }
  size_t len = 0;
  const auto* in = reinterpret_cast<const unsigned char*>(input.data());
  if (EVP_DigestSign(ctx.get(), nullptr, &len, in, input.size()) != 1) {
    ADD_FAILURE() << "EVP_DigestSign size";
    return "";
  }
  std::string sig(len, '\0');
  if (EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char*>(sig.data()), &len, in,
                     input.size()) != 1) {
    ADD_FAILURE() << "EVP_DigestSign";
    return "";
  }
  sig.resize(len);
  return sig;
}

// DER ECDSA -> r||s with OpenSSL primitives, independently of EcdsaDerToRaw.
std::string DerToRawWithOpenssl(const std::string& der, int field_bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(der.data());
  EcdsaSigPtr sig(d2i_ECDSA_SIG(nullptr, &p, static_cast<long>(der.size())), ECDSA_SIG_free);
  if (sig == nullptr) return "";
  std::string raw(2 * field_bytes, '\0');
  auto* out = reinterpret_cast<unsigned char*>(raw.data());
  BN_bn2binpad(ECDSA_SIG_get0_r(sig.get()), out, field_bytes);
  BN_bn2binpad(ECDSA_SIG_get0_s(sig.get()), out + field_bytes, field_bytes);
  return raw;
}

std::string HeaderFor(JwsAlg alg) {
  JwsHeaderParams params;
  params.alg = alg;
  params.kid = "test-key";
  absl::StatusOr<std::string> header = BuildProtectedHeader(params);
  EXPECT_TRUE(header.ok()) << header.status();
  return header.ok() ? *header : "";
}

// Builds a compact JWS signed by OpenSSL for `alg` with `key`.
std::string SignCompact(JwsAlg alg, const EVP_PKEY* key, std::string_view payload) {
  const std::string input = JwsSigningInput(HeaderFor(alg), payload);
  std::string sig;
  switch (alg) {
    case JwsAlg::kES256:
      sig = DerToRawWithOpenssl(OpensslSign(key, "SHA256", input), 32);
      break;
    case JwsAlg::kES384:
      sig = DerToRawWithOpenssl(OpensslSign(key, "SHA384", input), 48);
      break;
    case JwsAlg::kES512:
      sig = DerToRawWithOpenssl(OpensslSign(key, "SHA512", input), 66);
      break;
    case JwsAlg::kPS256:
      sig = OpensslSign(key, "SHA256", input, RSA_PSS_SALTLEN_DIGEST);
      break;
    case JwsAlg::kPS384:
      sig = OpensslSign(key, "SHA384", input, RSA_PSS_SALTLEN_DIGEST);
      break;
    case JwsAlg::kPS512:
      sig = OpensslSign(key, "SHA512", input, RSA_PSS_SALTLEN_DIGEST);
      break;
    case JwsAlg::kRS256:
      sig = OpensslSign(key, "SHA256", input);
      break;
    case JwsAlg::kEdDSA:
      sig = OpensslSign(key, nullptr, input);
      break;
  }
  return AssembleCompactJws(input, sig);
}

void ExpectVerifies(JwsAlg alg, const EVP_PKEY* key) {
  ASSERT_NE(key, nullptr);
  const std::string payload = "{\"iss\":\"custody\",\"n\":1}";
  const std::string jws = SignCompact(alg, key, payload);
  absl::StatusOr<VerifiedJws> verified = VerifyCompactJws(jws, key, {alg});
  ASSERT_TRUE(verified.ok()) << JwsAlgName(alg) << ": " << verified.status();
  EXPECT_EQ(verified->payload, payload);
  ASSERT_NE(verified->header.Find("alg"), nullptr);
  EXPECT_EQ(verified->header.Find("alg")->as_string(), JwsAlgName(alg));
  EXPECT_EQ(verified->header.Find("kid")->as_string(), "test-key");
}

std::string ReplacePayload(const std::string& jws, const std::string& payload) {
  const size_t dot1 = jws.find('.');
  const size_t dot2 = jws.find('.', dot1 + 1);
  return jws.substr(0, dot1 + 1) + Base64UrlEncode(payload) + jws.substr(dot2);
}

TEST(JwsAlgTest, NamesRoundTrip) {
  for (JwsAlg alg : kAllAlgs) {
    absl::StatusOr<JwsAlg> parsed = ParseJwsAlg(JwsAlgName(alg));
    ASSERT_TRUE(parsed.ok()) << JwsAlgName(alg);
    EXPECT_EQ(*parsed, alg);
  }
  EXPECT_EQ(JwsAlgName(JwsAlg::kEdDSA), "EdDSA");
  EXPECT_EQ(JwsAlgName(JwsAlg::kPS256), "PS256");
}

TEST(JwsAlgTest, RefusesNoneSymmetricAndUnknown) {
  for (const char* name : {"none", "None", "HS256", "HS512", "RS1", "es256", "", "ES256K"}) {
    EXPECT_EQ(ParseJwsAlg(name).status().code(), absl::StatusCode::kInvalidArgument) << name;
  }
}

TEST(BuildProtectedHeaderTest, WritesMembersInOrder) {
  JwsHeaderParams params;
  params.alg = JwsAlg::kES256;
  params.kid = "ring/1";
  params.typ = "JWT";
  params.cty = "json";
  params.extra = MustParse(R"({"nonce":"abc","iat":1})");
  absl::StatusOr<std::string> header = BuildProtectedHeader(params);
  ASSERT_TRUE(header.ok()) << header.status();
  EXPECT_EQ(*header,
            R"({"alg":"ES256","kid":"ring/1","typ":"JWT","cty":"json","nonce":"abc","iat":1})");
}

TEST(BuildProtectedHeaderTest, OmitsEmptyTypAndCty) {
  JwsHeaderParams params;
  params.alg = JwsAlg::kEdDSA;
  params.kid = "k";
  absl::StatusOr<std::string> header = BuildProtectedHeader(params);
  ASSERT_TRUE(header.ok());
  EXPECT_EQ(*header, R"({"alg":"EdDSA","kid":"k"})");
}

TEST(BuildProtectedHeaderTest, RefusesEachForbiddenMember) {
  for (const char* name : {"alg", "kid", "jwk", "jku", "x5u", "x5c", "x5t", "x5t#S256", "crit",
                           "b64", "zip", "enc", "typ", "cty"}) {
    JwsHeaderParams params;
    params.kid = "k";
    params.extra = Json::MakeObject({{name, Json::String("x")}});
    absl::StatusOr<std::string> header = BuildProtectedHeader(params);
    EXPECT_EQ(header.status().code(), absl::StatusCode::kInvalidArgument) << name;
    EXPECT_NE(header.status().message().find(name), absl::string_view::npos)
        << "message should name " << name << ": " << header.status();
  }
}

TEST(BuildProtectedHeaderTest, RefusesNonObjectExtraAndDuplicates) {
  JwsHeaderParams params;
  params.kid = "k";
  params.extra = Json::MakeArray();
  EXPECT_FALSE(BuildProtectedHeader(params).ok());
  params.extra = Json::MakeObject({{"n", Json::Int(1)}, {"n", Json::Int(2)}});
  EXPECT_FALSE(BuildProtectedHeader(params).ok());
}

TEST(BuildProtectedHeaderTest, EmbedsPublicJwkAndRefusesPrivateOne) {
  PkeyPtr key = GenerateEc("P-256");
  absl::StatusOr<Json> jwk = PublicJwkFromPkey(key.get());
  ASSERT_TRUE(jwk.ok());
  JwsHeaderParams params;
  params.kid = "k";
  params.typ = "dpop+jwt";
  params.jwk = *jwk;
  absl::StatusOr<std::string> header = BuildProtectedHeader(params);
  ASSERT_TRUE(header.ok()) << header.status();
  absl::StatusOr<Json> parsed = ParseJson(*header);
  ASSERT_TRUE(parsed.ok());
  ASSERT_NE(parsed->Find("jwk"), nullptr);
  EXPECT_EQ(parsed->Find("jwk")->Serialize(), jwk->Serialize());

  params.jwk->Set("d", Json::String("AAAA"));
  EXPECT_EQ(BuildProtectedHeader(params).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(JwsTest, SigningInputAndAssembly) {
  // RFC 7515 §A.3: header {"alg":"ES256"} encodes as eyJhbGciOiJFUzI1NiJ9.
  EXPECT_EQ(JwsSigningInput(R"({"alg":"ES256"})", "x"), "eyJhbGciOiJFUzI1NiJ9.eA");
  EXPECT_EQ(AssembleCompactJws("a.b", "foo"), "a.b.Zm9v");
}

TEST(JwsVerifyTest, Es256VerifiesOpensslSignature) {
  PkeyPtr key = GenerateEc("P-256");
  ExpectVerifies(JwsAlg::kES256, key.get());
}

TEST(JwsVerifyTest, Es384VerifiesOpensslSignature) {
  PkeyPtr key = GenerateEc("P-384");
  ExpectVerifies(JwsAlg::kES384, key.get());
}

TEST(JwsVerifyTest, Es512VerifiesOpensslSignature) {
  PkeyPtr key = GenerateEc("P-521");
  ExpectVerifies(JwsAlg::kES512, key.get());
}

TEST(JwsVerifyTest, Ps256Ps384Ps512VerifyOpensslSignature) {
  ExpectVerifies(JwsAlg::kPS256, Rsa2048());
  ExpectVerifies(JwsAlg::kPS384, Rsa2048());
  ExpectVerifies(JwsAlg::kPS512, Rsa2048());
}

TEST(JwsVerifyTest, Rs256VerifiesOpensslSignature) { ExpectVerifies(JwsAlg::kRS256, Rsa2048()); }

TEST(JwsVerifyTest, EdDsaVerifiesOpensslSignature) {
  PkeyPtr key = GenerateEd25519();
  ExpectVerifies(JwsAlg::kEdDSA, key.get());
}

TEST(JwsVerifyTest, VerifiesWithKeyImportedFromJwk) {
  PkeyPtr key = GenerateEc("P-256");
  const std::string jws = SignCompact(JwsAlg::kES256, key.get(), "hello");
  absl::StatusOr<Json> jwk = PublicJwkFromPkey(key.get());
  ASSERT_TRUE(jwk.ok());
  absl::StatusOr<PkeyPtr> pub = PkeyFromPublicJwk(*jwk);
  ASSERT_TRUE(pub.ok());
  EXPECT_TRUE(VerifyCompactJws(jws, pub->get(), {JwsAlg::kES256}).ok());
}

TEST(JwsVerifyTest, TamperedPayloadIsUnauthenticated) {
  PkeyPtr ec = GenerateEc("P-256");
  PkeyPtr ed = GenerateEd25519();
  struct Case {
    JwsAlg alg;
    const EVP_PKEY* key;
  };
  for (const Case& c : {Case{JwsAlg::kES256, ec.get()}, Case{JwsAlg::kPS256, Rsa2048()},
                        Case{JwsAlg::kRS256, Rsa2048()}, Case{JwsAlg::kEdDSA, ed.get()}}) {
    const std::string jws = SignCompact(c.alg, c.key, "{\"amount\":10}");
    absl::StatusOr<VerifiedJws> verified =
        VerifyCompactJws(ReplacePayload(jws, "{\"amount\":99}"), c.key, kAllAlgs);
    EXPECT_EQ(verified.status().code(), absl::StatusCode::kUnauthenticated) << JwsAlgName(c.alg);
  }
}

TEST(JwsVerifyTest, TamperedSignatureIsUnauthenticated) {
  PkeyPtr key = GenerateEc("P-256");
  std::string jws = SignCompact(JwsAlg::kES256, key.get(), "payload");
  const size_t dot2 = jws.rfind('.');
  absl::StatusOr<std::string> sig = Base64UrlDecode(jws.substr(dot2 + 1));
  ASSERT_TRUE(sig.ok());
  (*sig)[10] ^= 0x01;
  jws = jws.substr(0, dot2 + 1) + Base64UrlEncode(*sig);
  EXPECT_EQ(VerifyCompactJws(jws, key.get(), {JwsAlg::kES256}).status().code(),
            absl::StatusCode::kUnauthenticated);
}

TEST(JwsVerifyTest, WrongKeyIsUnauthenticated) {
  PkeyPtr signer = GenerateEc("P-256");
  PkeyPtr other = GenerateEc("P-256");
  const std::string jws = SignCompact(JwsAlg::kES256, signer.get(), "payload");
  EXPECT_EQ(VerifyCompactJws(jws, other.get(), {JwsAlg::kES256}).status().code(),
            absl::StatusCode::kUnauthenticated);
}

TEST(JwsVerifyTest, EcdsaSignatureInDerFormIsRefused) {
  PkeyPtr key = GenerateEc("P-256");
  const std::string input = JwsSigningInput(HeaderFor(JwsAlg::kES256), "payload");
  const std::string jws = AssembleCompactJws(input, OpensslSign(key.get(), "SHA256", input));
  EXPECT_EQ(VerifyCompactJws(jws, key.get(), {JwsAlg::kES256}).status().code(),
            absl::StatusCode::kUnauthenticated);
}

TEST(JwsVerifyTest, PssWithWrongSaltLengthIsUnauthenticated) {
  const std::string input = JwsSigningInput(HeaderFor(JwsAlg::kPS256), "payload");
  const std::string jws =
      AssembleCompactJws(input, OpensslSign(Rsa2048(), "SHA256", input, /*pss_saltlen=*/0));
  EXPECT_EQ(VerifyCompactJws(jws, Rsa2048(), {JwsAlg::kPS256}).status().code(),
            absl::StatusCode::kUnauthenticated);
}

TEST(JwsVerifyTest, RefusesAlgNotInAllowedList) {
  PkeyPtr key = GenerateEc("P-256");
  const std::string jws = SignCompact(JwsAlg::kES256, key.get(), "payload");
  EXPECT_EQ(VerifyCompactJws(jws, key.get(), {JwsAlg::kES384, JwsAlg::kEdDSA}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(VerifyCompactJws(jws, key.get(), {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(JwsVerifyTest, RefusesAlgNone) {
  PkeyPtr key = GenerateEc("P-256");
  const std::string unsigned_jws = JwsSigningInput(R"({"alg":"none"})", "payload") + ".";
  EXPECT_EQ(VerifyCompactJws(unsigned_jws, key.get(), kAllAlgs).status().code(),
            absl::StatusCode::kInvalidArgument);
  const std::string hs = JwsSigningInput(R"({"alg":"HS256"})", "payload") + ".AAAA";
  EXPECT_EQ(VerifyCompactJws(hs, key.get(), kAllAlgs).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(JwsVerifyTest, RefusesAlgThatDoesNotMatchKey) {
  PkeyPtr p384 = GenerateEc("P-384");
  PkeyPtr p256 = GenerateEc("P-256");
  // An ES256 header against a P-384 key, and the reverse.
  const std::string es384 = SignCompact(JwsAlg::kES384, p384.get(), "payload");
  EXPECT_FALSE(VerifyCompactJws(es384, p256.get(), kAllAlgs).ok());
  const std::string es256 = SignCompact(JwsAlg::kES256, p256.get(), "payload");
  EXPECT_FALSE(VerifyCompactJws(es256, p384.get(), kAllAlgs).ok());
  // RS256 against an EC key, EdDSA against RSA.
  const std::string rs256 = SignCompact(JwsAlg::kRS256, Rsa2048(), "payload");
  EXPECT_FALSE(VerifyCompactJws(rs256, p256.get(), kAllAlgs).ok());
  PkeyPtr ed = GenerateEd25519();
  const std::string eddsa = SignCompact(JwsAlg::kEdDSA, ed.get(), "payload");
  EXPECT_FALSE(VerifyCompactJws(eddsa, Rsa2048(), kAllAlgs).ok());
  // ES256 signature relabelled as ES384 over the same key.
  const std::string relabelled =
      JwsSigningInput(R"({"alg":"ES384"})", "payload") + es256.substr(es256.rfind('.'));
  EXPECT_FALSE(VerifyCompactJws(relabelled, p256.get(), kAllAlgs).ok());
}

TEST(JwsVerifyTest, RefusesRsaKeyBelow2048Bits) {
  PkeyPtr small(EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", size_t{1024}));
  ASSERT_NE(small, nullptr);
  const std::string jws = SignCompact(JwsAlg::kRS256, small.get(), "payload");
  EXPECT_EQ(VerifyCompactJws(jws, small.get(), {JwsAlg::kRS256}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(JwsVerifyTest, RefusesMalformedCompactSerialization) {
  PkeyPtr key = GenerateEc("P-256");
  const std::string jws = SignCompact(JwsAlg::kES256, key.get(), "payload");
  const std::vector<JwsAlg> allowed = {JwsAlg::kES256};
  for (const std::string& bad :
       {std::string(""), std::string("a.b"), jws + ".x", jws + "=", "=" + jws, " " + jws,
        JwsSigningInput("not json", "p") + ".AAAA",
        JwsSigningInput(R"({"alg":"ES256","alg":"none"})", "p") + ".AAAA",
        JwsSigningInput(R"(["ES256"])", "p") + ".AAAA",
        JwsSigningInput(R"({"alg":256})", "p") + ".AAAA",
        JwsSigningInput(R"({"alg":"ES256","crit":["exp"],"exp":1})", "p") + ".AAAA"}) {
    EXPECT_EQ(VerifyCompactJws(bad, key.get(), allowed).status().code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
  }
}

TEST(JwsVerifyTest, RefusesInputOverOneMebibyte) {
  PkeyPtr key = GenerateEc("P-256");
  const std::string jws = SignCompact(JwsAlg::kES256, key.get(), std::string(800 * 1024, 'a'));
  ASSERT_GT(jws.size(), size_t{1} << 20);
  EXPECT_EQ(VerifyCompactJws(jws, key.get(), {JwsAlg::kES256}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// RFC 7515 Appendix A.3: ES256 example JWS and its public key.
TEST(JwsVerifyTest, Rfc7515AppendixA3Es256Example) {
  const Json jwk = MustParse(R"({"kty":"EC","crv":"P-256",)"
                             R"("x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",)"
                             R"("y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"})");
  absl::StatusOr<PkeyPtr> key = PkeyFromPublicJwk(jwk);
  ASSERT_TRUE(key.ok()) << key.status();
  const std::string jws =
      "eyJhbGciOiJFUzI1NiJ9"
      ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnV"
      "lfQ"
      ".DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSApmWQxfKTUJqPP3-Kg6NU1Q";
  absl::StatusOr<VerifiedJws> verified = VerifyCompactJws(jws, key->get(), {JwsAlg::kES256});
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_EQ(verified->payload,
            "{\"iss\":\"joe\",\r\n \"exp\":1300819380,\r\n \"http://example.com/is_root\":true}");
}

// RFC 8037 Appendix A.4: Ed25519 example JWS with the A.2 public key.
TEST(JwsVerifyTest, Rfc8037AppendixA4EdDsaExample) {
  absl::StatusOr<PkeyPtr> key = PkeyFromPublicJwk(MustParse(
      R"({"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"})"));
  ASSERT_TRUE(key.ok()) << key.status();
  const std::string jws =
      "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc"
      ".hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg";
  absl::StatusOr<VerifiedJws> verified = VerifyCompactJws(jws, key->get(), {JwsAlg::kEdDSA});
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_EQ(verified->payload, "Example of Ed25519 signing");
}

TEST(EcdsaConversionTest, DerRawRoundTripForEachCurve) {
  struct Case {
    const char* curve;
    const char* md;
    size_t field_bytes;
  };
  for (const Case& c :
       {Case{"P-256", "SHA256", 32}, Case{"P-384", "SHA384", 48}, Case{"P-521", "SHA512", 66}}) {
    PkeyPtr key = GenerateEc(c.curve);
    for (int i = 0; i < 16; ++i) {
      const std::string der = OpensslSign(key.get(), c.md, "message " + std::to_string(i));
      absl::StatusOr<std::string> raw = EcdsaDerToRaw(der, c.field_bytes);
      ASSERT_TRUE(raw.ok()) << raw.status();
      EXPECT_EQ(*raw, DerToRawWithOpenssl(der, static_cast<int>(c.field_bytes)));
      absl::StatusOr<std::string> back = EcdsaRawToDer(*raw);
      ASSERT_TRUE(back.ok()) << back.status();
      EXPECT_EQ(*back, der) << c.curve;
    }
  }
}

TEST(EcdsaConversionTest, RawToDerMatchesOpensslEncodingOfSmallValues) {
  // r = 1, s = 0x80 (needs a leading zero in DER), built by OpenSSL for the expected bytes.
  std::string raw(64, '\0');
  raw[31] = 0x01;
  raw[63] = static_cast<char>(0x80);
  EcdsaSigPtr sig(ECDSA_SIG_new(), ECDSA_SIG_free);
  BIGNUM* r = BN_new();
  BIGNUM* s = BN_new();
  BN_set_word(r, 1);
  BN_set_word(s, 0x80);
  ASSERT_EQ(ECDSA_SIG_set0(sig.get(), r, s), 1);
  unsigned char* der = nullptr;
  const int len = i2d_ECDSA_SIG(sig.get(), &der);
  ASSERT_GT(len, 0);
  const std::string expected(reinterpret_cast<char*>(der), len);
  OPENSSL_free(der);

  absl::StatusOr<std::string> got = EcdsaRawToDer(raw);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, expected);
  absl::StatusOr<std::string> back = EcdsaDerToRaw(expected, 32);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, raw);
}

TEST(EcdsaConversionTest, RefusesMalformedInput) {
  PkeyPtr key = GenerateEc("P-521");
  const std::string der = OpensslSign(key.get(), "SHA512", "m");
  EXPECT_FALSE(EcdsaDerToRaw(der + std::string(1, '\0'), 66).ok());  // trailing data
  EXPECT_FALSE(EcdsaDerToRaw(der.substr(0, 10), 66).ok());           // truncated
  EXPECT_FALSE(EcdsaDerToRaw("", 32).ok());
  // r = 1 written with a superfluous leading zero octet: BER, not DER.
  EXPECT_FALSE(EcdsaDerToRaw(std::string("\x30\x07\x02\x02\x00\x01\x02\x01\x01", 9), 32).ok());
  // A P-521 signature's components do not fit in 32 bytes (with overwhelming probability
  // for at least one of several signatures).
  bool refused = false;
  for (int i = 0; i < 4 && !refused; ++i) {
    refused = !EcdsaDerToRaw(OpensslSign(key.get(), "SHA512", std::to_string(i)), 32).ok();
  }
  EXPECT_TRUE(refused);
  EXPECT_FALSE(EcdsaRawToDer("").ok());
  EXPECT_FALSE(EcdsaRawToDer(std::string(63, '\x01')).ok());
}

}  // namespace
}  // namespace custody::jose
