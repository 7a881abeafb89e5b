// Project Wycheproof RSA-OAEP vectors (2048-bit key, SHA-256, MGF1-SHA-256) against the software
// half of custody's RSA-OAEP-256 decryption: jose::OaepDecode, the constant-time EME-OAEP decoding
// of the k-byte output of a raw RSA decryption (custodyd runs the raw step in the token when the
// token refuses OAEP with SHA-256). Here OpenSSL does the raw step (RSA_NO_PADDING), so that only
// OaepDecode is under test. The vectors are tests/data/wycheproof/ (see the README there).
//
// JWE never uses an OAEP label, and OaepDecode takes none: vectors with a non-empty label are
// skipped and counted.
#include <cstddef>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/secret.h"
#include "gtest/gtest.h"
#include "jose/json.h"
#include "jose/jwe.h"
#include "openssl/bio.h"
#include "openssl/evp.h"
#include "openssl/pem.h"
#include "openssl/rsa.h"
#include "openssl/x509.h"

#ifndef CUSTODY_SOURCE_DIR
#error "CUSTODY_SOURCE_DIR must name the source tree (see jose/CMakeLists.txt)"
#endif

namespace custody::jose {
namespace {

struct PkeyFree {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
using Pkey = std::unique_ptr<EVP_PKEY, PkeyFree>;
struct PkeyCtxFree {
  void operator()(EVP_PKEY_CTX* p) const { EVP_PKEY_CTX_free(p); }
};
using PkeyCtx = std::unique_ptr<EVP_PKEY_CTX, PkeyCtxFree>;
struct BioFree {
  void operator()(BIO* p) const { BIO_free(p); }
};
using Bio = std::unique_ptr<BIO, BioFree>;

std::string DataPath(std::string_view name) {
  return std::string(CUSTODY_SOURCE_DIR) + "/tests/data/wycheproof/" + std::string(name);
}

absl::StatusOr<Json> LoadVectors(std::string_view name) {
  const std::string path = DataPath(name);
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError("cannot open " + path);
  std::stringstream text;
  text << in.rdbuf();
  return ParseJson(text.str(), JsonLimits{.max_bytes = 8 * 1024 * 1024, .max_depth = 16});
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

// The group's private key: privateKeyPkcs8 (DER) when present, else privateKeyPem.
Pkey LoadPrivateKey(const Json& group) {
  if (std::optional<std::string> der = Unhex(StringMember(group, "privateKeyPkcs8"));
      der.has_value() && !der->empty()) {
    const unsigned char* p = reinterpret_cast<const unsigned char*>(der->data());
    Pkey key(d2i_AutoPrivateKey(nullptr, &p, static_cast<long>(der->size())));
    if (key != nullptr) return key;
  }
  const std::string pem = StringMember(group, "privateKeyPem");
  if (pem.empty()) return nullptr;
  Bio bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (bio == nullptr) return nullptr;
  return Pkey(PEM_read_bio_PrivateKey_ex(bio.get(), nullptr, nullptr, nullptr, nullptr, nullptr));
}

// RSADP without padding, as a token's CKM_RSA_X_509 does it: nullopt unless `ciphertext` is
// exactly k bytes (RFC 8017 §7.1.2 step 1b; Token::DecryptRsaRaw refuses other lengths before
// the token sees them) and less than n (OpenSSL refuses those). The result is left-padded to k.
std::optional<std::string> RawRsaDecrypt(EVP_PKEY* key, std::string_view ciphertext) {
  const size_t k = static_cast<size_t>(EVP_PKEY_get_size(key));
  if (ciphertext.size() != k) return std::nullopt;
  PkeyCtx ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, key, nullptr));
  if (ctx == nullptr || EVP_PKEY_decrypt_init(ctx.get()) != 1 ||
      EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_NO_PADDING) != 1) {
    ADD_FAILURE() << "cannot set up raw RSA decryption";
    return std::nullopt;
  }
  std::string out(k, '\0');
  size_t size = out.size();
  if (EVP_PKEY_decrypt(ctx.get(), reinterpret_cast<unsigned char*>(out.data()), &size,
                       reinterpret_cast<const unsigned char*>(ciphertext.data()),
                       ciphertext.size()) != 1 ||
      size > k) {
    return std::nullopt;
  }
  out.resize(size);
  out.insert(0, k - size, '\0');
  return out;
}

TEST(WycheproofTest, RsaOaep2048Sha256Mgf1Sha256) {
  absl::StatusOr<Json> vectors = LoadVectors("rsa_oaep_2048_sha256_mgf1sha256_test.json");
  ASSERT_TRUE(vectors.ok()) << vectors.status();
  const Json* groups = vectors->Find("testGroups");
  ASSERT_NE(groups, nullptr);
  ASSERT_TRUE(groups->is_array());

  size_t total = 0, ran = 0, skipped_label = 0, skipped_group = 0;
  size_t valid_ok = 0, invalid_rejected_raw = 0, invalid_rejected_decode = 0;
  std::map<std::string, std::string> acceptable;  // tcId -> what custody did
  for (const Json& group : groups->as_array()) {
    const Json* tests = group.Find("tests");
    ASSERT_NE(tests, nullptr);
    total += tests->as_array().size();
    // OaepDecode uses one hash for the label hash and MGF1, as RSA-OAEP-256 (RFC 7518 §4.3) does.
    if (StringMember(group, "sha") != "SHA-256" || StringMember(group, "mgf") != "MGF1" ||
        StringMember(group, "mgfSha") != "SHA-256") {
      skipped_group += tests->as_array().size();
      continue;
    }
    Pkey key = LoadPrivateKey(group);
    ASSERT_NE(key, nullptr) << "cannot load the group's private key";
    ASSERT_TRUE(EVP_PKEY_is_a(key.get(), "RSA"));

    for (const Json& test : tests->as_array()) {
      const std::string id = test.Find("tcId") != nullptr ? test.Find("tcId")->number_text() : "?";
      const std::string result = StringMember(test, "result");
      SCOPED_TRACE(absl::StrCat("tcId ", id, " (", result, "): ", StringMember(test, "comment")));
      if (!StringMember(test, "label").empty()) {
        ++skipped_label;
        continue;
      }
      const std::optional<std::string> msg = Unhex(StringMember(test, "msg"));
      const std::optional<std::string> ct = Unhex(StringMember(test, "ct"));
      ASSERT_TRUE(msg.has_value() && ct.has_value()) << "bad hex in the vector";
      ASSERT_TRUE(result == "valid" || result == "invalid" || result == "acceptable") << result;
      ++ran;

      const std::optional<std::string> em = RawRsaDecrypt(key.get(), *ct);
      if (!em.has_value()) {
        // Refused before any padding check: only an invalid ciphertext may end here.
        EXPECT_NE(result, "valid") << "raw RSA decryption refused a valid ciphertext";
        if (result == "invalid") ++invalid_rejected_raw;
        if (result == "acceptable") acceptable[id] = "rejected (raw RSA)";
        continue;
      }
      absl::StatusOr<Secret> plaintext = OaepDecode(Secret(*em), EVP_sha256());
      if (result == "valid") {
        ASSERT_TRUE(plaintext.ok()) << plaintext.status();
        EXPECT_EQ(std::string(plaintext->view()), *msg);
        if (plaintext->view() == *msg) ++valid_ok;
      } else if (result == "invalid") {
        ASSERT_FALSE(plaintext.ok()) << "OaepDecode accepted an invalid vector";
        EXPECT_EQ(plaintext.status().code(), absl::StatusCode::kInvalidArgument);
        EXPECT_EQ(plaintext.status().message(), "decryption failed");
        ++invalid_rejected_decode;
      } else {
        acceptable[id] = plaintext.ok()
                             ? (plaintext->view() == *msg ? "accepted" : "wrong plaintext")
                             : "rejected (OaepDecode)";
      }
    }
  }
  std::vector<std::string> acceptable_text;
  for (const auto& [id, what] : acceptable) acceptable_text.push_back(absl::StrCat(id, ":", what));
  RecordProperty("vectors_total", static_cast<int>(total));
  RecordProperty("vectors_ran", static_cast<int>(ran));
  RecordProperty("vectors_skipped_label", static_cast<int>(skipped_label));
  RecordProperty("vectors_skipped_group", static_cast<int>(skipped_group));
  std::cout << "[wycheproof] rsa_oaep_2048_sha256_mgf1sha256: " << total << " vectors, ran " << ran
            << " (valid decoded " << valid_ok << ", invalid rejected by raw RSA "
            << invalid_rejected_raw << ", invalid rejected by OaepDecode "
            << invalid_rejected_decode << ", acceptable " << acceptable.size()
            << (acceptable.empty() ? "" : " [" + absl::StrJoin(acceptable_text, ", ") + "]")
            << "), skipped " << skipped_label << " with a non-empty label, " << skipped_group
            << " in groups with other hashes\n";
  EXPECT_GT(ran, 0u) << "no Wycheproof vector ran";
}

}  // namespace
}  // namespace custody::jose
