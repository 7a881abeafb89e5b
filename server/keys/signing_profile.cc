#include "server/keys/signing_profile.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "openssl/evp.h"

namespace custody::server {
namespace {

// Fetched once: EVP_MD_fetch is not free, and a fetched EVP_MD is safe to share across threads.
const EVP_MD* Sha256() {
  static const EVP_MD* md = EVP_MD_fetch(nullptr, "SHA2-256", nullptr);
  return md;
}

const EVP_MD* Sha384() {
  static const EVP_MD* md = EVP_MD_fetch(nullptr, "SHA2-384", nullptr);
  return md;
}

const EVP_MD* Sha512() {
  static const EVP_MD* md = EVP_MD_fetch(nullptr, "SHA2-512", nullptr);
  return md;
}

// DER DigestInfo prefix for SHA-256 (RFC 8017 §9.2 note 1).
constexpr unsigned char kSha256DigestInfoPrefix[] = {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60,
                                                     0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                                                     0x01, 0x05, 0x00, 0x04, 0x20};

}  // namespace

absl::StatusOr<SigningProfile> ResolveSigningProfile(absl::string_view alg, int rsa_bits,
                                                     bool allow_non_fapi) {
  SigningProfile p;
  bool rsa = alg == "PS256" || alg == "RS256";
  if (!rsa && rsa_bits != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("rsa_bits applies to RSA algorithms only, not ", alg));
  }
  if (rsa) {
    if (rsa_bits == 0) rsa_bits = 2048;
    if (rsa_bits != 2048 && rsa_bits != 3072 && rsa_bits != 4096) {
      return absl::InvalidArgumentError(
          absl::StrCat("rsa_bits must be 2048, 3072 or 4096, not ", rsa_bits));
    }
    p.key = {pkcs11::KeyType::kRsa, rsa_bits};
    p.digest = Sha256();
    p.digest_size = 32;
  }
  if (alg == "ES256") {
    p.alg = jose::JwsAlg::kES256;
    p.key = {pkcs11::KeyType::kEcP256, 0};
    p.scheme = pkcs11::SignScheme::kEcdsa;
    p.digest = Sha256();
    p.digest_size = 32;
  } else if (alg == "ES384") {  // for TLS/X.509 keys on P-384 (and JWS ES384)
    p.alg = jose::JwsAlg::kES384;
    p.key = {pkcs11::KeyType::kEcP384, 0};
    p.scheme = pkcs11::SignScheme::kEcdsa;
    p.digest = Sha384();
    p.digest_size = 48;
  } else if (alg == "ES512") {  // P-521 with SHA-512
    p.alg = jose::JwsAlg::kES512;
    p.key = {pkcs11::KeyType::kEcP521, 0};
    p.scheme = pkcs11::SignScheme::kEcdsa;
    p.digest = Sha512();
    p.digest_size = 64;
  } else if (alg == "EdDSA") {
    p.alg = jose::JwsAlg::kEdDSA;
    p.key = {pkcs11::KeyType::kEd25519, 0};
    p.scheme = pkcs11::SignScheme::kEddsa;
  } else if (alg == "PS256") {
    p.alg = jose::JwsAlg::kPS256;
    p.scheme = pkcs11::SignScheme::kRsaPssSha256;
  } else if (alg == "RS256") {
    if (!allow_non_fapi) {
      return absl::InvalidArgumentError(
          "RS256 is not allowed by FAPI (use PS256 or ES256); set allow_non_fapi on the ring to "
          "opt in explicitly");
    }
    p.alg = jose::JwsAlg::kRS256;
    p.scheme = pkcs11::SignScheme::kRsaPkcs1v15;
  } else if (alg.empty()) {
    return absl::InvalidArgumentError(
        "alg is required: PS256, ES256, ES384, ES512, EdDSA or RS256");
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("unsupported signing alg '", alg,
                     "': use PS256, ES256, ES384, ES512, EdDSA (or RS256, non-FAPI)"));
  }
  if (p.digest == nullptr && p.scheme != pkcs11::SignScheme::kEddsa) {
    return absl::InternalError("SHA-2 is not available from the OpenSSL default provider");
  }
  return p;
}

absl::StatusOr<std::string> TokenSignInputFromDigest(const SigningProfile& profile,
                                                     absl::string_view digest) {
  if (profile.scheme == pkcs11::SignScheme::kEddsa) {
    return absl::InvalidArgumentError(
        "EdDSA signs the message itself, not a digest: send the message in 'data'");
  }
  if (digest.size() != profile.digest_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("digest must be ", profile.digest_size, " bytes for ",
                     std::string(jose::JwsAlgName(profile.alg)), ", got ", digest.size()));
  }
  if (profile.scheme == pkcs11::SignScheme::kRsaPkcs1v15) {
    std::string info(reinterpret_cast<const char*>(kSha256DigestInfoPrefix),
                     sizeof(kSha256DigestInfoPrefix));
    info.append(digest.data(), digest.size());
    return info;
  }
  return std::string(digest.data(), digest.size());
}

absl::StatusOr<std::string> TokenSignInput(const SigningProfile& profile,
                                           absl::string_view message) {
  if (profile.scheme == pkcs11::SignScheme::kEddsa)
    return std::string(message.data(), message.size());
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int md_len = 0;
  if (EVP_Digest(message.data(), message.size(), md, &md_len, profile.digest, nullptr) != 1) {
    return absl::InternalError("EVP_Digest failed");
  }
  return TokenSignInputFromDigest(profile,
                                  absl::string_view(reinterpret_cast<const char*>(md), md_len));
}

}  // namespace custody::server
