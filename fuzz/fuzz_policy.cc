// libFuzzer target: access policy parsing (server::AccessPolicy::Parse) and the ring matcher.
// Input "PATTERN\nRING" (one newline) also runs a differential check of the matcher against a
// plain recursive glob matcher, on sizes small enough for the latter's backtracking.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "common/log.h"
#include "server/security/access_policy.h"

namespace {

using custody::server::AccessPolicy;

// Reference semantics: '**' any run, '*' any run without '/', other bytes literal.
bool ReferenceMatch(std::string_view p, std::string_view s) {
  if (p.empty()) return s.empty();
  if (p.substr(0, 2) == "**") {
    for (size_t k = 0; k <= s.size(); ++k) {
      if (ReferenceMatch(p.substr(2), s.substr(k))) return true;
    }
    return false;
  }
  if (p[0] == '*') {
    for (size_t k = 0;; ++k) {
      if (ReferenceMatch(p.substr(1), s.substr(k))) return true;
      if (k == s.size() || s[k] == '/') return false;
    }
  }
  return !s.empty() && s[0] == p[0] && ReferenceMatch(p.substr(1), s.substr(1));
}

void CheckInvariants(const AccessPolicy& policy) {
  static const char* const kIdentities[] = {"uid:1000", "spiffe://bank.example/as", "*", "a",
                                            "anonymous"};
  static const char* const kOperations[] = {"sign",          "decrypt",      "jwks",
                                            "admin.read",    "admin.rotate", "admin.create",
                                            "admin.destroy", "admin.import", "bogus"};
  static const char* const kRings[] = {"op/id-token", "clients/acme/jwt", "a", "r",
                                       "a/b/c/d/e/f/g/sig"};
  bool names_anonymous = false;
  for (const std::string& warning : policy.Warnings()) {
    if (warning.find("names anonymous") != std::string::npos) names_anonymous = true;
  }
  for (const char* op : kOperations) {
    if (policy.AllowsAnyRing("", op)) std::abort();
    for (const char* id : kIdentities) {
      bool any = policy.AllowsAnyRing(id, op);
      for (const char* ring : kRings) {
        if (policy.Allows(id, op, ring) && !any) std::abort();
        if (policy.Allows("", op, ring)) std::abort();
        // Only a grant naming "anonymous" reaches a caller without credentials ("*" never does).
        if (policy.Allows("anonymous", op, ring) && !names_anonymous) std::abort();
      }
    }
  }
  if (policy.AllowsAnyRing("uid:1000", "bogus")) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<AccessPolicy> policy =
      AccessPolicy::Parse(absl::string_view(input.data(), input.size()));
  if (policy.ok()) CheckInvariants(*policy);

  const size_t newline = input.find('\n');
  if (newline == std::string_view::npos ||
      input.find('\n', newline + 1) != std::string_view::npos) {
    return 0;
  }
  const std::string_view pattern = input.substr(0, newline);
  const std::string_view ring = input.substr(newline + 1);
  if (pattern.size() > 32 || ring.size() > 24 || ring.empty()) return 0;
  std::string json =
      R"({"version":1,"grants":[{"identities":["id"],"operations":["sign"],"rings":[)";
  custody::AppendJsonString(json, absl::string_view(pattern.data(), pattern.size()));
  json += "]}]}";
  absl::StatusOr<AccessPolicy> single = AccessPolicy::Parse(json);
  if (!single.ok()) return 0;
  const bool allowed = single->Allows("id", "sign", absl::string_view(ring.data(), ring.size()));
  if (allowed != ReferenceMatch(pattern, ring)) std::abort();
  return 0;
}
