// Tags that authenticate metadata records: a MAC (or signature) over a canonical encoding of
// every field of a ring or version record that decides what custody publishes, uses or destroys,
// made by a key the store's writer cannot read (custodyd's lives in the token:
// server/keys/metadata_tag_key.h). Both metadata stores compute a record's tag when they write it
// and check it when they read it (RingRecord::tag_check / VersionRecord::tag_check), so that write
// access to the database alone cannot publish a key, revive a compromised one or change a policy.
//
// The canonical encoding is versioned and length-prefixed ("custody-metadata/v1", the record
// kind, then each field as a 4-byte big-endian length and its bytes, integers in decimal), so
// that no two different records encode alike and a tag cannot move to another ring or version
// (the name and the number are inside it). Not covered: RingRecord::generation (a concurrency
// counter PostgreSQL moves on every commit; it decides nothing).
#ifndef CUSTODY_ROTATION_RECORD_TAG_H_
#define CUSTODY_ROTATION_RECORD_TAG_H_

#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "rotation/key_ring.h"

namespace custody::rotation {

// Makes and checks tags. Implementations are thread-safe.
class RecordTagger {
 public:
  virtual ~RecordTagger() = default;
  // The tag of `message` (printable ASCII, stored as it is). UNAVAILABLE when the key's holder
  // (the token) cannot be reached: the write is then refused.
  virtual absl::StatusOr<std::string> Tag(absl::string_view message) const = 0;
  // True when `tag` is `message`'s tag under this key; false for any other tag (another key, an
  // edited record, an empty or malformed tag). UNAVAILABLE for token trouble.
  virtual absl::StatusOr<bool> Verify(absl::string_view message, absl::string_view tag) const = 0;
  // For logs: "HMAC-SHA256 (token key 'custody-metadata-tag')", "software (tests only)".
  virtual std::string Describe() const = 0;
};

std::string CanonicalRing(const RingRecord& ring);
std::string CanonicalVersion(const VersionRecord& version);

// What a store's read found: kValid / kMismatch / kMissing (empty tag); kUnchecked without a
// tagger. UNAVAILABLE for token trouble (the whole read fails: nothing is served unchecked).
absl::StatusOr<TagCheck> CheckRingTag(const RecordTagger* tagger, const RingRecord& ring,
                                      absl::string_view tag);
absl::StatusOr<TagCheck> CheckVersionTag(const RecordTagger* tagger, const VersionRecord& version,
                                         absl::string_view tag);

// Sets each record's tag_check from `tags` (the stored tag of each, in the same order).
absl::Status CheckTags(const RecordTagger* tagger, std::vector<RingRecord>& rings,
                       const std::vector<std::string>& tags);
absl::Status CheckTags(const RecordTagger* tagger, std::vector<VersionRecord>& versions,
                       const std::vector<std::string>& tags);

// HMAC-SHA256 with a key held in this process's memory. For unit tests of the stores only (it
// says so in Describe): custodyd's key lives in the token.
class SoftwareRecordTagger final : public RecordTagger {
 public:
  explicit SoftwareRecordTagger(std::string key) : key_(std::move(key)) {}
  absl::StatusOr<std::string> Tag(absl::string_view message) const override;
  absl::StatusOr<bool> Verify(absl::string_view message, absl::string_view tag) const override;
  std::string Describe() const override { return "software HMAC-SHA256 (tests only)"; }

 private:
  std::string key_;
};

}  // namespace custody::rotation

#endif  // CUSTODY_ROTATION_RECORD_TAG_H_
