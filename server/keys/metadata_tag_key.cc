#include "server/keys/metadata_tag_key.h"

#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/ecdsa.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/log.h"

namespace custody::server {
namespace {

constexpr absl::string_view kHmacPrefix = "h1:";
constexpr absl::string_view kEcdsaPrefix = "e1:";
constexpr size_t kMaxRemembered = 100000;

std::string Sha256(absl::string_view data) {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(data.data()), data.size(), digest);
  return std::string(reinterpret_cast<const char*>(digest), sizeof(digest));
}

absl::StatusOr<std::string> RandomId() {
  unsigned char raw[16];
  if (RAND_bytes(raw, sizeof(raw)) != 1) return absl::InternalError("RAND_bytes failed");
  return std::string(reinterpret_cast<const char*>(raw), sizeof(raw));
}

// The CKA_IDs of the EC private keys labelled kLabel, sorted.
absl::StatusOr<std::vector<std::string>> FindEcKeyIds(pkcs11::Token& token) {
  auto objects = token.ListKeyObjects();
  if (!objects.ok()) return objects.status();
  std::vector<std::string> ids;
  for (const pkcs11::ObjectInfo& o : *objects) {
    if (o.is_private_key && o.label == std::string_view(MetadataTagKey::kLabel))
      ids.push_back(o.id);
  }
  std::sort(ids.begin(), ids.end());
  return ids;
}

// r||s (32 bytes each) as the DER ECDSA-Sig-Value OpenSSL verifies.
std::string DerSignature(absl::string_view raw) {
  if (raw.size() != 64) return "";
  ECDSA_SIG* sig = ECDSA_SIG_new();
  BIGNUM* r = BN_bin2bn(reinterpret_cast<const unsigned char*>(raw.data()), 32, nullptr);
  BIGNUM* s = BN_bin2bn(reinterpret_cast<const unsigned char*>(raw.data()) + 32, 32, nullptr);
  std::string der;
  if (sig != nullptr && r != nullptr && s != nullptr && ECDSA_SIG_set0(sig, r, s) == 1) {
    r = s = nullptr;  // owned by sig
    unsigned char* out = nullptr;
    int n = i2d_ECDSA_SIG(sig, &out);
    if (n > 0) der.assign(reinterpret_cast<char*>(out), static_cast<size_t>(n));
    OPENSSL_free(out);
  }
  BN_free(r);
  BN_free(s);
  ECDSA_SIG_free(sig);
  return der;
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetadataTagKey>> MetadataTagKey::Open(pkcs11::Token* token,
                                                                     bool allow_hmac) {
  auto key = std::unique_ptr<MetadataTagKey>(new MetadataTagKey(token));
  const bool can_hmac = allow_hmac && token->HasMechanism("CKM_GENERIC_SECRET_KEY_GEN") &&
                        token->HasMechanism("CKM_SHA256_HMAC");
  const bool can_ecdsa =
      token->HasMechanism("CKM_EC_KEY_PAIR_GEN") && token->HasMechanism("CKM_ECDSA");
  // Whichever kind exists is used (a token may have gained HMAC since the key was made).
  auto find = [&]() -> absl::StatusOr<std::vector<std::string>> {
    if (can_hmac) {
      auto ids = token->FindSecretKeyIds(kLabel);
      if (!ids.ok() || !ids->empty()) {
        key->hmac_ = true;
        return ids;
      }
    }
    key->hmac_ = false;
    auto ids = FindEcKeyIds(*token);
    if (ids.ok() && ids->empty()) key->hmac_ = can_hmac;
    return ids;
  };
  for (int attempt = 0;; ++attempt) {
    auto ids = find();
    for (int retry = 0; !ids.ok() && retry < 3; ++retry) {
      absl::SleepFor(absl::Milliseconds(50));
      ids = find();
    }
    if (!ids.ok()) return ids.status();
    if (!ids->empty()) {
      key->id_ = ids->front();  // the lowest CKA_ID, as every replica picks
      break;
    }
    if (!can_hmac && !can_ecdsa) {
      return absl::FailedPreconditionError(
          "the token can make no metadata tag key: it lists neither CKM_GENERIC_SECRET_KEY_GEN "
          "with CKM_SHA256_HMAC nor CKM_EC_KEY_PAIR_GEN with CKM_ECDSA");
    }
    if (attempt == 5) {
      return absl::UnavailableError(
          "the metadata tag key: other processes kept generating one at the same time; retry");
    }
    auto id = RandomId();
    if (!id.ok()) return id.status();
    absl::Status made =
        key->hmac_ ? token->GenerateHmacKey(*id, kLabel)
                   : token->GenerateKeyPair({pkcs11::KeyType::kEcP256, 0}, *id, kLabel).status();
    if (!made.ok()) {
      // Tokens may refuse a generation while another process writes one (SoftHSM2:
      // CKR_GENERAL_ERROR, CKR_TEMPLATE_INCONSISTENT): look again, then try once more.
      if (attempt == 4) {
        return absl::Status(made.code(),
                            absl::StrCat("generating the metadata tag key: ", made.message()));
      }
      token->DestroyKeyPair(*id).IgnoreError();
      Log(LogLevel::kWarning, "metadata.tag_key_retry", {{"error", std::string(made.message())}});
      absl::SleepFor(absl::Milliseconds(20 + (id->front() & 0x7f)));
      continue;
    }
    auto after = find();
    for (int retry = 0; !after.ok() && retry < 3; ++retry) {
      absl::SleepFor(absl::Milliseconds(50));
      after = find();
    }
    if (!after.ok()) {
      // SoftHSM2 may fail a read of an object another process is writing or deleting.
      token->DestroyKeyPair(*id).IgnoreError();
      if (attempt == 4) return after.status();
      Log(LogLevel::kWarning, "metadata.tag_key_retry",
          {{"error", std::string(after.status().message())}});
      absl::SleepFor(absl::Milliseconds(20 + (id->front() & 0x7f)));
      continue;
    }
    if (after->size() == 1 && after->front() == *id) {
      key->id_ = *id;
      key->generated_ = true;
      break;
    }
    // Another process generated one at the same time: ours was never used, so it goes, and the
    // others are looked at again (theirs may go the same way).
    if (absl::Status s = token->DestroyKeyPair(*id); !s.ok()) return s;
    Log(LogLevel::kInfo, "metadata.tag_key_race",
        {{"action", "another process generated a tag key at the same time; ours destroyed"}});
    absl::SleepFor(absl::Milliseconds(20 + (id->front() & 0x7f)));
  }
  if (!key->hmac_) {
    auto pair = token->FindKeyPair(key->id_);
    if (!pair.ok()) return pair.status();
    if ((*pair)->spec.type != pkcs11::KeyType::kEcP256) {
      return absl::FailedPreconditionError(
          absl::StrCat("the token object labelled '", kLabel, "' is not an EC P-256 key"));
    }
    auto pub = token->PublicKey(**pair);
    if (!pub.ok()) return pub.status();
    key->pair_ = *std::move(pair);
    key->public_key_ = *std::move(pub);
  }
  return key;
}

std::string MetadataTagKey::Describe() const {
  return absl::StrCat(algorithm(), " (token key '", kLabel,
                      "', CKA_ID=", absl::BytesToHexString(id_), ")");
}

absl::StatusOr<std::string> MetadataTagKey::Tag(absl::string_view message) const {
  if (hmac_) {
    auto mac = token_->HmacSha256(id_, std::string_view(message.data(), message.size()));
    if (!mac.ok()) return mac.status();
    return absl::StrCat(kHmacPrefix, absl::WebSafeBase64Escape(*mac));
  }
  auto sig = token_->Sign(*pair_, pkcs11::SignScheme::kEcdsa, Sha256(message));
  if (!sig.ok()) return sig.status();
  return absl::StrCat(kEcdsaPrefix, absl::WebSafeBase64Escape(*sig));
}

absl::StatusOr<bool> MetadataTagKey::Verify(absl::string_view message,
                                            absl::string_view tag) const {
  const std::string seen = Sha256(absl::StrCat(tag.size(), ":", tag, message));
  {
    absl::MutexLock lock(&mu_);
    if (verified_.count(seen) > 0) return true;
  }
  bool ok = false;
  std::string raw;
  if (hmac_) {
    if (absl::ConsumePrefix(&tag, kHmacPrefix) && absl::WebSafeBase64Unescape(tag, &raw)) {
      auto mac = token_->HmacSha256(id_, std::string_view(message.data(), message.size()));
      if (!mac.ok()) return mac.status();
      ok = mac->size() == raw.size() && CRYPTO_memcmp(mac->data(), raw.data(), raw.size()) == 0;
    }
  } else if (absl::ConsumePrefix(&tag, kEcdsaPrefix) && absl::WebSafeBase64Unescape(tag, &raw)) {
    const std::string der = DerSignature(raw);
    const std::string digest = Sha256(message);
    EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new(public_key_.get(), nullptr);
    ok = !der.empty() && ctx != nullptr && EVP_PKEY_verify_init(ctx) == 1 &&
         EVP_PKEY_verify(ctx, reinterpret_cast<const unsigned char*>(der.data()), der.size(),
                         reinterpret_cast<const unsigned char*>(digest.data()), digest.size()) == 1;
    EVP_PKEY_CTX_free(ctx);
  }
  if (ok) {
    absl::MutexLock lock(&mu_);
    if (verified_.size() >= kMaxRemembered) verified_.clear();
    verified_.insert(seen);
  }
  return ok;
}

}  // namespace custody::server
