// Project Wycheproof vectors through a SoftHSM2 token, along the paths custodyd takes:
//
//  - RSA-OAEP (2048, SHA-256, MGF1-SHA-256): the group's private key imported into the token
//    (Token::ImportKeyPair, for decryption), raw RSA in the token (Token::DecryptRsaRaw), then
//    jose::OaepDecode, as server/keys/decryption_profile.cc does when the token refuses OAEP with
//    SHA-256 (SoftHSM2 2.6.1 does). Vectors with a non-empty label are skipped (JWE has none).
//  - ECDH secp256r1 (the "ecpoint" vectors, peer key as an encoded point): each distinct private
//    key imported into the token; the peer point checked as custodyd checks a JWE "epk"
//    (jose::ValidateEpk on the JWK of its coordinates) and then Token::DeriveEcdh. Encodings a JWK
//    cannot carry (compressed, empty) are first decoded by OpenSSL; a point OpenSSL refuses never
//    reaches custody, so it counts as rejected.
//
// The vectors are tests/data/wycheproof/ (see the README there for the source and the subset).
#include <cstddef>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/secret.h"
#include "gtest/gtest.h"
#include "jose/base64url.h"
#include "jose/json.h"
#include "jose/jwe.h"
#include "openssl/bn.h"
#include "openssl/core_names.h"
#include "openssl/ec.h"
#include "openssl/evp.h"
#include "openssl/obj_mac.h"
#include "openssl/param_build.h"
#include "openssl/params.h"
#include "openssl/x509.h"
#include "pkcs11/testing/softhsm_testing.h"
#include "pkcs11/token.h"

#ifndef CUSTODY_SOURCE_DIR
#error "CUSTODY_SOURCE_DIR must name the source tree (see pkcs11/CMakeLists.txt)"
#endif

namespace custody::pkcs11 {
namespace {

using jose::Json;

constexpr char kLabel[] = "custody-wycheproof";
constexpr char kUserPin[] = "user-pin-1234";
constexpr char kSoPin[] = "so-pin-5678";

// One SoftHSM2 configuration per process (SOFTHSM2_CONF is read at C_Initialize).
class SoftHsmEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<TemporarySoftHsm>> setup = TemporarySoftHsm::Create();
    ASSERT_TRUE(setup.ok()) << setup.status();
    softhsm_ = std::move(*setup);
    ASSERT_TRUE(Token::InitializeToken(TemporarySoftHsm::ModulePath(), kLabel, Secret(kSoPin),
                                       Secret(kUserPin))
                    .ok());
  }
  void TearDown() override { softhsm_.reset(); }

 private:
  std::unique_ptr<TemporarySoftHsm> softhsm_;
};

const ::testing::Environment* const kEnvironment =
    ::testing::AddGlobalTestEnvironment(new SoftHsmEnvironment);

// ---- OpenSSL handles and vector helpers ----------------------------------------------------

struct PkeyCtxFree {
  void operator()(EVP_PKEY_CTX* p) const { EVP_PKEY_CTX_free(p); }
};
using PkeyCtx = std::unique_ptr<EVP_PKEY_CTX, PkeyCtxFree>;
struct BnFree {
  void operator()(BIGNUM* p) const { BN_clear_free(p); }
};
using Bn = std::unique_ptr<BIGNUM, BnFree>;
struct EcGroupFree {
  void operator()(EC_GROUP* p) const { EC_GROUP_free(p); }
};
struct EcPointFree {
  void operator()(EC_POINT* p) const { EC_POINT_free(p); }
};
struct ParamBldFree {
  void operator()(OSSL_PARAM_BLD* p) const { OSSL_PARAM_BLD_free(p); }
};
struct ParamsFree {
  void operator()(OSSL_PARAM* p) const { OSSL_PARAM_free(p); }
};
using Params = std::unique_ptr<OSSL_PARAM, ParamsFree>;

const unsigned char* Bytes(std::string_view s) {
  return reinterpret_cast<const unsigned char*>(s.data());
}

std::string DataPath(std::string_view name) {
  return std::string(CUSTODY_SOURCE_DIR) + "/tests/data/wycheproof/" + std::string(name);
}

absl::StatusOr<Json> LoadVectors(std::string_view name) {
  const std::string path = DataPath(name);
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError("cannot open " + path);
  std::stringstream text;
  text << in.rdbuf();
  return jose::ParseJson(text.str(), jose::JsonLimits{.max_bytes = 8 * 1024 * 1024});
}

// Strict hex decoding: nullopt for odd lengths or non-hex characters.
std::optional<std::string> Unhex(std::string_view hex) {
  if (hex.size() % 2 != 0) return std::nullopt;
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  std::string out(hex.size() / 2, '\0');
  for (size_t i = 0; i < out.size(); ++i) {
    const int hi = nibble(hex[2 * i]);
    const int lo = nibble(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out[i] = static_cast<char>(hi << 4 | lo);
  }
  return out;
}

std::string StringMember(const Json& object, std::string_view key) {
  const Json* member = object.Find(key);
  return member != nullptr && member->is_string() ? member->as_string() : std::string();
}

std::string TcId(const Json& test) {
  const Json* id = test.Find("tcId");
  return id != nullptr ? id->number_text() : "?";
}

std::string Describe(const std::map<std::string, std::string>& by_id) {
  std::vector<std::string> parts;
  for (const auto& [id, what] : by_id) parts.push_back(absl::StrCat(id, ":", what));
  return absl::StrJoin(parts, ", ");
}

// PKCS#8 DER (privateKeyPkcs8) of the group.
EvpPkeyPtr LoadRsaPrivateKey(const Json& group) {
  std::optional<std::string> der = Unhex(StringMember(group, "privateKeyPkcs8"));
  if (!der.has_value() || der->empty()) return nullptr;
  const unsigned char* p = Bytes(*der);
  return EvpPkeyPtr(d2i_AutoPrivateKey(nullptr, &p, static_cast<long>(der->size())));
}

// A P-256 private key from the vector's big-endian scalar (any length, leading zeros allowed),
// with its public point d·G (ImportKeyPair imports both halves).
EvpPkeyPtr P256PrivateKey(std::string_view scalar) {
  Bn d(BN_bin2bn(Bytes(scalar), static_cast<int>(scalar.size()), nullptr));
  std::unique_ptr<EC_GROUP, EcGroupFree> group(EC_GROUP_new_by_curve_name(NID_X9_62_prime256v1));
  if (d == nullptr || group == nullptr) return nullptr;
  std::unique_ptr<EC_POINT, EcPointFree> point(EC_POINT_new(group.get()));
  unsigned char encoded[65];
  if (point == nullptr ||
      EC_POINT_mul(group.get(), point.get(), d.get(), nullptr, nullptr, nullptr) != 1 ||
      EC_POINT_point2oct(group.get(), point.get(), POINT_CONVERSION_UNCOMPRESSED, encoded,
                         sizeof(encoded), nullptr) != sizeof(encoded)) {
    return nullptr;
  }
  std::unique_ptr<OSSL_PARAM_BLD, ParamBldFree> bld(OSSL_PARAM_BLD_new());
  if (bld == nullptr ||
      OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME, "P-256", 0) != 1 ||
      OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_PRIV_KEY, d.get()) != 1 ||
      OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, encoded,
                                       sizeof(encoded)) != 1) {
    return nullptr;
  }
  Params params(OSSL_PARAM_BLD_to_param(bld.get()));
  PkeyCtx ctx(EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr));
  EVP_PKEY* pkey = nullptr;
  if (params == nullptr || ctx == nullptr || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &pkey, EVP_PKEY_KEYPAIR, params.get()) != 1) {
    return nullptr;
  }
  return EvpPkeyPtr(pkey);
}

// OpenSSL's reading of an encoded P-256 point (any form), re-encoded uncompressed; nullopt when
// OpenSSL refuses it (bad encoding, x without a point, not on the curve).
std::optional<std::string> OpenSslUncompressedPoint(std::string_view encoded) {
  if (encoded.empty()) return std::nullopt;
  char format[] = "uncompressed";
  char group_name[] = "P-256";
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, group_name, 0),
      OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, const_cast<char*>(encoded.data()),
                                        encoded.size()),
      OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT, format, 0),
      OSSL_PARAM_construct_end(),
  };
  PkeyCtx ctx(EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr));
  EVP_PKEY* raw = nullptr;
  if (ctx == nullptr || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_PUBLIC_KEY, params) != 1) {
    return std::nullopt;
  }
  EvpPkeyPtr pkey(raw);
  PkeyCtx check(EVP_PKEY_CTX_new_from_pkey(nullptr, pkey.get(), nullptr));
  if (check == nullptr || EVP_PKEY_public_check(check.get()) != 1) return std::nullopt;
  unsigned char out[133];
  size_t size = 0;
  if (EVP_PKEY_get_octet_string_param(pkey.get(), OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, out,
                                      sizeof(out), &size) != 1) {
    return std::nullopt;
  }
  return std::string(reinterpret_cast<const char*>(out), size);
}

// The JWE "epk" a sender would put in the header for the uncompressed point 04||X||Y.
Json EpkJwk(std::string_view uncompressed) {
  const size_t half = (uncompressed.size() - 1) / 2;
  Json jwk = Json::MakeObject();
  jwk.Set("kty", Json::String("EC"));
  jwk.Set("crv", Json::String("P-256"));
  jwk.Set("x", Json::String(jose::Base64UrlEncode(uncompressed.substr(1, half))));
  jwk.Set("y", Json::String(jose::Base64UrlEncode(uncompressed.substr(1 + half, half))));
  return jwk;
}

bool IsUniformDecryptionFailure(const absl::Status& status) {
  return status.code() == absl::StatusCode::kInvalidArgument &&
         status.message() == "decryption failed";
}

// ---- Against the token ---------------------------------------------------------------------

class WycheproofTokenTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    Token::Options options;
    options.module_path = TemporarySoftHsm::ModulePath();
    options.selector.label = kLabel;
    options.pin = Secret(kUserPin);
    absl::StatusOr<std::unique_ptr<Token>> token = Token::Open(std::move(options));
    ASSERT_TRUE(token.ok()) << token.status();
    token_ = std::move(*token).release();
  }
  static void TearDownTestSuite() {
    delete token_;
    token_ = nullptr;
  }

  static Token* token_;
};

Token* WycheproofTokenTest::token_ = nullptr;

TEST_F(WycheproofTokenTest, RsaOaep2048Sha256Mgf1Sha256RawInTokenThenOaepDecode) {
  ASSERT_NE(token_, nullptr);
  ASSERT_TRUE(token_->HasMechanism("CKM_RSA_X_509"));
  absl::StatusOr<Json> vectors = LoadVectors("rsa_oaep_2048_sha256_mgf1sha256_test.json");
  ASSERT_TRUE(vectors.ok()) << vectors.status();
  const Json* groups = vectors->Find("testGroups");
  ASSERT_NE(groups, nullptr);

  size_t total = 0, ran = 0, skipped_label = 0, skipped_group = 0, keys = 0;
  size_t valid_ok = 0, rejected_by_token = 0, rejected_by_decode = 0;
  std::map<std::string, std::string> acceptable;
  for (const Json& group : groups->as_array()) {
    const Json* tests = group.Find("tests");
    ASSERT_NE(tests, nullptr);
    total += tests->as_array().size();
    if (StringMember(group, "sha") != "SHA-256" || StringMember(group, "mgf") != "MGF1" ||
        StringMember(group, "mgfSha") != "SHA-256") {
      skipped_group += tests->as_array().size();
      continue;
    }
    EvpPkeyPtr pkey = LoadRsaPrivateKey(group);
    ASSERT_NE(pkey, nullptr) << "cannot load privateKeyPkcs8";
    const std::string id = absl::StrCat("wycheproof-rsa-", keys++);
    absl::StatusOr<std::shared_ptr<KeyPair>> key =
        token_->ImportKeyPair(pkey.get(), id, id, /*for_decryption=*/true);
    ASSERT_TRUE(key.ok()) << key.status();

    for (const Json& test : tests->as_array()) {
      const std::string tc = TcId(test);
      const std::string result = StringMember(test, "result");
      SCOPED_TRACE(absl::StrCat("tcId ", tc, " (", result, "): ", StringMember(test, "comment")));
      if (!StringMember(test, "label").empty()) {
        ++skipped_label;
        continue;
      }
      const std::optional<std::string> msg = Unhex(StringMember(test, "msg"));
      const std::optional<std::string> ct = Unhex(StringMember(test, "ct"));
      ASSERT_TRUE(msg.has_value() && ct.has_value()) << "bad hex in the vector";
      ASSERT_TRUE(result == "valid" || result == "invalid" || result == "acceptable") << result;
      ++ran;

      absl::StatusOr<Secret> em = token_->DecryptRsaRaw(**key, *ct);
      if (!em.ok()) {
        EXPECT_TRUE(IsUniformDecryptionFailure(em.status())) << em.status();
        EXPECT_NE(result, "valid") << "the token refused a valid ciphertext: " << em.status();
        if (result == "invalid") ++rejected_by_token;
        if (result == "acceptable") acceptable[tc] = "rejected (token)";
        continue;
      }
      ASSERT_EQ(em->size(), 256u);
      absl::StatusOr<Secret> plaintext = jose::OaepDecode(*em, EVP_sha256());
      if (result == "valid") {
        ASSERT_TRUE(plaintext.ok()) << plaintext.status();
        EXPECT_EQ(std::string(plaintext->view()), *msg);
        if (plaintext->view() == *msg) ++valid_ok;
      } else if (result == "invalid") {
        ASSERT_FALSE(plaintext.ok()) << "an invalid ciphertext decrypted";
        EXPECT_TRUE(IsUniformDecryptionFailure(plaintext.status())) << plaintext.status();
        ++rejected_by_decode;
      } else {
        acceptable[tc] = plaintext.ok()
                             ? (plaintext->view() == *msg ? "accepted" : "wrong plaintext")
                             : "rejected (OaepDecode)";
      }
    }
    EXPECT_TRUE(token_->DestroyKeyPair(id).ok());
  }
  RecordProperty("vectors_total", static_cast<int>(total));
  RecordProperty("vectors_ran", static_cast<int>(ran));
  RecordProperty("vectors_skipped", static_cast<int>(skipped_label + skipped_group));
  std::cout << "[wycheproof] rsa_oaep_2048_sha256_mgf1sha256 via token: " << total
            << " vectors, ran " << ran << " (valid decoded " << valid_ok
            << ", invalid rejected by DecryptRsaRaw " << rejected_by_token
            << ", invalid rejected by OaepDecode " << rejected_by_decode << ", acceptable "
            << acceptable.size() << (acceptable.empty() ? "" : " [" + Describe(acceptable) + "]")
            << "), skipped " << skipped_label << " with a non-empty label, " << skipped_group
            << " in groups with other hashes; " << keys << " key(s) imported\n";
  EXPECT_GT(ran, 0u) << "no Wycheproof vector ran";
}

TEST_F(WycheproofTokenTest, EcdhSecp256r1EcpointValidateEpkThenDeriveEcdh) {
  ASSERT_NE(token_, nullptr);
  absl::StatusOr<Json> vectors = LoadVectors("ecdh_secp256r1_ecpoint_test.json");
  ASSERT_TRUE(vectors.ok()) << vectors.status();
  const Json* groups = vectors->Find("testGroups");
  ASSERT_NE(groups, nullptr);

  size_t total = 0, ran = 0, skipped = 0;
  size_t valid_ok = 0, rejected_by_openssl = 0, rejected_by_validate_epk = 0, rejected_by_token = 0;
  std::map<std::string, std::string> acceptable, skip_reasons;
  std::map<std::string, std::shared_ptr<KeyPair>> imported;  // by private scalar (hex)
  for (const Json& group : groups->as_array()) {
    const Json* tests = group.Find("tests");
    ASSERT_NE(tests, nullptr);
    total += tests->as_array().size();
    if (StringMember(group, "curve") != "secp256r1" ||
        StringMember(group, "encoding") != "ecpoint") {
      skipped += tests->as_array().size();
      skip_reasons["group"] = "not secp256r1/ecpoint";
      continue;
    }
    for (const Json& test : tests->as_array()) {
      const std::string tc = TcId(test);
      const std::string result = StringMember(test, "result");
      SCOPED_TRACE(absl::StrCat("tcId ", tc, " (", result, "): ", StringMember(test, "comment")));
      const std::optional<std::string> peer = Unhex(StringMember(test, "public"));
      const std::optional<std::string> scalar = Unhex(StringMember(test, "private"));
      const std::optional<std::string> shared = Unhex(StringMember(test, "shared"));
      ASSERT_TRUE(peer.has_value() && scalar.has_value() && shared.has_value())
          << "bad hex in the vector";
      ASSERT_TRUE(result == "valid" || result == "invalid" || result == "acceptable") << result;

      // The recipient's key in the token, once per distinct scalar.
      std::shared_ptr<KeyPair>& key = imported[StringMember(test, "private")];
      if (key == nullptr) {
        EvpPkeyPtr pkey = P256PrivateKey(*scalar);
        ASSERT_NE(pkey, nullptr) << "OpenSSL cannot build the private key";
        const std::string id = absl::StrCat("wycheproof-ecdh-", imported.size());
        absl::StatusOr<std::shared_ptr<KeyPair>> pair =
            token_->ImportKeyPair(pkey.get(), id, id, /*for_decryption=*/true);
        ASSERT_TRUE(pair.ok()) << pair.status();
        key = *pair;
      }
      ++ran;
      auto rejected = [&](size_t& counter, const std::string& by) {
        EXPECT_NE(result, "valid") << "a valid peer key was rejected by " << by;
        if (result == "invalid") ++counter;
        if (result == "acceptable") acceptable[tc] = absl::StrCat("rejected (", by, ")");
      };

      // A JWE epk carries x and y, so only an uncompressed point reaches custody as it is; other
      // encodings are what a sender would first have to decode (OpenSSL does that here).
      std::string uncompressed = *peer;
      if (peer->size() != 65 || (*peer)[0] != '\x04') {
        std::optional<std::string> decoded = OpenSslUncompressedPoint(*peer);
        if (!decoded.has_value()) {
          rejected(rejected_by_openssl, "OpenSSL decoding");
          continue;
        }
        if (decoded->size() != 65 || (*decoded)[0] != '\x04') {
          --ran;
          ++skipped;
          skip_reasons[tc] = "OpenSSL did not re-encode the point uncompressed";
          continue;
        }
        uncompressed = *decoded;
      }
      absl::StatusOr<jose::PkeyPtr> epk = jose::ValidateEpk(EpkJwk(uncompressed), "P-256");
      if (!epk.ok()) {
        EXPECT_EQ(epk.status().code(), absl::StatusCode::kInvalidArgument) << epk.status();
        rejected(rejected_by_validate_epk, "ValidateEpk");
        continue;
      }
      // What custody's check let through goes to the token, whatever the vector says.
      absl::StatusOr<Secret> z = token_->DeriveEcdh(*key, uncompressed);
      if (!z.ok()) {
        rejected(rejected_by_token, "DeriveEcdh");
        if (result == "invalid") {
          ADD_FAILURE() << "ValidateEpk let an invalid point through; the token refused it: "
                        << z.status();
        }
        continue;
      }
      if (result == "valid") {
        EXPECT_EQ(std::string(z->view()), *shared);
        if (z->view() == *shared) ++valid_ok;
      } else if (result == "invalid") {
        ADD_FAILURE() << "an invalid peer key was accepted end to end";
      } else {
        acceptable[tc] = z->view() == *shared ? "accepted" : "accepted, Z differs";
      }
    }
  }
  for (const auto& [scalar, key] : imported) {
    if (key != nullptr) {
      EXPECT_TRUE(token_->DestroyKeyPair(key->id).ok());
    }
  }
  RecordProperty("vectors_total", static_cast<int>(total));
  RecordProperty("vectors_ran", static_cast<int>(ran));
  RecordProperty("vectors_skipped", static_cast<int>(skipped));
  std::cout << "[wycheproof] ecdh_secp256r1_ecpoint via token: " << total << " vectors, ran " << ran
            << " (valid derived " << valid_ok << ", invalid rejected by OpenSSL decoding "
            << rejected_by_openssl << ", by ValidateEpk " << rejected_by_validate_epk
            << ", by DeriveEcdh " << rejected_by_token << ", acceptable " << acceptable.size()
            << (acceptable.empty() ? "" : " [" + Describe(acceptable) + "]") << "), skipped "
            << skipped << (skip_reasons.empty() ? "" : " [" + Describe(skip_reasons) + "]") << "; "
            << imported.size() << " private key(s) imported\n";
  EXPECT_GT(ran, 0u) << "no Wycheproof vector ran";
}

}  // namespace
}  // namespace custody::pkcs11
