// The metadata tag key: the key in the token that vouches for every metadata record
// (rotation/record_tag.h). An HMAC-SHA256 key (CKK_GENERIC_SECRET, 32 bytes) where the token has
// CKM_GENERIC_SECRET_KEY_GEN and CKM_SHA256_HMAC, else an EC P-256 key pair whose ECDSA
// signatures are the tags (verified here in software with the public key read from the token at
// startup, never from the database). Either way generated in the token, CKA_SENSITIVE,
// non-extractable, labelled kLabel, and shared by every replica through the token.
//
// Open finds the key by its label, or generates it at the first start. Replicas starting at once
// end with one key: a process that generated a key keeps it only if it is then the only one;
// otherwise it destroys its own (never used) and takes the lowest CKA_ID of the others, or, when
// none is left (each destroyed its own), tries again after a random pause.
//
// Token calls: one per record written; one per record read the first time it is seen (a
// verified record and tag are remembered, so a replica's periodic re-read of unchanged rows
// makes none); none on the signing path.
//
// Thread-safe.
#ifndef CUSTODY_SERVER_KEYS_METADATA_TAG_KEY_H_
#define CUSTODY_SERVER_KEYS_METADATA_TAG_KEY_H_

#include <memory>
#include <set>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "pkcs11/token.h"
#include "rotation/record_tag.h"

namespace custody::server {

class MetadataTagKey final : public rotation::RecordTagger {
 public:
  static constexpr char kLabel[] = "custody-metadata-tag";

  // FAILED_PRECONDITION when the token can make neither kind of key; UNAVAILABLE for token
  // trouble. `token` must outlive the key. `allow_hmac` false: never HMAC (tests of the ECDSA path
  // on a token that has HMAC).
  static absl::StatusOr<std::unique_ptr<MetadataTagKey>> Open(pkcs11::Token* token,
                                                              bool allow_hmac = true);

  // True when this process generated the key (no tag key existed: the first start with tags).
  // Records without a tag are then from before tags and may be adopted once; once the key
  // exists, an untagged record is a mismatch.
  bool generated() const { return generated_; }
  // "HMAC-SHA256" or "ECDSA P-256".
  absl::string_view algorithm() const { return hmac_ ? "HMAC-SHA256" : "ECDSA P-256"; }
  const std::string& id() const { return id_; }  // CKA_ID, bytes

  absl::StatusOr<std::string> Tag(absl::string_view message) const override;
  absl::StatusOr<bool> Verify(absl::string_view message, absl::string_view tag) const override;
  std::string Describe() const override;

 private:
  MetadataTagKey(pkcs11::Token* token) : token_(token) {}

  pkcs11::Token* const token_;
  bool hmac_ = true;
  bool generated_ = false;
  std::string id_;
  std::shared_ptr<pkcs11::KeyPair> pair_;  // ECDSA
  pkcs11::EvpPkeyPtr public_key_;          // ECDSA, read from the token at Open
  mutable absl::Mutex mu_;
  // SHA-256 of (tag, message) pairs that verified: not asked of the token again. Bounded.
  mutable std::set<std::string> verified_ ABSL_GUARDED_BY(mu_);
};

}  // namespace custody::server

#endif  // CUSTODY_SERVER_KEYS_METADATA_TAG_KEY_H_
