// The embedded metadata store: one SQLite file in custodyd's state directory, written by one
// process. The schema, the row encoding and the migrations are rotation/metadata_schema.h's.
#ifndef CUSTODY_ROTATION_SQLITE_METADATA_STORE_H_
#define CUSTODY_ROTATION_SQLITE_METADATA_STORE_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "rotation/metadata_store.h"

namespace custody::rotation {

class RecordTagger;

// Opens (creating if needed) the SQLite database at `path` and brings its schema to the latest
// migration (PRAGMA user_version; a database from before numbered migrations converges): WAL
// mode with synchronous=FULL, so a change is on disk before the call returns. With `tagger`
// (which must outlive the store) every written record carries its tag and every read record
// says whether its tag verifies (tag_check); without, tags are neither written nor read.
// FAILED_PRECONDITION for a database whose schema is newer than this build knows.
absl::StatusOr<std::unique_ptr<MetadataStore>> OpenSqliteMetadataStore(
    const std::string& path, const RecordTagger* tagger = nullptr);

// Reads chain `chain`'s anchor from the SQLite database at `path` without writing to it
// (custodyctl audit verify --state_dir); NOT_FOUND when there is none.
absl::StatusOr<MetadataStore::AuditAnchor> ReadSqliteAuditAnchor(const std::string& path,
                                                                 const std::string& chain);

}  // namespace custody::rotation

#endif  // CUSTODY_ROTATION_SQLITE_METADATA_STORE_H_
