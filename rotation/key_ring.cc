#include "rotation/key_ring.h"

#include <array>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

namespace custody::rotation {
namespace {

constexpr std::array<std::pair<VersionState, absl::string_view>, 7> kStateNames = {{
    {VersionState::kCreating, "CREATING"},
    {VersionState::kPending, "PENDING"},
    {VersionState::kActive, "ACTIVE"},
    {VersionState::kRetired, "RETIRED"},
    {VersionState::kDisabled, "DISABLED"},
    {VersionState::kDestroyScheduled, "DESTROY_SCHEDULED"},
    {VersionState::kDestroyed, "DESTROYED"},
}};

bool IsSegmentChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
}

}  // namespace

absl::string_view PurposeName(Purpose purpose) {
  return purpose == Purpose::kSign ? "SIGN" : "DECRYPT";
}

absl::StatusOr<Purpose> ParsePurpose(absl::string_view name) {
  if (name == "SIGN") return Purpose::kSign;
  if (name == "DECRYPT") return Purpose::kDecrypt;
  return absl::InvalidArgumentError(absl::StrCat("unknown purpose '", name, "'"));
}

absl::string_view VersionStateName(VersionState state) {
  for (const auto& [s, name] : kStateNames) {
    if (s == state) return name;
  }
  return "UNKNOWN";
}

absl::StatusOr<VersionState> ParseVersionState(absl::string_view name) {
  for (const auto& [s, n] : kStateNames) {
    if (n == name) return s;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown key version state '", name, "'"));
}

absl::Status ValidateRingName(absl::string_view name) {
  if (name.empty()) return absl::InvalidArgumentError("ring name is empty");
  if (name.size() > 200) {
    return absl::InvalidArgumentError(
        absl::StrCat("ring name is ", name.size(), " characters long; the limit is 200"));
  }
  std::vector<absl::string_view> segments = absl::StrSplit(name, '/');
  if (segments.size() > 8) {
    return absl::InvalidArgumentError(
        absl::StrCat("ring name has ", segments.size(), " segments; the limit is 8"));
  }
  for (absl::string_view segment : segments) {
    if (segment.empty()) {
      return absl::InvalidArgumentError(
          "ring name has an empty segment (leading, trailing or doubled '/')");
    }
    if (segment.size() > 64) {
      return absl::InvalidArgumentError("ring name segment is longer than 64 characters");
    }
    if (segment == "." || segment == "..") {
      return absl::InvalidArgumentError("ring name segment may not be '.' or '..'");
    }
    if (segment[0] == '.' || segment[0] == '_' || segment[0] == '-') {
      return absl::InvalidArgumentError(absl::StrCat(
          "ring name segment '", segment, "' must start with a lowercase letter or a digit"));
    }
    for (char c : segment) {
      if (!IsSegmentChar(c)) {
        return absl::InvalidArgumentError(
            "ring name may contain only lowercase letters, digits, '.', '_', '-' and '/'");
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace custody::rotation
