// Durable metadata for rings and versions: SQLite in WAL mode with synchronous=FULL, so a
// change is on disk before the call returns (and before custodyd acknowledges it).
//
// Every mutation is one transaction: a rotation (two versions change state) is all or nothing.
// Thread-safe (one connection behind a mutex; the store is read at startup and written on
// admin operations and scheduled transitions only, never on the signing path).
#ifndef CUSTODY_ROTATION_METADATA_STORE_H_
#define CUSTODY_ROTATION_METADATA_STORE_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "rotation/key_ring.h"

struct sqlite3;

namespace custody::rotation {

// One atomic change to the metadata.
struct Mutation {
  std::vector<RingRecord> insert_rings;
  std::vector<RingRecord> update_rings;  // policy fields, by name
  std::vector<VersionRecord> insert_versions;
  std::vector<VersionRecord> update_versions;  // by (ring, version)
  // (ring, version) pairs; a ring left with no version is deleted with its last version.
  std::vector<std::pair<std::string, uint32_t>> delete_versions;
};

class MetadataStore {
 public:
  // Opens (creating if needed) the database at `path` and applies the schema.
  static absl::StatusOr<std::unique_ptr<MetadataStore>> Open(const std::string& path);
  ~MetadataStore();
  MetadataStore(const MetadataStore&) = delete;
  MetadataStore& operator=(const MetadataStore&) = delete;

  // Applies `mutation` in one transaction. ALREADY_EXISTS when an inserted ring name, version
  // number or object id is taken; NOT_FOUND when an updated row or the ring of an inserted
  // version does not exist. Nothing is changed on error.
  absl::Status Commit(const Mutation& mutation);

  // Shorthands for single-row mutations.
  absl::Status InsertRingWithVersion(const RingRecord& ring, const VersionRecord& version);
  absl::Status InsertVersion(const VersionRecord& version);
  absl::Status UpdateVersion(const VersionRecord& version);
  absl::Status DeleteVersion(const std::string& ring, uint32_t version);

  absl::StatusOr<std::vector<RingRecord>> LoadRings();
  absl::StatusOr<std::vector<VersionRecord>> LoadVersions();

 private:
  explicit MetadataStore(sqlite3* db) : db_(db) {}
  absl::Status Exec(const char* sql) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Apply(const Mutation& mutation) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  absl::Mutex mu_;
  sqlite3* db_ ABSL_GUARDED_BY(mu_);
};

}  // namespace custody::rotation

#endif  // CUSTODY_ROTATION_METADATA_STORE_H_
