#include "server/daemon/embedded_token.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/log.h"
#include "common/secret.h"
#include "openssl/crypto.h"
#include "openssl/rand.h"
#include "pkcs11/token.h"

namespace custody::server {
namespace {

absl::Status WriteNewFile(const std::string& path, absl::string_view content, mode_t mode) {
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  if (fd < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot create '", path, "': ", std::strerror(errno)));
  }
  size_t done = 0;
  while (done < content.size()) {
    ssize_t n = write(fd, content.data() + done, content.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      close(fd);
      return absl::FailedPreconditionError(
          absl::StrCat("cannot write '", path, "': ", std::strerror(errno)));
    }
    done += static_cast<size_t>(n);
  }
  // Durable before we rely on it: a token initialized with a PIN that was never persisted
  // would be lost for good.
  int rc = fsync(fd);
  close(fd);
  if (rc != 0) {
    return absl::FailedPreconditionError(absl::StrCat("cannot fsync '", path, "'"));
  }
  return absl::OkStatus();
}

// A random PIN file (hex of 24 random bytes) unless it exists.
absl::Status EnsurePinFile(const std::string& path) {
  if (access(path.c_str(), F_OK) == 0) return absl::OkStatus();
  unsigned char raw[24];
  if (RAND_bytes(raw, sizeof(raw)) != 1) return absl::InternalError("RAND_bytes failed");
  Secret pin{absl::BytesToHexString(absl::string_view(reinterpret_cast<char*>(raw), sizeof(raw)))};
  OPENSSL_cleanse(raw, sizeof(raw));
  return WriteNewFile(path, pin.view(), 0600);
}

}  // namespace

absl::Status EnsurePrivateDirectory(const std::string& dir) {
  std::error_code ec;
  if (!std::filesystem::exists(dir, ec)) {
    std::filesystem::create_directories(dir, ec);
    if (ec) {
      return absl::FailedPreconditionError(
          absl::StrCat("cannot create directory '", dir, "': ", ec.message()));
    }
    chmod(dir.c_str(), 0700);
    return absl::OkStatus();
  }
  struct stat st {};
  if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat("'", dir, "' is not a directory"));
  }
  if ((st.st_mode & 077) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "state directory '", dir, "' is accessible to group or others; run chmod 700 on it"));
  }
  return absl::OkStatus();
}

absl::Status PrepareEmbeddedToken(const std::string& state_dir, const std::string& module_path) {
  if (absl::Status s = EnsurePrivateDirectory(state_dir); !s.ok()) return s;
  std::string abs_dir = std::filesystem::absolute(state_dir).lexically_normal().string();
  if (!abs_dir.empty() && abs_dir.back() == '/') abs_dir.pop_back();
  std::string token_dir = abs_dir + "/tokens";
  if (absl::Status s = EnsurePrivateDirectory(token_dir); !s.ok()) return s;
  std::string conf = abs_dir + "/softhsm2.conf";
  if (access(conf.c_str(), F_OK) != 0) {
    std::string text =
        absl::StrCat("# Written by custodyd on first start: the embedded token.\n",
                     "directories.tokendir = ", token_dir, "\n", "objectstore.backend = file\n",
                     "log.level = ERROR\n", "slots.removable = false\n");
    if (absl::Status s = WriteNewFile(conf, text, 0600); !s.ok()) return s;
  }
  setenv("SOFTHSM2_CONF", conf.c_str(), 1);
  for (const char* name : {"/pin", "/so-pin"}) {
    if (absl::Status s = EnsurePinFile(abs_dir + name); !s.ok()) return s;
  }
  // Once initialized, the token is not probed again: loading the module to look would make
  // SoftHSM2 read every object file twice per start (and keep the memory of the first read).
  const std::string marker = abs_dir + "/token-initialized";
  if (access(marker.c_str(), F_OK) == 0) return absl::OkStatus();
  auto pin = ReadSecretFile(abs_dir + "/pin");
  if (!pin.ok()) return pin.status();
  auto so_pin = ReadSecretFile(abs_dir + "/so-pin");
  if (!so_pin.ok()) return so_pin.status();
  absl::Status init =
      pkcs11::Token::InitializeToken(module_path, kEmbeddedTokenLabel, *so_pin, *pin);
  if (!init.ok() && !absl::IsAlreadyExists(init)) return init;
  if (init.ok()) {
    Log(LogLevel::kInfo, "embedded_token.initialized",
        {{"label", kEmbeddedTokenLabel}, {"softhsm2_conf", conf}});
  }
  return WriteNewFile(marker, "the embedded token is initialized\n", 0600);
}

}  // namespace custody::server
