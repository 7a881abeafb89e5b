// KeyService: the metadata records the token's tag key does not vouch for (rotation/record_tag.h,
// server/keys/metadata_tag_key.h). A ring whose tag does not verify is not served; a version whose
// tag does not verify is out of service (not published, not used, not planned, not destroyed), and
// no commit changes it; records from before tags are adopted once (trust on first upgrade).
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "server/keys/key_service.h"

namespace custody::server {
namespace {

using rotation::TagCheck;

const char* TagProblem(TagCheck check) {
  return check == TagCheck::kMissing ? "no tag" : "the tag does not verify";
}

constexpr char kAction[] =
    "refused (fail closed): the record was changed outside custody, or written without the "
    "token's tag key; restore it from a backup, or check it, clear its tag and start once with "
    "--adopt_untagged_metadata";

}  // namespace

bool KeyService::TagTrusted(const rotation::RingRecord& ring, bool log) {
  if (ring.tag_check == TagCheck::kValid || ring.tag_check == TagCheck::kUnchecked) return true;
  if (log) {
    Log(LogLevel::kError, "metadata.tag_mismatch",
        {{"record", "ring"},
         {"ring", ring.name},
         {"problem", TagProblem(ring.tag_check)},
         {"action", absl::StrCat("ring not served; ", kAction)}});
  }
  return false;
}

bool KeyService::TagTrusted(const rotation::VersionRecord& version, bool log) {
  if (version.tag_check == TagCheck::kValid || version.tag_check == TagCheck::kUnchecked) {
    return true;
  }
  if (log) {
    Log(LogLevel::kError, "metadata.tag_mismatch",
        {{"record", "version"},
         {"ring", version.ring},
         {"version", absl::StrCat(version.version)},
         {"object_id", version.object_id},
         {"problem", TagProblem(version.tag_check)},
         {"action",
          absl::StrCat("version out of service (not published, not used, not destroyed); ",
                       kAction)}});
  }
  return false;
}

absl::Status KeyService::AdoptUntagged(std::vector<rotation::RingRecord>& rings,
                                       std::vector<rotation::VersionRecord>& versions) {
  rotation::Mutation adopt;
  for (const rotation::RingRecord& r : rings) {
    if (r.tag_check == TagCheck::kMissing) adopt.update_rings.push_back(r);
  }
  for (const rotation::VersionRecord& v : versions) {
    if (v.tag_check == TagCheck::kMissing) adopt.update_versions.push_back(v);
  }
  if (adopt.update_rings.empty() && adopt.update_versions.empty()) return absl::OkStatus();
  // The rows are written back as read (the store adds their tags).
  if (absl::Status s = store_->Commit(adopt); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("adopting the untagged metadata: ", s.message()));
  }
  for (rotation::RingRecord& r : rings) {
    if (r.tag_check == TagCheck::kMissing) r.tag_check = TagCheck::kValid;
  }
  for (rotation::VersionRecord& v : versions) {
    if (v.tag_check == TagCheck::kMissing) v.tag_check = TagCheck::kValid;
  }
  Log(LogLevel::kWarning, "metadata.tags_adopted",
      {{"rings", absl::StrCat(adopt.update_rings.size())},
       {"versions", absl::StrCat(adopt.update_versions.size())},
       {"action",
        "tagged with the token's metadata tag key (trust on first upgrade); from now on a record "
        "without a valid tag is refused"}});
  return absl::OkStatus();
}

void KeyService::RefuseReplayedActive(Ring& ring, bool log) {
  auto active = [](const Version& v) {
    return !v.tag_mismatch && v.record.state == rotation::VersionState::kActive;
  };
  const Version* newest = nullptr;
  for (const Version& v : ring.versions) {
    if (active(v) && (newest == nullptr || v.record.version > newest->record.version)) newest = &v;
  }
  for (Version& v : ring.versions) {
    if (&v == newest || !active(v)) continue;
    v.tag_mismatch = true;
    v.key = nullptr;
    if (!log) continue;
    Log(LogLevel::kError, "metadata.replayed_row",
        {{"ring", v.record.ring},
         {"version", absl::StrCat(v.record.version)},
         {"newer_active_version", absl::StrCat(newest->record.version)},
         {"action",
          "out of service (not published, not used, not destroyed): an earlier ACTIVE row of this "
          "version was put back in the database (its tag verifies, but version " +
              absl::StrCat(newest->record.version) + " is ACTIVE after it)"}});
  }
}

absl::Status KeyService::RefuseUntrustedChange(const Ring& ring,
                                               const rotation::Mutation& mutation) {
  auto refuse = [&](uint32_t number) -> absl::Status {
    const Version* v = ring.Find(number);
    if (v == nullptr || !v->tag_mismatch) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrCat(
        "version ", number, " of ring '", ring.record.name,
        "' is out of service: its metadata record's tag does not verify (metadata.tag_mismatch "
        "in custodyd's log); custody does not change it until the row is restored"));
  };
  for (const rotation::VersionRecord& v : mutation.update_versions) {
    if (absl::Status s = refuse(v.version); !s.ok()) return s;
  }
  for (const auto& [name, number] : mutation.delete_versions) {
    if (absl::Status s = refuse(number); !s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace custody::server
