// Durable metadata for rings and versions. A change is durable before the call returns (and
// before custodyd acknowledges it).
//
// Every mutation is one transaction: a rotation (two versions change state) is all or nothing.
// The store is read at startup and written on admin operations and scheduled transitions only,
// never on the signing path.
#ifndef CUSTODY_ROTATION_METADATA_STORE_H_
#define CUSTODY_ROTATION_METADATA_STORE_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "rotation/key_ring.h"

namespace custody::rotation {

// One atomic change to the metadata.
struct Mutation {
  std::vector<RingRecord> insert_rings;
  std::vector<RingRecord> update_rings;  // policy fields, by name
  std::vector<VersionRecord> insert_versions;
  std::vector<VersionRecord> update_versions;  // by (ring, version)
  // (ring, version) pairs; a ring left with no version is deleted with its last version.
  std::vector<std::pair<std::string, uint32_t>> delete_versions;
  // (ring, generation): a store shared between replicas commits only while each named ring is
  // still at that generation (else ABORTED); the embedded store ignores it.
  std::vector<std::pair<std::string, uint64_t>> expect_generations;
};

class RecordTagger;  // rotation/record_tag.h

// The tags a store writes with a mutation's records, one per record of each list.
struct MutationTags {
  std::vector<std::string> insert_rings, update_rings, insert_versions, update_versions;
};
// Empty tags without a tagger; UNAVAILABLE when the tagger cannot be reached (nothing is written).
absl::StatusOr<MutationTags> TagMutation(const RecordTagger* tagger, const Mutation& mutation);

// The durable metadata of rings and versions. Two implementations: the embedded SQLite file
// (rotation/sqlite_metadata_store.h, one custodyd process) and PostgreSQL
// (rotation/postgres_metadata_store.h, shared by any number of replicas). Implementations are
// thread-safe.
class MetadataStore {
 public:
  struct AuditAnchor;
  virtual ~MetadataStore() = default;
  MetadataStore(const MetadataStore&) = delete;
  MetadataStore& operator=(const MetadataStore&) = delete;

  // Applies `mutation` in one transaction. ALREADY_EXISTS when an inserted ring name, version
  // number or object id is taken; NOT_FOUND when an updated row or the ring of an inserted
  // version does not exist. A store shared between processes also refuses, ABORTED, a mutation
  // that lost a race with another writer (a stale ring generation, a version number that is no
  // longer the next one, a second ACTIVE version); UNAVAILABLE when it cannot be reached.
  // Nothing is changed on error.
  virtual absl::Status Commit(const Mutation& mutation) = 0;

  // Shorthands for single-row mutations.
  absl::Status InsertRingWithVersion(const RingRecord& ring, const VersionRecord& version);
  absl::Status InsertVersion(const VersionRecord& version);
  absl::Status UpdateVersion(const VersionRecord& version);
  absl::Status DeleteVersion(const std::string& ring, uint32_t version);

  // Every record, with tag_check set (when the store was opened with a tagger). UNAVAILABLE when
  // the store, or the tagger's token, cannot be reached.
  virtual absl::StatusOr<std::vector<RingRecord>> LoadRings() = 0;
  virtual absl::StatusOr<std::vector<VersionRecord>> LoadVersions() = 0;

  // Blocks until another writer may have committed a change (true), or `timeout` passes
  // (false). A store only one process writes never reports a change. UNAVAILABLE when the
  // store cannot be reached. Call from one thread at a time.
  virtual absl::StatusOr<bool> WaitForChange(absl::Duration timeout) {
    absl::SleepFor(timeout);
    return false;
  }

  // Whether this process leads the scheduler: it should perform due transitions. A store only
  // one process writes is always led by that process. A shared store elects one holder among
  // the processes calling it (the first to ask while none holds it) and keeps it until that
  // process's connection ends; each call re-checks that the holder's session is alive.
  virtual absl::StatusOr<bool> HoldLeadership() { return true; }

  // The latest anchored head of an audit chain (server/security/audit_anchor.h): kept outside the
  // chain's own files, so that a truncated, deleted or restarted chain is detected. One row per
  // chain
  // (`chain`: the replica id, "" for a lone custodyd), replaced by each save.
  struct AuditAnchor {
    std::string chain;
    uint64_t seq = 0;     // of the anchored line
    std::string hash;     // hex SHA-256 of that line
    std::string file;     // the file that holds it (name only)
    int64_t time_ms = 0;  // when it was anchored (Unix ms)
  };
  // Durable before it returns. UNIMPLEMENTED for a store without anchors.
  virtual absl::Status SaveAuditAnchor(const AuditAnchor& anchor) {
    (void)anchor;
    return absl::UnimplementedError("this metadata store keeps no audit anchors");
  }
  // NOT_FOUND when the chain was never anchored.
  virtual absl::StatusOr<AuditAnchor> LoadAuditAnchor(const std::string& chain) {
    (void)chain;
    return absl::UnimplementedError("this metadata store keeps no audit anchors");
  }

 protected:
  MetadataStore() = default;
};

}  // namespace custody::rotation

#endif  // CUSTODY_ROTATION_METADATA_STORE_H_
