#include "server/security/audit_anchor.h"

#include <cstdio>
#include <cstdlib>
#include <memory>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "common/sha256.h"

namespace custody::server {
namespace {

// The hash of line `seq` in `path` (an audit file), NOT_FOUND when the file lacks it or is gone.
absl::StatusOr<std::string> LineHash(const std::string& path, uint64_t seq) {
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (f == nullptr) return absl::NotFoundError(absl::StrCat(path, " is not there"));
  const std::string key = absl::StrCat("{\"seq\":", seq, ",");
  char* data = nullptr;
  size_t capacity = 0;
  std::string hash;
  for (ssize_t n; (n = ::getline(&data, &capacity, f.get())) > 0;) {
    absl::string_view line(data, static_cast<size_t>(n));
    if (!absl::StartsWith(line, key)) continue;
    if (line.back() == '\n') line.remove_suffix(1);
    hash = Sha256Hex(line);
    break;
  }
  std::free(data);
  if (hash.empty()) return absl::NotFoundError(absl::StrCat(path, " has no line ", seq));
  return hash;
}

}  // namespace

absl::Status AuditAnchoring::CheckAtStartup(bool allow_new_chain) {
  auto anchor = store_->LoadAuditAnchor(options_.chain);
  if (absl::IsUnimplemented(anchor.status())) {
    unsupported_ = true;
    return absl::OkStatus();
  }
  if (absl::IsNotFound(anchor.status())) return absl::OkStatus();
  if (!anchor.ok()) return anchor.status();
  const AuditLog::Head head = log_->head();
  anchored_seq_ = anchor->seq;
  std::string problem;
  if (head.seq < anchor->seq) {
    problem =
        absl::StrCat("the audit chain in ", log_->dir(), " ends at seq ", head.seq,
                     " but the metadata store anchored seq ", anchor->seq, " (in ", anchor->file,
                     "): audit lines were removed (a file truncated or "
                     "deleted, or the chain begun again)");
  } else {
    // The anchored line must still be the one anchored. Its file may have been archived: then
    // the later lines' links are what `custodyctl audit verify --start` checks.
    absl::StatusOr<std::string> hash =
        head.seq == anchor->seq
            ? absl::StatusOr<std::string>(head.hash)
            : LineHash(absl::StrCat(log_->dir(), "/", anchor->file), anchor->seq);
    if (hash.ok() && *hash != anchor->hash) {
      problem = absl::StrCat("line seq ", anchor->seq, " of the audit chain in ", log_->dir(),
                             " is not the line the metadata store anchored: the chain was "
                             "rewritten");
    }
  }
  if (problem.empty()) return absl::OkStatus();
  if (!allow_new_chain) {
    return absl::FailedPreconditionError(
        absl::StrCat(problem,
                     ". Restore the audit files, or, to continue with this chain and record that "
                     "it was broken, start custodyd once with --audit_new_chain"));
  }
  Log(LogLevel::kWarning, "audit.new_chain",
      {{"reason", problem},
       {"old_anchor_seq", absl::StrCat(anchor->seq)},
       {"old_anchor_hash", anchor->hash},
       {"old_anchor_file", anchor->file},
       {"head_seq", absl::StrCat(head.seq)}});
  anchored_seq_ = 0;  // the next Tick replaces the old anchor
  return absl::OkStatus();
}

void AuditAnchoring::Tick(bool force) {
  const AuditLog::Head head = log_->head();
  if (head.seq == 0 || head.seq == anchored_seq_) return;
  const bool due = force || head.seq - anchored_seq_ >= options_.every_lines ||
                   anchored_seq_ > head.seq || absl::Now() - anchored_at_ >= options_.every;
  if (!due) return;
  rotation::MetadataStore::AuditAnchor anchor;
  anchor.chain = options_.chain;
  anchor.seq = head.seq;
  anchor.hash = head.hash;
  anchor.file = head.file;
  anchor.time_ms = absl::ToUnixMillis(absl::Now());
  absl::Status saved = unsupported_ ? absl::OkStatus() : store_->SaveAuditAnchor(anchor);
  if (!saved.ok()) {
    Log(LogLevel::kError, "audit.anchor_failed",
        {{"seq", absl::StrCat(head.seq)}, {"error", std::string(saved.message())}});
    anchored_at_ = absl::Now();  // retried at the next interval, not every tick
    return;
  }
  anchored_seq_ = head.seq;
  anchored_at_ = absl::Now();
  Log(LogLevel::kInfo, "audit.anchor",
      {{"chain", options_.chain},
       {"seq", absl::StrCat(head.seq)},
       {"hash", head.hash},
       {"file", head.file},
       {"anchor", absl::StrCat(head.seq, ":", head.hash)},
       {"store", unsupported_ ? "none" : "metadata"}});
}

}  // namespace custody::server
