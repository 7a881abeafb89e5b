#include "server/keys/decryption_profile.h"

#include "absl/strings/str_cat.h"
#include "openssl/evp.h"
#include "openssl/rand.h"

namespace custody::server {
namespace {

absl::Status DecryptionFailed() { return absl::InvalidArgumentError("decryption failed"); }

// A random CEK: what an RSA failure continues with, so that it fails at the tag check.
absl::StatusOr<Secret> RandomCek(size_t bytes) {
  Secret cek{std::string(bytes, '\0')};
  if (RAND_bytes(reinterpret_cast<unsigned char*>(cek.mutable_value().data()),
                 static_cast<int>(bytes)) != 1) {
    return absl::InternalError("RAND_bytes failed");
  }
  return cek;
}

const EVP_MD* Sha256() {
  static const EVP_MD* md = EVP_MD_fetch(nullptr, "SHA2-256", nullptr);
  return md;
}

absl::StatusOr<Secret> RsaPrivateStep(pkcs11::KeyOperations& token, const pkcs11::KeyPair& key,
                                      const DecryptionProfile& profile, RsaOaepPath path,
                                      absl::string_view encrypted_key) {
  std::string_view ciphertext(encrypted_key.data(), encrypted_key.size());
  if (profile.alg == jose::JweAlg::kRsaOaep) {
    return token.DecryptRsaOaep(key, pkcs11::OaepHash::kSha1, ciphertext);
  }
  if (path.sha256_native) {
    return token.DecryptRsaOaep(key, pkcs11::OaepHash::kSha256, ciphertext);
  }
  // The token refuses OAEP with SHA-256: raw RSA in the token, constant-time OAEP decoding here.
  auto em = token.DecryptRsaRaw(key, ciphertext);
  if (!em.ok()) return em.status();
  return jose::OaepDecode(*em, Sha256());
}

}  // namespace

absl::StatusOr<DecryptionProfile> ResolveDecryptionProfile(absl::string_view alg, int rsa_bits,
                                                           absl::string_view curve) {
  if (alg.empty()) {
    return absl::InvalidArgumentError(
        "alg is required: RSA-OAEP-256, RSA-OAEP, ECDH-ES or ECDH-ES+A128KW/A192KW/A256KW");
  }
  auto jwe_alg = jose::ParseJweAlg(alg);
  if (!jwe_alg.ok()) return jwe_alg.status();
  DecryptionProfile p;
  p.alg = *jwe_alg;
  if (jose::IsEcdh(p.alg)) {
    if (rsa_bits != 0) {
      return absl::InvalidArgumentError(absl::StrCat("rsa_bits does not apply to ", alg));
    }
    std::string crv = curve.empty() ? "P-256" : std::string(curve);
    if (crv == "P-256") {
      p.key = {pkcs11::KeyType::kEcP256, 0};
    } else if (crv == "P-384") {
      p.key = {pkcs11::KeyType::kEcP384, 0};
    } else if (crv == "P-521") {
      p.key = {pkcs11::KeyType::kEcP521, 0};
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("curve must be P-256, P-384 or P-521, not '", crv, "'"));
    }
    p.curve = crv;
    return p;
  }
  if (!curve.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("curve does not apply to ", alg));
  }
  if (rsa_bits == 0) rsa_bits = 2048;
  if (rsa_bits != 2048 && rsa_bits != 3072 && rsa_bits != 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("rsa_bits must be 2048, 3072 or 4096, not ", rsa_bits));
  }
  p.key = {pkcs11::KeyType::kRsa, rsa_bits};
  return p;
}

std::string DecryptionMechanismDescription(const DecryptionProfile& profile, RsaOaepPath path) {
  switch (profile.alg) {
    case jose::JweAlg::kRsaOaep:
      return "token: CKM_RSA_PKCS_OAEP (SHA-1)";
    case jose::JweAlg::kRsaOaep256:
      return path.sha256_native
                 ? "token: CKM_RSA_PKCS_OAEP (SHA-256)"
                 : "fallback: token CKM_RSA_X_509 + constant-time OAEP decoding in custodyd (the "
                   "token refuses CKM_RSA_PKCS_OAEP with SHA-256)";
    default:
      return "token: CKM_ECDH1_DERIVE + Concat KDF in custodyd";
  }
}

absl::StatusOr<Secret> RecoverCek(pkcs11::KeyOperations& token, const pkcs11::KeyPair& key,
                                  const DecryptionProfile& profile, RsaOaepPath path,
                                  const jose::ParsedJwe& jwe, absl::string_view epk_point) {
  const size_t cek_bytes = jose::CekBytes(jwe.enc);
  if (!jose::IsEcdh(profile.alg)) {
    auto cek = RsaPrivateStep(token, key, profile, path, jwe.encrypted_key);
    if (cek.ok() && cek->size() == cek_bytes) return cek;
    // Token trouble is not a decryption failure: report it (it carries no secret).
    if (!cek.ok() && !absl::IsInvalidArgument(cek.status())) return cek.status();
    return RandomCek(cek_bytes);
  }
  auto z = token.DeriveEcdh(key, std::string_view(epk_point.data(), epk_point.size()));
  if (!z.ok()) return absl::IsInvalidArgument(z.status()) ? DecryptionFailed() : z.status();
  const size_t kw_bytes = jose::KeyWrapBytes(profile.alg);
  if (kw_bytes == 0) {  // ECDH-ES direct: the KDF output is the CEK
    return jose::ConcatKdf(*z, jose::JweEncName(jwe.enc), jwe.apu, jwe.apv, cek_bytes);
  }
  auto kek = jose::ConcatKdf(*z, jose::JweAlgName(profile.alg), jwe.apu, jwe.apv, kw_bytes);
  if (!kek.ok()) return kek.status();
  auto cek = jose::AesKeyUnwrap(*kek, jwe.encrypted_key);
  if (!cek.ok() || cek->size() != cek_bytes) return DecryptionFailed();
  return cek;
}

}  // namespace custody::server
