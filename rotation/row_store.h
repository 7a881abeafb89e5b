// What the SQLite and PostgreSQL stores share above their SQL: rings and versions loaded as the
// rows of their tables, decoded by the one schema (metadata_schema.h), their tags checked
// (record_tag.h) and put in one order: rings by name, versions by ring then number, names
// compared bytewise (as SQLite's BINARY and PostgreSQL's COLLATE "C" compare). A store supplies
// the rows.
#ifndef CUSTODY_ROTATION_ROW_STORE_H_
#define CUSTODY_ROTATION_ROW_STORE_H_

#include <vector>

#include "absl/status/statusor.h"
#include "rotation/metadata_schema.h"
#include "rotation/metadata_store.h"

namespace custody::rotation {

class RecordTagger;

class RowStore : public MetadataStore {
 public:
  absl::StatusOr<std::vector<RingRecord>> LoadRings() final;
  absl::StatusOr<std::vector<VersionRecord>> LoadVersions() final;

 protected:
  // `tagger` (may be null: no tags) must outlive the store.
  RowStore(schema::Dialect dialect, const RecordTagger* tagger)
      : dialect_(dialect), tagger_(tagger) {}
  const RecordTagger* tagger() const { return tagger_; }

  // Every row of `table`, one value per column of schema::ColumnList(dialect, table), in any
  // order. Called without the store's own locks held: it takes them.
  virtual absl::StatusOr<std::vector<std::vector<schema::Value>>> ReadRows(
      const schema::Table& table) = 0;

 private:
  const schema::Dialect dialect_;
  const RecordTagger* const tagger_;
};

}  // namespace custody::rotation

#endif  // CUSTODY_ROTATION_ROW_STORE_H_
