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
// shutdown (server/audit_anchor.h), and `custodyctl audit verify` checks files against it.
//
// Strings are stored as valid UTF-8 (invalid bytes become U+FFFD) and capped in length (detail
// 4096 bytes, others 1024), so a line stays below 16 KiB. Never put payloads, plaintexts or key
// material in an event: payload_sha256 is the only trace of the content.
#ifndef CUSTODY_SERVER_AUDIT_LOG_H_
#define CUSTODY_SERVER_AUDIT_LOG_H_

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

  absl::Mutex mu_;
  absl::CondVar cv_;
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

#endif  // CUSTODY_SERVER_AUDIT_LOG_H_
