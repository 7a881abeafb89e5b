#include "common/secret.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/regular_file.h"
#include "openssl/crypto.h"

namespace custody {

Secret::Secret(Secret&& other) noexcept : value_(std::move(other.value_)) { other.Wipe(); }

Secret& Secret::operator=(Secret&& other) noexcept {
  if (this != &other) {
    Wipe();
    value_ = std::move(other.value_);
    other.Wipe();
  }
  return *this;
}

Secret::~Secret() { Wipe(); }

void Secret::Wipe() {
  // Wipe the whole capacity: a shorter string may have left older bytes behind.
  if (value_.capacity() > 0) {
    value_.resize(value_.capacity());
    OPENSSL_cleanse(value_.data(), value_.size());
  }
  value_.clear();
}

absl::StatusOr<Secret> ReadSecretFile(const std::string& path) {
  absl::StatusOr<RegularFile> file = RegularFile::Open(path, "secret file");
  if (!file.ok()) return file.status();
  const int fd = file->fd();
  const struct stat& st = file->stat();
  // Kubernetes presents a Secret to a non-root container as a root-owned file whose group is
  // the pod's fsGroup, mode 0440: root can read anything anyway, and the group is the service's
  // own, so that is accepted as well (group read only, nothing for others).
  const bool root_owned_for_our_group =
      st.st_uid == 0 && st.st_gid == getegid() && (st.st_mode & 037) == 0;
  if ((st.st_mode & 077) != 0 && !root_owned_for_our_group) {
    return absl::FailedPreconditionError(
        absl::StrCat("secret file '", path, "' has mode ", OctalMode(st.st_mode & 0777),
                     ": it must be 0600 or 0400, readable by its owner only; run chmod 600 on it"));
  }
  if (st.st_uid != geteuid() && !root_owned_for_our_group) {
    return absl::FailedPreconditionError(
        absl::StrCat("secret file '", path, "' is not owned by the user running custody"));
  }
  Secret secret;
  std::string& buf = secret.mutable_value();
  buf.reserve(256);
  char chunk[256];
  for (;;) {
    ssize_t n = read(fd, chunk, sizeof(chunk));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      OPENSSL_cleanse(chunk, sizeof(chunk));
      return absl::FailedPreconditionError(
          absl::StrCat("cannot read secret file '", path, "': ", std::strerror(errno)));
    }
    if (n == 0) break;
    if (buf.size() + static_cast<size_t>(n) > 4096) {
      OPENSSL_cleanse(chunk, sizeof(chunk));
      return absl::FailedPreconditionError(
          absl::StrCat("secret file '", path, "' is larger than 4096 bytes"));
    }
    buf.append(chunk, static_cast<size_t>(n));
  }
  OPENSSL_cleanse(chunk, sizeof(chunk));
  if (!buf.empty() && buf.back() == '\n') buf.pop_back();
  if (!buf.empty() && buf.back() == '\r') buf.pop_back();
  if (buf.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("secret file '", path, "' is empty"));
  }
  return secret;
}

absl::StatusOr<Secret> ReadSecretEnv(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') {
    return absl::NotFoundError(absl::StrCat("environment variable ", name, " is not set"));
  }
  Secret secret{std::string(value)};
  // The environment block is not ours to wipe reliably; unsetting at least keeps it from
  // children (softhsm2-util, pkcs11-tool) and from /proc/self/environ readers of new strings.
  unsetenv(name);
  return secret;
}

}  // namespace custody
