#include "rotation/lifecycle.h"

#include "gtest/gtest.h"

namespace custody::rotation {
namespace {

RingRecord Ring(int64_t prepublish, int64_t period, int64_t retain, bool explicit_policy = true) {
  RingRecord r;
  r.name = "op/id";
  r.policy = {prepublish, period, retain, 500};
  r.policy_explicit = explicit_policy;
  return r;
}

VersionRecord V(uint32_t n, VersionState state, int64_t publish, int64_t activate = 0,
                int64_t retire = 0, int64_t destroy_after = 0) {
  VersionRecord v;
  v.ring = "op/id";
  v.version = n;
  v.state = state;
  v.publish_time = publish;
  v.activate_time = activate;
  v.retire_time = retire;
  v.destroy_after = destroy_after;
  return v;
}

bool Has(const Plan& plan, ActionKind kind, uint32_t version = 0) {
  for (const Action& a : plan.due) {
    if (a.kind == kind && (version == 0 || a.version == version)) return true;
  }
  return false;
}

TEST(PlanRingTest, ExplicitPolicyWithoutPendingCreatesOne) {
  Plan plan = PlanRing(Ring(100, 0, 200), {V(1, VersionState::kActive, 0, 0)}, 1000);
  EXPECT_TRUE(Has(plan, ActionKind::kCreatePending));
  EXPECT_FALSE(
      PlanRing(Ring(100, 0, 200, false), {V(1, VersionState::kActive, 0, 0)}, 1000).due.size());
}

TEST(PlanRingTest, CreatingVersionCountsAsPending) {
  Plan plan = PlanRing(Ring(100, 0, 200),
                       {V(1, VersionState::kActive, 0, 0), V(2, VersionState::kCreating, 0)}, 10);
  EXPECT_FALSE(Has(plan, ActionKind::kCreatePending));
}

TEST(PlanRingTest, RotationWaitsForBothPeriodAndPrepublish) {
  // Active since 0, period 1000; pending published at 950 with prepublish 100: due at 1050.
  std::vector<VersionRecord> vs = {V(1, VersionState::kActive, 0, 0),
                                   V(2, VersionState::kPending, 950)};
  Plan early = PlanRing(Ring(100, 1000, 200), vs, 1000);
  EXPECT_FALSE(Has(early, ActionKind::kRotate));
  EXPECT_EQ(early.next_due_ms, 1050);
  Plan due = PlanRing(Ring(100, 1000, 200), vs, 1050);
  ASSERT_TRUE(Has(due, ActionKind::kRotate, 2));
}

TEST(PlanRingTest, DowntimeOfThreePeriodsRotatesOnceAndCountsMissedPeriods) {
  std::vector<VersionRecord> vs = {V(1, VersionState::kActive, 0, 0),
                                   V(2, VersionState::kPending, 10)};
  Plan plan = PlanRing(Ring(100, 1000, 200), vs, 3500);
  int rotations = 0;
  for (const Action& a : plan.due) {
    if (a.kind == ActionKind::kRotate) {
      ++rotations;
      EXPECT_EQ(a.missed_periods, 3);
    }
  }
  EXPECT_EQ(rotations, 1);
}

TEST(PlanRingTest, RetiredVersionsAreUnpublishedAfterRetainAndDestroyedAfterDelay) {
  std::vector<VersionRecord> vs = {
      V(1, VersionState::kRetired, 0, 0, 1000), V(2, VersionState::kActive, 500, 1000),
      V(3, VersionState::kPending, 1000), V(4, VersionState::kDestroyScheduled, 0, 0, 0, 3000),
      V(5, VersionState::kDestroying, 0)};
  Plan before = PlanRing(Ring(100, 0, 200), vs, 1100);
  EXPECT_FALSE(Has(before, ActionKind::kScheduleDestruction));
  EXPECT_TRUE(Has(before, ActionKind::kDestroy, 5)) << "an interrupted destruction resumes";
  EXPECT_FALSE(Has(before, ActionKind::kDestroy, 4));
  EXPECT_EQ(before.next_due_ms, 1200);
  Plan after = PlanRing(Ring(100, 0, 200), vs, 3000);
  EXPECT_TRUE(Has(after, ActionKind::kScheduleDestruction, 1));
  EXPECT_TRUE(Has(after, ActionKind::kDestroy, 4));
}

TEST(PolicyTest, RetainShorterThanPrepublishIsRefusedWithTheReason) {
  absl::Status s = ValidatePolicy({1000, 0, 500, 0});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("retain"), absl::string_view::npos);
  EXPECT_NE(s.message().find("prepublish"), absl::string_view::npos);
  EXPECT_EQ(ValidatePolicy({1000, 500, 2000, 0}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidatePolicy({-1, 0, 0, 0}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(ValidatePolicy({1000, 1000, 1000, 0}).ok());
  EXPECT_TRUE(ValidatePolicy(RotationPolicy{}).ok()) << "the defaults are valid";
}

}  // namespace
}  // namespace custody::rotation
