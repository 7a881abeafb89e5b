#include "server/security/audit_verify.h"

#include <cerrno>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/sha256.h"
#include "server/security/audit_format.h"

namespace custody::server {
namespace {

using audit_format::FileIndex;
using audit_format::IsLowerHex;
using audit_format::kAnchor;
using audit_format::kHexHashBytes;
using audit_format::ParseAuditLine;
using audit_format::ParsedLine;

absl::Status ErrnoError(absl::string_view what) { return absl::ErrnoToStatus(errno, what); }

}  // namespace

namespace {

std::string ShortHash(absl::string_view hash) { return std::string(hash.substr(0, 16)); }

// VerifyAuditFiles, and when `replica` is given, every line must carry that replica id; checked
// against `anchors` (AuditAnchors) when given. `result` (may be null) gets the figures.
absl::Status VerifyChain(const std::vector<std::string>& files, uint64_t* lines,
                         std::string* last_hash, const std::string* replica,
                         const AuditAnchors* anchors = nullptr,
                         AuditChainResult* result = nullptr) {
  if (files.empty()) return absl::InvalidArgumentError("no audit files given");
  const AuditChainPoint* start =
      anchors != nullptr && anchors->start.has_value() ? &*anchors->start : nullptr;
  const AuditChainPoint* end =
      anchors != nullptr && anchors->end.has_value() ? &*anchors->end : nullptr;
  uint64_t count = 0;
  uint64_t expected_seq = 1;
  uint64_t first_seq = 0;
  bool start_seen = false, end_seen = false;
  std::string prev(kAnchor);
  for (const std::string& file : files) {
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(file.c_str(), "rb"), &std::fclose);
    if (f == nullptr) return ErrnoError(file);
    struct LineBuffer {
      char* data = nullptr;
      size_t capacity = 0;
      ~LineBuffer() { std::free(data); }
    } buf;
    uint64_t line_no = 0;
    for (;;) {
      ssize_t n = ::getline(&buf.data, &buf.capacity, f.get());
      if (n <= 0) break;
      ++line_no;
      auto bad = [&](absl::string_view reason) {
        return absl::InvalidArgumentError(absl::StrCat(file, ":", line_no, ": ", reason));
      };
      absl::string_view line(buf.data, static_cast<size_t>(n));
      if (line.back() != '\n') return bad("incomplete line (no trailing newline)");
      line.remove_suffix(1);
      absl::StatusOr<ParsedLine> parsed = ParseAuditLine(line);
      if (!parsed.ok()) return bad(parsed.status().message());
      if (replica != nullptr && parsed->replica != *replica) {
        return bad(absl::StrCat("line of replica '", parsed->replica, "' in a file of replica '",
                                *replica, "'"));
      }
      if (count == 0) {
        first_seq = parsed->seq;
        const bool chain_start = parsed->seq == 1 && parsed->prev == kAnchor;
        const bool continues_start =
            start != nullptr && parsed->seq == start->seq + 1 && parsed->prev == start->hash;
        const bool holds_start = start != nullptr && parsed->seq <= start->seq;
        if (continues_start) start_seen = true;
        if (!chain_start && !continues_start && !holds_start) {
          if (start != nullptr) {
            return bad(absl::StrCat("first line (seq ", parsed->seq,
                                    ") neither starts the chain nor continues from the start "
                                    "anchor (seq ",
                                    start->seq, ")"));
          }
          return bad(absl::StrCat("first line not anchored (seq ", parsed->seq,
                                  "; a chain starts at seq 1 with prev of 64 zeros; when earlier "
                                  "files were archived, pass --start=SEQ:HASH of their last line "
                                  "or of an anchor)"));
        }
      } else {
        if (parsed->seq != expected_seq) {
          return bad(absl::StrCat("seq ", parsed->seq, " not consecutive (expected ", expected_seq,
                                  "): a line is missing or out of order"));
        }
        if (parsed->prev != prev) {
          return bad("prev does not match the hash of the previous line");
        }
      }
      prev = Sha256Hex(line);
      for (const auto& [point, seen, what] :
           {std::tuple{start, &start_seen, "start"}, std::tuple{end, &end_seen, "end"}}) {
        if (point == nullptr || point->seq != parsed->seq) continue;
        if (point->hash != prev) {
          return bad(absl::StrCat("line seq ", parsed->seq, " has hash ", ShortHash(prev),
                                  "..., the ", what, " anchor says ", ShortHash(point->hash),
                                  "...: the chain was rewritten"));
        }
        *seen = true;
      }
      expected_seq = parsed->seq + 1;
      ++count;
    }
    if (std::ferror(f.get())) return ErrnoError(absl::StrCat("read ", file));
  }
  const uint64_t last_seq = count == 0 ? 0 : expected_seq - 1;
  if (start != nullptr && !start_seen && first_seq != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the files end (seq ", last_seq, ") before the start anchor at seq ", start->seq));
  }
  if (end != nullptr && end->seq > last_seq) {
    return absl::InvalidArgumentError(absl::StrCat("truncated: anchor at seq ", end->seq,
                                                   ", file ends at ", last_seq, " (", files.back(),
                                                   ")"));
  }
  if (lines != nullptr) *lines = count;
  if (last_hash != nullptr) *last_hash = prev;
  if (result != nullptr) {
    result->first_seq = first_seq;
    result->last_seq = last_seq;
    result->end_anchored = end_seen;
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status VerifyAuditFiles(const std::vector<std::string>& files, uint64_t* lines,
                              std::string* last_hash) {
  return VerifyChain(files, lines, last_hash, nullptr);
}

std::string AuditFileReplica(const std::string& path) {
  const size_t slash = path.rfind('/');
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  constexpr absl::string_view kPrefix = "audit-";
  if (!absl::StartsWith(name, kPrefix)) return "";
  const size_t dash = name.rfind('-');
  if (dash + 1 <= kPrefix.size()) return "";  // audit-NNNNNN.jsonl
  const std::string replica = name.substr(kPrefix.size(), dash - kPrefix.size());
  return FileIndex(name, replica) > 0 ? replica : "";
}

absl::StatusOr<AuditChainPoint> ParseAuditChainPoint(absl::string_view text) {
  const size_t colon = text.find(':');
  AuditChainPoint point;
  if (colon == absl::string_view::npos || !absl::SimpleAtoi(text.substr(0, colon), &point.seq) ||
      point.seq == 0 || text.size() - colon - 1 != kHexHashBytes ||
      !IsLowerHex(text.substr(colon + 1))) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", text.substr(0, 100),
                     "' is not SEQ:HASH (a line number >= 1, a colon, "
                     "64 lowercase hex digits), e.g. from the audit.anchor log line"));
  }
  point.hash = std::string(text.substr(colon + 1));
  return point;
}

absl::StatusOr<std::vector<AuditChainResult>> VerifyAuditChains(
    const std::vector<std::string>& files, const std::map<std::string, AuditAnchors>& anchors) {
  if (files.empty()) return absl::InvalidArgumentError("no audit files given");
  std::vector<std::string> order;
  std::map<std::string, std::vector<std::string>> groups;
  for (const std::string& f : files) {
    const std::string replica = AuditFileReplica(f);
    if (groups.count(replica) == 0) order.push_back(replica);
    groups[replica].push_back(f);
  }
  std::vector<AuditChainResult> out;
  for (const std::string& replica : order) {
    AuditChainResult r;
    r.replica = replica;
    r.files = groups[replica].size();
    // A single process's files (no replica in the name) are checked as before; a replica's
    // lines must all name it.
    auto anchor = anchors.find(replica);
    absl::Status s =
        VerifyChain(groups[replica], &r.lines, &r.last_hash, replica.empty() ? nullptr : &replica,
                    anchor == anchors.end() ? nullptr : &anchor->second, &r);
    if (!s.ok()) {
      if (replica.empty()) return s;
      return absl::Status(s.code(), absl::StrCat("replica ", replica, ": ", s.message()));
    }
    out.push_back(std::move(r));
  }
  return out;
}

}  // namespace custody::server
