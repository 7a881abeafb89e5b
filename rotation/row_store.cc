#include "rotation/row_store.h"

#include <algorithm>
#include <string>
#include <tuple>
#include <utility>

#include "rotation/record_tag.h"

namespace custody::rotation {
namespace {

// The records a store's rows hold (read in `dialect`), each with its tag_check. Call it after
// the store's lock is released: a check may be a token call.
template <typename Record>
absl::StatusOr<std::vector<Record>> DecodeChecked(
    schema::Dialect dialect, std::span<const schema::Column<Record>> columns,
    const std::vector<std::vector<schema::Value>>& rows, const RecordTagger* tagger) {
  std::vector<Record> records;
  std::vector<std::string> tags;
  for (const std::vector<schema::Value>& row : rows) {
    absl::StatusOr<Record> record = schema::Decode(dialect, columns, row, &tags.emplace_back());
    if (!record.ok()) return record.status();
    records.push_back(*std::move(record));
  }
  if (absl::Status s = CheckTags(tagger, records, tags); !s.ok()) return s;
  return records;
}

}  // namespace

absl::StatusOr<std::vector<RingRecord>> RowStore::LoadRings() {
  auto rows = ReadRows(schema::RingsTable());
  if (!rows.ok()) return rows.status();
  auto rings = DecodeChecked(dialect_, schema::RingColumns(), *rows, tagger_);
  if (!rings.ok()) return rings.status();
  std::sort(rings->begin(), rings->end(),
            [](const RingRecord& a, const RingRecord& b) { return a.name < b.name; });
  return rings;
}

absl::StatusOr<std::vector<VersionRecord>> RowStore::LoadVersions() {
  auto rows = ReadRows(schema::VersionsTable());
  if (!rows.ok()) return rows.status();
  auto versions = DecodeChecked(dialect_, schema::VersionColumns(), *rows, tagger_);
  if (!versions.ok()) return versions.status();
  std::sort(versions->begin(), versions->end(), [](const VersionRecord& a, const VersionRecord& b) {
    return std::tie(a.ring, a.version) < std::tie(b.ring, b.version);
  });
  return versions;
}

}  // namespace custody::rotation
