#include "rotation/metadata_store.h"

namespace custody::rotation {

absl::Status MetadataStore::InsertRingWithVersion(const RingRecord& ring,
                                                  const VersionRecord& version) {
  Mutation m;
  m.insert_rings.push_back(ring);
  m.insert_versions.push_back(version);
  return Commit(m);
}

absl::Status MetadataStore::InsertVersion(const VersionRecord& version) {
  Mutation m;
  m.insert_versions.push_back(version);
  return Commit(m);
}

absl::Status MetadataStore::UpdateVersion(const VersionRecord& version) {
  Mutation m;
  m.update_versions.push_back(version);
  return Commit(m);
}

absl::Status MetadataStore::DeleteVersion(const std::string& ring, uint32_t version) {
  Mutation m;
  m.delete_versions.emplace_back(ring, version);
  return Commit(m);
}

}  // namespace custody::rotation
