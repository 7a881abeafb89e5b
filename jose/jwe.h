// Compact JWE (RFC 7516) for the algorithms custody supports: parsing with limits, content
// decryption, the software halves of key agreement/transport, and encryption (the client side).
// The private-key step (RSA-OAEP decryption, ECDH) is not here: custodyd runs it in the token.
//
// Decryption failures after parsing are deliberately uniform: every function documented as
// "uniform" returns INVALID_ARGUMENT "decryption failed" whatever went wrong, and the OAEP
// decoder runs in constant time, so that no error text or timing acts as an oracle.
#ifndef CUSTODY_JOSE_JWE_H_
#define CUSTODY_JOSE_JWE_H_

#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "custody/common/secret.h"
#include "custody/jose/json.h"
#include "custody/jose/jwk.h"
#include "openssl/evp.h"

namespace custody::jose {

enum class JweAlg { kRsaOaep, kRsaOaep256, kEcdhEs, kEcdhEsA128Kw, kEcdhEsA192Kw, kEcdhEsA256Kw };
enum class JweEnc { kA128Gcm, kA192Gcm, kA256Gcm, kA128CbcHs256, kA192CbcHs384, kA256CbcHs512 };

absl::string_view JweAlgName(JweAlg alg);
// INVALID_ARGUMENT naming the reason for the algs we refuse on purpose: RSA1_5 (padding oracle,
// Bleichenbacher; forbidden by FAPI), dir (a shared symmetric key is not custody's model),
// PBES2-* (password-based), A*KW / A*GCMKW (symmetric key wrap); and for unknown names.
absl::StatusOr<JweAlg> ParseJweAlg(absl::string_view name);
absl::string_view JweEncName(JweEnc enc);
absl::StatusOr<JweEnc> ParseJweEnc(absl::string_view name);
size_t CekBytes(JweEnc enc);  // 16/24/32 for GCM, 32/48/64 for CBC-HS
bool IsEcdh(JweAlg alg);
// Key-wrap KEK size for ECDH-ES+AxxxKW (16/24/32), 0 for the others.
size_t KeyWrapBytes(JweAlg alg);

struct JweLimits {
  size_t max_compact_bytes = 1024 * 1024;
  size_t max_protected_header_bytes = 8 * 1024;  // decoded
  size_t max_encrypted_key_bytes = 1024;         // decoded (RSA-4096 is 512)
  size_t max_ciphertext_bytes = 768 * 1024;      // decoded
  // zip ("DEF") is refused unless enabled; then decompressed output is capped at this size.
  bool allow_zip = false;
  size_t max_decompressed_bytes = 256 * 1024;
};

struct ParsedJwe {
  std::string protected_b64;  // the AAD is exactly these ASCII bytes
  Json header;                // the decoded protected header (an object)
  JweAlg alg = JweAlg::kRsaOaep256;
  JweEnc enc = JweEnc::kA256Gcm;
  std::string kid;          // empty when absent
  std::optional<Json> epk;  // ECDH-ES ephemeral public key (required for ECDH algs)
  std::string apu, apv;     // decoded, empty when absent
  bool zip = false;
  std::string encrypted_key, iv, ciphertext, tag;  // decoded
};

// Parses five base64url parts. INVALID_ARGUMENT naming the part ("JWE protected header: ...",
// "JWE iv: ...") for: wrong part count, bad base64url, bad JSON, missing/unknown alg or enc,
// refused alg (see ParseJweAlg), a "crit" member (no extension is understood), zip when not
// allowed or other than "DEF", size limits, iv/tag length wrong for enc, encrypted_key present for
// ECDH-ES (direct) or absent for the others, missing or malformed epk for ECDH algs.
absl::StatusOr<ParsedJwe> ParseCompactJwe(absl::string_view compact, const JweLimits& limits = {});

// Validates an ECDH-ES "epk" against the ring's curve ("P-256", "P-384", "P-521") before any
// private-key use: kty EC, the same crv, coordinates of the right length, the point on the curve
// and not at infinity (invalid-curve attack). INVALID_ARGUMENT saying which check failed (this is
// before any secret is involved, so the message may be specific). Returns the public key.
absl::StatusOr<PkeyPtr> ValidateEpk(const Json& epk, absl::string_view expected_crv);

// RFC 7518 §4.6.2 Concat KDF with SHA-256 through OpenSSL 3's SSKDF (EVP_KDF_fetch "SSKDF"):
// OtherInfo = AlgorithmID(alg_id) || PartyUInfo(apu) || PartyVInfo(apv) || SuppPubInfo(bits).
// alg_id is the "enc" name for ECDH-ES and the "alg" name for ECDH-ES+AxxxKW.
absl::StatusOr<Secret> ConcatKdf(const Secret& z, absl::string_view alg_id, absl::string_view apu,
                                 absl::string_view apv, size_t key_bytes);

// RFC 3394 AES key unwrap (EVP "AES-xxx-WRAP"). Uniform error.
absl::StatusOr<Secret> AesKeyUnwrap(const Secret& kek, absl::string_view wrapped);

// Decrypts and authenticates the content with `cek` (AES-GCM, or AES-CBC + HMAC-SHA2 per RFC 7518
// §5.2 with a constant-time tag compare), then inflates when zip is set (bounded by the limits).
// Uniform error, including for a CEK of the wrong length.
absl::StatusOr<Secret> DecryptContent(const ParsedJwe& jwe, const Secret& cek,
                                      const JweLimits& limits = {});

// EME-OAEP decoding (RFC 8017 §7.1.2) of `em` (the k-byte result of a raw RSA decryption) with
// `hash` for both the label hash and MGF1, label empty. Constant-time in everything secret: no
// branch or early return on em's contents; one uniform error.
absl::StatusOr<Secret> OaepDecode(const Secret& em, const EVP_MD* hash);

// Encrypts `plaintext` to the public JWK `recipient` (RSA for RSA-OAEP*, EC for ECDH-ES*) and
// returns the compact JWE. `kid`, when not empty, goes into the protected header; `extra` may add
// members such as "cty" (an object or null; alg/enc/epk/kid/zip/crit refused there). "apu"/"apv"
// in `extra` (base64url) also enter the ECDH-ES key derivation.
absl::StatusOr<std::string> EncryptCompactJwe(absl::string_view plaintext, const Json& recipient,
                                              JweAlg alg, JweEnc enc, absl::string_view kid = "",
                                              const Json& extra = Json());

}  // namespace custody::jose

#endif  // CUSTODY_JOSE_JWE_H_
