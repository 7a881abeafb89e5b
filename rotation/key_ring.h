// Key rings and key versions as stored in the metadata store, and the ring-name syntax.
//
// A key ring is a named sequence of key versions with one purpose and one algorithm. Versions
// move through the lifecycle states of shared/DESIGN.md; CREATING marks a version whose key
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
};

absl::string_view PurposeName(Purpose purpose);  // "SIGN" | "DECRYPT"
absl::StatusOr<Purpose> ParsePurpose(absl::string_view name);
absl::string_view VersionStateName(VersionState state);  // "ACTIVE", ...
absl::StatusOr<VersionState> ParseVersionState(absl::string_view name);

struct RingRecord {
  std::string name;
  Purpose purpose = Purpose::kSign;
  std::string alg;
  int rsa_bits = 0;
  bool allow_non_fapi = false;
  int64_t create_time = 0;  // Unix seconds
  std::string curve;        // ECDH-ES* decryption rings: "P-256", "P-384" or "P-521"
  int64_t zip_max_bytes = 0;  // decryption rings: 0 = JWE "zip" refused
};

struct VersionRecord {
  std::string ring;
  uint32_t version = 0;
  std::string object_id;     // CKA_ID, lowercase hex
  std::string object_label;  // CKA_LABEL
  std::string kid;           // empty while CREATING
  std::string public_jwk;    // JSON; empty while CREATING
  VersionState state = VersionState::kCreating;
  int64_t create_time = 0;
  int64_t activate_time = 0;
};

// Label prefix of every token object custody creates; objects with it and no metadata are
// reported as orphans.
inline constexpr absl::string_view kObjectLabelPrefix = "custody/";

// Ring names: 1..8 segments separated by '/', each 1..64 characters from [a-z0-9._-] starting
// with a letter or digit; at most 200 characters. INVALID_ARGUMENT says which rule failed.
absl::Status ValidateRingName(absl::string_view name);

}  // namespace custody::rotation

#endif  // CUSTODY_ROTATION_KEY_RING_H_
