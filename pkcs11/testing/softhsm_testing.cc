#include "pkcs11/testing/softhsm_testing.h"

#include <stdlib.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <system_error>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace custody::pkcs11 {

absl::StatusOr<std::unique_ptr<TemporarySoftHsm>> TemporarySoftHsm::Create(
    std::string_view extra_config) {
  std::error_code error;
  std::filesystem::path base = std::filesystem::temp_directory_path(error);
  if (error) base = "/tmp";
  std::string pattern = (base / "custody-softhsm-XXXXXX").string();
  if (mkdtemp(pattern.data()) == nullptr) {
    return absl::InternalError(absl::StrCat("mkdtemp: ", std::strerror(errno)));
  }
  std::unique_ptr<TemporarySoftHsm> setup(new TemporarySoftHsm(pattern));
  const std::string tokens = absl::StrCat(pattern, "/tokens");
  if (!std::filesystem::create_directory(tokens, error)) {
    return absl::InternalError(absl::StrCat("mkdir ", tokens, ": ", error.message()));
  }
  const std::string conf = absl::StrCat(pattern, "/softhsm2.conf");
  std::ofstream out(conf);
  out << "directories.tokendir = " << tokens << "\n"
      << "objectstore.backend = file\n"
      << "log.level = ERROR\n"
      << extra_config << "\n";
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", conf));
  if (setenv("SOFTHSM2_CONF", conf.c_str(), /*overwrite=*/1) != 0) {
    return absl::InternalError("setenv SOFTHSM2_CONF failed");
  }
  return setup;
}

std::string TemporarySoftHsm::ModulePath() {
  const char* path = getenv("SOFTHSM2_MODULE");
  return path != nullptr && *path != '\0' ? path : "/usr/lib/softhsm/libsofthsm2.so";
}

TemporarySoftHsm::~TemporarySoftHsm() {
  std::error_code ignored;
  std::filesystem::remove_all(dir_, ignored);
}

}  // namespace custody::pkcs11
