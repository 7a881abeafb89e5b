// The audit log's line format and file names, shared by the writer (audit_log.h: AuditLog) and
// the verifier (audit_verify.h: custodyctl audit verify), which link this and not each other.
// The format itself is described at the top of audit_log.h.
#ifndef CUSTODY_SERVER_SECURITY_AUDIT_FORMAT_H_
#define CUSTODY_SERVER_SECURITY_AUDIT_FORMAT_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace custody::server {

struct AuditEvent {
  std::string identity;
  std::string operation;
  std::string ring;
  uint32_t version = 0;
  std::string kid;
  std::string payload_sha256;  // hex, of the payload or ciphertext; never the content
  std::string result;          // gRPC code name: "OK", "PERMISSION_DENIED", ...
  std::string detail;
};

namespace audit_format {

constexpr absl::string_view kAnchor =
    "0000000000000000000000000000000000000000000000000000000000000000";
constexpr absl::string_view kHashKey = ",\"hash\":\"";
constexpr size_t kHexHashBytes = 64;
// The fixed tail of every line: ,"hash":"<64 hex>"}
constexpr size_t kHashSuffixBytes = kHashKey.size() + kHexHashBytes + 2;
// Longest line the verifier and Open accept; ours stay below 16 KiB thanks to the field caps.
constexpr size_t kMaxLineBytes = 64 * 1024;
constexpr size_t kMaxDetailBytes = 4096;
constexpr size_t kMaxFieldBytes = 1024;

bool IsLowerHex(absl::string_view s);
// ,"NAME":"VALUE" with VALUE as valid UTF-8 (invalid bytes become U+FFFD), cut at `max_bytes`.
void AppendField(std::string& out, absl::string_view name, absl::string_view value,
                 size_t max_bytes);
// Everything of a line between "time" and "prev", formatted by the caller's thread.
std::string FormatEventFields(const AuditEvent& event);
// The whole line (no newline): seq, time, `fields`, prev, and its own hash.
std::string FormatLine(uint64_t seq, absl::Time time, absl::string_view fields,
                       absl::string_view prev);

struct ParsedLine {
  uint64_t seq = 0;
  std::string prev;
  std::string replica;  // "" when the line has no "replica" member
};
// Checks one line (without its newline) on its own: JSON, the members the chain needs, and its
// own hash. The error message is the reason only; callers add where.
absl::StatusOr<ParsedLine> ParseAuditLine(absl::string_view line);

// audit-NNNNNN.jsonl, or audit-REPLICA-NNNNNN.jsonl for a replica's chain.
std::string FilePrefix(absl::string_view replica);
std::string FileName(uint64_t index, absl::string_view replica);
// audit-[REPLICA-]NNNNNN.jsonl -> NNNNNN; 0 for other names (and other replicas' files).
uint64_t FileIndex(absl::string_view name, absl::string_view replica);

}  // namespace audit_format
}  // namespace custody::server

#endif  // CUSTODY_SERVER_SECURITY_AUDIT_FORMAT_H_
