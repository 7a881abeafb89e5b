// PinnedVersionMaySign: which version a Sign request pinned to a version may sign with.
#include "server/keys/raw_signature.h"

#include "gtest/gtest.h"

namespace custody::server {
namespace {

using rotation::VersionRecord;
using rotation::VersionState;

constexpr int64_t kNow = 1'800'000'000'000;
const absl::Duration kGrace = absl::Seconds(30);

VersionRecord Version(uint32_t version, VersionState state, int64_t retire_time = 0) {
  VersionRecord v;
  v.version = version;
  v.state = state;
  v.retire_time = retire_time;
  return v;
}

TEST(PinnedVersionMaySignTest, TheActiveVersionSigns) {
  VersionRecord active = Version(2, VersionState::kActive);
  EXPECT_TRUE(PinnedVersionMaySign("op/tls", 2, &active, 2, kNow, kGrace).ok());
}

TEST(PinnedVersionMaySignTest, ARetiredVersionSignsOnlyWithinTheGraceAfterItsRotation) {
  VersionRecord just = Version(1, VersionState::kRetired, kNow - 30'000);
  EXPECT_TRUE(PinnedVersionMaySign("op/tls", 1, &just, 2, kNow, kGrace).ok());
  VersionRecord late = Version(1, VersionState::kRetired, kNow - 30'001);
  absl::Status s = PinnedVersionMaySign("op/tls", 1, &late, 2, kNow, kGrace);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.message(),
            "version 1 of ring 'op/tls' does not sign: only the ACTIVE version (2) does, and a "
            "RETIRED one only for 30000 ms after its rotation; reload the key (and its "
            "certificate)");
  // No grace configured: the old version stops at the rotation.
  EXPECT_FALSE(PinnedVersionMaySign("op/tls", 1, &just, 2, kNow, absl::ZeroDuration()).ok());
}

TEST(PinnedVersionMaySignTest, CompromisedPendingDisabledOrMissingVersionsNeverSign) {
  VersionRecord compromised = Version(1, VersionState::kRetired, kNow - 1);
  compromised.compromised = true;
  EXPECT_FALSE(PinnedVersionMaySign("op/tls", 1, &compromised, 2, kNow, kGrace).ok());
  for (VersionState state : {VersionState::kPending, VersionState::kDisabled,
                             VersionState::kDestroyScheduled, VersionState::kDestroyed}) {
    VersionRecord v = Version(3, state, kNow - 1);
    absl::Status s = PinnedVersionMaySign("op/tls", 3, &v, 2, kNow, kGrace);
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << rotation::VersionStateName(state);
  }
  absl::Status missing = PinnedVersionMaySign("op/tls", 9, nullptr, 2, kNow, kGrace);
  EXPECT_EQ(missing.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(missing.message().find("version 9 of ring 'op/tls' does not sign"), std::string::npos);
}

}  // namespace
}  // namespace custody::server
