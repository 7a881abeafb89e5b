// Secret byte strings (PINs, CEKs, plaintexts) that wipe themselves with OPENSSL_cleanse.
//
// A Secret is move-only so that a copy cannot outlive the wipe. Thread-compatible.
#ifndef CUSTODY_COMMON_SECRET_H_
#define CUSTODY_COMMON_SECRET_H_

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace custody {

class Secret {
 public:
  Secret() = default;
  explicit Secret(std::string value) : value_(std::move(value)) {}
  Secret(const Secret&) = delete;
  Secret& operator=(const Secret&) = delete;
  Secret(Secret&& other) noexcept;
  Secret& operator=(Secret&& other) noexcept;
  ~Secret();

  absl::string_view view() const { return value_; }
  bool empty() const { return value_.empty(); }
  size_t size() const { return value_.size(); }
  // Mutable access for in-place fills (e.g. C_Decrypt output). Callers must not copy it out.
  std::string& mutable_value() { return value_; }

 private:
  void Wipe();
  std::string value_;
};

// Reads a secret (a PIN) from a file. The file must be a regular file owned by the current
// user with mode 0600 or 0400; wider permissions are refused, because a PIN readable by
// others is a PIN already disclosed. Also accepted: a root-owned file whose group is the
// current effective group, readable by that group only (0440/0400: how Kubernetes mounts a
// Secret for a non-root pod with fsGroup). Symlinks are refused. One trailing newline is
// stripped.
absl::StatusOr<Secret> ReadSecretFile(const std::string& path);

// Reads a secret from an environment variable, then unsets the variable so that child
// processes do not inherit it. NOT_FOUND when unset.
absl::StatusOr<Secret> ReadSecretEnv(const char* name);

}  // namespace custody

#endif  // CUSTODY_COMMON_SECRET_H_
