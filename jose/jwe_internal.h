// What the three files of compact JWE share (jwe.cc: algorithm names, parsing and encryption;
// jwe_content.cc: content encryption and decryption; jwe_key_management.cc: key wrap, key
// agreement, Concat KDF and OAEP decoding). Not installed API: jose/jwe.h is.
#ifndef CUSTODY_JOSE_JWE_INTERNAL_H_
#define CUSTODY_JOSE_JWE_INTERNAL_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/secret.h"
#include "jose/jwe.h"
#include "jose/jwk.h"
#include "openssl/evp.h"

namespace custody::jose::internal {

// A content-encryption algorithm ("enc") and what OpenSSL calls it.
struct EncInfo {
  JweEnc enc;
  absl::string_view name;
  size_t cek_bytes;
  const char* cipher;       // OpenSSL cipher name
  const char* hmac_digest;  // nullptr for GCM
  size_t iv_bytes;
  size_t tag_bytes;
};
const EncInfo& EncInfoFor(JweEnc enc);

// The uniform decryption error (INVALID_ARGUMENT "decryption failed"), OpenSSL's queue cleared.
absl::Status DecryptionFailed();
// INVALID_ARGUMENT "`what`: <OpenSSL's first queued error>", the queue cleared. Encryption side
// only: decryption reports DecryptionFailed().
absl::Status OpensslError(absl::string_view what);
inline const unsigned char* Bytes(absl::string_view s) {
  return reinterpret_cast<const unsigned char*>(s.data());
}
inline unsigned char* MutableBytes(std::string& s) {
  return reinterpret_cast<unsigned char*>(s.data());
}
void AppendBigEndian32(std::string& out, uint32_t v);
void AppendBigEndian64(std::string& out, uint64_t v);
absl::StatusOr<Secret> RandomSecret(size_t n);

// Content encryption (jwe_content.cc): `plaintext` under `cek` with `iv`, `aad` authenticated.
struct Sealed {
  std::string ciphertext;
  std::string tag;
};
absl::StatusOr<Sealed> EncryptContent(const EncInfo& info, const Secret& cek, absl::string_view iv,
                                      absl::string_view aad, absl::string_view plaintext);

// Key management, encryption side (jwe_key_management.cc).
absl::StatusOr<std::string> AesKeyWrap(const Secret& kek, const Secret& key);
absl::StatusOr<std::string> GroupName(const EVP_PKEY* key);
absl::StatusOr<PkeyPtr> GenerateEphemeral(const std::string& group);
absl::StatusOr<Secret> EcdhDerive(EVP_PKEY* own, EVP_PKEY* peer);
absl::StatusOr<std::string> RsaOaepEncrypt(EVP_PKEY* key, const char* digest, const Secret& cek);

}  // namespace custody::jose::internal

#endif  // CUSTODY_JOSE_JWE_INTERNAL_H_
