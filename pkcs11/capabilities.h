// What custody asks of a token for one kind of key, in Cryptoki mechanisms, and which of those a
// given token does not offer. A token that lacks a mechanism must be reported when a ring is
// created (and in GetKeyRing), not when the first signature or decryption fails: a network HSM
// reached through an RPC layer (p11-kit's client, a vendor's network module) often offers fewer
// mechanisms than the token behind it.
//
// The answer is read from the token's C_GetMechanismList (taken at Token::Open) and, for OAEP
// with SHA-256, from Token::OaepSupported (probed once). p11-kit's RPC client (Debian 12, 0.24.1)
// removes from that list every mechanism whose parameters it cannot marshal, and refuses such a
// mechanism with CKR_MECHANISM_INVALID before the call reaches the server, so the list is the
// truth there: CKM_EC_EDWARDS_KEY_PAIR_GEN, CKM_EDDSA and CKM_ECDH1_DERIVE are absent.
//
// Thread-safety: the functions are thread-safe as Token is.
#ifndef CUSTODY_PKCS11_CAPABILITIES_H_
#define CUSTODY_PKCS11_CAPABILITIES_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "pkcs11/key_operations.h"

namespace custody::pkcs11 {

// One kind of key and the one operation custody runs with it (besides generating it).
struct KeyUse {
  enum class Operation {
    kSign,            // Token::Sign with `scheme`
    kDecryptRsaOaep,  // Token::DecryptRsaOaep with `oaep_hash` (SHA-256: or DecryptRsaRaw)
    kDeriveEcdh,      // Token::DeriveEcdh
  };
  KeySpec spec;
  Operation operation = Operation::kSign;
  SignScheme scheme = SignScheme::kEcdsa;  // kSign only
  OaepHash oaep_hash = OaepHash::kSha256;  // kDecryptRsaOaep only
};

// The mechanisms `use` needs: key-pair generation, then the operation. Each entry is met by any
// one of its names (custody's first choice first), e.g. {"CKM_RSA_PKCS_OAEP", "CKM_RSA_X_509"}
// for RSA-OAEP with SHA-256, which custodyd can run as raw RSA + OAEP decoding in software.
std::vector<std::vector<std::string>> RequiredMechanisms(const KeyUse& use);

// The needs of `use` that `token` does not meet, in RequiredMechanisms' order, each as
// "CKM_X" or "CKM_A or CKM_B"; empty when the token serves `use`. The OAEP SHA-256 need counts
// as met by CKM_RSA_PKCS_OAEP only when Token::OaepSupported(kSha256) says so. A generation
// mechanism whose key-size range (C_GetMechanismInfo) excludes the spec's size is missing as
// "CKM_X for N-bit keys (the token generates A to B)".
std::vector<std::string> MissingMechanisms(KeyOperations& token, const KeyUse& use);

// "" when the token's reported key-size range for generating `spec` includes its size (RSA
// modulus bits, EC field bits), or when the token reports no range (or one in units that cannot
// be bits); otherwise the need as MissingMechanisms names it.
std::string UnservedKeySize(const KeyOperations& token, const KeySpec& spec);

// Whether `token` can run `use` on `key`, a pair just created for it: signs a test digest and
// verifies the signature with OpenSSL against the token's public key, or encrypts a test value
// with OpenSSL and decrypts it in the token (RSA-OAEP with SHA-256 through raw RSA when the
// token refuses OAEP with SHA-256, as custodyd does), or derives with an ephemeral peer and
// compares with OpenSSL's ECDH. FAILED_PRECONDITION naming the failing call when the token
// created a key it cannot use (e.g. tpm2-pkcs11 1.9 on P-521: C_SignInit CKR_HOST_MEMORY);
// UNAVAILABLE/RESOURCE_EXHAUSTED as the token's calls return them when the device or pool
// failed (the key may well work).
absl::Status SelfTest(KeyOperations& token, const KeyPair& key, const KeyUse& use);

}  // namespace custody::pkcs11

#endif  // CUSTODY_PKCS11_CAPABILITIES_H_
