// What custody's key logic needs from a token, as an interface: generate, import, find and
// destroy key pairs, read public keys, sign, decrypt and derive, and what the token offers.
// pkcs11::Token (token.h) implements it over Cryptoki; the contracts of each operation are
// Token's, documented there. server/ (KeyService, the self-test, the capability checks) depends
// on this interface only, so the lifecycle logic above the token can be unit-tested over a
// software implementation (server/keys/testing/software_key_operations.h) with no PKCS#11 module.
#ifndef CUSTODY_PKCS11_KEY_OPERATIONS_H_
#define CUSTODY_PKCS11_KEY_OPERATIONS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/secret.h"
#include "pkcs11/key_types.h"

namespace custody::pkcs11 {

class KeyOperations {
 public:
  virtual ~KeyOperations() = default;

  virtual const TokenInfo& info() const = 0;
  virtual bool HasMechanism(std::string_view mechanism_name) const = 0;
  virtual std::optional<std::pair<uint64_t, uint64_t>> KeySizeRange(
      std::string_view mechanism_name) const = 0;
  virtual bool OaepSupported(OaepHash hash) = 0;

  virtual absl::StatusOr<std::shared_ptr<KeyPair>> GenerateKeyPair(const KeySpec& spec,
                                                                   std::string_view id,
                                                                   std::string_view label,
                                                                   bool for_decryption) = 0;
  virtual absl::StatusOr<std::shared_ptr<KeyPair>> ImportKeyPair(const EVP_PKEY* private_key,
                                                                 std::string_view id,
                                                                 std::string_view label,
                                                                 bool for_decryption) = 0;
  virtual absl::StatusOr<std::shared_ptr<KeyPair>> FindKeyPair(std::string_view id) = 0;
  virtual absl::StatusOr<std::map<std::string, std::shared_ptr<KeyPair>>> FindAllKeyPairs(
      std::vector<ObjectInfo>* objects) = 0;
  virtual absl::Status DestroyKeyPair(std::string_view id) = 0;
  virtual absl::StatusOr<EvpPkeyPtr> PublicKey(const KeyPair& key) = 0;

  virtual absl::StatusOr<std::string> Sign(const KeyPair& key, SignScheme scheme,
                                           std::string_view input) = 0;
  virtual absl::StatusOr<Secret> DecryptRsaOaep(const KeyPair& key, OaepHash hash,
                                                std::string_view ciphertext) = 0;
  virtual absl::StatusOr<Secret> DecryptRsaRaw(const KeyPair& key, std::string_view ciphertext) = 0;
  virtual absl::StatusOr<Secret> DeriveEcdh(const KeyPair& key, std::string_view peer_point) = 0;
};

}  // namespace custody::pkcs11

#endif  // CUSTODY_PKCS11_KEY_OPERATIONS_H_
