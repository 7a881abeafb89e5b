// Tamper-evident audit log: one JSON object per line, each line hashed and chained to the one
// before it, written to DIR/audit-000001.jsonl, audit-000002.jsonl, ... (rotated by size).
//
// Line format (member order fixed; no whitespace):
//   {"seq":N,"time":"2024-05-01T12:00:00.123Z","identity":"..","operation":"..","ring":"..",
//    "version":V,"kid":"..","payload_sha256":"..","result":"OK","detail":"..",
//    "prev":"<hex SHA-256 of the previous line>","hash":"<hex SHA-256 of this line's own prefix>"}
// - seq starts at 1 and increases by one per line across files.
// - prev is the SHA-256 of the previous line's bytes without its newline (the line of the
//   previous file after a rotation); the first line ever has prev = 64 zeros (the anchor).
// - hash is the SHA-256 of this line's bytes before ,"hash": — so an edited line fails its own
//   check and the verifier names the edited line itself, not its successor.
// What it proves: edits, deletions, insertions and reorderings inside the files are detected,
// unless the attacker rewrites every later line (no key is involved). The tail is pinned from
// outside: custodyd anchors the head (seq, hash, file) in the metadata store and as an
// "audit.anchor" log line every --audit_anchor_lines lines or --audit_anchor_interval and at
// shutdown (server/security/audit_anchor.h), and `custodyctl audit verify` checks files against it.
//
// Strings are stored as valid UTF-8 (invalid bytes become U+FFFD) and capped in length (detail
// 4096 bytes, others 1024), so a line stays below 16 KiB. Never put payloads, plaintexts or key
// material in an event: payload_sha256 is the only trace of the content.
#ifndef CUSTODY_SERVER_SECURITY_AUDIT_LOG_H_
#define CUSTODY_SERVER_SECURITY_AUDIT_LOG_H_

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "metrics/histogram.h"
#include "server/security/audit_format.h"
#include "server/security/audit_verify.h"

namespace custody::server {

class AuditLog {
 public:
  struct Options {
    std::string dir;  // created with mode 0700 when missing (its parent must exist)
    uint64_t max_file_bytes = 64 << 20;
    // Test hooks replacing write(2) and fdatasync(2) on the log's file descriptors. Tests run
    // as root in CI, and root ignores permission bits, so a read-only directory cannot make
    // writes fail there; an injected failure (errno set, -1 returned) is the portable fault.
    std::function<ssize_t(int fd, const void* data, size_t size)> write_fn = nullptr;
    std::function<int(int fd)> fsync_fn = nullptr;
    // A replica of several (custodyd --replica_id): its chain's files are
    // audit-REPLICA-NNNNNN.jsonl and each line carries "replica":"REPLICA" after "time". Empty:
    // audit-NNNNNN.jsonl without the member (one process). [A-Za-z0-9._-], at most 64.
    std::string replica_id = "";
  };

  struct Stats {
    uint64_t lines = 0;     // acknowledged lines
    uint64_t batches = 0;   // successful group commits
    uint64_t fsyncs = 0;    // fsync calls on log files and the directory
    uint64_t failures = 0;  // failed batches
  };

  // Creates DIR when missing, takes an exclusive lock on DIR/.lock (FAILED_PRECONDITION when
  // another process holds it), and continues the chain from the newest file's last line.
  // A torn last line (no newline: a crash mid-write, never acknowledged) is cut off. DATA_LOSS
  // when the last line is not a valid audit line (run `custodyctl audit verify`), an I/O status
  // when the directory or files cannot be used.
  static absl::StatusOr<std::unique_ptr<AuditLog>> Open(Options options);

  // Callers must not call Append concurrently with destruction.
  ~AuditLog();
  AuditLog(const AuditLog&) = delete;
  AuditLog& operator=(const AuditLog&) = delete;

  // Appends one line and returns once it is written and fsynced. Concurrent callers are group
  // committed: one thread writes and fsyncs everything queued so far while the others wait, so
  // at most one fsync is in flight. On a write or fsync failure every caller of the batch gets
  // UNAVAILABLE "audit log unavailable: ...", nothing of the batch counts as written (the file is
  // truncated back to its last acknowledged size before the next attempt, which keeps the chain
  // valid), and healthy() turns false until an Append succeeds again. Thread-safe.
  absl::Status Append(const AuditEvent& event);
  // Appends several lines, consecutive and in order, with the same semantics: all of them are
  // durable when it returns OK, none counts as written otherwise.
  absl::Status AppendAll(absl::Span<const AuditEvent> events);

  // False after a failed Append, true again after a successful one.
  bool healthy() const { return healthy_.load(); }

  // Re-tests the log after a failure on its own (health calls it on a timer, so that service
  // returns when the disk does, without waiting for a caller): when the directory's file system
  // has at least kProbeHeadroomBytes free, appends one line (operation "audit.probe"). OK and
  // healthy() true again when it was written.
  absl::Status Probe();
  static constexpr uint64_t kProbeHeadroomBytes = 64 * 1024;

  // The chain's head: the last acknowledged line (seq 0 and the 64-zero anchor before the
  // first), and the file that holds it (name only). Thread-safe.
  struct Head {
    uint64_t seq = 0;
    std::string hash;
    std::string file;
  };
  Head head() const;
  const std::string& dir() const { return options_.dir; }

  Stats stats() const;
  // Duration of each fsync (log files and directory), failed ones included.
  const metrics::Histogram& fsync_seconds() const { return fsync_seconds_; }

 private:
  struct Batch;
  explicit AuditLog(Options options);

  // Writer-side steps; only the thread holding the writer role (writing_) runs them.
  // Writes and fsyncs the batch's lines, rotating as needed; on failure undoes the batch (state
  // back to the last acknowledged line, the file cut back on the next attempt). Also updates
  // healthy_ and the counters.
  absl::Status Commit(const Batch& batch);
  absl::Status WriteLines(const Batch& batch);
  absl::Status ReopenCurrent();
  absl::Status OpenNextFile();
  absl::Status WriteAll(int fd, const std::string& data, const std::string& path);
  absl::Status Sync(int fd, const std::string& path);
  absl::Status SyncDir();
  std::string FilePath(uint64_t index) const;

  const Options options_;

  absl::Mutex mu_;  // guards the batches' fields too
  std::shared_ptr<Batch> queued_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;

  // Writer state: touched only by the thread that set writing_ (or by Open).
  int lock_fd_ = -1;
  int fd_ = -1;             // the current file, O_APPEND; -1 when it must be reopened
  bool dirty_ = false;      // the file may hold bytes past good_size_ (a failed batch)
  uint64_t index_ = 1;      // number of the current file
  uint64_t good_size_ = 0;  // acknowledged bytes in the current file
  uint64_t seq_ = 0;        // seq of the last acknowledged line
  std::string last_hash_;   // hex SHA-256 of the last acknowledged line (or the anchor)

  // Before a batch is acknowledged: the current file must still be linked under its name (a
  // deleted or replaced file would take acknowledged lines with it). DATA_LOSS otherwise.
  absl::Status CheckStillLinked(const std::string& path) const;

  mutable absl::Mutex head_mu_;
  Head head_ ABSL_GUARDED_BY(head_mu_);

  std::atomic<bool> healthy_{true};
  std::atomic<uint64_t> lines_{0}, batches_{0}, fsyncs_{0}, failures_{0};
  metrics::Histogram fsync_seconds_{metrics::Histogram::LatencyBounds()};
};

}  // namespace custody::server

#endif  // CUSTODY_SERVER_SECURITY_AUDIT_LOG_H_
