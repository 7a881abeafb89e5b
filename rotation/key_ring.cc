#include "rotation/key_ring.h"

#include <algorithm>
#include <array>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace custody::rotation {
namespace {

constexpr std::array<std::pair<VersionState, absl::string_view>, 8> kStateNames = {{
    {VersionState::kCreating, "CREATING"},
    {VersionState::kPending, "PENDING"},
    {VersionState::kActive, "ACTIVE"},
    {VersionState::kRetired, "RETIRED"},
    {VersionState::kDisabled, "DISABLED"},
    {VersionState::kDestroyScheduled, "DESTROY_SCHEDULED"},
    {VersionState::kDestroyed, "DESTROYED"},
    {VersionState::kDestroying, "DESTROYING"},
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

bool IsPublishedState(VersionState state) {
  return state == VersionState::kPending || state == VersionState::kActive ||
         state == VersionState::kRetired;
}

absl::Status ValidatePolicy(const RotationPolicy& p) {
  constexpr int64_t kTenYearsMs = int64_t{10} * 366 * 24 * 60 * 60 * 1000;
  for (auto [name, value] : {std::pair<const char*, int64_t>{"prepublish", p.prepublish_ms},
                             {"rotation_period", p.rotation_period_ms},
                             {"retain", p.retain_ms},
                             {"destroy_delay", p.destroy_delay_ms}}) {
    if (value < 0 || value > kTenYearsMs) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " must be between 0 and 10 years, got ", value, " ms"));
    }
  }
  if (p.retain_ms < p.prepublish_ms) {
    return absl::InvalidArgumentError(absl::StrCat(
        "retain (", p.retain_ms, " ms) is shorter than prepublish (", p.prepublish_ms,
        " ms): a retired key must stay published at least as long as its successor was "
        "pre-published, or verifiers caching the JWKS lose it"));
  }
  if (p.rotation_period_ms != 0 && p.rotation_period_ms < p.prepublish_ms) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rotation_period (", p.rotation_period_ms, " ms) is shorter than prepublish (",
        p.prepublish_ms, " ms): the next key could not be published long enough before it is due"));
  }
  return absl::OkStatus();
}

std::string FormatDurationMs(int64_t ms) {
  if (ms == 0) return "0s";
  return absl::FormatDuration(absl::Milliseconds(ms));
}

absl::Status CheckPolicyFloors(const RotationPolicy& p, const PolicyFloors& floors) {
  struct Floor {
    const char* field;
    int64_t value;
    const char* flag;
    int64_t bound;
  };
  for (const Floor& f : {Floor{"destroy_delay", p.destroy_delay_ms, "min_destroy_delay",
                               floors.min_destroy_delay_ms},
                         Floor{"retain", p.retain_ms, "min_retain", floors.min_retain_ms}}) {
    if (f.value < f.bound) {
      return absl::InvalidArgumentError(absl::StrCat(f.field, " ", FormatDurationMs(f.value),
                                                     " is below --", f.flag, "=",
                                                     FormatDurationMs(f.bound)));
    }
  }
  if (p.rotation_period_ms != 0 && p.rotation_period_ms < floors.min_rotation_period_ms) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rotation_period ", FormatDurationMs(p.rotation_period_ms),
        " is below --min_rotation_period=", FormatDurationMs(floors.min_rotation_period_ms),
        " (0 = manual rotation only)"));
  }
  return absl::OkStatus();
}

RotationPolicy RaiseToFloors(RotationPolicy p, const PolicyFloors& floors, bool* raised) {
  const RotationPolicy before = p;
  p.destroy_delay_ms = std::max(p.destroy_delay_ms, floors.min_destroy_delay_ms);
  p.retain_ms = std::max(p.retain_ms, floors.min_retain_ms);
  if (p.rotation_period_ms != 0) {
    p.rotation_period_ms = std::max(p.rotation_period_ms, floors.min_rotation_period_ms);
  }
  // The raised values must still satisfy ValidatePolicy's ordering rules.
  p.retain_ms = std::max(p.retain_ms, p.prepublish_ms);
  if (p.rotation_period_ms != 0)
    p.rotation_period_ms = std::max(p.rotation_period_ms, p.prepublish_ms);
  *raised = p.destroy_delay_ms != before.destroy_delay_ms || p.retain_ms != before.retain_ms ||
            p.rotation_period_ms != before.rotation_period_ms;
  return p;
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
