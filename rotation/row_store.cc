#include "rotation/row_store.h"

#include <algorithm>
#include <tuple>

namespace custody::rotation {

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
