// What was built: the version of CMake's project(), the git revision the build was configured
// from ("unknown" outside a checkout) and the build type. For --version and logs.
#ifndef CUSTODY_COMMON_VERSION_H_
#define CUSTODY_COMMON_VERSION_H_

#include <string>

#include "absl/strings/string_view.h"

namespace custody {

absl::string_view Version();      // "0.1.0"
absl::string_view GitRevision();  // 12 hex digits, or "unknown"
absl::string_view BuildType();    // "RelWithDebInfo", "Debug", ...

// "custodyd 0.1.0 (git 0123456789ab, RelWithDebInfo)"
std::string VersionLine(absl::string_view program);

}  // namespace custody

#endif  // CUSTODY_COMMON_VERSION_H_
