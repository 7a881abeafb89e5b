// Compact JWE, content encryption (RFC 7518 §5): AES-GCM and AES-CBC + HMAC-SHA2, both ways, and
// raw DEFLATE for "zip":"DEF". Decryption authenticates before anything else and fails uniformly.
#include <zlib.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>

#include "jose/jwe.h"
#include "jose/jwe_internal.h"
#include "jose/openssl_handles.h"
#include "openssl/core_names.h"
#include "openssl/crypto.h"

namespace custody::jose {
namespace internal {
namespace {

// HMAC over AAD || IV || ciphertext || AL (RFC 7518 §5.2.2.1 step 5), truncated to tag_bytes.
bool CbcHsTag(const EncInfo& info, absl::string_view mac_key, absl::string_view aad,
              absl::string_view iv, absl::string_view ciphertext, std::string& tag) {
  MacPtr mac(EVP_MAC_fetch(nullptr, "HMAC", nullptr));
  if (mac == nullptr) return false;
  MacCtxPtr ctx(EVP_MAC_CTX_new(mac.get()));
  if (ctx == nullptr) return false;
  OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST,
                                                          const_cast<char*>(info.hmac_digest), 0),
                         OSSL_PARAM_construct_end()};
  std::string al;
  AppendBigEndian64(al, static_cast<uint64_t>(aad.size()) * 8);
  unsigned char full[EVP_MAX_MD_SIZE];
  size_t full_len = 0;
  if (EVP_MAC_init(ctx.get(), Bytes(mac_key), mac_key.size(), params) != 1 ||
      EVP_MAC_update(ctx.get(), Bytes(aad), aad.size()) != 1 ||
      EVP_MAC_update(ctx.get(), Bytes(iv), iv.size()) != 1 ||
      EVP_MAC_update(ctx.get(), Bytes(ciphertext), ciphertext.size()) != 1 ||
      EVP_MAC_update(ctx.get(), Bytes(al), al.size()) != 1 ||
      EVP_MAC_final(ctx.get(), full, &full_len, sizeof(full)) != 1 || full_len < info.tag_bytes) {
    return false;
  }
  tag.assign(reinterpret_cast<const char*>(full), info.tag_bytes);
  OPENSSL_cleanse(full, sizeof(full));
  return true;
}

// Returns false on any failure; the caller reports the uniform error.
bool GcmDecrypt(const EncInfo& info, const Secret& cek, const ParsedJwe& jwe, Secret& plain) {
  CipherPtr cipher(EVP_CIPHER_fetch(nullptr, info.cipher, nullptr));
  CipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  if (cipher == nullptr || ctx == nullptr) return false;
  std::string& out = plain.mutable_value();
  out.assign(jwe.ciphertext.size() + 16, '\0');
  std::string tag = jwe.tag;
  OSSL_PARAM tag_params[] = {
      OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, tag.data(), tag.size()),
      OSSL_PARAM_construct_end()};
  int len = 0, fin = 0;
  if (EVP_DecryptInit_ex2(ctx.get(), cipher.get(), Bytes(cek.view()), Bytes(jwe.iv), nullptr) !=
          1 ||
      EVP_DecryptUpdate(ctx.get(), nullptr, &len, Bytes(jwe.protected_b64),
                        static_cast<int>(jwe.protected_b64.size())) != 1 ||
      EVP_DecryptUpdate(ctx.get(), MutableBytes(out), &len, Bytes(jwe.ciphertext),
                        static_cast<int>(jwe.ciphertext.size())) != 1 ||
      EVP_CIPHER_CTX_set_params(ctx.get(), tag_params) != 1 ||
      EVP_DecryptFinal_ex(ctx.get(), MutableBytes(out) + len, &fin) != 1) {
    return false;
  }
  out.resize(static_cast<size_t>(len) + static_cast<size_t>(fin));
  return true;
}

bool CbcHsDecrypt(const EncInfo& info, const Secret& cek, const ParsedJwe& jwe, Secret& plain) {
  if (jwe.ciphertext.empty() || jwe.ciphertext.size() % 16 != 0) return false;
  const size_t half = info.cek_bytes / 2;
  std::string expected;
  if (!CbcHsTag(info, cek.view().substr(0, half), jwe.protected_b64, jwe.iv, jwe.ciphertext,
                expected)) {
    return false;
  }
  // Authenticate before decrypting: no padding check ever runs on unauthenticated data.
  if (jwe.tag.size() != expected.size() ||
      CRYPTO_memcmp(jwe.tag.data(), expected.data(), expected.size()) != 0) {
    return false;
  }
  CipherPtr cipher(EVP_CIPHER_fetch(nullptr, info.cipher, nullptr));
  CipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  if (cipher == nullptr || ctx == nullptr) return false;
  std::string& out = plain.mutable_value();
  out.assign(jwe.ciphertext.size() + 16, '\0');
  int len = 0, fin = 0;
  if (EVP_DecryptInit_ex2(ctx.get(), cipher.get(), Bytes(cek.view().substr(half)), Bytes(jwe.iv),
                          nullptr) != 1 ||
      EVP_DecryptUpdate(ctx.get(), MutableBytes(out), &len, Bytes(jwe.ciphertext),
                        static_cast<int>(jwe.ciphertext.size())) != 1 ||
      EVP_DecryptFinal_ex(ctx.get(), MutableBytes(out) + len, &fin) != 1) {
    return false;
  }
  out.resize(static_cast<size_t>(len) + static_cast<size_t>(fin));
  return true;
}

struct InflateStream {
  z_stream stream{};
  bool initialized = false;
  ~InflateStream() {
    if (initialized) inflateEnd(&stream);
  }
};

// Raw DEFLATE (RFC 1951), as "zip":"DEF" specifies. The output buffer grows by copying into a
// fresh Secret so that no reallocation leaves plaintext behind unwiped.
bool Inflate(absl::string_view compressed, size_t max_bytes, Secret& out) {
  if (compressed.size() > UINT_MAX || max_bytes >= UINT_MAX) return false;
  InflateStream zs;
  if (inflateInit2(&zs.stream, -MAX_WBITS) != Z_OK) return false;
  zs.initialized = true;
  zs.stream.next_in = const_cast<Bytef*>(Bytes(compressed));
  zs.stream.avail_in = static_cast<uInt>(compressed.size());
  // One byte over the limit lets "exactly at the limit" be told apart from "over it".
  const size_t cap_limit = max_bytes + 1;
  size_t cap = std::min(cap_limit, std::max<size_t>(4096, compressed.size() * 4));
  Secret buf(std::string(cap, '\0'));
  size_t used = 0;
  for (;;) {
    if (used == cap) {
      if (cap == cap_limit) return false;  // over max_decompressed_bytes
      const size_t bigger = std::min(cap_limit, cap * 2);
      Secret grown(std::string(bigger, '\0'));
      std::memcpy(grown.mutable_value().data(), buf.view().data(), used);
      buf = std::move(grown);
      cap = bigger;
    }
    zs.stream.next_out = MutableBytes(buf.mutable_value()) + used;
    zs.stream.avail_out = static_cast<uInt>(cap - used);
    const int rc = inflate(&zs.stream, Z_NO_FLUSH);
    used = cap - zs.stream.avail_out;
    if (rc == Z_STREAM_END) break;
    // Z_BUF_ERROR with room left means the input ended before the stream did.
    if (rc != Z_OK) return false;
  }
  if (zs.stream.avail_in != 0 || used > max_bytes) return false;  // trailing data / over limit
  buf.mutable_value().resize(used);
  out = std::move(buf);
  return true;
}

}  // namespace

absl::StatusOr<Sealed> EncryptContent(const EncInfo& info, const Secret& cek, absl::string_view iv,
                                      absl::string_view aad, absl::string_view plaintext) {
  if (cek.size() != info.cek_bytes || iv.size() != info.iv_bytes ||
      plaintext.size() > static_cast<size_t>(INT_MAX) - 32 ||
      aad.size() > static_cast<size_t>(INT_MAX)) {
    return absl::InvalidArgumentError("content encryption: bad sizes");
  }
  CipherPtr cipher(EVP_CIPHER_fetch(nullptr, info.cipher, nullptr));
  CipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  if (cipher == nullptr || ctx == nullptr) return OpensslError("content encryption");
  const bool gcm = info.hmac_digest == nullptr;
  const absl::string_view key =
      gcm ? cek.view() : cek.view().substr(info.cek_bytes / 2);  // CBC: ENC_KEY is the 2nd half
  Sealed out;
  out.ciphertext.resize(plaintext.size() + 16);
  int len = 0, fin = 0;
  if (EVP_EncryptInit_ex2(ctx.get(), cipher.get(), Bytes(key), Bytes(iv), nullptr) != 1) {
    return OpensslError("content encryption");
  }
  if (gcm &&
      EVP_EncryptUpdate(ctx.get(), nullptr, &len, Bytes(aad), static_cast<int>(aad.size())) != 1) {
    return OpensslError("content encryption");
  }
  if (EVP_EncryptUpdate(ctx.get(), MutableBytes(out.ciphertext), &len, Bytes(plaintext),
                        static_cast<int>(plaintext.size())) != 1 ||
      EVP_EncryptFinal_ex(ctx.get(), MutableBytes(out.ciphertext) + len, &fin) != 1) {
    return OpensslError("content encryption");
  }
  out.ciphertext.resize(static_cast<size_t>(len) + static_cast<size_t>(fin));
  if (gcm) {
    out.tag.resize(info.tag_bytes);
    OSSL_PARAM params[] = {OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG,
                                                             out.tag.data(), out.tag.size()),
                           OSSL_PARAM_construct_end()};
    if (EVP_CIPHER_CTX_get_params(ctx.get(), params) != 1) return OpensslError("GCM tag");
  } else if (!CbcHsTag(info, cek.view().substr(0, info.cek_bytes / 2), aad, iv, out.ciphertext,
                       out.tag)) {
    return OpensslError("HMAC");
  }
  return out;
}

}  // namespace internal

using internal::Bytes;
using internal::DecryptionFailed;
using internal::EncInfo;
using internal::EncInfoFor;

absl::StatusOr<Secret> DecryptContent(const ParsedJwe& jwe, const Secret& cek,
                                      const JweLimits& limits) {
  const EncInfo& info = EncInfoFor(jwe.enc);
  if (cek.size() != info.cek_bytes || jwe.iv.size() != info.iv_bytes ||
      jwe.tag.size() != info.tag_bytes ||
      jwe.ciphertext.size() > static_cast<size_t>(INT_MAX) - 32 ||
      jwe.protected_b64.size() > static_cast<size_t>(INT_MAX)) {
    return DecryptionFailed();
  }
  Secret plain;
  const bool ok = info.hmac_digest == nullptr ? internal::GcmDecrypt(info, cek, jwe, plain)
                                              : internal::CbcHsDecrypt(info, cek, jwe, plain);
  if (!ok) return DecryptionFailed();
  if (!jwe.zip) return plain;
  if (!limits.allow_zip) return DecryptionFailed();
  Secret inflated;
  if (!internal::Inflate(plain.view(), limits.max_decompressed_bytes, inflated))
    return DecryptionFailed();
  return inflated;
}

}  // namespace custody::jose
