// Test-only: a throw-away SoftHSM2 setup (configuration file, token directory) for one process.
//
// SoftHSM2 reads SOFTHSM2_CONF at C_Initialize, so Create must run before the first
// Token::Open / Token::InitializeToken of the process, and one process gets one configuration.
#ifndef CUSTODY_PKCS11_TESTING_SOFTHSM_TESTING_H_
#define CUSTODY_PKCS11_TESTING_SOFTHSM_TESTING_H_

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace custody::pkcs11 {

class TemporarySoftHsm {
 public:
  // mkdtemp a directory, write DIR/softhsm2.conf (token directory DIR/tokens, file backend,
  // log level ERROR, then `extra_config` lines) and point SOFTHSM2_CONF at it.
  static absl::StatusOr<std::unique_ptr<TemporarySoftHsm>> Create(
      std::string_view extra_config = "");

  // The SoftHSM2 module: $SOFTHSM2_MODULE if set, else Debian's path.
  static std::string ModulePath();

  ~TemporarySoftHsm();  // removes the directory and its tokens
  TemporarySoftHsm(const TemporarySoftHsm&) = delete;
  TemporarySoftHsm& operator=(const TemporarySoftHsm&) = delete;

  const std::string& dir() const { return dir_; }

 private:
  explicit TemporarySoftHsm(std::string dir) : dir_(std::move(dir)) {}
  std::string dir_;
};

}  // namespace custody::pkcs11

#endif  // CUSTODY_PKCS11_TESTING_SOFTHSM_TESTING_H_
