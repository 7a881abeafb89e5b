// Test-only: pkcs11::KeyOperations over OpenSSL keys held in this process's memory, to unit-test
// the logic above the token (KeyService's scheduler, replica follower and version creation) in
// milliseconds, with no PKCS#11 module. It models what that logic relies on — generation and
// import under a CKA_ID, lookup, idempotent destruction, public keys, signatures that verify —
// and lets a test fail generation or destruction on demand. It is never a stand-in for a real
// token in integration tests (those run custodyd on SoftHSM2 and the other modules), and it
// offers no decryption: HasMechanism lists the signing mechanisms only, so KeyService refuses
// DECRYPT rings over it as it would on a token without them.
//
// Thread-safety: thread-safe. Several KeyService instances may share one (replicas of one HSM).
#ifndef CUSTODY_SERVER_KEYS_TESTING_SOFTWARE_KEY_OPERATIONS_H_
#define CUSTODY_SERVER_KEYS_TESTING_SOFTWARE_KEY_OPERATIONS_H_

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "pkcs11/key_operations.h"

namespace custody::server::testing {

class SoftwareKeyOperations final : public pkcs11::KeyOperations {
 public:
  SoftwareKeyOperations();

  // The next `count` generations (and imports) fail with `status` before creating anything.
  void FailGeneration(absl::Status status, int count = 1);
  // The next `count` destructions fail with `status` and leave the key in place.
  void FailDestruction(absl::Status status, int count = 1);
  // The CKA_IDs of the key pairs held now, sorted.
  std::vector<std::string> Ids() const;
  bool Holds(std::string_view id) const;

  const pkcs11::TokenInfo& info() const override { return info_; }
  bool HasMechanism(std::string_view mechanism_name) const override;
  std::optional<std::pair<uint64_t, uint64_t>> KeySizeRange(std::string_view) const override {
    return std::nullopt;
  }
  bool OaepSupported(pkcs11::OaepHash) override { return false; }

  absl::StatusOr<std::shared_ptr<pkcs11::KeyPair>> GenerateKeyPair(const pkcs11::KeySpec& spec,
                                                                   std::string_view id,
                                                                   std::string_view label,
                                                                   bool for_decryption) override;
  absl::StatusOr<std::shared_ptr<pkcs11::KeyPair>> ImportKeyPair(const EVP_PKEY* private_key,
                                                                 std::string_view id,
                                                                 std::string_view label,
                                                                 bool for_decryption) override;
  absl::StatusOr<std::shared_ptr<pkcs11::KeyPair>> FindKeyPair(std::string_view id) override;
  absl::StatusOr<std::map<std::string, std::shared_ptr<pkcs11::KeyPair>>> FindAllKeyPairs(
      std::vector<pkcs11::ObjectInfo>* objects) override;
  absl::Status DestroyKeyPair(std::string_view id) override;
  absl::StatusOr<pkcs11::EvpPkeyPtr> PublicKey(const pkcs11::KeyPair& key) override;

  absl::StatusOr<std::string> Sign(const pkcs11::KeyPair& key, pkcs11::SignScheme scheme,
                                   std::string_view input) override;
  absl::StatusOr<Secret> DecryptRsaOaep(const pkcs11::KeyPair&, pkcs11::OaepHash,
                                        std::string_view) override;
  absl::StatusOr<Secret> DecryptRsaRaw(const pkcs11::KeyPair&, std::string_view) override;
  absl::StatusOr<Secret> DeriveEcdh(const pkcs11::KeyPair&, std::string_view) override;

 private:
  struct Held {
    pkcs11::EvpPkeyPtr key;
    pkcs11::KeySpec spec;
    std::string label;
  };
  absl::StatusOr<std::shared_ptr<pkcs11::KeyPair>> Add(pkcs11::EvpPkeyPtr key,
                                                       const pkcs11::KeySpec& spec,
                                                       std::string_view id, std::string_view label)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Null when `id` is not held.
  const Held* Find(std::string_view id) const ABSL_SHARED_LOCKS_REQUIRED(mu_);

  pkcs11::TokenInfo info_;
  mutable absl::Mutex mu_;
  std::map<std::string, Held, std::less<>> keys_ ABSL_GUARDED_BY(mu_);
  absl::Status generation_failure_ ABSL_GUARDED_BY(mu_);
  int generation_failures_left_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status destruction_failure_ ABSL_GUARDED_BY(mu_);
  int destruction_failures_left_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace custody::server::testing

#endif  // CUSTODY_SERVER_KEYS_TESTING_SOFTWARE_KEY_OPERATIONS_H_
