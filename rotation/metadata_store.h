// Durable metadata for rings and versions: SQLite in WAL mode with synchronous=FULL, so a
// change is on disk before the call returns (and before custodyd acknowledges it).
//
// Every mutation is one transaction. Thread-safe (one connection behind a mutex; the store is
// read at startup and written on admin operations only, never on the signing path).
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

class MetadataStore {
 public:
  // Opens (creating if needed) the database at `path` and applies the schema.
  static absl::StatusOr<std::unique_ptr<MetadataStore>> Open(const std::string& path);
  ~MetadataStore();
  MetadataStore(const MetadataStore&) = delete;
  MetadataStore& operator=(const MetadataStore&) = delete;

  // Inserts a new ring and its first version in one transaction. ALREADY_EXISTS when a ring of
  // that name exists (nothing is changed then).
  absl::Status InsertRingWithVersion(const RingRecord& ring, const VersionRecord& version);

  // Inserts a further version of an existing ring. NOT_FOUND when the ring does not exist,
  // ALREADY_EXISTS when the version number or object id is taken.
  absl::Status InsertVersion(const VersionRecord& version);

  // Replaces the mutable fields (kid, public_jwk, state, activate_time, object label) of the
  // version identified by (ring, version). NOT_FOUND when absent.
  absl::Status UpdateVersion(const VersionRecord& version);

  // Deletes a version and, when the ring has no version left, the ring: the rollback of a
  // creation that never reached the token.
  absl::Status DeleteVersion(const std::string& ring, uint32_t version);

  absl::StatusOr<std::vector<RingRecord>> LoadRings();
  absl::StatusOr<std::vector<VersionRecord>> LoadVersions();

 private:
  explicit MetadataStore(sqlite3* db) : db_(db) {}
  absl::Status Exec(const char* sql) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status InsertVersionLocked(const VersionRecord& version) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  absl::Mutex mu_;
  sqlite3* db_ ABSL_GUARDED_BY(mu_);
};

}  // namespace custody::rotation

#endif  // CUSTODY_ROTATION_METADATA_STORE_H_
