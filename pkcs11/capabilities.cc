#include "pkcs11/capabilities.h"

#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "openssl/core_names.h"
#include "openssl/ecdsa.h"
#include "openssl/rand.h"
#include "openssl/rsa.h"
#include "pkcs11/token_internal.h"

namespace custody::pkcs11 {
namespace {

using internal::EvpPkeyCtxPtr;

// The generation mechanism and the size custody asks of it: RSA modulus bits, EC field bits.
// Empty name for key types whose size is fixed by the mechanism (Ed25519).
std::pair<std::string, uint64_t> GenerationSize(const KeySpec& spec) {
  switch (spec.type) {
    case KeyType::kRsa:
      return {"CKM_RSA_PKCS_KEY_PAIR_GEN", static_cast<uint64_t>(spec.rsa_bits)};
    case KeyType::kEcP256:
      return {"CKM_EC_KEY_PAIR_GEN", 256};
    case KeyType::kEcP384:
      return {"CKM_EC_KEY_PAIR_GEN", 384};
    case KeyType::kEcP521:
      return {"CKM_EC_KEY_PAIR_GEN", 521};
    case KeyType::kEd25519:
      break;
  }
  return {"", 0};
}

// FAILED_PRECONDITION for a key the token created but could not use: the version must not be
// published. Device, session and pool failures keep their code (retryable; the key may work).
absl::Status Unusable(const KeyUse& use, const absl::Status& status) {
  if (absl::IsUnavailable(status) || absl::IsResourceExhausted(status) ||
      absl::IsDeadlineExceeded(status)) {
    return status;
  }
  return absl::FailedPreconditionError(absl::StrCat(
      "the token created the key but cannot use it (",
      use.operation == KeyUse::Operation::kSign ? "self-test signature" : "self-test decryption",
      "): ", status.message(), "; the key was not published (use another algorithm or token)"));
}

const char* SchemeDigest(const KeyUse& use) {
  switch (use.scheme) {
    case SignScheme::kEcdsa:
      return use.spec.type == KeyType::kEcP384   ? "SHA384"
             : use.spec.type == KeyType::kEcP521 ? "SHA512"
                                                 : "SHA256";
    case SignScheme::kRsaPssSha384:
      return "SHA384";
    case SignScheme::kRsaPssSha512:
      return "SHA512";
    default:
      return "SHA256";
  }
}

absl::StatusOr<std::string> Digest(const char* md, std::string_view data) {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  if (EVP_Digest(data.data(), data.size(), out, &size, EVP_get_digestbyname(md), nullptr) != 1) {
    return absl::InternalError("EVP_Digest failed");
  }
  return std::string(reinterpret_cast<char*>(out), size);
}

// OpenSSL's verdict on the token's signature `signature` over `input` (SignScheme's input).
bool VerifiesInOpenSsl(EVP_PKEY* pkey, const KeyUse& use, std::string_view input,
                       std::string signature) {
  const auto* in = reinterpret_cast<const unsigned char*>(input.data());
  if (use.scheme == SignScheme::kEddsa) {
    OpensslPtr<EVP_MD_CTX> ctx(EVP_MD_CTX_new());
    return ctx != nullptr &&
           EVP_DigestVerifyInit(ctx.get(), nullptr, nullptr, nullptr, pkey) == 1 &&
           EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(signature.data()),
                            signature.size(), in, input.size()) == 1;
  }
  if (use.scheme == SignScheme::kEcdsa) {  // r||s -> DER
    const size_t half = signature.size() / 2;
    ECDSA_SIG* sig = ECDSA_SIG_new();
    const auto* raw = reinterpret_cast<const unsigned char*>(signature.data());
    BIGNUM* r = BN_bin2bn(raw, static_cast<int>(half), nullptr);
    BIGNUM* s = BN_bin2bn(raw + half, static_cast<int>(half), nullptr);
    if (sig == nullptr || r == nullptr || s == nullptr || ECDSA_SIG_set0(sig, r, s) != 1) {
      BN_free(r);
      BN_free(s);
      ECDSA_SIG_free(sig);
      return false;
    }
    unsigned char* der = nullptr;
    const int der_size = i2d_ECDSA_SIG(sig, &der);
    ECDSA_SIG_free(sig);
    if (der_size <= 0) return false;
    signature.assign(reinterpret_cast<char*>(der), der_size);
    OPENSSL_free(der);
  }
  EvpPkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, pkey, nullptr));
  if (ctx == nullptr || EVP_PKEY_verify_init(ctx.get()) != 1) return false;
  if (use.scheme == SignScheme::kRsaPkcs1v15) {
    if (EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PADDING) != 1) return false;
  } else if (use.scheme != SignScheme::kEcdsa) {  // PSS, salt = digest length
    const char* md = SchemeDigest(use);
    if (EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PSS_PADDING) != 1 ||
        EVP_PKEY_CTX_set_signature_md(ctx.get(), EVP_get_digestbyname(md)) != 1 ||
        EVP_PKEY_CTX_set_rsa_mgf1_md(ctx.get(), EVP_get_digestbyname(md)) != 1 ||
        EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx.get(), static_cast<int>(input.size())) != 1) {
      return false;
    }
  }
  return EVP_PKEY_verify(ctx.get(), reinterpret_cast<const unsigned char*>(signature.data()),
                         signature.size(), in, input.size()) == 1;
}

absl::Status SelfTestSign(KeyOperations& token, const KeyPair& key, const KeyUse& use,
                          EVP_PKEY* pkey) {
  constexpr std::string_view kMessage = "custody self-test: a new key signs before it is published";
  std::string input(kMessage);
  if (use.scheme == SignScheme::kRsaPkcs1v15) {
    // DigestInfo(SHA-256) = fixed DER prefix || digest.
    static constexpr char kPrefix[] =
        "\x30\x31\x30\x0d\x06\x09\x60\x86\x48\x01\x65\x03\x04\x02\x01\x05\x00\x04\x20";
    CUSTODY_ASSIGN_OR_RETURN(std::string digest, Digest("SHA256", kMessage));
    input = std::string(kPrefix, sizeof(kPrefix) - 1) + digest;
  } else if (use.scheme != SignScheme::kEddsa) {
    CUSTODY_ASSIGN_OR_RETURN(input, Digest(SchemeDigest(use), kMessage));
  }
  absl::StatusOr<std::string> signature = token.Sign(key, use.scheme, input);
  if (!signature.ok()) return Unusable(use, signature.status());
  if (!VerifiesInOpenSsl(pkey, use, input, *std::move(signature))) {
    return Unusable(use, absl::InternalError("the signature does not verify under its public key"));
  }
  return absl::OkStatus();
}

absl::Status SelfTestDecrypt(KeyOperations& token, const KeyPair& key, const KeyUse& use,
                             EVP_PKEY* pkey) {
  unsigned char message[32];
  if (RAND_bytes(message, sizeof(message)) != 1) return absl::InternalError("RAND_bytes failed");
  const std::string_view plain(reinterpret_cast<const char*>(message), sizeof(message));
  absl::StatusOr<Secret> decrypted = absl::InternalError("unset");
  if (use.oaep_hash == OaepHash::kSha256 && !token.OaepSupported(OaepHash::kSha256)) {
    // custodyd's path on such a token: raw RSA in the token, OAEP decoding in software. The
    // test value is a k-byte block below the modulus (leading zero byte).
    std::string block(static_cast<size_t>(EVP_PKEY_get_size(pkey)), '\0');
    if (RAND_bytes(reinterpret_cast<unsigned char*>(block.data()) + 1,
                   static_cast<int>(block.size() - 1)) != 1) {
      return absl::InternalError("RAND_bytes failed");
    }
    EvpPkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, pkey, nullptr));
    std::string ciphertext(block.size(), '\0');
    size_t size = ciphertext.size();
    if (ctx == nullptr || EVP_PKEY_encrypt_init(ctx.get()) != 1 ||
        EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_NO_PADDING) != 1 ||
        EVP_PKEY_encrypt(ctx.get(), reinterpret_cast<unsigned char*>(ciphertext.data()), &size,
                         reinterpret_cast<const unsigned char*>(block.data()), block.size()) != 1) {
      return absl::InternalError("EVP_PKEY_encrypt (raw RSA) failed");
    }
    decrypted = token.DecryptRsaRaw(key, ciphertext);
    if (decrypted.ok() && decrypted->view() != absl::string_view(block.data(), block.size())) {
      return Unusable(use, absl::InternalError("raw RSA decryption returned another value"));
    }
  } else {
    CUSTODY_ASSIGN_OR_RETURN(std::string ciphertext,
                             internal::OpenSslOaepEncrypt(pkey, use.oaep_hash, plain));
    decrypted = token.DecryptRsaOaep(key, use.oaep_hash, ciphertext);
    if (decrypted.ok() && decrypted->view() != absl::string_view(plain.data(), plain.size())) {
      return Unusable(use, absl::InternalError("OAEP decryption returned another value"));
    }
  }
  if (!decrypted.ok()) return Unusable(use, decrypted.status());
  return absl::OkStatus();
}

absl::Status SelfTestDerive(KeyOperations& token, const KeyPair& key, const KeyUse& use,
                            EVP_PKEY* pkey) {
  char group[64] = {};
  size_t group_size = 0;
  if (EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof(group),
                                     &group_size) != 1) {
    return absl::InternalError("the token's EC public key has no curve");
  }
  EvpPkeyPtr peer(EVP_EC_gen(group));
  unsigned char point[133];
  size_t point_size = 0;
  if (peer == nullptr ||
      EVP_PKEY_get_octet_string_param(peer.get(), OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, point,
                                      sizeof(point), &point_size) != 1) {
    return absl::InternalError("cannot make an ephemeral EC key");
  }
  absl::StatusOr<Secret> z =
      token.DeriveEcdh(key, std::string_view(reinterpret_cast<char*>(point), point_size));
  if (!z.ok()) return Unusable(use, z.status());
  EvpPkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, peer.get(), nullptr));
  std::string expected(z->size(), '\0');
  size_t size = expected.size();
  if (ctx == nullptr || EVP_PKEY_derive_init(ctx.get()) != 1 ||
      EVP_PKEY_derive_set_peer(ctx.get(), pkey) != 1 ||
      EVP_PKEY_derive(ctx.get(), reinterpret_cast<unsigned char*>(expected.data()), &size) != 1) {
    return absl::InternalError("OpenSSL ECDH failed");
  }
  expected.resize(size);
  if (z->view() != absl::string_view(expected.data(), expected.size())) {
    return Unusable(use, absl::InternalError("ECDH in the token disagrees with OpenSSL"));
  }
  return absl::OkStatus();
}

}  // namespace

std::vector<std::vector<std::string>> RequiredMechanisms(const KeyUse& use) {
  std::vector<std::vector<std::string>> needs;
  switch (use.spec.type) {
    case KeyType::kRsa:
      needs.push_back({"CKM_RSA_PKCS_KEY_PAIR_GEN"});
      break;
    case KeyType::kEd25519:
      needs.push_back({"CKM_EC_EDWARDS_KEY_PAIR_GEN"});
      break;
    case KeyType::kEcP256:
    case KeyType::kEcP384:
    case KeyType::kEcP521:
      needs.push_back({"CKM_EC_KEY_PAIR_GEN"});
      break;
  }
  switch (use.operation) {
    case KeyUse::Operation::kSign:
      switch (use.scheme) {
        case SignScheme::kEcdsa:
          needs.push_back({"CKM_ECDSA"});
          break;
        case SignScheme::kEddsa:
          needs.push_back({"CKM_EDDSA"});
          break;
        case SignScheme::kRsaPssSha256:
        case SignScheme::kRsaPssSha384:
        case SignScheme::kRsaPssSha512:
          needs.push_back({"CKM_RSA_PKCS_PSS"});
          break;
        case SignScheme::kRsaPkcs1v15:
          needs.push_back({"CKM_RSA_PKCS"});
          break;
      }
      break;
    case KeyUse::Operation::kDecryptRsaOaep:
      if (use.oaep_hash == OaepHash::kSha256) {
        needs.push_back({"CKM_RSA_PKCS_OAEP", "CKM_RSA_X_509"});
      } else {
        needs.push_back({"CKM_RSA_PKCS_OAEP"});
      }
      break;
    case KeyUse::Operation::kDeriveEcdh:
      needs.push_back({"CKM_ECDH1_DERIVE"});
      break;
  }
  return needs;
}

std::vector<std::string> MissingMechanisms(KeyOperations& token, const KeyUse& use) {
  std::vector<std::string> missing;
  for (const std::vector<std::string>& need : RequiredMechanisms(use)) {
    bool met = false;
    for (const std::string& name : need) {
      if (name == "CKM_RSA_PKCS_OAEP" && use.operation == KeyUse::Operation::kDecryptRsaOaep &&
          use.oaep_hash == OaepHash::kSha256) {
        // Listed is not enough: some tokens take OAEP with SHA-1 only.
        met = met || token.OaepSupported(OaepHash::kSha256);
      } else {
        met = met || token.HasMechanism(name);
      }
    }
    if (!met) {
      missing.push_back(absl::StrJoin(need, " or "));
    } else if (need.front() == GenerationSize(use.spec).first) {
      if (std::string size = UnservedKeySize(token, use.spec); !size.empty()) {
        missing.push_back(std::move(size));
      }
    }
  }
  return missing;
}

std::string UnservedKeySize(const KeyOperations& token, const KeySpec& spec) {
  const auto [mechanism, size] = GenerationSize(spec);
  if (mechanism.empty()) return "";
  const std::optional<std::pair<uint64_t, uint64_t>> range = token.KeySizeRange(mechanism);
  // Modules report bits here, but a maximum below the smallest size custody generates can only
  // be another unit (bytes): such a range says nothing.
  const uint64_t smallest = spec.type == KeyType::kRsa ? 2048 : 256;
  if (!range.has_value() || range->second < smallest) return "";
  if (size >= range->first && size <= range->second) return "";
  return absl::StrCat(mechanism, " for ", size, "-bit keys (the token generates ", range->first,
                      " to ", range->second, ")");
}

absl::Status SelfTest(KeyOperations& token, const KeyPair& key, const KeyUse& use) {
  absl::StatusOr<EvpPkeyPtr> pkey = token.PublicKey(key);
  if (!pkey.ok()) return pkey.status();
  switch (use.operation) {
    case KeyUse::Operation::kSign:
      return SelfTestSign(token, key, use, pkey->get());
    case KeyUse::Operation::kDecryptRsaOaep:
      return SelfTestDecrypt(token, key, use, pkey->get());
    case KeyUse::Operation::kDeriveEcdh:
      return SelfTestDerive(token, key, use, pkey->get());
  }
  return absl::InternalError("unknown key use");
}

}  // namespace custody::pkcs11
