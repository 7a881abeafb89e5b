// Key rings and key versions as stored in the metadata store, and the ring-name syntax.
//
// A key ring is a named sequence of key versions with one purpose and one algorithm. Versions
// move through the lifecycle states of docs/lifecycle.md; CREATING marks a version whose key
// generation in the token has not been confirmed yet (the crash window of ring creation).
#ifndef CUSTODY_ROTATION_KEY_RING_H_
#define CUSTODY_ROTATION_KEY_RING_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace custody::rotation {

enum class Purpose { kSign, kDecrypt };

enum class VersionState {
  kCreating,
  kPending,
  kActive,
  kRetired,
  kDisabled,
  kDestroyScheduled,
  kDestroyed,
  kDestroying,
};

// Zero-downtime rotation policy (milliseconds). See ValidatePolicy for the invariants.
struct RotationPolicy {
  int64_t prepublish_ms = 60 * 60 * 1000;              // 1 h
  int64_t rotation_period_ms = 0;                      // manual
  int64_t retain_ms = 24 * 60 * 60 * 1000;             // 24 h
  int64_t destroy_delay_ms = 7 * 24 * 60 * 60 * 1000;  // 7 days
};

// INVALID_ARGUMENT naming the rule: every field >= 0, retain >= prepublish (a retired key must
// stay published at least as long as a new one is pre-published, or verifiers lose it before
// they could have learnt its successor), rotation_period == 0 or >= prepublish (the next key
// must be publishable long enough before it is due), at most 10 years each.
absl::Status ValidatePolicy(const RotationPolicy& policy);

// Lower bounds custodyd puts on every ring's policy (--min_destroy_delay, --min_retain,
// --min_rotation_period), so that no policy, however it was typed, destroys a key, unpublishes
// it or rotates sooner than the operator of the service allows. Milliseconds.
struct PolicyFloors {
  int64_t min_destroy_delay_ms = 24 * 60 * 60 * 1000;  // 24 h, as cloud KMSs do
  int64_t min_retain_ms = 60 * 60 * 1000;              // 1 h (docs/lifecycle.md says why)
  int64_t min_rotation_period_ms = 60 * 60 * 1000;     // 1 h; 0 (manual) is always allowed
};

// INVALID_ARGUMENT naming the field and the bound ("destroy_delay 0s is below
// --min_destroy_delay=24h") for the first field below its floor.
absl::Status CheckPolicyFloors(const RotationPolicy& policy, const PolicyFloors& floors);

// `policy` with every field below its floor raised to it (rings stored before the floors
// existed); true in *raised when something changed.
RotationPolicy RaiseToFloors(RotationPolicy policy, const PolicyFloors& floors, bool* raised);

// "0s", "500ms", "24h", "1h30m": a duration in milliseconds as an operator writes it.
std::string FormatDurationMs(int64_t ms);

absl::string_view PurposeName(Purpose purpose);  // "SIGN" | "DECRYPT"
absl::StatusOr<Purpose> ParsePurpose(absl::string_view name);
absl::string_view VersionStateName(VersionState state);  // "ACTIVE", ...
absl::StatusOr<VersionState> ParseVersionState(absl::string_view name);

// What the metadata store found of a record's tag when it read it (rotation/record_tag.h).
enum class TagCheck {
  kUnchecked,  // the store has no tagger (unit tests, tools)
  kValid,      // the token's key vouches for every field
  kMissing,    // no tag: written before tags existed (adopted once, KeyService::Load) or edited
  kMismatch,   // the record was changed outside custody (or tagged by another key)
};

struct RingRecord {
  std::string name;
  Purpose purpose = Purpose::kSign;
  std::string alg;
  int rsa_bits = 0;
  bool allow_non_fapi = false;
  int64_t create_time = 0;    // Unix milliseconds
  std::string curve;          // ECDH-ES* decryption rings: "P-256", "P-384" or "P-521"
  int64_t zip_max_bytes = 0;  // decryption rings: 0 = JWE "zip" refused
  RotationPolicy policy;
  bool policy_explicit = false;  // set once an operator gave a policy: keep a PENDING version
  // Stores shared between replicas (PostgreSQL): incremented by every commit that changes the
  // ring or its versions, so a writer can make its change conditional on what it read. Always
  // 0 in the embedded SQLite store (one process writes it).
  uint64_t generation = 0;
  // Manual rotation (without force) promotes only a PENDING version that has a certificate.
  bool require_certificate = false;
  TagCheck tag_check = TagCheck::kUnchecked;  // set by the store's read; not stored
};

struct VersionRecord {
  std::string ring;
  uint32_t version = 0;
  std::string object_id;     // CKA_ID, lowercase hex
  std::string object_label;  // CKA_LABEL
  std::string kid;           // empty while CREATING
  std::string public_jwk;    // JSON; empty while CREATING
  VersionState state = VersionState::kCreating;
  // Unix milliseconds; 0 = not (yet).
  int64_t create_time = 0;
  int64_t activate_time = 0;
  int64_t publish_time = 0;
  int64_t retire_time = 0;
  int64_t destroy_after = 0;
  int64_t destroy_time = 0;
  // DISABLED / DESTROY_SCHEDULED: the state before; kCreating when not applicable.
  VersionState previous_state = VersionState::kCreating;
  bool compromised = false;
  // X.509 chain of the version's key (PEM, leaf first; checked against the key when set); "" =
  // none.
  std::string certificate_chain;
  TagCheck tag_check = TagCheck::kUnchecked;  // set by the store's read; not stored
};

// Published in JWKS: PENDING, ACTIVE and RETIRED. Decrypts: the same.
bool IsPublishedState(VersionState state);

// Label prefix of every token object custody creates; objects with it and no metadata are
// reported as orphans.
inline constexpr absl::string_view kObjectLabelPrefix = "custody/";

// Ring names: 1..8 segments separated by '/', each 1..64 characters from [a-z0-9._-] starting
// with a letter or digit; at most 200 characters. INVALID_ARGUMENT says which rule failed.
absl::Status ValidateRingName(absl::string_view name);

}  // namespace custody::rotation

#endif  // CUSTODY_ROTATION_KEY_RING_H_
