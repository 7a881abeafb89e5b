#include "jose/jwe.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/testing/child_process.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "jose/base64url.h"
#include "jose/json.h"
#include "jose/jwk.h"
#include "jose/openssl_handles.h"
#include "openssl/bio.h"
#include "openssl/core_names.h"
#include "openssl/evp.h"
#include "openssl/pem.h"
#include "openssl/rand.h"
#include "openssl/rsa.h"

namespace custody::jose {
namespace {

using internal::BnPtr;
using internal::ParamBldPtr;
using internal::ParamsPtr;
using internal::PkeyCtxPtr;
using ::testing::HasSubstr;

constexpr absl::string_view kDecryptionFailed = "decryption failed";

// The one uniform answer to every decryption failure: INVALID_ARGUMENT "decryption failed".
auto IsDecryptionFailed() {
  return custody::testing::StatusIs(absl::StatusCode::kInvalidArgument,
                                    std::string(kDecryptionFailed));
}

// ---- Byte helpers ------------------------------------------------------------------------------

std::string_view Std(absl::string_view s) { return std::string_view(s.data(), s.size()); }
absl::string_view Absl(std::string_view s) { return absl::string_view(s.data(), s.size()); }
std::string Msg(const absl::Status& status) { return std::string(status.message()); }

std::string Unhex(std::string_view hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) {
    out.push_back(static_cast<char>(std::stoi(std::string(hex.substr(i, 2)), nullptr, 16)));
  }
  return out;
}

std::string B64d(std::string_view b64) {
  absl::StatusOr<std::string> out = Base64UrlDecode(b64);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? *out : std::string();
}

std::string RandomBytes(size_t n) {
  std::string out(n, '\0');
  EXPECT_EQ(RAND_bytes(reinterpret_cast<unsigned char*>(out.data()), static_cast<int>(n)), 1);
  return out;
}

const unsigned char* U(std::string_view s) {
  return reinterpret_cast<const unsigned char*>(s.data());
}

// ---- Keys (generated or built with OpenSSL, independently of the code under test) -------------

PkeyPtr GenerateRsa(int bits) {
  PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, "RSA", nullptr));
  EVP_PKEY* raw = nullptr;
  if (ctx == nullptr || EVP_PKEY_keygen_init(ctx.get()) != 1 ||
      EVP_PKEY_CTX_set_rsa_keygen_bits(ctx.get(), bits) != 1 ||
      EVP_PKEY_generate(ctx.get(), &raw) != 1) {
    ADD_FAILURE() << "RSA keygen";
  }
  return PkeyPtr(raw);
}

PkeyPtr GenerateEc(const char* group) {
  PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr));
  EVP_PKEY* raw = nullptr;
  if (ctx == nullptr || EVP_PKEY_keygen_init(ctx.get()) != 1 ||
      EVP_PKEY_CTX_set_group_name(ctx.get(), group) != 1 ||
      EVP_PKEY_generate(ctx.get(), &raw) != 1) {
    ADD_FAILURE() << "EC keygen " << group;
  }
  return PkeyPtr(raw);
}

struct TestCurve {
  const char* jwk_name;
  const char* group;
};
constexpr TestCurve kTestCurves[] = {
    {"P-256", "prime256v1"}, {"P-384", "secp384r1"}, {"P-521", "secp521r1"}};

EVP_PKEY* RsaKey() {
  static EVP_PKEY* key = GenerateRsa(2048).release();
  return key;
}

EVP_PKEY* EcKey(const char* jwk_name) {
  static EVP_PKEY* keys[3] = {GenerateEc("prime256v1").release(), GenerateEc("secp384r1").release(),
                              GenerateEc("secp521r1").release()};
  for (int i = 0; i < 3; ++i) {
    if (std::string_view(kTestCurves[i].jwk_name) == jwk_name) return keys[i];
  }
  return nullptr;
}

std::string CrvOf(const EVP_PKEY* key) {
  char group[64] = {0};
  size_t len = 0;
  EVP_PKEY_get_utf8_string_param(key, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof(group), &len);
  for (const TestCurve& c : kTestCurves) {
    if (std::string_view(group, len) == c.group) return c.jwk_name;
  }
  return "";
}

Json PublicJwk(const EVP_PKEY* key) {
  absl::StatusOr<Json> jwk = PublicJwkFromPkey(key);
  EXPECT_TRUE(jwk.ok()) << jwk.status();
  return jwk.ok() ? *jwk : Json();
}

BnPtr Bn(std::string_view bytes) {
  return BnPtr(BN_bin2bn(U(bytes), static_cast<int>(bytes.size()), nullptr));
}

PkeyPtr PkeyFromBuilder(const char* type, OSSL_PARAM_BLD* bld) {
  ParamsPtr params(OSSL_PARAM_BLD_to_param(bld));
  PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr));
  EVP_PKEY* raw = nullptr;
  if (params == nullptr || ctx == nullptr || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_KEYPAIR, params.get()) != 1) {
    ADD_FAILURE() << "fromdata " << type;
  }
  return PkeyPtr(raw);
}

// A P-256 private key from the base64url JWK members.
PkeyPtr EcPrivateKey(std::string_view x, std::string_view y, std::string_view d) {
  const std::string point = "\x04" + B64d(x) + B64d(y);
  BnPtr priv = Bn(B64d(d));
  ParamBldPtr bld(OSSL_PARAM_BLD_new());
  OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0);
  OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(), point.size());
  OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_PRIV_KEY, priv.get());
  return PkeyFromBuilder("EC", bld.get());
}

PkeyPtr RsaPrivateKey(const Json& jwk) {
  const std::pair<const char*, const char*> members[] = {
      {"n", OSSL_PKEY_PARAM_RSA_N},          {"e", OSSL_PKEY_PARAM_RSA_E},
      {"d", OSSL_PKEY_PARAM_RSA_D},          {"p", OSSL_PKEY_PARAM_RSA_FACTOR1},
      {"q", OSSL_PKEY_PARAM_RSA_FACTOR2},    {"dp", OSSL_PKEY_PARAM_RSA_EXPONENT1},
      {"dq", OSSL_PKEY_PARAM_RSA_EXPONENT2}, {"qi", OSSL_PKEY_PARAM_RSA_COEFFICIENT1}};
  std::vector<BnPtr> bns;
  ParamBldPtr bld(OSSL_PARAM_BLD_new());
  for (const auto& [jwk_name, param] : members) {
    bns.push_back(Bn(B64d(jwk.Find(jwk_name)->as_string())));
    OSSL_PARAM_BLD_push_BN(bld.get(), param, bns.back().get());
  }
  return PkeyFromBuilder("RSA", bld.get());
}

// ---- Private-key operations of the recipient (the token's part), done here with OpenSSL -------

absl::StatusOr<Secret> OpensslOaepDecrypt(EVP_PKEY* key, const char* digest,
                                          std::string_view ciphertext) {
  PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, key, nullptr));
  size_t len = 0;
  if (ctx == nullptr || EVP_PKEY_decrypt_init(ctx.get()) != 1 ||
      EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_OAEP_PADDING) != 1 ||
      EVP_PKEY_CTX_set_rsa_oaep_md_name(ctx.get(), digest, nullptr) != 1 ||
      EVP_PKEY_CTX_set_rsa_mgf1_md_name(ctx.get(), digest, nullptr) != 1 ||
      EVP_PKEY_decrypt(ctx.get(), nullptr, &len, U(ciphertext), ciphertext.size()) != 1) {
    return absl::InternalError("OAEP setup");
  }
  Secret out(std::string(len, '\0'));
  if (EVP_PKEY_decrypt(ctx.get(), reinterpret_cast<unsigned char*>(out.mutable_value().data()),
                       &len, U(ciphertext), ciphertext.size()) != 1) {
    return absl::InvalidArgumentError("openssl oaep failed");
  }
  out.mutable_value().resize(len);
  return out;
}

absl::StatusOr<Secret> RawRsa(EVP_PKEY* key, std::string_view in, bool decrypt) {
  PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, key, nullptr));
  size_t len = static_cast<size_t>(EVP_PKEY_get_size(key));
  Secret out(std::string(len, '\0'));
  auto* dst = reinterpret_cast<unsigned char*>(out.mutable_value().data());
  const int init = decrypt ? EVP_PKEY_decrypt_init(ctx.get()) : EVP_PKEY_encrypt_init(ctx.get());
  if (init != 1 || EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_NO_PADDING) != 1) {
    return absl::InternalError("raw RSA setup");
  }
  const int rc = decrypt ? EVP_PKEY_decrypt(ctx.get(), dst, &len, U(in), in.size())
                         : EVP_PKEY_encrypt(ctx.get(), dst, &len, U(in), in.size());
  if (rc != 1) return absl::InvalidArgumentError("raw RSA failed");
  out.mutable_value().resize(len);
  return out;
}

absl::StatusOr<Secret> EcdhDerive(EVP_PKEY* priv, EVP_PKEY* peer) {
  PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, priv, nullptr));
  size_t len = 0;
  if (ctx == nullptr || EVP_PKEY_derive_init(ctx.get()) != 1 ||
      EVP_PKEY_derive_set_peer(ctx.get(), peer) != 1 ||
      EVP_PKEY_derive(ctx.get(), nullptr, &len) != 1) {
    return absl::InternalError("ECDH setup");
  }
  Secret z(std::string(len, '\0'));
  if (EVP_PKEY_derive(ctx.get(), reinterpret_cast<unsigned char*>(z.mutable_value().data()),
                      &len) != 1) {
    return absl::InternalError("ECDH");
  }
  z.mutable_value().resize(len);
  return z;
}

enum class RsaPath { kOpensslOaep, kRawPlusOaepDecode };

// The whole decryption of a compact JWE as custodyd would run it, with the private-key step done
// by OpenSSL here instead of the token.
absl::StatusOr<Secret> RecipientDecrypt(std::string_view compact, EVP_PKEY* priv,
                                        const JweLimits& limits = {},
                                        RsaPath rsa_path = RsaPath::kOpensslOaep) {
  absl::StatusOr<ParsedJwe> jwe = ParseCompactJwe(Absl(compact), limits);
  if (!jwe.ok()) return jwe.status();
  Secret cek;
  if (IsEcdh(jwe->alg)) {
    absl::StatusOr<PkeyPtr> epk = ValidateEpk(*jwe->epk, CrvOf(priv));
    if (!epk.ok()) return epk.status();
    absl::StatusOr<Secret> z = EcdhDerive(priv, epk->get());
    if (!z.ok()) return z.status();
    const bool direct = jwe->alg == JweAlg::kEcdhEs;
    absl::StatusOr<Secret> derived =
        ConcatKdf(*z, direct ? JweEncName(jwe->enc) : JweAlgName(jwe->alg), jwe->apu, jwe->apv,
                  direct ? CekBytes(jwe->enc) : KeyWrapBytes(jwe->alg));
    if (!derived.ok()) return derived.status();
    if (direct) {
      cek = *std::move(derived);
    } else {
      absl::StatusOr<Secret> unwrapped = AesKeyUnwrap(*derived, jwe->encrypted_key);
      if (!unwrapped.ok()) return unwrapped.status();
      cek = *std::move(unwrapped);
    }
  } else {
    const char* digest = jwe->alg == JweAlg::kRsaOaep ? "SHA1" : "SHA256";
    absl::StatusOr<Secret> key;
    if (rsa_path == RsaPath::kOpensslOaep) {
      key = OpensslOaepDecrypt(priv, digest, jwe->encrypted_key);
    } else {
      absl::StatusOr<Secret> em = RawRsa(priv, jwe->encrypted_key, /*decrypt=*/true);
      if (!em.ok()) return em.status();
      key = OaepDecode(*em, jwe->alg == JweAlg::kRsaOaep ? EVP_sha1() : EVP_sha256());
    }
    if (!key.ok()) return key.status();
    cek = *std::move(key);
  }
  return DecryptContent(*jwe, cek, limits);
}

// ---- python3-jwcrypto, run as a separate process
// -------------------------------------------------

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/custody_jwe_test_XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string File(std::string_view name) const { return path_ + "/" + std::string(name); }

 private:
  std::string path_;
};

void WriteFile(const std::string& path, std::string_view data) {
  std::ofstream out(path, std::ios::binary);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Runs /usr/bin/python3 on `script` with `args`; returns the exit status (0 on success).
int RunPython(const TempDir& dir, std::string_view script, const std::vector<std::string>& args) {
  const std::string script_path = dir.File("script.py");
  WriteFile(script_path, script);
  std::vector<std::string> argv = {"/usr/bin/python3", script_path};
  argv.insert(argv.end(), args.begin(), args.end());
  return custody::testing::RunChild({.argv = argv});
}

// Input: a JSON list of {"jwk": {...}, "header": {...}, "plaintext": b64url}. Output: a JSON list
// of compact JWEs, in the same order.
constexpr std::string_view kJwcryptoEncrypt = R"py(
import json, sys
from jwcrypto import jwe, jwk
from jwcrypto.common import base64url_decode
jobs = json.load(open(sys.argv[1]))
out = []
for job in jobs:
    key = jwk.JWK(**job["jwk"])
    token = jwe.JWE(base64url_decode(job["plaintext"]), json.dumps(job["header"]))
    token.add_recipient(key)
    out.append(token.serialize(compact=True))
json.dump(out, open(sys.argv[2], "w"))
)py";

// Input: a JSON list of {"pem": path, "jwe": compact}. Output: a JSON list of b64url plaintexts.
constexpr std::string_view kJwcryptoDecrypt = R"py(
import json, sys
from jwcrypto import jwe, jwk
from jwcrypto.common import base64url_encode
jobs = json.load(open(sys.argv[1]))
out = []
for job in jobs:
    key = jwk.JWK.from_pem(open(job["pem"], "rb").read())
    token = jwe.JWE()
    token.deserialize(job["jwe"], key)
    out.append(base64url_encode(token.payload))
json.dump(out, open(sys.argv[2], "w"))
)py";

std::string WritePrivatePem(const TempDir& dir, EVP_PKEY* key, const std::string& name) {
  const std::string path = dir.File(name);
  BIO* bio = BIO_new_file(path.c_str(), "w");
  EXPECT_NE(bio, nullptr);
  EXPECT_EQ(PEM_write_bio_PrivateKey(bio, key, nullptr, nullptr, 0, nullptr, nullptr), 1);
  BIO_free(bio);
  return path;
}

Json ParseJsonOrDie(std::string_view text) {
  JsonLimits limits;
  limits.max_bytes = 16 * 1024 * 1024;
  absl::StatusOr<Json> json = ParseJson(text, limits);
  EXPECT_TRUE(json.ok()) << json.status();
  return json.ok() ? *json : Json();
}

// ---- Test matrix -------------------------------------------------------------------------------

constexpr JweAlg kAllAlgs[] = {JweAlg::kRsaOaep,      JweAlg::kRsaOaep256,   JweAlg::kEcdhEs,
                               JweAlg::kEcdhEsA128Kw, JweAlg::kEcdhEsA192Kw, JweAlg::kEcdhEsA256Kw};
constexpr JweEnc kAllEncs[] = {JweEnc::kA128Gcm,      JweEnc::kA192Gcm,      JweEnc::kA256Gcm,
                               JweEnc::kA128CbcHs256, JweEnc::kA192CbcHs384, JweEnc::kA256CbcHs512};

struct Case {
  JweAlg alg;
  JweEnc enc;
  EVP_PKEY* key;
  std::string label;
};

std::vector<Case> AllCases() {
  std::vector<Case> cases;
  for (JweAlg alg : kAllAlgs) {
    for (JweEnc enc : kAllEncs) {
      if (IsEcdh(alg)) {
        for (const TestCurve& c : kTestCurves) {
          cases.push_back({alg, enc, EcKey(c.jwk_name),
                           absl::StrCat(JweAlgName(alg), "/", JweEncName(enc), "/", c.jwk_name)});
        }
      } else {
        cases.push_back({alg, enc, RsaKey(), absl::StrCat(JweAlgName(alg), "/", JweEncName(enc))});
      }
    }
  }
  return cases;
}

std::string Compact(std::string_view header_json, std::string_view ek, std::string_view iv,
                    std::string_view ct, std::string_view tag) {
  return Base64UrlEncode(header_json) + "." + Base64UrlEncode(ek) + "." + Base64UrlEncode(iv) +
         "." + Base64UrlEncode(ct) + "." + Base64UrlEncode(tag);
}

// A well-formed RSA-OAEP-256/A256GCM compact JWE with the given header (not decryptable).
std::string RsaShaped(std::string_view header_json) {
  return Compact(header_json, std::string(256, 'k'), std::string(12, 'i'), "ciphertext",
                 std::string(16, 't'));
}

std::string ReplacePart(std::string_view compact, int index, std::string_view replacement) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (;;) {
    const size_t dot = compact.find('.', start);
    parts.emplace_back(compact.substr(start, dot - start));
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  parts[static_cast<size_t>(index)] = std::string(replacement);
  std::string out = parts[0];
  for (size_t i = 1; i < parts.size(); ++i) out += "." + parts[i];
  return out;
}

std::string PartBytes(std::string_view compact, int index) {
  size_t start = 0;
  for (int i = 0; i < index; ++i) start = compact.find('.', start) + 1;
  const size_t end = compact.find('.', start);
  return B64d(compact.substr(start, end == std::string_view::npos ? end : end - start));
}

// ---- Names and sizes ---------------------------------------------------------------------------

TEST(JweNames, AlgAndEncNamesRoundTrip) {
  for (JweAlg alg : kAllAlgs) {
    absl::StatusOr<JweAlg> parsed = ParseJweAlg(JweAlgName(alg));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, alg);
  }
  for (JweEnc enc : kAllEncs) {
    absl::StatusOr<JweEnc> parsed = ParseJweEnc(JweEncName(enc));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, enc);
  }
  EXPECT_EQ(JweAlgName(JweAlg::kEcdhEsA192Kw), "ECDH-ES+A192KW");
  EXPECT_EQ(JweEncName(JweEnc::kA256CbcHs512), "A256CBC-HS512");
}

TEST(JweNames, RefusedAlgsNameTheirReason) {
  const std::pair<const char*, const char*> refused[] = {
      {"RSA1_5", "Bleichenbacher"},       {"RSA1_5", "FAPI"},
      {"dir", "shared symmetric key"},    {"PBES2-HS256+A128KW", "password"},
      {"PBES2-HS512+A256KW", "password"}, {"A128KW", "symmetric key wrap"},
      {"A256KW", "symmetric key wrap"},   {"A128GCMKW", "symmetric key wrap"},
  };
  for (const auto& [name, reason] : refused) {
    absl::StatusOr<JweAlg> alg = ParseJweAlg(name);
    ASSERT_FALSE(alg.ok()) << name;
    EXPECT_EQ(alg.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(Msg(alg.status()), HasSubstr(name));
    EXPECT_THAT(Msg(alg.status()), HasSubstr(reason)) << name;
  }
  absl::StatusOr<JweAlg> unknown = ParseJweAlg("RSA-OAEP-512");
  ASSERT_FALSE(unknown.ok());
  EXPECT_THAT(Msg(unknown.status()), HasSubstr("unknown JWE alg \"RSA-OAEP-512\""));
  EXPECT_FALSE(ParseJweEnc("A128CTR").ok());
}

TEST(JweNames, CekAndKeyWrapSizesFollowRfc7518) {
  EXPECT_EQ(CekBytes(JweEnc::kA128Gcm), 16u);
  EXPECT_EQ(CekBytes(JweEnc::kA192Gcm), 24u);
  EXPECT_EQ(CekBytes(JweEnc::kA256Gcm), 32u);
  EXPECT_EQ(CekBytes(JweEnc::kA128CbcHs256), 32u);
  EXPECT_EQ(CekBytes(JweEnc::kA192CbcHs384), 48u);
  EXPECT_EQ(CekBytes(JweEnc::kA256CbcHs512), 64u);
  EXPECT_EQ(KeyWrapBytes(JweAlg::kEcdhEsA128Kw), 16u);
  EXPECT_EQ(KeyWrapBytes(JweAlg::kEcdhEsA192Kw), 24u);
  EXPECT_EQ(KeyWrapBytes(JweAlg::kEcdhEsA256Kw), 32u);
  EXPECT_EQ(KeyWrapBytes(JweAlg::kEcdhEs), 0u);
  EXPECT_EQ(KeyWrapBytes(JweAlg::kRsaOaep256), 0u);
  EXPECT_TRUE(IsEcdh(JweAlg::kEcdhEs));
  EXPECT_FALSE(IsEcdh(JweAlg::kRsaOaep));
}

// ---- Standard vectors --------------------------------------------------------------------------

// RFC 7518 Appendix C.
constexpr absl::string_view kAliceX = "gI0GAILBdu7T53akrFmMyGcsF3n5dO7MmwNBHKW5SV0";
constexpr absl::string_view kAliceY = "SLW_xSffzlPWrHEVI30DHM_4egVwt3NQqeUD7nMFpps";
constexpr std::string_view kAliceD = "0_NxaRPUMQoAJt50Gz8YiTr8gRTwyEaCumd-MToTmIo";
constexpr std::string_view kBobX = "weNJy2HscCSM6AEDTDg04biOvhFhyyWvOHQfeF_PxMQ";
constexpr std::string_view kBobY = "e8lnCO-AlStT-NJVX-crhB7QRYhiix03illJOVAOyck";
constexpr std::string_view kBobD = "VEmDZpDXXK8p8N0Cndsxs924q6nS1RXFASRl6BfUqdw";

TEST(ConcatKdf, MatchesRfc7518AppendixC) {
  PkeyPtr alice = EcPrivateKey(Std(kAliceX), Std(kAliceY), kAliceD);
  PkeyPtr bob = EcPrivateKey(kBobX, kBobY, kBobD);
  ASSERT_NE(alice, nullptr);
  ASSERT_NE(bob, nullptr);
  // Bob, the recipient, validates Alice's epk as custodyd would, then derives Z.
  const Json epk = ParseJsonOrDie(
      absl::StrCat(R"({"kty":"EC","crv":"P-256","x":")", kAliceX, R"(","y":")", kAliceY, R"("})"));
  absl::StatusOr<PkeyPtr> alice_public = ValidateEpk(epk, "P-256");
  ASSERT_TRUE(alice_public.ok()) << alice_public.status();
  absl::StatusOr<Secret> z = EcdhDerive(bob.get(), alice_public->get());
  ASSERT_TRUE(z.ok()) << z.status();
  absl::StatusOr<Secret> z_alice = EcdhDerive(alice.get(), bob.get());
  ASSERT_TRUE(z_alice.ok());
  EXPECT_EQ(z->view(), z_alice->view());

  absl::StatusOr<Secret> key = ConcatKdf(*z, "A128GCM", "Alice", "Bob", 16);
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_EQ(Base64UrlEncode(Std(key->view())), "VqqN6vgjbSBcIijNcacQGg");
}

TEST(ConcatKdf, DependsOnEveryOtherInfoField) {
  const Secret z(RandomBytes(32));
  absl::StatusOr<Secret> base = ConcatKdf(z, "A128GCM", "u", "v", 16);
  ASSERT_TRUE(base.ok());
  EXPECT_NE(ConcatKdf(z, "A192GCM", "u", "v", 16)->view(), base->view());
  EXPECT_NE(ConcatKdf(z, "A128GCM", "x", "v", 16)->view(), base->view());
  EXPECT_NE(ConcatKdf(z, "A128GCM", "u", "x", 16)->view(), base->view());
  // The length goes into SuppPubInfo, so a longer key is not an extension of the shorter one.
  EXPECT_NE(ConcatKdf(z, "A128GCM", "u", "v", 32)->view().substr(0, 16), base->view());
  // Length-prefixing keeps ("ab","c") apart from ("a","bc").
  EXPECT_NE(ConcatKdf(z, "A128GCM", "ab", "c", 16)->view(),
            ConcatKdf(z, "A128GCM", "a", "bc", 16)->view());
  EXPECT_FALSE(ConcatKdf(Secret(), "A128GCM", "", "", 16).ok());
}

TEST(AesKeyUnwrap, MatchesRfc3394Section4_1) {
  const Secret kek(Unhex("000102030405060708090A0B0C0D0E0F"));
  const std::string wrapped = Unhex("1FA68B0A8112B447AEF34BD8FB5A7B829D3E862371D2CFE5");
  absl::StatusOr<Secret> key = AesKeyUnwrap(kek, wrapped);
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_EQ(key->view(), Unhex("00112233445566778899AABBCCDDEEFF"));
}

TEST(AesKeyUnwrap, RejectsTamperingAndBadSizesUniformly) {
  const Secret kek(Unhex("000102030405060708090A0B0C0D0E0F"));
  std::string wrapped = Unhex("1FA68B0A8112B447AEF34BD8FB5A7B829D3E862371D2CFE5");
  wrapped[5] ^= 0x01;
  for (const absl::StatusOr<Secret>& result :
       {AesKeyUnwrap(kek, wrapped), AesKeyUnwrap(kek, wrapped.substr(0, 16)),
        AesKeyUnwrap(kek, wrapped.substr(0, 23)), AesKeyUnwrap(Secret("short"), wrapped)}) {
    ASSERT_FALSE(result.ok());
    EXPECT_THAT(result, IsDecryptionFailed());
  }
}

TEST(DecryptContent, MatchesRfc7518AppendixB1) {
  ParsedJwe jwe;
  jwe.enc = JweEnc::kA128CbcHs256;
  jwe.protected_b64 = "The second principle of Auguste Kerckhoffs";  // A, used verbatim as AAD
  jwe.iv = Unhex("1af38c2dc2b96ffdd86694092341bc04");
  jwe.ciphertext = Unhex(
      "c80edfa32ddf39d5ef00c0b468834279a2e46a1b8049f792f76bfe54b903a9c9a94ac9b47ad2655c5f10f9aef714"
      "27e2fc6f9b3f399a221489f16362c703233609d45ac69864e3321cf82935ac4096c86e133314c54019e8ca7980df"
      "a4b9cf1b384c486f3a54c51078158ee5d79de59fbd34d848b3d69550a67646344427ade54b8851ffb598f7f80074"
      "b9473c82e2db");
  jwe.tag = Unhex("652c3fa36b0a7c5b3219fab3a30bc1c4");
  std::string k;
  for (int i = 0; i < 32; ++i) k.push_back(static_cast<char>(i));
  const Secret cek(k);
  absl::StatusOr<Secret> plaintext = DecryptContent(jwe, cek);
  ASSERT_TRUE(plaintext.ok()) << plaintext.status();
  EXPECT_EQ(plaintext->view(),
            "A cipher system must not be required to be secret, and it must be able to fall into "
            "the hands of the enemy without inconvenience");

  ParsedJwe bad_tag = jwe;
  bad_tag.tag[15] ^= 0x80;
  ParsedJwe bad_aad = jwe;
  bad_aad.protected_b64[0] = 't';
  ParsedJwe bad_ct = jwe;
  bad_ct.ciphertext[0] ^= 0x01;
  ParsedJwe bad_iv = jwe;
  bad_iv.iv[0] ^= 0x01;
  for (const ParsedJwe* tampered : {&bad_tag, &bad_aad, &bad_ct, &bad_iv}) {
    absl::StatusOr<Secret> result = DecryptContent(*tampered, cek);
    ASSERT_FALSE(result.ok());
    EXPECT_THAT(result, IsDecryptionFailed());
  }
  absl::StatusOr<Secret> short_cek = DecryptContent(jwe, Secret(k.substr(0, 16)));
  ASSERT_FALSE(short_cek.ok());
  EXPECT_THAT(short_cek, IsDecryptionFailed());
}

// RFC 7516 Appendix A.1: RSA-OAEP with A256GCM, the complete example.
constexpr std::string_view kRfc7516A1Key = R"({"kty":"RSA",
 "n":"oahUIoWw0K0usKNuOR6H4wkf4oBUXHTxRvgb48E-BVvxkeDNjbC4he8rUWcJoZmds2h7M70imEVhRU5djINXtqllXI4DFqcI1DgjT9LewND8MW2Krf3Spsk_ZkoFnilakGygTwpZ3uesH-PFABNIUYpOiN15dsQRkgr0vEhxN92i2asbOenSZeyaxziK72UwxrrKoExv6kc5twXTq4h-QChLOln0_mtUZwfsRaMStPs6mS6XrgxnxbWhojf663tuEQueGC-FCMfra36C9knDFGzKsNa7LZK2djYgyD3JR_MB_4NUJW_TqOQtwHYbxevoJArm-L5StowjzGy-_bq6Gw",
 "e":"AQAB",
 "d":"kLdtIj6GbDks_ApCSTYQtelcNttlKiOyPzMrXHeI-yk1F7-kpDxY4-WY5NWV5KntaEeXS1j82E375xxhWMHXyvjYecPT9fpwR_M9gV8n9Hrh2anTpTD93Dt62ypW3yDsJzBnTnrYu1iwWRgBKrEYY46qAZIrA2xAwnm2X7uGR1hghkqDp0Vqj3kbSCz1XyfCs6_LehBwtxHIyh8Ripy40p24moOAbgxVw3rxT_vlt3UVe4WO3JkJOzlpUf-KTVI2Ptgm-dARxTEtE-id-4OJr0h-K-VFs3VSndVTIznSxfyrj8ILL6MG_Uv8YAu7VILSB3lOW085-4qE3DzgrTjgyQ",
 "p":"1r52Xk46c-LsfB5P442p7atdPUrxQSy4mti_tZI3Mgf2EuFVbUoDBvaRQ-SWxkbkmoEzL7JXroSBjSrK3YIQgYdMgyAEPTPjXv_hI2_1eTSPVZfzL0lffNn03IXqWF5MDFuoUYE0hzb2vhrlN_rKrbfDIwUbTrjjgieRbwC6Cl0",
 "q":"wLb35x7hmQWZsWJmB_vle87ihgZ19S8lBEROLIsZG4ayZVe9Hi9gDVCOBmUDdaDYVTSNx_8Fyw1YYa9XGrGnDew00J28cRUoeBB_jKI1oma0Orv1T9aXIWxKwd4gvxFImOWr3QRL9KEBRzk2RatUBnmDZJTIAfwTs0g68UZHvtc",
 "dp":"ZK-YwE7diUh0qR1tR7w8WHtolDx3MZ_OTowiFvgfeQ3SiresXjm9gZ5KLhMXvo-uz-KUJWDxS5pFQ_M0evdo1dKiRTjVw_x4NyqyXPM5nULPkcpU827rnpZzAJKpdhWAgqrXGKAECQH0Xt4taznjnd_zVpAmZZq60WPMBMfKcuE",
 "dq":"Dq0gfgJ1DdFGXiLvQEZnuKEN0UUmsJBxkjydc3j4ZYdBiMRAy86x0vHCjywcMlYYg4yoC4YZa9hNVcsjqA3FeiL19rk8g6Qn29Tt0cj8qqyFpz9vNDBUfCAiJVeESOjJDZPYHdHY8v1b-o-Z2X5tvLx-TCekf7oxyeKDUqKWjis",
 "qi":"VIMpMYbPf47dT1w_zDUXfPimsSegnMOA1zTaX7aGk_8urY6R8-ZW1FxU7AlWAyLWybqq6t16VFd7hQd0y6flUK4SlOydB61gwanOsXGOAOv82cHq0E3eL4HrtZkUuKvnPrMnsUUFlfUdybVzxyjz9JF_XyaY14ardLSjf4L_FNY"})";

constexpr std::string_view kRfc7516A1Jwe =
    "eyJhbGciOiJSU0EtT0FFUCIsImVuYyI6IkEyNTZHQ00ifQ."
    "OKOawDo13gRp2ojaHV7LFpZcgV7T6DVZKTyKOMTYUmKoTCVJRgckCL9kiMT03JGeipsEdY3mx_etLbbWSrFr05kLzcSr4q"
    "KAq7YN7e9jwQRb23nfa6c9d-StnImGyFDbSv04uVuxIp5Zms1gNxKKK2Da14B8S4rzVRltdYwam_lDp5XnZAYpQdb76FdI"
    "KLaVmqgfwX7XWRxv2322i-vDxRfqNzo_tETKzpVLzfiwQyeyPGLBIO56YJ7eObdv0je81860ppamavo35UgoRdbYaBcoh9"
    "QcfylQr66oc6vFWXRcZ_ZT2LawVCWTIy3brGPi6UklfCpIMfIjf7iGdXKHzg."
    "48V1_ALb6US04U3b."
    "5eym8TW_c8SuK0ltJ3rpYIzOeDQz7TALvtu6UG9oMo4vpzs9tX_EFShS8iB7j6jiSdiwkIr3ajwQzaBtQD_A."
    "XFBoMYUZodetZdvTiFvSkQ";

TEST(Rfc7516Vectors, DecryptsAppendixA1ThroughOaepDecodeAndOpensslOaep) {
  PkeyPtr key = RsaPrivateKey(ParseJsonOrDie(kRfc7516A1Key));
  ASSERT_NE(key, nullptr);
  for (RsaPath path : {RsaPath::kRawPlusOaepDecode, RsaPath::kOpensslOaep}) {
    absl::StatusOr<Secret> plaintext = RecipientDecrypt(kRfc7516A1Jwe, key.get(), {}, path);
    ASSERT_TRUE(plaintext.ok()) << plaintext.status();
    EXPECT_EQ(plaintext->view(), "The true sign of intelligence is not knowledge but imagination.");
  }
}

TEST(Rfc7516Vectors, DecryptsAppendixA3ContentWithTheUnwrappedCek) {
  constexpr std::string_view kJwe =
      "eyJhbGciOiJBMTI4S1ciLCJlbmMiOiJBMTI4Q0JDLUhTMjU2In0."
      "6KB707dM9YTIgHtLvtgWQ8mKwboJW3of9locizkDTHzBC2IlrT1oOQ."
      "AxY8DCtDaGlsbGljb3RoZQ."
      "KDlTtXchhZTGufMYmOYGS4HffxPSUrfmqCHXaI9wOGY."
      "U0m_YmjN04DJvceFICbCVQ";
  // A128KW itself is refused as an alg...
  absl::StatusOr<ParsedJwe> refused = ParseCompactJwe(Absl(kJwe));
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(Msg(refused.status()), HasSubstr("\"A128KW\" refused"));
  // ...but its key unwrap and A128CBC-HS256 content are the same primitives as ours.
  absl::StatusOr<Secret> cek =
      AesKeyUnwrap(Secret(B64d("GawgguFyGrWKav7AX4VKUg")), PartBytes(kJwe, 1));
  ASSERT_TRUE(cek.ok()) << cek.status();
  const unsigned char kRfcCek[] = {4,   211, 31,  197, 84,  157, 252, 254, 11, 100, 157,
                                   250, 63,  170, 106, 206, 107, 124, 212, 45, 111, 107,
                                   9,   219, 200, 177, 0,   240, 143, 156, 44, 207};
  EXPECT_EQ(cek->view(), std::string(reinterpret_cast<const char*>(kRfcCek), sizeof(kRfcCek)));
  ParsedJwe jwe;
  jwe.protected_b64 = "eyJhbGciOiJBMTI4S1ciLCJlbmMiOiJBMTI4Q0JDLUhTMjU2In0";
  jwe.enc = JweEnc::kA128CbcHs256;
  jwe.iv = PartBytes(kJwe, 2);
  jwe.ciphertext = PartBytes(kJwe, 3);
  jwe.tag = PartBytes(kJwe, 4);
  absl::StatusOr<Secret> plaintext = DecryptContent(jwe, *cek);
  ASSERT_TRUE(plaintext.ok()) << plaintext.status();
  EXPECT_EQ(plaintext->view(), "Live long and prosper.");
}

// ---- OAEP decoding against OpenSSL's own
// ---------------------------------------------------------

std::string Mgf1ForTest(const EVP_MD* md, std::string_view seed, size_t len) {
  std::string out;
  for (uint32_t counter = 0; out.size() < len; ++counter) {
    std::string block(seed);
    for (int shift = 24; shift >= 0; shift -= 8)
      block.push_back(static_cast<char>(counter >> shift));
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    EVP_Digest(block.data(), block.size(), digest, &n, md, nullptr);
    out.append(reinterpret_cast<const char*>(digest), n);
  }
  out.resize(len);
  return out;
}

enum class OaepFlaw { kNone, kNonZeroY, kWrongLHash, kSeparatorTwo, kNoSeparator, kNonZeroPs };

// RFC 8017 §7.1.1 EME-OAEP encoding with one deliberate flaw, written independently of OaepDecode.
std::string OaepEncodeForTest(const EVP_MD* md, size_t k, std::string_view message, OaepFlaw flaw) {
  const size_t h = static_cast<size_t>(EVP_MD_get_size(md));
  unsigned char lhash[EVP_MAX_MD_SIZE];
  EVP_Digest("", 0, lhash, nullptr, md, nullptr);
  const size_t ps_len = k - message.size() - 2 * h - 2;
  std::string db(reinterpret_cast<const char*>(lhash), h);
  db.append(ps_len, '\0');
  db.push_back('\x01');
  db.append(message);
  switch (flaw) {
    case OaepFlaw::kNone:
    case OaepFlaw::kNonZeroY:
      break;
    case OaepFlaw::kWrongLHash:
      db[h - 1] ^= 0x01;
      break;
    case OaepFlaw::kSeparatorTwo:
      db[h + ps_len] = '\x02';
      break;
    case OaepFlaw::kNoSeparator:  // with an empty message: lHash || zeros
      db[h + ps_len] = '\0';
      break;
    case OaepFlaw::kNonZeroPs:
      db[h] = '\x05';
      break;
  }
  const std::string seed = RandomBytes(h);
  const std::string db_mask = Mgf1ForTest(md, seed, db.size());
  for (size_t i = 0; i < db.size(); ++i) db[i] ^= db_mask[i];
  std::string masked_seed = seed;
  const std::string seed_mask = Mgf1ForTest(md, db, h);
  for (size_t i = 0; i < h; ++i) masked_seed[i] ^= seed_mask[i];
  return std::string(1, flaw == OaepFlaw::kNonZeroY ? '\x01' : '\0') + masked_seed + db;
}

const char* DigestName(const EVP_MD* md) { return md == EVP_sha1() ? "SHA1" : "SHA256"; }

// Checks OaepDecode against OpenSSL's OAEP decryption of the same ciphertext: same verdict, same
// message on success, the uniform message on failure. Returns whether OpenSSL accepted it.
bool ExpectSameVerdictAsOpenssl(const EVP_MD* md, std::string_view ciphertext) {
  absl::StatusOr<Secret> openssl = OpensslOaepDecrypt(RsaKey(), DigestName(md), ciphertext);
  absl::StatusOr<Secret> em = RawRsa(RsaKey(), ciphertext, /*decrypt=*/true);
  if (!em.ok()) {  // not a valid RSA input (>= n): no em to decode, and OpenSSL refuses too
    EXPECT_FALSE(openssl.ok());
    return false;
  }
  absl::StatusOr<Secret> ours = OaepDecode(*em, md);
  EXPECT_EQ(ours.ok(), openssl.ok());
  if (ours.ok() && openssl.ok()) {
    EXPECT_EQ(ours->view(), openssl->view());
  }
  if (!ours.ok()) {
    EXPECT_THAT(ours, IsDecryptionFailed());
  }
  return openssl.ok();
}

std::string OpensslOaepEncrypt(const EVP_MD* md, std::string_view message) {
  PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, RsaKey(), nullptr));
  size_t len = 0;
  EXPECT_EQ(EVP_PKEY_encrypt_init(ctx.get()), 1);
  EXPECT_EQ(EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_OAEP_PADDING), 1);
  EXPECT_EQ(EVP_PKEY_CTX_set_rsa_oaep_md_name(ctx.get(), DigestName(md), nullptr), 1);
  EXPECT_EQ(EVP_PKEY_CTX_set_rsa_mgf1_md_name(ctx.get(), DigestName(md), nullptr), 1);
  EXPECT_EQ(EVP_PKEY_encrypt(ctx.get(), nullptr, &len, U(message), message.size()), 1);
  std::string out(len, '\0');
  EXPECT_EQ(EVP_PKEY_encrypt(ctx.get(), reinterpret_cast<unsigned char*>(out.data()), &len,
                             U(message), message.size()),
            1);
  out.resize(len);
  return out;
}

class OaepDecodeTest : public ::testing::TestWithParam<const EVP_MD*> {};

TEST_P(OaepDecodeTest, RecoversOpensslEncryptedMessagesOfEveryLength) {
  const EVP_MD* md = GetParam();
  const size_t k = static_cast<size_t>(EVP_PKEY_get_size(RsaKey()));
  const size_t max_message = k - 2 * static_cast<size_t>(EVP_MD_get_size(md)) - 2;
  std::vector<size_t> lengths = {0, 1, 16, 32, 64, max_message - 1, max_message};
  for (int i = 0; i < 20; ++i) {
    unsigned char r[2];
    RAND_bytes(r, 2);
    lengths.push_back((static_cast<size_t>(r[0]) << 8 | r[1]) % (max_message + 1));
  }
  for (size_t len : lengths) {
    const std::string message = RandomBytes(len);
    const std::string ciphertext = OpensslOaepEncrypt(md, message);
    absl::StatusOr<Secret> em = RawRsa(RsaKey(), ciphertext, /*decrypt=*/true);
    ASSERT_TRUE(em.ok());
    ASSERT_EQ(em->size(), k);
    absl::StatusOr<Secret> decoded = OaepDecode(*em, md);
    ASSERT_TRUE(decoded.ok()) << "length " << len;
    EXPECT_EQ(decoded->view(), message);
  }
}

TEST_P(OaepDecodeTest, FailsExactlyWhenOpensslOaepFails) {
  const EVP_MD* md = GetParam();
  const size_t k = static_cast<size_t>(EVP_PKEY_get_size(RsaKey()));
  struct Crafted {
    OaepFlaw flaw;
    std::string message;
    bool valid;
  };
  const std::vector<Crafted> crafted = {
      {OaepFlaw::kNone, "hello", true},          {OaepFlaw::kNone, "", true},
      {OaepFlaw::kNonZeroY, "hello", false},     {OaepFlaw::kWrongLHash, "hello", false},
      {OaepFlaw::kSeparatorTwo, "hello", false}, {OaepFlaw::kNoSeparator, "", false},
      {OaepFlaw::kNonZeroPs, "hello", false},
  };
  for (const Crafted& c : crafted) {
    const std::string em = OaepEncodeForTest(md, k, c.message, c.flaw);
    absl::StatusOr<Secret> ciphertext = RawRsa(RsaKey(), em, /*decrypt=*/false);
    ASSERT_TRUE(ciphertext.ok());
    EXPECT_EQ(ExpectSameVerdictAsOpenssl(md, Std(ciphertext->view())), c.valid)
        << "flaw " << static_cast<int>(c.flaw);
  }
  // Flipped bits in a valid ciphertext, and random ciphertexts.
  const std::string good = OpensslOaepEncrypt(md, "a content encryption key");
  for (size_t i = 0; i < 24; ++i) {
    std::string flipped = good;
    flipped[(i * 37) % k] ^= static_cast<char>(1 << (i % 8));
    EXPECT_FALSE(ExpectSameVerdictAsOpenssl(md, flipped));
  }
  for (int i = 0; i < 24; ++i) {
    std::string random = RandomBytes(k);
    random[0] &= 0x3f;  // below n most of the time, so that the raw decryption succeeds
    ExpectSameVerdictAsOpenssl(md, random);
  }
}

TEST_P(OaepDecodeTest, RejectsEncodingsTooShortForTheHash) {
  const size_t h = static_cast<size_t>(EVP_MD_get_size(GetParam()));
  absl::StatusOr<Secret> result = OaepDecode(Secret(std::string(2 * h + 1, '\0')), GetParam());
  ASSERT_FALSE(result.ok());
  EXPECT_THAT(result, IsDecryptionFailed());
  EXPECT_FALSE(OaepDecode(Secret(), GetParam()).ok());
}

INSTANTIATE_TEST_SUITE_P(Sha1AndSha256, OaepDecodeTest, ::testing::Values(EVP_sha1(), EVP_sha256()),
                         [](const auto& info) {
                           return info.param == EVP_sha1() ? "Sha1" : "Sha256";
                         });

// ---- Encryption round trips and interop ---------------------------------------------------------

TEST(EncryptCompactJwe, EveryAlgAndEncDecryptsThroughOpensslPrivateKeyOps) {
  for (const Case& c : AllCases()) {
    SCOPED_TRACE(c.label);
    const std::string plaintext = "payload for " + c.label + RandomBytes(37);
    absl::StatusOr<std::string> compact =
        EncryptCompactJwe(plaintext, PublicJwk(c.key), c.alg, c.enc, "kid-1");
    ASSERT_TRUE(compact.ok()) << compact.status();
    absl::StatusOr<Secret> decrypted = RecipientDecrypt(*compact, c.key);
    ASSERT_TRUE(decrypted.ok()) << decrypted.status();
    EXPECT_EQ(decrypted->view(), plaintext);
    if (!IsEcdh(c.alg)) {
      decrypted = RecipientDecrypt(*compact, c.key, {}, RsaPath::kRawPlusOaepDecode);
      ASSERT_TRUE(decrypted.ok()) << decrypted.status();
      EXPECT_EQ(decrypted->view(), plaintext);
    }
  }
}

TEST(EncryptCompactJwe, HeaderMembersComeInTheDocumentedOrder) {
  Json extra = Json::MakeObject({{"cty", Json::String("JWT")}, {"typ", Json::String("x")}});
  absl::StatusOr<std::string> compact = EncryptCompactJwe(
      "hi", PublicJwk(EcKey("P-256")), JweAlg::kEcdhEsA128Kw, JweEnc::kA128Gcm, "k7", extra);
  ASSERT_TRUE(compact.ok()) << compact.status();
  const Json header = ParseJsonOrDie(PartBytes(*compact, 0));
  std::vector<std::string> names;
  for (const auto& [name, value] : header.as_object()) names.push_back(name);
  EXPECT_EQ(names, (std::vector<std::string>{"alg", "enc", "kid", "epk", "cty", "typ"}));
  EXPECT_EQ(header.Find("epk")->Find("crv")->as_string(), "P-256");
  EXPECT_EQ(header.Find("epk")->Find("d"), nullptr);

  compact = EncryptCompactJwe("hi", PublicJwk(RsaKey()), JweAlg::kRsaOaep256, JweEnc::kA256Gcm);
  ASSERT_TRUE(compact.ok());
  EXPECT_EQ(PartBytes(*compact, 0), R"({"alg":"RSA-OAEP-256","enc":"A256GCM"})");
}

TEST(EncryptCompactJwe, UsesCallerApuApvInTheKeyDerivation) {
  Json extra = Json::MakeObject({{"apu", Json::String(Base64UrlEncode("Alice"))},
                                 {"apv", Json::String(Base64UrlEncode("Bob"))}});
  absl::StatusOr<std::string> compact =
      EncryptCompactJwe("with party info", PublicJwk(EcKey("P-384")), JweAlg::kEcdhEs,
                        JweEnc::kA256CbcHs512, "", extra);
  ASSERT_TRUE(compact.ok()) << compact.status();
  absl::StatusOr<ParsedJwe> parsed = ParseCompactJwe(*compact);
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(parsed->apu, "Alice");
  EXPECT_EQ(parsed->apv, "Bob");
  absl::StatusOr<Secret> decrypted = RecipientDecrypt(*compact, EcKey("P-384"));
  ASSERT_TRUE(decrypted.ok()) << decrypted.status();
  EXPECT_EQ(decrypted->view(), "with party info");
}

TEST(EncryptCompactJwe, RefusesForbiddenExtraMembersAndMismatchedKeys) {
  for (const char* name : {"alg", "enc", "epk", "kid", "zip", "crit"}) {
    Json extra = Json::MakeObject({{name, Json::String("x")}});
    absl::StatusOr<std::string> r = EncryptCompactJwe("p", PublicJwk(RsaKey()), JweAlg::kRsaOaep256,
                                                      JweEnc::kA256Gcm, "", extra);
    ASSERT_FALSE(r.ok()) << name;
    EXPECT_THAT(Msg(r.status()), HasSubstr(absl::StrCat("\"", name, "\"")));
  }
  EXPECT_FALSE(EncryptCompactJwe("p", PublicJwk(RsaKey()), JweAlg::kEcdhEs, JweEnc::kA256Gcm).ok());
  EXPECT_FALSE(
      EncryptCompactJwe("p", PublicJwk(EcKey("P-256")), JweAlg::kRsaOaep, JweEnc::kA256Gcm).ok());
  EXPECT_FALSE(EncryptCompactJwe("p", Json::String("x"), JweAlg::kRsaOaep, JweEnc::kA256Gcm).ok());
}

TEST(Interop, JwcryptoEncryptsAndWeDecryptEveryAlgAndEnc) {
  TempDir dir;
  const std::vector<Case> cases = AllCases();
  Json jobs = Json::MakeArray();
  std::vector<std::string> plaintexts;
  for (const Case& c : cases) {
    plaintexts.push_back("from jwcrypto: " + c.label + RandomBytes(19));
    jobs.Append(Json::MakeObject(
        {{"jwk", PublicJwk(c.key)},
         {"header", Json::MakeObject({{"alg", Json::String(std::string(JweAlgName(c.alg)))},
                                      {"enc", Json::String(std::string(JweEncName(c.enc)))},
                                      {"kid", Json::String("jwcrypto")}})},
         {"plaintext", Json::String(Base64UrlEncode(plaintexts.back()))}}));
  }
  WriteFile(dir.File("jobs.json"), jobs.Serialize());
  ASSERT_EQ(RunPython(dir, kJwcryptoEncrypt, {dir.File("jobs.json"), dir.File("out.json")}), 0);
  const Json tokens = ParseJsonOrDie(ReadFile(dir.File("out.json")));
  ASSERT_EQ(tokens.as_array().size(), cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(cases[i].label);
    absl::StatusOr<Secret> decrypted =
        RecipientDecrypt(tokens.as_array()[i].as_string(), cases[i].key);
    ASSERT_TRUE(decrypted.ok()) << decrypted.status();
    EXPECT_EQ(decrypted->view(), plaintexts[i]);
    if (!IsEcdh(cases[i].alg)) {
      decrypted = RecipientDecrypt(tokens.as_array()[i].as_string(), cases[i].key, {},
                                   RsaPath::kRawPlusOaepDecode);
      ASSERT_TRUE(decrypted.ok()) << decrypted.status();
      EXPECT_EQ(decrypted->view(), plaintexts[i]);
    }
  }
}

TEST(Interop, WeEncryptAndJwcryptoDecryptsEveryAlgAndEnc) {
  TempDir dir;
  const std::vector<Case> cases = AllCases();
  const std::string rsa_pem = WritePrivatePem(dir, RsaKey(), "rsa.pem");
  Json jobs = Json::MakeArray();
  std::vector<std::string> plaintexts;
  for (const Case& c : cases) {
    const std::string pem =
        IsEcdh(c.alg) ? WritePrivatePem(dir, c.key, CrvOf(c.key) + ".pem") : rsa_pem;
    plaintexts.push_back("from custody: " + c.label + RandomBytes(23));
    absl::StatusOr<std::string> compact =
        EncryptCompactJwe(plaintexts.back(), PublicJwk(c.key), c.alg, c.enc, "custody",
                          Json::MakeObject({{"cty", Json::String("text/plain")}}));
    ASSERT_TRUE(compact.ok()) << c.label << ": " << compact.status();
    jobs.Append(Json::MakeObject({{"pem", Json::String(pem)}, {"jwe", Json::String(*compact)}}));
  }
  WriteFile(dir.File("jobs.json"), jobs.Serialize());
  ASSERT_EQ(RunPython(dir, kJwcryptoDecrypt, {dir.File("jobs.json"), dir.File("out.json")}), 0);
  const Json payloads = ParseJsonOrDie(ReadFile(dir.File("out.json")));
  ASSERT_EQ(payloads.as_array().size(), cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    EXPECT_EQ(B64d(payloads.as_array()[i].as_string()), plaintexts[i]) << cases[i].label;
  }
}

TEST(Interop, JwcryptoZipDefDecryptsOnlyWhenAllowedAndWithinTheLimit) {
  TempDir dir;
  const std::string small = "compressible " + std::string(1000, 'a');
  const std::string large(300 * 1024, 'z');  // over the default 256 KiB inflate cap
  Json jobs = Json::MakeArray();
  for (const std::string* plaintext : {&small, &large}) {
    jobs.Append(
        Json::MakeObject({{"jwk", PublicJwk(RsaKey())},
                          {"header", Json::MakeObject({{"alg", Json::String("RSA-OAEP-256")},
                                                       {"enc", Json::String("A256GCM")},
                                                       {"zip", Json::String("DEF")}})},
                          {"plaintext", Json::String(Base64UrlEncode(*plaintext))}}));
  }
  WriteFile(dir.File("jobs.json"), jobs.Serialize());
  ASSERT_EQ(RunPython(dir, kJwcryptoEncrypt, {dir.File("jobs.json"), dir.File("out.json")}), 0);
  const Json tokens = ParseJsonOrDie(ReadFile(dir.File("out.json")));
  ASSERT_EQ(tokens.as_array().size(), 2u);
  const std::string& small_jwe = tokens.as_array()[0].as_string();
  const std::string& large_jwe = tokens.as_array()[1].as_string();

  absl::StatusOr<Secret> refused = RecipientDecrypt(small_jwe, RsaKey());
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(Msg(refused.status()), HasSubstr("JWE protected header: \"zip\""));

  JweLimits zip;
  zip.allow_zip = true;
  absl::StatusOr<Secret> decrypted = RecipientDecrypt(small_jwe, RsaKey(), zip);
  ASSERT_TRUE(decrypted.ok()) << decrypted.status();
  EXPECT_EQ(decrypted->view(), small);

  absl::StatusOr<Secret> bomb = RecipientDecrypt(large_jwe, RsaKey(), zip);
  ASSERT_FALSE(bomb.ok());
  EXPECT_THAT(bomb, IsDecryptionFailed());

  zip.max_decompressed_bytes = large.size();  // exactly at the limit is allowed
  decrypted = RecipientDecrypt(large_jwe, RsaKey(), zip);
  ASSERT_TRUE(decrypted.ok()) << decrypted.status();
  EXPECT_EQ(decrypted->view(), large);
}

// ---- Tampering ---------------------------------------------------------------------------------

TEST(DecryptContent, TamperedTagCiphertextIvOrAadFailsUniformly) {
  for (JweEnc enc : kAllEncs) {
    SCOPED_TRACE(JweEncName(enc));
    absl::StatusOr<std::string> compact =
        EncryptCompactJwe("secret payload", PublicJwk(RsaKey()), JweAlg::kRsaOaep256, enc);
    ASSERT_TRUE(compact.ok());
    absl::StatusOr<ParsedJwe> jwe = ParseCompactJwe(*compact);
    ASSERT_TRUE(jwe.ok());
    absl::StatusOr<Secret> cek = OpensslOaepDecrypt(RsaKey(), "SHA256", jwe->encrypted_key);
    ASSERT_TRUE(cek.ok());
    ASSERT_TRUE(DecryptContent(*jwe, *cek).ok());

    std::vector<ParsedJwe> tampered(5, *jwe);
    tampered[0].tag[0] ^= 0x01;
    tampered[1].ciphertext.back() ^= 0x01;
    tampered[2].iv[3] ^= 0x40;
    // A different protected header (still valid JSON, still the same alg/enc) changes the AAD.
    tampered[3].protected_b64 = Base64UrlEncode(
        absl::StrCat(R"({"alg":"RSA-OAEP-256","enc":")", JweEncName(enc), R"(","x":1})"));
    tampered[4].ciphertext += std::string(16, '\0');
    for (const ParsedJwe& t : tampered) {
      absl::StatusOr<Secret> result = DecryptContent(t, *cek);
      ASSERT_FALSE(result.ok());
      EXPECT_THAT(result, IsDecryptionFailed());
    }
    absl::StatusOr<Secret> wrong_key = DecryptContent(*jwe, Secret(RandomBytes(cek->size())));
    ASSERT_FALSE(wrong_key.ok());
    EXPECT_THAT(wrong_key, IsDecryptionFailed());
    absl::StatusOr<Secret> wrong_len = DecryptContent(*jwe, Secret(RandomBytes(cek->size() + 8)));
    ASSERT_FALSE(wrong_len.ok());
    EXPECT_THAT(wrong_len, IsDecryptionFailed());
  }
}

TEST(RecipientPath, TamperedWrappedKeyFailsUniformly) {
  absl::StatusOr<std::string> compact = EncryptCompactJwe(
      "p", PublicJwk(EcKey("P-256")), JweAlg::kEcdhEsA256Kw, JweEnc::kA128CbcHs256);
  ASSERT_TRUE(compact.ok());
  std::string ek = PartBytes(*compact, 1);
  ek[3] ^= 0x10;
  absl::StatusOr<Secret> result =
      RecipientDecrypt(ReplacePart(*compact, 1, Base64UrlEncode(ek)), EcKey("P-256"));
  ASSERT_FALSE(result.ok());
  EXPECT_THAT(result, IsDecryptionFailed());
}

// ---- Parsing -----------------------------------------------------------------------------------

TEST(ParseCompactJwe, AcceptsAWellFormedJwe) {
  absl::StatusOr<ParsedJwe> jwe =
      ParseCompactJwe(RsaShaped(R"({"alg":"RSA-OAEP-256","enc":"A256GCM","kid":"v1"})"));
  ASSERT_TRUE(jwe.ok()) << jwe.status();
  EXPECT_EQ(jwe->alg, JweAlg::kRsaOaep256);
  EXPECT_EQ(jwe->enc, JweEnc::kA256Gcm);
  EXPECT_EQ(jwe->kid, "v1");
  EXPECT_FALSE(jwe->zip);
  EXPECT_EQ(jwe->iv.size(), 12u);
  EXPECT_EQ(jwe->ciphertext, "ciphertext");
}

TEST(ParseCompactJwe, RefusesEachRefusedAlgWithItsReason) {
  const std::pair<const char*, const char*> refused[] = {{"RSA1_5", "Bleichenbacher"},
                                                         {"dir", "shared symmetric key"},
                                                         {"PBES2-HS384+A192KW", "password"},
                                                         {"A192KW", "symmetric key wrap"},
                                                         {"A192GCMKW", "symmetric key wrap"}};
  for (const auto& [alg, reason] : refused) {
    absl::StatusOr<ParsedJwe> jwe =
        ParseCompactJwe(RsaShaped(absl::StrCat(R"({"alg":")", alg, R"(","enc":"A256GCM"})")));
    ASSERT_FALSE(jwe.ok()) << alg;
    EXPECT_THAT(Msg(jwe.status()), HasSubstr("JWE protected header"));
    EXPECT_THAT(Msg(jwe.status()), HasSubstr(reason));
  }
}

TEST(ParseCompactJwe, RejectsMissingOrUnknownAlgAndEnc) {
  for (const char* header :
       {R"({"enc":"A256GCM"})", R"({"alg":"RSA-OAEP-256"})", R"({"alg":7,"enc":"A256GCM"})",
        R"({"alg":"RSA-OAEP-256","enc":"A256CTR"})", R"({"alg":"X","enc":"A256GCM"})"}) {
    absl::StatusOr<ParsedJwe> jwe = ParseCompactJwe(RsaShaped(header));
    ASSERT_FALSE(jwe.ok()) << header;
    EXPECT_THAT(Msg(jwe.status()), HasSubstr("JWE protected header"));
  }
}

TEST(ParseCompactJwe, RejectsCrit) {
  absl::StatusOr<ParsedJwe> jwe = ParseCompactJwe(
      RsaShaped(R"({"alg":"RSA-OAEP-256","enc":"A256GCM","crit":["exp"],"exp":1})"));
  ASSERT_FALSE(jwe.ok());
  EXPECT_THAT(Msg(jwe.status()), HasSubstr("\"crit\""));
}

TEST(ParseCompactJwe, RejectsZipUnlessAllowedAndOnlyDef) {
  const std::string def = RsaShaped(R"({"alg":"RSA-OAEP-256","enc":"A256GCM","zip":"DEF"})");
  absl::StatusOr<ParsedJwe> jwe = ParseCompactJwe(def);
  ASSERT_FALSE(jwe.ok());
  EXPECT_THAT(Msg(jwe.status()), HasSubstr("\"zip\""));
  JweLimits limits;
  limits.allow_zip = true;
  jwe = ParseCompactJwe(def, limits);
  ASSERT_TRUE(jwe.ok()) << jwe.status();
  EXPECT_TRUE(jwe->zip);
  jwe =
      ParseCompactJwe(RsaShaped(R"({"alg":"RSA-OAEP-256","enc":"A256GCM","zip":"GZIP"})"), limits);
  ASSERT_FALSE(jwe.ok());
  EXPECT_THAT(Msg(jwe.status()), HasSubstr("\"GZIP\""));
}

TEST(ParseCompactJwe, BadBase64NamesThePart) {
  const std::string good = RsaShaped(R"({"alg":"RSA-OAEP-256","enc":"A256GCM"})");
  const std::pair<int, const char*> parts[] = {{0, "JWE protected header: "},
                                               {1, "JWE encrypted key: "},
                                               {2, "JWE iv: "},
                                               {3, "JWE ciphertext: "},
                                               {4, "JWE tag: "}};
  for (const auto& [index, prefix] : parts) {
    absl::StatusOr<ParsedJwe> jwe = ParseCompactJwe(ReplacePart(good, index, "ab+c"));
    ASSERT_FALSE(jwe.ok()) << index;
    EXPECT_THAT(Msg(jwe.status()), ::testing::StartsWith(prefix));
  }
  absl::StatusOr<ParsedJwe> not_json = ParseCompactJwe(ReplacePart(good, 0, Base64UrlEncode("{")));
  ASSERT_FALSE(not_json.ok());
  EXPECT_THAT(Msg(not_json.status()), ::testing::StartsWith("JWE protected header: "));
}

TEST(ParseCompactJwe, RejectsWrongPartCount) {
  const std::string good = RsaShaped(R"({"alg":"RSA-OAEP-256","enc":"A256GCM"})");
  EXPECT_FALSE(ParseCompactJwe(good + ".x").ok());
  EXPECT_FALSE(ParseCompactJwe(good.substr(0, good.rfind('.'))).ok());
  EXPECT_FALSE(ParseCompactJwe("").ok());
}

TEST(ParseCompactJwe, RejectsWrongIvLength) {
  const std::string header_gcm = R"({"alg":"RSA-OAEP-256","enc":"A256GCM"})";
  absl::StatusOr<ParsedJwe> jwe = ParseCompactJwe(
      Compact(header_gcm, std::string(256, 'k'), std::string(16, 'i'), "c", std::string(16, 't')));
  ASSERT_FALSE(jwe.ok());
  EXPECT_THAT(Msg(jwe.status()), HasSubstr("JWE iv: 16 bytes, 12 expected"));
  const std::string header_cbc = R"({"alg":"RSA-OAEP-256","enc":"A128CBC-HS256"})";
  jwe = ParseCompactJwe(Compact(header_cbc, std::string(256, 'k'), std::string(12, 'i'),
                                std::string(16, 'c'), std::string(16, 't')));
  ASSERT_FALSE(jwe.ok());
  EXPECT_THAT(Msg(jwe.status()), HasSubstr("JWE iv: 12 bytes, 16 expected"));
}

TEST(ParseCompactJwe, RejectsWrongTagLength) {
  const std::pair<const char*, size_t> bad[] = {
      {"A256GCM", 12}, {"A128CBC-HS256", 32}, {"A192CBC-HS384", 16}, {"A256CBC-HS512", 16}};
  for (const auto& [enc, tag_len] : bad) {
    const bool gcm = std::string_view(enc) == "A256GCM";
    absl::StatusOr<ParsedJwe> jwe = ParseCompactJwe(
        Compact(absl::StrCat(R"({"alg":"RSA-OAEP","enc":")", enc, R"("})"), std::string(256, 'k'),
                std::string(gcm ? 12 : 16, 'i'), std::string(16, 'c'), std::string(tag_len, 't')));
    ASSERT_FALSE(jwe.ok()) << enc;
    EXPECT_THAT(Msg(jwe.status()), HasSubstr("JWE tag: "));
  }
  absl::StatusOr<ParsedJwe> ok =
      ParseCompactJwe(Compact(R"({"alg":"RSA-OAEP","enc":"A192CBC-HS384"})", std::string(256, 'k'),
                              std::string(16, 'i'), std::string(16, 'c'), std::string(24, 't')));
  EXPECT_TRUE(ok.ok()) << ok.status();
}

TEST(ParseCompactJwe, EnforcesSizeLimits) {
  JweLimits limits;
  limits.max_ciphertext_bytes = 8;
  absl::StatusOr<ParsedJwe> jwe =
      ParseCompactJwe(RsaShaped(R"({"alg":"RSA-OAEP-256","enc":"A256GCM"})"), limits);
  ASSERT_FALSE(jwe.ok());
  EXPECT_THAT(Msg(jwe.status()), HasSubstr("JWE ciphertext: "));
  limits = JweLimits();
  limits.max_compact_bytes = 100;
  EXPECT_FALSE(
      ParseCompactJwe(RsaShaped(R"({"alg":"RSA-OAEP-256","enc":"A256GCM"})"), limits).ok());
  limits = JweLimits();
  limits.max_encrypted_key_bytes = 128;
  jwe = ParseCompactJwe(RsaShaped(R"({"alg":"RSA-OAEP-256","enc":"A256GCM"})"), limits);
  ASSERT_FALSE(jwe.ok());
  EXPECT_THAT(Msg(jwe.status()), HasSubstr("JWE encrypted key: "));
}

std::string EpkJson(const EVP_PKEY* key) { return PublicJwk(key).Serialize(); }

TEST(ParseCompactJwe, ChecksEncryptedKeyPresenceAndEpkForEcdh) {
  const std::string epk = EpkJson(EcKey("P-256"));
  const std::string iv(12, 'i'), tag(16, 't');
  // ECDH-ES (direct): no encrypted key.
  absl::StatusOr<ParsedJwe> jwe = ParseCompactJwe(Compact(
      absl::StrCat(R"({"alg":"ECDH-ES","enc":"A256GCM","epk":)", epk, "}"), "key", iv, "c", tag));
  ASSERT_FALSE(jwe.ok());
  EXPECT_THAT(Msg(jwe.status()), HasSubstr("JWE encrypted key: "));
  jwe = ParseCompactJwe(Compact(
      absl::StrCat(R"({"alg":"ECDH-ES","enc":"A256GCM","epk":)", epk, R"(,"apu":"QWxpY2U"})"), "",
      iv, "c", tag));
  ASSERT_TRUE(jwe.ok()) << jwe.status();
  EXPECT_EQ(jwe->apu, "Alice");
  ASSERT_TRUE(jwe->epk.has_value());
  // RSA-OAEP and key wrap: the encrypted key is required.
  jwe = ParseCompactJwe(Compact(R"({"alg":"RSA-OAEP","enc":"A256GCM"})", "", iv, "c", tag));
  ASSERT_FALSE(jwe.ok());
  EXPECT_THAT(Msg(jwe.status()), HasSubstr("JWE encrypted key: "));
  jwe = ParseCompactJwe(
      Compact(absl::StrCat(R"({"alg":"ECDH-ES+A128KW","enc":"A256GCM","epk":)", epk, "}"), "", iv,
              "c", tag));
  ASSERT_FALSE(jwe.ok());
  // Missing or malformed epk.
  for (const std::string& header :
       {std::string(R"({"alg":"ECDH-ES","enc":"A256GCM"})"),
        std::string(R"({"alg":"ECDH-ES","enc":"A256GCM","epk":"x"})"),
        std::string(R"({"alg":"ECDH-ES","enc":"A256GCM","epk":{"kty":"EC","crv":"P-256"}})")}) {
    jwe = ParseCompactJwe(Compact(header, "", iv, "c", tag));
    ASSERT_FALSE(jwe.ok()) << header;
    EXPECT_THAT(Msg(jwe.status()), HasSubstr("\"epk\""));
  }
}

// ---- Ephemeral public keys ---------------------------------------------------------------------

TEST(ValidateEpk, AcceptsAPointOnTheRingsCurve) {
  for (const TestCurve& c : kTestCurves) {
    absl::StatusOr<PkeyPtr> key = ValidateEpk(PublicJwk(EcKey(c.jwk_name)), c.jwk_name);
    EXPECT_TRUE(key.ok()) << c.jwk_name << ": " << key.status();
  }
}

TEST(ValidateEpk, RejectsEpkNotOnCurve) {
  Json epk = PublicJwk(EcKey("P-256"));
  std::string y = B64d(epk.Find("y")->as_string());
  y.back() ^= 0x01;
  epk.Set("y", Json::String(Base64UrlEncode(y)));
  absl::StatusOr<PkeyPtr> key = ValidateEpk(epk, "P-256");
  ASSERT_FALSE(key.ok());
  EXPECT_THAT(Msg(key.status()), ::testing::StartsWith("epk: "));
}

TEST(ValidateEpk, RejectsZeroCoordinatesStandingForInfinity) {
  Json epk = PublicJwk(EcKey("P-256"));
  epk.Set("x", Json::String(Base64UrlEncode(std::string(32, '\0'))));
  epk.Set("y", Json::String(Base64UrlEncode(std::string(32, '\0'))));
  EXPECT_FALSE(ValidateEpk(epk, "P-256").ok());
}

TEST(ValidateEpk, RejectsP384EpkForAP256Ring) {
  absl::StatusOr<PkeyPtr> key = ValidateEpk(PublicJwk(EcKey("P-384")), "P-256");
  ASSERT_FALSE(key.ok());
  EXPECT_THAT(Msg(key.status()), HasSubstr("\"P-384\" does not match"));
}

TEST(ValidateEpk, RejectsCrvThatDoesNotMatchTheCoordinates) {
  Json epk = PublicJwk(EcKey("P-384"));
  epk.Set("crv", Json::String("P-256"));  // claims P-256, carries P-384 coordinates
  absl::StatusOr<PkeyPtr> key = ValidateEpk(epk, "P-256");
  ASSERT_FALSE(key.ok());
  EXPECT_THAT(Msg(key.status()), HasSubstr("48 bytes, 32 expected"));
  // P-256 coordinates labelled P-384 for a P-384 ring.
  epk = PublicJwk(EcKey("P-256"));
  epk.Set("crv", Json::String("P-384"));
  EXPECT_FALSE(ValidateEpk(epk, "P-384").ok());
}

TEST(ValidateEpk, RejectsNonEcAndPrivateKeys) {
  EXPECT_FALSE(ValidateEpk(PublicJwk(RsaKey()), "P-256").ok());
  Json with_d = PublicJwk(EcKey("P-256"));
  with_d.Set("d", Json::String(Base64UrlEncode(std::string(32, '\x01'))));
  EXPECT_FALSE(ValidateEpk(with_d, "P-256").ok());
  EXPECT_FALSE(ValidateEpk(Json::String("x"), "P-256").ok());
}

TEST(RecipientPath, OffCurveEpkInAJweIsRejectedBeforeKeyAgreement) {
  absl::StatusOr<std::string> compact =
      EncryptCompactJwe("p", PublicJwk(EcKey("P-256")), JweAlg::kEcdhEs, JweEnc::kA128Gcm);
  ASSERT_TRUE(compact.ok());
  Json header = ParseJsonOrDie(PartBytes(*compact, 0));
  Json epk = *header.Find("epk");
  std::string x = B64d(epk.Find("x")->as_string());
  x[0] ^= 0x01;
  epk.Set("x", Json::String(Base64UrlEncode(x)));
  header.Set("epk", epk);
  absl::StatusOr<Secret> result = RecipientDecrypt(
      ReplacePart(*compact, 0, Base64UrlEncode(header.Serialize())), EcKey("P-256"));
  ASSERT_FALSE(result.ok());
  EXPECT_THAT(Msg(result.status()), ::testing::StartsWith("epk: "));
}

}  // namespace
}  // namespace custody::jose
