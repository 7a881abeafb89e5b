#include "rotation/key_ring.h"

#include <string>

#include "gtest/gtest.h"

namespace custody::rotation {
namespace {

TEST(RingNameTest, AcceptsDocumentedExamples) {
  EXPECT_TRUE(ValidateRingName("op/id-token").ok());
  EXPECT_TRUE(ValidateRingName("clients/acme/private-key-jwt").ok());
  EXPECT_TRUE(ValidateRingName("a").ok());
  EXPECT_TRUE(ValidateRingName("op/v1.2_x").ok());
}

TEST(RingNameTest, RejectsMalformedNamesWithReason) {
  struct Case {
    std::string name;
    std::string reason;
  };
  for (const Case& c : std::vector<Case>{
           {"", "empty"},
           {"/op", "empty segment"},
           {"op/", "empty segment"},
           {"op//x", "empty segment"},
           {"op/../x", "'.' or '..'"},
           {"Op/x", "lowercase"},
           {"op/x y", "lowercase"},
           {"op/-x", "must start"},
           {std::string(201, 'a'), "limit is 200"},
           {"a/b/c/d/e/f/g/h/i", "limit is 8"},
           {std::string(65, 'a'), "longer than 64"},
       }) {
    absl::Status s = ValidateRingName(c.name);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.name;
    EXPECT_NE(s.message().find(c.reason), std::string::npos) << c.name << ": " << s.message();
  }
}

TEST(VersionStateTest, NamesRoundTrip) {
  for (VersionState s : {VersionState::kCreating, VersionState::kPending, VersionState::kActive,
                         VersionState::kRetired, VersionState::kDisabled,
                         VersionState::kDestroyScheduled, VersionState::kDestroyed}) {
    auto parsed = ParseVersionState(VersionStateName(s));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, s);
  }
  EXPECT_FALSE(ParseVersionState("BOGUS").ok());
}

TEST(PolicyFloorsTest, RefusesEachFieldBelowItsFloorNamingTheFieldAndTheFlag) {
  const PolicyFloors floors;  // the defaults: 24 h, 1 h, 1 h
  RotationPolicy p;           // the documented default policy passes
  EXPECT_TRUE(CheckPolicyFloors(p, floors).ok());
  p.destroy_delay_ms = 0;
  absl::Status s = CheckPolicyFloors(p, floors);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "destroy_delay 0s is below --min_destroy_delay=24h");
  p = RotationPolicy();
  p.retain_ms = 1000;
  p.prepublish_ms = 0;
  EXPECT_EQ(CheckPolicyFloors(p, floors).message(), "retain 1s is below --min_retain=1h");
  p = RotationPolicy();
  p.rotation_period_ms = 1;
  EXPECT_EQ(CheckPolicyFloors(p, floors).message(),
            "rotation_period 1ms is below --min_rotation_period=1h (0 = manual rotation only)");
  p.rotation_period_ms = 0;  // manual rotation is never below a floor
  EXPECT_TRUE(CheckPolicyFloors(p, floors).ok());
  // Floors lowered by the operator (as tests do with the flags) let short policies through.
  EXPECT_TRUE(CheckPolicyFloors({0, 1000, 0, 0}, PolicyFloors{0, 0, 0}).ok());
}

TEST(PolicyFloorsTest, RaisesAStoredPolicyToTheFloorsAndKeepsItValid) {
  bool raised = false;
  RotationPolicy p = RaiseToFloors({2 * 3600 * 1000, 1, 0, 0}, PolicyFloors(), &raised);
  EXPECT_TRUE(raised);
  EXPECT_EQ(p.destroy_delay_ms, 24 * 3600 * 1000);
  EXPECT_EQ(p.rotation_period_ms, 2 * 3600 * 1000);  // to 1 h, then to prepublish (2 h)
  EXPECT_GE(p.retain_ms, p.prepublish_ms);
  EXPECT_TRUE(ValidatePolicy(p).ok());
  RaiseToFloors(RotationPolicy(), PolicyFloors(), &raised);
  EXPECT_FALSE(raised);
}

}  // namespace
}  // namespace custody::rotation
