// Verifying audit files (what `custodyctl audit verify` runs): the chain's links, each line's
// own hash, and anchors known from outside the files. Needs only the format (audit_format.h),
// not the writer.
#ifndef CUSTODY_SERVER_SECURITY_AUDIT_VERIFY_H_
#define CUSTODY_SERVER_SECURITY_AUDIT_VERIFY_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace custody::server {

// Verifies audit files given in order (the first must start the chain). OK, and the number of
// lines and the last line's hash when asked; otherwise INVALID_ARGUMENT "FILE:LINE: reason" for
// the first bad line: not JSON, line hash does not match its content, seq not consecutive, prev
// does not match the hash of the previous line, first line not anchored, incomplete last line.
// An I/O status when a file cannot be read.
absl::Status VerifyAuditFiles(const std::vector<std::string>& files, uint64_t* lines = nullptr,
                              std::string* last_hash = nullptr);

// A point of a chain known from outside its files: the line with `seq` has SHA-256 `hash` (an
// anchor custodyd saved in the metadata store or logged as "audit.anchor", or the last line of
// an archived file).
struct AuditChainPoint {
  uint64_t seq = 0;
  std::string hash;
};
// Parses "SEQ:HASH" (HASH: 64 lowercase hex). INVALID_ARGUMENT naming the form otherwise.
absl::StatusOr<AuditChainPoint> ParseAuditChainPoint(absl::string_view text);
// What a chain's files are checked against, besides their own links:
// - start: the files' earlier part was archived; the first line need not be seq 1 if it
//   continues from `start` (seq start+1 with prev = start.hash) or the files hold line
//   start.seq with that hash.
// - end: the latest anchor; the files must reach it ("truncated: anchor at seq 812, file ends
//   at 790") and hold that line with that hash.
struct AuditAnchors {
  std::optional<AuditChainPoint> start;
  std::optional<AuditChainPoint> end;
};

// The replica id a file name carries (audit-REPLICA-NNNNNN.jsonl), "" for audit-NNNNNN.jsonl or
// any other name.
std::string AuditFileReplica(const std::string& path);

// One chain per replica: `files` (any order of replicas; each replica's files oldest first) are
// grouped by AuditFileReplica and each group is verified as VerifyAuditFiles does; every line of
// a replica's files must carry that replica's id ("replica" member; none for ""). The results
// in the order replicas first appear; the first failure is INVALID_ARGUMENT
// "replica R: FILE:LINE: reason".
struct AuditChainResult {
  std::string replica;
  size_t files = 0;
  uint64_t lines = 0;
  std::string last_hash;
  uint64_t first_seq = 0;
  uint64_t last_seq = 0;
  bool end_anchored = false;  // anchors.end was given and the files hold it
};
// `anchors` by replica id ("" for a lone custodyd's chain); chains without an entry are checked
// on their own links only.
absl::StatusOr<std::vector<AuditChainResult>> VerifyAuditChains(
    const std::vector<std::string>& files, const std::map<std::string, AuditAnchors>& anchors = {});

}  // namespace custody::server

#endif  // CUSTODY_SERVER_SECURITY_AUDIT_VERIFY_H_
