#include "common/version.h"

#include "absl/strings/str_cat.h"

// Set by common/CMakeLists.txt on this file only, so that a new revision recompiles one file.
#ifndef CUSTODY_VERSION
#define CUSTODY_VERSION "unknown"
#endif
#ifndef CUSTODY_GIT_REVISION
#define CUSTODY_GIT_REVISION "unknown"
#endif
#ifndef CUSTODY_BUILD_TYPE
#define CUSTODY_BUILD_TYPE "unknown"
#endif

namespace custody {

absl::string_view Version() { return CUSTODY_VERSION; }
absl::string_view GitRevision() { return CUSTODY_GIT_REVISION; }
absl::string_view BuildType() { return CUSTODY_BUILD_TYPE; }

std::string VersionLine(absl::string_view program) {
  return absl::StrCat(program, " ", Version(), " (git ", GitRevision(), ", ", BuildType(), ")");
}

}  // namespace custody
