#include "rotation/record_tag.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <cstdint>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "rotation/metadata_schema.h"
#include "rotation/metadata_store.h"

namespace custody::rotation {
namespace {

constexpr absl::string_view kSoftwarePrefix = "sw1:";

absl::StatusOr<TagCheck> Check(const RecordTagger* tagger, const std::string& message,
                               absl::string_view tag) {
  if (tagger == nullptr) return TagCheck::kUnchecked;
  if (tag.empty()) return TagCheck::kMissing;
  auto ok = tagger->Verify(message, tag);
  if (!ok.ok()) return ok.status();
  return *ok ? TagCheck::kValid : TagCheck::kMismatch;
}

std::string Canonical(const RingRecord& ring) { return CanonicalRing(ring); }
std::string Canonical(const VersionRecord& version) { return CanonicalVersion(version); }

// Appends each record's tag to `out` (empty ones without a tagger).
template <typename Record>
absl::Status TagEach(const RecordTagger* tagger, const std::vector<Record>& records,
                     std::vector<std::string>* out) {
  for (const Record& record : records) {
    if (tagger == nullptr) {
      out->emplace_back();
      continue;
    }
    CUSTODY_ASSIGN_OR_RETURN(std::string tag, tagger->Tag(Canonical(record)));
    out->push_back(std::move(tag));
  }
  return absl::OkStatus();
}

}  // namespace

std::string CanonicalRing(const RingRecord& r) {
  return schema::Canonical(schema::RingColumns(), "ring", r);
}

std::string CanonicalVersion(const VersionRecord& v) {
  return schema::Canonical(schema::VersionColumns(), "version", v);
}

absl::StatusOr<TagCheck> CheckRingTag(const RecordTagger* tagger, const RingRecord& ring,
                                      absl::string_view tag) {
  return Check(tagger, tagger == nullptr ? std::string() : CanonicalRing(ring), tag);
}

absl::StatusOr<TagCheck> CheckVersionTag(const RecordTagger* tagger, const VersionRecord& version,
                                         absl::string_view tag) {
  return Check(tagger, tagger == nullptr ? std::string() : CanonicalVersion(version), tag);
}

absl::StatusOr<MutationTags> TagMutation(const RecordTagger* tagger, const Mutation& m) {
  MutationTags tags;
  CUSTODY_RETURN_IF_ERROR(TagEach(tagger, m.insert_rings, &tags.insert_rings));
  CUSTODY_RETURN_IF_ERROR(TagEach(tagger, m.update_rings, &tags.update_rings));
  CUSTODY_RETURN_IF_ERROR(TagEach(tagger, m.insert_versions, &tags.insert_versions));
  CUSTODY_RETURN_IF_ERROR(TagEach(tagger, m.update_versions, &tags.update_versions));
  return tags;
}

namespace {

template <typename Record>
absl::Status CheckEach(const RecordTagger* tagger, std::vector<Record>& records,
                       const std::vector<std::string>& tags) {
  for (size_t i = 0; i < records.size(); ++i) {
    auto check = Check(tagger, tagger == nullptr ? std::string() : Canonical(records[i]), tags[i]);
    if (!check.ok()) return check.status();
    records[i].tag_check = *check;
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckTags(const RecordTagger* tagger, std::vector<RingRecord>& rings,
                       const std::vector<std::string>& tags) {
  return CheckEach(tagger, rings, tags);
}

absl::Status CheckTags(const RecordTagger* tagger, std::vector<VersionRecord>& versions,
                       const std::vector<std::string>& tags) {
  return CheckEach(tagger, versions, tags);
}

absl::StatusOr<std::string> SoftwareRecordTagger::Tag(absl::string_view message) const {
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  if (HMAC(EVP_sha256(), key_.data(), static_cast<int>(key_.size()),
           reinterpret_cast<const unsigned char*>(message.data()), message.size(), mac,
           &length) == nullptr) {
    return absl::InternalError("HMAC failed");
  }
  return absl::StrCat(kSoftwarePrefix,
                      absl::WebSafeBase64Escape(absl::string_view(
                          reinterpret_cast<const char*>(mac), static_cast<size_t>(length))));
}

absl::StatusOr<bool> SoftwareRecordTagger::Verify(absl::string_view message,
                                                  absl::string_view tag) const {
  auto expected = Tag(message);
  if (!expected.ok()) return expected.status();
  return expected->size() == tag.size() &&
         CRYPTO_memcmp(expected->data(), tag.data(), tag.size()) == 0;
}

}  // namespace custody::rotation
