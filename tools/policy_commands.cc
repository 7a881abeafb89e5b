#include "tools/policy_commands.h"

#include <iostream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/log.h"
#include "server/security/access_policy.h"

namespace custody::tools {
namespace {

using server::AccessPolicy;

std::string JsonString(absl::string_view s) {
  std::string out;
  AppendJsonString(out, s);
  return out;
}

std::string JsonStrings(const std::vector<std::string>& items) {
  std::vector<std::string> quoted;
  for (const std::string& item : items) quoted.push_back(JsonString(item));
  return absl::StrCat("[", absl::StrJoin(quoted, ","), "]");
}

}  // namespace

int PolicyCheck(const std::string& file) {
  std::vector<std::string> warnings;
  absl::StatusOr<AccessPolicy> policy = AccessPolicy::Check(file, &warnings);
  if (!policy.ok()) {
    std::cout << "{\"ok\":false,\"file\":" << JsonString(file)
              << ",\"error\":" << JsonString(policy.status().message()) << "}\n";
    return 1;
  }
  for (std::string& w : policy->Warnings()) warnings.push_back(std::move(w));
  std::cout << "{\"ok\":true,\"file\":" << JsonString(file)
            << ",\"grants\":" << policy->grant_count() << ",\"warnings\":" << JsonStrings(warnings)
            << "}\n";
  return 0;
}

int PolicyExplain(const std::string& file, const std::string& identity,
                  const std::string& operation, const std::string& ring) {
  if (!AccessPolicy::IsOperation(operation)) {
    std::cerr << "custodyctl: unknown operation '" << operation
              << "'; one of: " << absl::StrJoin(AccessPolicy::Operations(), ", ") << "\n";
    return 2;
  }
  std::vector<std::string> warnings;
  absl::StatusOr<AccessPolicy> policy = AccessPolicy::Check(file, &warnings);
  if (!policy.ok()) {
    std::cout << "{\"allowed\":false,\"file\":" << JsonString(file)
              << ",\"error\":" << JsonString(policy.status().message()) << "}\n";
    std::cerr << "custodyctl: policy explain reads a policy file offline (--policy_file=FILE, "
                 "default .state/policy.json); it could not load "
              << file << "\n";
    return 1;
  }
  AccessPolicy::Explanation e = policy->Explain(identity, operation, ring);
  std::cout << "{\"allowed\":" << (e.allowed ? "true" : "false") << ",\"file\":" << JsonString(file)
            << ",\"grant\":" << JsonString(e.grant) << ",\"explanation\":" << JsonStrings(e.notes)
            << "}\n";
  return e.allowed ? 0 : 1;
}

}  // namespace custody::tools
