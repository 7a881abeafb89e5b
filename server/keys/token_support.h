// Which ring algorithms the token custodyd runs on can serve: for each algorithm custodyd offers,
// the Cryptoki mechanisms it needs that this token does not offer (pkcs11/capabilities.h). Taken
// once at startup, so that a ring the token cannot hold is refused at creation and GetKeyRing
// names what is missing, instead of the first signature or decryption failing.
#ifndef CUSTODY_SERVER_KEYS_TOKEN_SUPPORT_H_
#define CUSTODY_SERVER_KEYS_TOKEN_SUPPORT_H_

#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "pkcs11/capabilities.h"
#include "pkcs11/key_operations.h"
#include "server/keys/decryption_profile.h"
#include "server/keys/signing_profile.h"

namespace custody::server {

// What a ring of `profile` asks of the token: its key and the one operation run with it.
pkcs11::KeyUse KeyUseOf(const SigningProfile& profile);
pkcs11::KeyUse KeyUseOf(const DecryptionProfile& profile);

class TokenSupport {
 public:
  // Reads the token's mechanisms (no token call except the cached OAEP SHA-256 probe).
  static TokenSupport Of(pkcs11::KeyOperations& token);

  // The mechanisms `alg` (a signing or decryption alg of CreateKeyRingRequest) needs and the
  // token lacks, each "CKM_X" or "CKM_A or CKM_B"; empty when it serves alg (or alg is unknown).
  const std::vector<std::string>& Missing(const std::string& alg) const;

  // FAILED_PRECONDITION "the token 'L' (module M) does not offer CKM_..., which ALG needs" when
  // Missing(alg) is not empty; OK otherwise.
  absl::Status CheckServes(const std::string& alg) const;

  // Every alg with missing mechanisms (for the startup log).
  const std::map<std::string, std::vector<std::string>>& unserved() const { return unserved_; }

 private:
  std::string token_label_;
  std::string module_path_;
  std::map<std::string, std::vector<std::string>> unserved_;
};

}  // namespace custody::server

#endif  // CUSTODY_SERVER_KEYS_TOKEN_SUPPORT_H_
