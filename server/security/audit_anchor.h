// Anchors the audit chain's head outside the chain's own files, so that a chain cut short,
// deleted or begun again is detected rather than trusted (issue 22, issue 28 #4):
// - every `every_lines` lines or `every` (whichever comes first; checked by custodyd's health
//   timer) and at shutdown, the head (seq, hash, file) is saved in the metadata store (one row
//   per chain: SQLite, or PostgreSQL shared by replicas, keyed by the replica id) and logged as
//   "audit.anchor" for the journal;
// - at startup, a chain that ends before the stored anchor, or whose anchored line hashes
//   differently, is refused unless the operator says to begin anew (--audit_new_chain).
// `custodyctl audit verify --state_dir` or `--anchor=SEQ:HASH` checks files against an anchor.
// Thread-compatible: custodyd calls it from its health thread, and at start and shutdown.
#ifndef CUSTODY_SERVER_SECURITY_AUDIT_ANCHOR_H_
#define CUSTODY_SERVER_SECURITY_AUDIT_ANCHOR_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "rotation/metadata_store.h"
#include "server/security/audit_log.h"

namespace custody::server {

class AuditAnchoring {
 public:
  struct Options {
    std::string chain;  // the replica id; "" for a lone custodyd
    uint64_t every_lines = 1000;
    absl::Duration every = absl::Seconds(60);
  };
  // Both must outlive this object.
  AuditAnchoring(AuditLog* log, rotation::MetadataStore* store, Options options)
      : log_(log), store_(store), options_(std::move(options)) {}

  // Compares the chain's head with the stored anchor. FAILED_PRECONDITION, saying what to do,
  // when the chain ends before the anchor or holds a different line there; with
  // `allow_new_chain` that is logged (audit.new_chain) and the next anchor replaces the old.
  // OK when the store has no anchor for the chain yet.
  absl::Status CheckAtStartup(bool allow_new_chain);

  // Saves the head when it moved and `force`, or every_lines lines or `every` passed since the
  // last anchor. A failure is logged (audit.anchor_failed) and retried at the next call.
  void Tick(bool force);

 private:
  AuditLog* const log_;
  rotation::MetadataStore* const store_;
  const Options options_;
  uint64_t anchored_seq_ = 0;
  absl::Time anchored_at_ = absl::Now();
  bool unsupported_ = false;  // the store keeps no anchors: log lines only
};

}  // namespace custody::server

#endif  // CUSTODY_SERVER_SECURITY_AUDIT_ANCHOR_H_
