// The value types of pkcs11/'s interface: key specs, signature schemes, key pairs (CKA_ID and
// opaque cached handles), object listings and the token's identity. Included by token.h and
// key_operations.h.
#ifndef CUSTODY_PKCS11_KEY_TYPES_H_
#define CUSTODY_PKCS11_KEY_TYPES_H_

#include <atomic>
#include <cstdint>
#include <string>

#include "common/openssl_ptr.h"
#include "openssl/evp.h"

namespace custody::pkcs11 {

using EvpPkeyPtr = OpensslPtr<EVP_PKEY>;  // the same owner as jose::PkeyPtr

enum class KeyType { kEcP256, kEcP384, kEcP521, kEd25519, kRsa };

struct KeySpec {
  KeyType type = KeyType::kEcP256;
  int rsa_bits = 0;  // 2048, 3072 or 4096 when type == kRsa; ignored otherwise.
};

// How the private key is used. The input each scheme takes is fixed here so that callers
// (jose/, server/) never pick Cryptoki parameters.
enum class SignScheme {
  kEcdsa,         // CKM_ECDSA. Input: the message digest. Output: r||s, each padded to the
                  // curve's field size (exactly the JWS ES256/384/512 encoding).
  kEddsa,         // CKM_EDDSA (pure Ed25519). Input: the whole message. Output: 64 bytes.
  kRsaPssSha256,  // CKM_RSA_PKCS_PSS, hash SHA-256, MGF1-SHA-256, salt 32. Input: SHA-256 digest.
  kRsaPkcs1v15,   // CKM_RSA_PKCS. Input: a DER DigestInfo (the caller encodes it).
  kRsaPssSha384,  // CKM_RSA_PKCS_PSS, SHA-384, MGF1-SHA-384, salt 48. Input: SHA-384 digest.
  kRsaPssSha512,  // CKM_RSA_PKCS_PSS, SHA-512, MGF1-SHA-512, salt 64. Input: SHA-512 digest.
};

enum class OaepHash { kSha1, kSha256 };

// A key pair resolved in the token. Handles are resolved once (FindKeyPair/GenerateKeyPair)
// and cached here; they are opaque outside pkcs11/.
struct KeyPair {
  std::string id;     // CKA_ID bytes (the key version's id)
  std::string label;  // CKA_LABEL
  KeySpec spec;
  // Mutable: Token re-resolves a stale handle by CKA_ID and updates the cache through the
  // const KeyPair& it was given (see Token::Sign).
  mutable std::atomic<uint64_t> private_handle{0};
  mutable std::atomic<uint64_t> public_handle{0};
  // Which initialization of the module issued the handles: after a module re-initialization
  // the same handle values may name other objects, so both are found again by CKA_ID.
  mutable std::atomic<uint64_t> handle_generation{0};
};

struct PrivateKeyAttributes {
  bool token = false;
  bool is_private = false;
  bool sensitive = false;
  bool extractable = true;
  bool always_sensitive = false;
  bool never_extractable = false;
};

// One key object found in the token (for reconciliation at startup).
struct ObjectInfo {
  std::string id;
  std::string label;
  bool is_private_key = false;  // else public key
};

struct TokenInfo {
  std::string module_path;
  std::string library_description;
  std::string label;
  std::string manufacturer;
  std::string model;
  std::string serial;
  uint64_t slot_id = 0;
};

}  // namespace custody::pkcs11

#endif  // CUSTODY_PKCS11_KEY_TYPES_H_
