#include "server/security/access_policy.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/regular_file.h"
#include "common/sha256.h"
#include "jose/json.h"

namespace custody::server {
namespace {

using jose::Json;

// The operation names, in the bit order of AccessPolicy::Grant::operations.
constexpr std::array<absl::string_view, 9> kOperations = {
    "sign",         "decrypt",       "jwks",         "admin.read",        "admin.rotate",
    "admin.create", "admin.destroy", "admin.import", "admin.certificate",
};

int OperationBit(absl::string_view name) {
  for (size_t i = 0; i < kOperations.size(); ++i) {
    if (kOperations[i] == name) return static_cast<int>(i);
  }
  return -1;
}

constexpr int kStar = -1;
constexpr int kDoubleStar = -2;
constexpr size_t kMaxPatternBytes = 256;
constexpr size_t kMaxIdentityBytes = 1024;
// Ring names are at most 200 characters (rotation::ValidateRingName); anything much longer is
// not a ring and is denied without running the matcher.
constexpr size_t kMaxRingBytes = 1024;

// Values echoed in error messages are cut so that a pasted blob does not flood the log.
std::string Quote(absl::string_view s) {
  constexpr size_t kMax = 64;
  if (s.size() <= kMax) return absl::StrCat("'", s, "'");
  return absl::StrCat("'", s.substr(0, kMax), "...'");
}

bool IsRingPatternChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-' ||
         c == '/' || c == '*';
}

// Reads a policy file: a regular file of at most kMaxBytes (no symlink, FIFO or device: see
// common/regular_file.h), owned by the user custodyd runs as or by root, not writable by group
// or others (whoever can write the policy can grant themselves every key). With `warnings`
// (custodyctl policy check, run by an operator who may not be the service user) a file owned by
// someone else is reported there instead of refused.
absl::StatusOr<std::string> ReadPolicyFile(const std::string& path,
                                           std::vector<std::string>* warnings) {
  const std::string what = absl::StrCat("policy file '", path, "'");
  absl::StatusOr<RegularFile> file = RegularFile::Open(path, "policy file");
  if (!file.ok()) return file.status();
  const struct stat& st = file->stat();
  if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(what, " has mode ",
                                                      OctalMode(st.st_mode & 07777),
                                                      ": it is writable by group or others; run "
                                                      "chmod go-w on it"));
  }
  if (st.st_uid != geteuid() && st.st_uid != 0) {
    std::string owner = absl::StrCat(what, " is owned by uid ", st.st_uid);
    if (warnings == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat(owner, ", neither the user custodyd runs as (uid ", geteuid(),
                       ") nor root; chown it to one of them"));
    }
    warnings->push_back(absl::StrCat(owner, ": custodyd loads it only when it runs as uid ",
                                     st.st_uid, " (or when root owns the file)"));
  }
  std::string content;
  char buf[16384];
  for (;;) {
    ssize_t n = ::read(file->fd(), buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::ErrnoToStatus(errno, what);
    }
    if (n == 0) break;
    content.append(buf, static_cast<size_t>(n));
    if (content.size() > AccessPolicy::kMaxBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": larger than ", AccessPolicy::kMaxBytes, " bytes"));
    }
  }
  return content;
}

}  // namespace

// Builds an AccessPolicy from its JSON, reporting the first problem with its JSON path.
class AccessPolicyParser {
 public:
  static absl::StatusOr<AccessPolicy> Parse(absl::string_view text) {
    if (text.size() > AccessPolicy::kMaxBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("policy is larger than ", AccessPolicy::kMaxBytes, " bytes"));
    }
    jose::JsonLimits limits;
    limits.max_bytes = AccessPolicy::kMaxBytes;
    limits.max_depth = 8;  // the format is three levels deep
    absl::StatusOr<Json> root = jose::ParseJson(std::string_view(text.data(), text.size()), limits);
    if (!root.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("policy is not valid JSON: ", root.status().message()));
    }
    if (!root->is_object()) return Error("policy", "must be a JSON object");

    const Json* version = nullptr;
    const Json* grants = nullptr;
    for (const auto& [key, value] : root->as_object()) {
      if (key == "version") {
        version = &value;
      } else if (key == "grants") {
        grants = &value;
      } else {
        return Error(key, "unknown member (expected version, grants)");
      }
    }
    if (version == nullptr) return Error("version", "missing");
    if (version->as_int() != 1) return Error("version", "must be 1");
    if (grants == nullptr) return Error("grants", "missing");
    if (!grants->is_array()) return Error("grants", "must be an array");

    // Every grant is checked, so that one run names every wrong grant (its first problem each).
    AccessPolicy policy;
    std::vector<std::string> problems;
    const Json::Array& items = grants->as_array();
    for (size_t i = 0; i < items.size(); ++i) {
      absl::StatusOr<AccessPolicy::Grant> grant =
          ParseGrant(items[i], absl::StrCat("grants[", i, "]"));
      if (!grant.ok()) {
        problems.emplace_back(grant.status().message());
        continue;
      }
      policy.grants_.push_back(*std::move(grant));
    }
    if (!problems.empty()) return absl::InvalidArgumentError(absl::StrJoin(problems, "; "));
    return policy;
  }

 private:
  static absl::Status Error(absl::string_view path, absl::string_view reason) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", reason));
  }

  // The elements of a non-empty array of strings, or an error naming the offending path.
  static absl::StatusOr<std::vector<std::string>> StringArray(const Json& value,
                                                              const std::string& path) {
    if (!value.is_array()) return Error(path, "must be an array of strings");
    if (value.as_array().empty()) return Error(path, "must not be empty");
    std::vector<std::string> out;
    for (size_t i = 0; i < value.as_array().size(); ++i) {
      const Json& item = value.as_array()[i];
      if (!item.is_string()) return Error(absl::StrCat(path, "[", i, "]"), "must be a string");
      out.push_back(item.as_string());
    }
    return out;
  }

  // An identity a caller can have (request_guard.h CallerIdentity): uid:N, dns:NAME, a URI
  // (a certificate's URI SAN, e.g. spiffe://bank.example/as), unix, anonymous; or * (every
  // caller except anonymous). Anything else could never match a caller, so it is refused
  // rather than loaded as a grant to nobody.
  static absl::Status CheckIdentity(const std::string& id, const std::string& path) {
    if (id.empty()) return Error(path, "identity is empty");
    if (id.size() > kMaxIdentityBytes) {
      return Error(path, absl::StrCat("identity is longer than ", kMaxIdentityBytes, " bytes"));
    }
    for (unsigned char c : id) {
      if (c <= 0x20 || c == 0x7f) {
        return Error(
            path, absl::StrCat("identity ", Quote(id), " contains a space or a control character"));
      }
    }
    if (id == "*" || id == "unix" || id == "anonymous") return absl::OkStatus();
    if (id.find('*') != std::string::npos) {
      return Error(path, absl::StrCat("identity ", Quote(id),
                                      ": '*' is only valid alone (any authenticated caller)"));
    }
    const size_t colon = id.find(':');
    const std::string scheme = colon == std::string::npos ? "" : id.substr(0, colon);
    const std::string lower_scheme = absl::AsciiStrToLower(scheme);
    if (scheme == "uid") {
      uint32_t uid = 0;
      if (!absl::SimpleAtoi(id.substr(4), &uid) || id.size() > 14 ||
          id.find_first_not_of("0123456789", 4) != std::string::npos) {
        return Error(path, absl::StrCat("identity ", Quote(id), ": uid:N needs a decimal uid"));
      }
      return absl::OkStatus();
    }
    if (scheme == "dns") {
      const std::string name = id.substr(4);
      if (name.empty() || name.size() > 253 ||
          name.find_first_not_of(
              "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_") !=
              std::string::npos ||
          name.front() == '.' || name.back() == '.' || name.find("..") != std::string::npos) {
        return Error(path, absl::StrCat("identity ", Quote(id),
                                        ": dns:NAME needs a DNS name (a certificate's DNS SAN)"));
      }
      return absl::OkStatus();
    }
    if (lower_scheme == "uid" || lower_scheme == "dns") {
      return Error(path, absl::StrCat("identity ", Quote(id), ": write ", lower_scheme,
                                      id.substr(colon), " (lower case)"));
    }
    if (IsUriScheme(scheme) && colon + 1 < id.size()) return absl::OkStatus();
    return Error(path,
                 absl::StrCat("identity ", Quote(id),
                              " can never match a caller: use uid:N (a Unix-socket caller), a "
                              "certificate's URI SAN (spiffe://...), dns:NAME (its DNS SAN), "
                              "unix, * (every authenticated caller) or anonymous"));
  }

  // RFC 3986: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
  static bool IsUriScheme(const std::string& scheme) {
    if (scheme.empty() || !absl::ascii_isalpha(static_cast<unsigned char>(scheme[0]))) return false;
    for (char c : scheme) {
      if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '+' && c != '-' && c != '.') {
        return false;
      }
    }
    return true;
  }

  static absl::StatusOr<AccessPolicy::Pattern> CompileRing(const std::string& pattern,
                                                           const std::string& path) {
    if (pattern.empty()) return Error(path, "ring pattern is empty");
    if (pattern.size() > kMaxPatternBytes) {
      return Error(path, absl::StrCat("ring pattern is longer than ", kMaxPatternBytes, " bytes"));
    }
    for (char c : pattern) {
      if (!IsRingPatternChar(c)) {
        return Error(path, absl::StrCat("ring pattern ", Quote(pattern),
                                        " may contain only [a-z0-9._-/] and '*'"));
      }
    }
    if (pattern.find("***") != std::string::npos) {
      return Error(path, absl::StrCat("ring pattern ", Quote(pattern), " contains '***'"));
    }
    if (pattern.front() == '/' || pattern.back() == '/' ||
        pattern.find("//") != std::string::npos) {
      return Error(path, absl::StrCat("ring pattern ", Quote(pattern),
                                      " has an empty segment (leading, trailing or doubled '/')"));
    }
    AccessPolicy::Pattern tokens;
    for (size_t i = 0; i < pattern.size(); ++i) {
      if (pattern[i] != '*') {
        tokens.push_back(static_cast<unsigned char>(pattern[i]));
      } else if (i + 1 < pattern.size() && pattern[i + 1] == '*') {
        tokens.push_back(kDoubleStar);
        ++i;
      } else {
        tokens.push_back(kStar);
      }
    }
    return tokens;
  }

  static absl::StatusOr<AccessPolicy::Grant> ParseGrant(const Json& value,
                                                        const std::string& path) {
    if (!value.is_object()) return Error(path, "must be an object");
    const Json* identities = nullptr;
    const Json* operations = nullptr;
    const Json* rings = nullptr;
    for (const auto& [key, member] : value.as_object()) {
      if (key == "identities") {
        identities = &member;
      } else if (key == "operations") {
        operations = &member;
      } else if (key == "rings") {
        rings = &member;
      } else {
        return Error(absl::StrCat(path, ".", key),
                     "unknown member (expected identities, operations, rings)");
      }
    }
    if (identities == nullptr) return Error(absl::StrCat(path, ".identities"), "missing");
    if (operations == nullptr) return Error(absl::StrCat(path, ".operations"), "missing");
    if (rings == nullptr) return Error(absl::StrCat(path, ".rings"), "missing");

    AccessPolicy::Grant grant;
    const std::string ids_path = absl::StrCat(path, ".identities");
    absl::StatusOr<std::vector<std::string>> ids = StringArray(*identities, ids_path);
    if (!ids.ok()) return ids.status();
    for (size_t i = 0; i < ids->size(); ++i) {
      absl::Status s = CheckIdentity((*ids)[i], absl::StrCat(ids_path, "[", i, "]"));
      if (!s.ok()) return s;
    }
    grant.identities = *std::move(ids);

    const std::string ops_path = absl::StrCat(path, ".operations");
    absl::StatusOr<std::vector<std::string>> ops = StringArray(*operations, ops_path);
    if (!ops.ok()) return ops.status();
    for (size_t i = 0; i < ops->size(); ++i) {
      int bit = OperationBit((*ops)[i]);
      if (bit < 0) {
        return Error(absl::StrCat(ops_path, "[", i, "]"),
                     absl::StrCat("unknown operation ", Quote((*ops)[i])));
      }
      grant.operations |= 1u << bit;
    }

    const std::string rings_path = absl::StrCat(path, ".rings");
    absl::StatusOr<std::vector<std::string>> patterns = StringArray(*rings, rings_path);
    if (!patterns.ok()) return patterns.status();
    for (size_t i = 0; i < patterns->size(); ++i) {
      absl::StatusOr<AccessPolicy::Pattern> compiled =
          CompileRing((*patterns)[i], absl::StrCat(rings_path, "[", i, "]"));
      if (!compiled.ok()) return compiled.status();
      grant.rings.push_back(*std::move(compiled));
    }
    grant.ring_patterns = *std::move(patterns);
    return grant;
  }
};

absl::StatusOr<AccessPolicy> AccessPolicy::Parse(absl::string_view json) {
  return AccessPolicyParser::Parse(json);
}

absl::StatusOr<AccessPolicy> AccessPolicy::Load(const std::string& path) {
  return Check(path, nullptr);
}

absl::StatusOr<AccessPolicy> AccessPolicy::Check(const std::string& path,
                                                 std::vector<std::string>* warnings) {
  absl::StatusOr<std::string> content = ReadPolicyFile(path, warnings);
  if (!content.ok()) return content.status();
  absl::StatusOr<AccessPolicy> policy = Parse(*content);
  if (!policy.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", policy.status().message()));
  }
  return policy;
}

// Whether the policy identity `id` names the caller `identity`.
bool AccessPolicy::IdentityNames(absl::string_view id, absl::string_view identity) {
  if (id == identity) return true;
  // "*": every authenticated caller; a caller without credentials must be named "anonymous".
  if (id == "*" && identity != "anonymous") return true;
  // "unix": any caller on custodyd's Unix socket, whatever its uid.
  return id == "unix" && absl::StartsWith(identity, "uid:");
}

bool AccessPolicy::IdentityMatches(const Grant& grant, absl::string_view identity) const {
  for (const std::string& id : grant.identities) {
    if (IdentityNames(id, identity)) return true;
  }
  return false;
}

// Glob matching by dynamic programming over (token, ring position): linear in
// tokens x ring length whatever the pattern, where backtracking would be exponential in the
// number of stars. reach[j] says whether the tokens so far can consume exactly ring[0, j).
bool AccessPolicy::RingMatches(const Pattern& pattern, absl::string_view ring) {
  const size_t n = ring.size();
  std::vector<char> reach(n + 1, 0), next(n + 1, 0);
  reach[0] = 1;
  for (int token : pattern) {
    if (token == kStar || token == kDoubleStar) {
      bool run = false;
      for (size_t j = 0; j <= n; ++j) {
        if (token == kStar && j > 0 && ring[j - 1] == '/') run = false;
        run = run || reach[j];
        next[j] = run;
      }
    } else {
      next[0] = 0;
      for (size_t j = 0; j < n; ++j) {
        next[j + 1] = reach[j] && static_cast<unsigned char>(ring[j]) == token;
      }
    }
    reach.swap(next);
  }
  return reach[n] != 0;
}

bool AccessPolicy::Allows(absl::string_view identity, absl::string_view operation,
                          absl::string_view ring) const {
  if (identity.empty() || ring.empty() || ring.size() > kMaxRingBytes) return false;
  int bit = OperationBit(operation);
  if (bit < 0) return false;
  for (const Grant& grant : grants_) {
    if ((grant.operations & (1u << bit)) == 0 || !IdentityMatches(grant, identity)) continue;
    for (const Pattern& pattern : grant.rings) {
      if (RingMatches(pattern, ring)) return true;
    }
  }
  return false;
}

bool AccessPolicy::AllowsAnyRing(absl::string_view identity, absl::string_view operation) const {
  if (identity.empty()) return false;
  int bit = OperationBit(operation);
  if (bit < 0) return false;
  for (const Grant& grant : grants_) {
    if ((grant.operations & (1u << bit)) != 0 && IdentityMatches(grant, identity)) return true;
  }
  return false;
}

AccessPolicy::Explanation AccessPolicy::Explain(absl::string_view identity,
                                                absl::string_view operation,
                                                absl::string_view ring) const {
  Explanation out;
  const int bit = OperationBit(operation);
  if (identity.empty() || bit < 0 || ring.empty() || ring.size() > kMaxRingBytes) {
    out.notes.push_back("denied: an empty identity, an unknown operation or no ring name");
    return out;
  }
  for (size_t g = 0; g < grants_.size(); ++g) {
    const Grant& grant = grants_[g];
    const std::string name = absl::StrCat("grants[", g, "]");
    std::string who;
    for (size_t i = 0; i < grant.identities.size() && who.empty(); ++i) {
      const std::string& id = grant.identities[i];
      if (IdentityNames(id, identity)) {
        who = absl::StrCat(name, ".identities[", i, "] ", Quote(id));
      }
    }
    const bool op = (grant.operations & (1u << bit)) != 0;
    std::string where;
    for (size_t i = 0; i < grant.rings.size() && where.empty(); ++i) {
      if (RingMatches(grant.rings[i], ring)) {
        where = absl::StrCat(name, ".rings[", i, "] ", Quote(grant.ring_patterns[i]));
      }
    }
    if (!who.empty() && op && !where.empty()) {
      out.allowed = true;
      out.grant = name;
      out.notes.push_back(absl::StrCat(name, " allows it: identity ", who, ", operation '",
                                       operation, "', ring pattern ", where));
      return out;
    }
    // Grants that fit two of the three are what an operator probably meant.
    if (static_cast<int>(!who.empty()) + static_cast<int>(op) + static_cast<int>(!where.empty()) <
        2) {
      continue;
    }
    if (who.empty()) {
      bool star = std::find(grant.identities.begin(), grant.identities.end(), "*") !=
                  grant.identities.end();
      out.notes.push_back(absl::StrCat(
          name, " grants '", operation, "' on ", where, " but not to ", Quote(identity),
          star && identity == "anonymous"
              ? " ('*' is every authenticated caller; name \"anonymous\" to grant callers "
                "without credentials)"
              : ""));
    } else if (!op) {
      out.notes.push_back(absl::StrCat(name, " names ", who, " and ", where,
                                       " but not the operation '", operation, "'"));
    } else {
      out.notes.push_back(absl::StrCat(name, " grants '", operation, "' to ", who,
                                       " but none of its ring patterns matches ", Quote(ring)));
    }
  }
  out.notes.insert(out.notes.begin(), absl::StrCat("denied: no grant gives '", operation, "' on ",
                                                   Quote(ring), " to ", Quote(identity)));
  return out;
}

std::vector<std::string> AccessPolicy::Warnings() const {
  std::vector<std::string> out;
  for (size_t g = 0; g < grants_.size(); ++g) {
    const Grant& grant = grants_[g];
    for (const std::string& id : grant.identities) {
      if (id == "*" && (grant.operations & ~(1u << OperationBit("jwks"))) != 0) {
        out.push_back(absl::StrCat("grants[", g,
                                   "] gives more than jwks to '*', every authenticated caller"));
      }
      if (id == "anonymous") {
        out.push_back(
            absl::StrCat("grants[", g, "] names anonymous: callers that present no credentials"));
      }
    }
  }
  return out;
}

bool AccessPolicy::IsOperation(absl::string_view name) { return OperationBit(name) >= 0; }

std::vector<std::string> AccessPolicy::Operations() {
  return std::vector<std::string>(kOperations.begin(), kOperations.end());
}

PolicyStore::PolicyStore() : policy_(std::make_shared<const AccessPolicy>()) {}

absl::Status PolicyStore::LoadFrom(const std::string& path) {
  absl::MutexLock lock(&reload_mu_);
  path_ = path;
  return LoadLocked(/*only_if_changed=*/false);
}

absl::Status PolicyStore::ReloadIfChanged() {
  absl::MutexLock lock(&reload_mu_);
  if (path_.empty()) return absl::FailedPreconditionError("no policy file was loaded");
  return LoadLocked(/*only_if_changed=*/true);
}

absl::Status PolicyStore::LoadLocked(bool only_if_changed) {
  absl::StatusOr<std::string> content = ReadPolicyFile(path_, nullptr);
  if (!content.ok()) return content.status();
  std::string digest = Sha256(*content);
  if (only_if_changed && digest == loaded_sha256_) return absl::OkStatus();
  absl::StatusOr<AccessPolicy> policy = AccessPolicy::Parse(*content);
  if (!policy.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": ", policy.status().message()));
  }
  auto fresh = std::make_shared<const AccessPolicy>(*std::move(policy));
  loaded_sha256_ = std::move(digest);
  absl::MutexLock lock(&mu_);
  policy_ = std::move(fresh);
  ++generation_;
  return absl::OkStatus();
}

std::shared_ptr<const AccessPolicy> PolicyStore::Get() const {
  absl::ReaderMutexLock lock(&mu_);
  return policy_;
}

uint64_t PolicyStore::generation() const {
  absl::ReaderMutexLock lock(&mu_);
  return generation_;
}

}  // namespace custody::server
