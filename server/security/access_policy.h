// Access policy: which caller identities may run which operations on which key rings.
// Default deny: a request is allowed only when some grant names its identity, its operation and
// a ring pattern matching its ring.
//
// File format (strict JSON, at most 1 MiB; unknown members are refused, not ignored, so that a
// typo such as "ring" for "rings" cannot silently grant nothing or everything):
//
//   {"version": 1,
//    "grants": [
//      {"identities": ["spiffe://bank.example/as", "dns:as.bank.example", "uid:1000"],
//       "operations": ["sign", "decrypt", "jwks"],
//       "rings": ["op/*", "clients/**"]},
//      {"identities": ["*"], "operations": ["jwks"], "rings": ["**"]}
//    ]}
//
// - "version": must be 1.
// - "grants": an array (may be empty: everything is denied). Each grant has exactly the three
//   members below, each a non-empty array of strings.
// - "identities": exact identity strings as the server derives them from the peer (a URI such
//   as "spiffe://..." from a URI SAN, "dns:NAME", "uid:N" for Unix-socket callers, N decimal),
//   "unix" = any caller on custodyd's Unix socket whatever its uid, "*" alone = any
//   authenticated caller (never "anonymous", never the empty identity), or "anonymous" = a
//   caller that presented no credentials (TLS without a client certificate), which only a grant
//   naming it reaches. Anything else (e.g. "root", "UID:0", "dns:") could never match a caller
//   and is refused. No other wildcards: "spiffe://bank/*" is refused rather than read literally.
// - "operations": sign, decrypt, jwks, admin.read, admin.rotate, admin.create, admin.destroy,
//   admin.import, admin.certificate (CSRs and certificates of ring versions).
// - "rings": patterns over ring names. "*" matches any run of characters within one path
//   segment (no '/'), "**" any run including '/', every other character is literal. Patterns use
//   only ring-name characters [a-z0-9._-/] and '*', and no "***". So "op/*" matches "op/id" but
//   not "op/a/b"; "clients/**" matches "clients/a/b" (and "clients/", which is no ring name);
//   "**" matches every ring.
#ifndef CUSTODY_SERVER_SECURITY_ACCESS_POLICY_H_
#define CUSTODY_SERVER_SECURITY_ACCESS_POLICY_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace custody::server {

// An immutable parsed policy. Thread-safe (const after construction).
class AccessPolicy {
 public:
  static constexpr size_t kMaxBytes = 1024 * 1024;

  // A policy that allows nothing.
  AccessPolicy() = default;

  // INVALID_ARGUMENT "PATH: reason" with the JSON path of the problem, e.g.
  // "grants[1].operations[0]: unknown operation 'sing'", "grants[0].rule: unknown member"; the
  // first problem of every wrong grant, joined by "; ".
  static absl::StatusOr<AccessPolicy> Parse(absl::string_view json);

  // Reads and parses `path`, which must be a regular file (opened with O_NOFOLLOW|O_NONBLOCK: a
  // symlink, FIFO or device is refused at once), owned by the user custodyd runs as or by root,
  // and not writable by group or others (whoever can write the policy can grant themselves
  // every key): FAILED_PRECONDITION otherwise, and for I/O errors; INVALID_ARGUMENT for a bad
  // policy; messages name the path.
  static absl::StatusOr<AccessPolicy> Load(const std::string& path);

  // Load for an operator checking a file offline (custodyctl policy check): the same rules,
  // except that a file owned by another user is reported in `warnings` rather than refused.
  static absl::StatusOr<AccessPolicy> Check(const std::string& path,
                                            std::vector<std::string>* warnings);

  // Why `identity` may or may not run `operation` on `ring`: the grant that allows it, or the
  // grants that fit two of the three and what they lack.
  struct Explanation {
    bool allowed = false;
    std::string grant;               // "grants[N]" when allowed
    std::vector<std::string> notes;  // human-readable, first the verdict
  };
  Explanation Explain(absl::string_view identity, absl::string_view operation,
                      absl::string_view ring) const;

  // Grants that are valid but wide: more than jwks to "*", anything to "anonymous".
  std::vector<std::string> Warnings() const;

  static bool IsOperation(absl::string_view name);
  static std::vector<std::string> Operations();

  // Whether `identity` may run `operation` on `ring`. False for an empty identity, an unknown
  // operation, or no matching grant.
  bool Allows(absl::string_view identity, absl::string_view operation,
              absl::string_view ring) const;

  // Whether `identity` may run `operation` on at least one ring pattern: the gate for list
  // operations, whose results the caller then filters ring by ring with Allows.
  bool AllowsAnyRing(absl::string_view identity, absl::string_view operation) const;

  size_t grant_count() const { return grants_.size(); }

 private:
  // A ring pattern compiled to tokens: a literal byte, kStar ('*') or kDoubleStar ('**').
  using Pattern = std::vector<int>;
  struct Grant {
    std::vector<std::string> identities;  // exact identities; "*" kept as is
    uint32_t operations = 0;              // bit set of Operation
    std::vector<Pattern> rings;
    std::vector<std::string> ring_patterns;  // as written, for Explain
  };

  bool IdentityMatches(const Grant& grant, absl::string_view identity) const;
  static bool IdentityNames(absl::string_view id, absl::string_view identity);
  static bool RingMatches(const Pattern& pattern, absl::string_view ring);
  friend class AccessPolicyParser;

  std::vector<Grant> grants_;
};

// Holds the current policy for request threads and reloads it from its file. A reload that
// fails (unreadable file, invalid policy) keeps the policy in force and returns the error.
// Thread-safe: Get() is a shared-pointer copy under a reader lock; reloads are serialized.
class PolicyStore {
 public:
  // Until a load succeeds, Get() returns a policy that allows nothing.
  PolicyStore();

  // Loads `path` and remembers it for ReloadIfChanged. On error the previous policy (deny-all
  // when none) stays, and the path is still remembered so that a later reload can pick it up.
  absl::Status LoadFrom(const std::string& path);

  std::shared_ptr<const AccessPolicy> Get() const;

  // Re-reads the file and swaps in the new policy when its content changed (compared by
  // SHA-256, not mtime, so that quick successive edits are not missed). OK when unchanged.
  // While the file stays invalid, every call returns the error again. FAILED_PRECONDITION when
  // LoadFrom was never called.
  absl::Status ReloadIfChanged();

  // Incremented on every successful swap (for logs and tests).
  uint64_t generation() const;

 private:
  absl::Status LoadLocked(bool only_if_changed) ABSL_EXCLUSIVE_LOCKS_REQUIRED(reload_mu_);

  absl::Mutex reload_mu_;  // serializes LoadFrom / ReloadIfChanged; held across file I/O
  std::string path_ ABSL_GUARDED_BY(reload_mu_);
  std::string loaded_sha256_ ABSL_GUARDED_BY(reload_mu_);  // of the policy in force

  mutable absl::Mutex mu_;  // guards the swap only; never held across I/O
  std::shared_ptr<const AccessPolicy> policy_ ABSL_GUARDED_BY(mu_);
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace custody::server

#endif  // CUSTODY_SERVER_SECURITY_ACCESS_POLICY_H_
