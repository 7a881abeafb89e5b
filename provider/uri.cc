#include "provider/uri.h"

#include <limits>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace custody::provider {

absl::StatusOr<CustodyUri> ParseCustodyUri(absl::string_view uri) {
  constexpr size_t kMaxUri = 1024;
  if (uri.size() > kMaxUri) {
    return absl::InvalidArgumentError(absl::StrCat("URI longer than ", kMaxUri, " characters"));
  }
  const std::string prefix = absl::StrCat(kUriScheme, ":");
  if (!absl::StartsWith(uri, prefix)) {
    return absl::InvalidArgumentError("not a custody: URI (expected custody:ring=NAME[;...])");
  }
  uri.remove_prefix(prefix.size());
  CustodyUri out;
  bool seen_ring = false, seen_version = false, seen_addr = false;
  for (absl::string_view attr : absl::StrSplit(uri, ';')) {
    const size_t eq = attr.find('=');
    if (eq == absl::string_view::npos || eq == 0 || eq + 1 == attr.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("malformed attribute '", attr, "': expected NAME=VALUE"));
    }
    const absl::string_view name = attr.substr(0, eq);
    const absl::string_view value = attr.substr(eq + 1);
    auto once = [&](bool& seen) -> absl::Status {
      if (seen) return absl::InvalidArgumentError(absl::StrCat("'", name, "' given twice"));
      seen = true;
      return absl::OkStatus();
    };
    if (name == "ring") {
      if (absl::Status s = once(seen_ring); !s.ok()) return s;
      out.ring = std::string(value);
    } else if (name == "version") {
      if (absl::Status s = once(seen_version); !s.ok()) return s;
      uint64_t v = 0;
      if (value.size() > 10 || value.find_first_not_of("0123456789") != absl::string_view::npos ||
          !absl::SimpleAtoi(value, &v) || v == 0 || v > std::numeric_limits<uint32_t>::max()) {
        return absl::InvalidArgumentError(
            absl::StrCat("version '", value, "' is not a decimal from 1 to 4294967295"));
      }
      out.version = static_cast<uint32_t>(v);
    } else if (name == "addr") {
      if (absl::Status s = once(seen_addr); !s.ok()) return s;
      out.address = std::string(value);
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown attribute '", name, "' (ring, version, addr)"));
    }
  }
  if (!seen_ring) return absl::InvalidArgumentError("the URI names no ring (custody:ring=NAME)");
  return out;
}

}  // namespace custody::provider
