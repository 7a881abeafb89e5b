// Opening the files custody trusts (a PIN, the access policy) without being tricked by what sits
// at their path: a symbolic link is not followed (O_NOFOLLOW), and a FIFO or device is refused at
// once instead of blocking the opening thread (O_NONBLOCK, then fstat). Thread-safe.
#ifndef CUSTODY_COMMON_REGULAR_FILE_H_
#define CUSTODY_COMMON_REGULAR_FILE_H_

#include <sys/stat.h>

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace custody {

// An open, read-only regular file and its fstat. Closes on destruction; move-only.
class RegularFile {
 public:
  RegularFile(RegularFile&& other) noexcept : fd_(other.fd_), stat_(other.stat_) { other.fd_ = -1; }
  RegularFile& operator=(RegularFile&&) = delete;
  RegularFile(const RegularFile&) = delete;
  ~RegularFile();

  int fd() const { return fd_; }
  const struct stat& stat() const { return stat_; }

  // FAILED_PRECONDITION naming `what` and `path` when the path is a symbolic link, a FIFO, a
  // device, a socket or a directory; the errno's status (NOT_FOUND, PERMISSION_DENIED, ...)
  // when it cannot be opened.
  static absl::StatusOr<RegularFile> Open(const std::string& path, absl::string_view what);

 private:
  RegularFile(int fd, const struct stat& st) : fd_(fd), stat_(st) {}
  int fd_;
  struct stat stat_;
};

// The whole file at `path` (certificates, a CA bundle, a TLS key): FAILED_PRECONDITION
// "cannot read '<path>'" when it cannot be opened. Unlike RegularFile it follows links, as
// operators' certificate paths (Kubernetes secrets mounts) are links.
absl::StatusOr<std::string> ReadWholeFile(const std::string& path);

// "0644": a mode's permission bits in octal, for messages.
std::string OctalMode(mode_t mode);

}  // namespace custody

#endif  // CUSTODY_COMMON_REGULAR_FILE_H_
