// The lifecycle scheduler's rules (server/keys/key_scheduler.cc) on a fake clock and software keys:
// rotation when the period ends and not before, retention of the retired version, destruction
// after the delay and only then, and recovery from a token that fails. Each test runs in
// milliseconds: the clock is moved, never waited for.
#include "absl/strings/escaping.h"
#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"
#include "server/keys/testing/key_service_fixture.h"

namespace custody::server {
namespace {

using custody::testing::IsOk;
using custody::testing::StatusIs;
using testing::KeyServiceFixture;

class LifecycleSchedulerTest : public KeyServiceFixture {
 protected:
  void SetUp() override {
    KeyServiceFixture::SetUp();
    auto service = Start(Options());
    ASSERT_THAT(service.status(), IsOk());
    service_ = *service;
    ASSERT_THAT(CreateRing(*service_, "as", DailyPolicy()).status(), IsOk());
  }
  // Moves the clock, then runs the scheduler's step once, as its thread would at that time.
  void At(absl::Duration later) {
    clock_.Advance(later);
    service_->RunDueTransitions();
  }

  KeyService* service_ = nullptr;
};

TEST_F(LifecycleSchedulerTest, RotatesWhenThePeriodEndsAndNotAMinuteBefore) {
  ASSERT_EQ(StateOf(*service_, "as", 1), v1::ACTIVE);
  ASSERT_EQ(StateOf(*service_, "as", 2), v1::PENDING);
  EXPECT_THAT(SignAndVerify(*service_, "as"), IsOk());

  At(kDay - absl::Minutes(1));
  EXPECT_EQ(StateOf(*service_, "as", 1), v1::ACTIVE);
  EXPECT_EQ(StateOf(*service_, "as", 2), v1::PENDING);
  EXPECT_EQ(SignAndVerify(*service_, "as").value_or(0), 1u);

  At(absl::Minutes(2));
  EXPECT_EQ(StateOf(*service_, "as", 1), v1::RETIRED);
  EXPECT_EQ(StateOf(*service_, "as", 2), v1::ACTIVE);
  EXPECT_EQ(StateOf(*service_, "as", 3), v1::PENDING);  // the next one, pre-published at once
  EXPECT_EQ(SignAndVerify(*service_, "as").value_or(0), 2u);
}

TEST_F(LifecycleSchedulerTest, MissedPeriodsRotateOnceAndTheNextPeriodStartsThen) {
  At(5 * kDay + 12 * kHour);  // a scheduler that did not run for five and a half periods
  EXPECT_EQ(StateOf(*service_, "as", 2), v1::ACTIVE);
  EXPECT_EQ(StateOf(*service_, "as", 3), v1::PENDING);
  EXPECT_EQ(StateOf(*service_, "as", 4), v1::KEY_VERSION_STATE_UNSPECIFIED);  // rotated once

  // The next rotation is a whole period after this one, not at the old schedule's 6 days.
  At(12 * kHour + absl::Minutes(1));
  EXPECT_EQ(StateOf(*service_, "as", 2), v1::ACTIVE);
  At(12 * kHour);
  EXPECT_EQ(StateOf(*service_, "as", 3), v1::ACTIVE);
}

TEST_F(LifecycleSchedulerTest, RetiredKeyStaysUsableForRetainAndIsDestroyedOnlyAfterTheDelay) {
  const std::string v1_object = ObjectIdOf(*service_, "as", 1);
  ASSERT_FALSE(v1_object.empty());
  At(kDay + absl::Minutes(1));  // rotation: version 1 retires now
  ASSERT_EQ(StateOf(*service_, "as", 1), v1::RETIRED);

  At(2 * kHour - absl::Minutes(2));  // within retain: still published, still in the token
  EXPECT_EQ(StateOf(*service_, "as", 1), v1::RETIRED);

  At(absl::Minutes(3));  // retain over: unpublished and scheduled, the key still in the token
  EXPECT_EQ(StateOf(*service_, "as", 1), v1::DESTROY_SCHEDULED);
  EXPECT_TRUE(token_.Holds(absl::HexStringToBytes(v1_object)));

  At(kDay - absl::Minutes(2));  // within the destroy delay: cancellable, so still there
  EXPECT_EQ(StateOf(*service_, "as", 1), v1::DESTROY_SCHEDULED);
  EXPECT_TRUE(token_.Holds(absl::HexStringToBytes(v1_object)));

  At(absl::Minutes(3));
  EXPECT_EQ(StateOf(*service_, "as", 1), v1::DESTROYED);
  EXPECT_FALSE(token_.Holds(absl::HexStringToBytes(v1_object)));
  // The ACTIVE key is untouched (version 2, or 3 after the second day's rotation).
  EXPECT_GE(SignAndVerify(*service_, "as").value_or(0), 2u);
}

TEST_F(LifecycleSchedulerTest, RetentionAfterTheLastSignatureIsRealTimeWhenTheWallClockJumps) {
  At(kDay - absl::Minutes(1));
  ASSERT_EQ(SignAndVerify(*service_, "as").value_or(0), 1u);  // version 1's last signature
  At(absl::Minutes(2));                                       // rotation: version 1 retires
  ASSERT_EQ(StateOf(*service_, "as", 1), v1::RETIRED);

  // The wall clock is stepped an hour forward (NTP, a resumed VM) without an hour passing. Two
  // hours of wall time after the retirement, but not two hours after the last signature:
  // tokens it made may still be checked, so the key stays published.
  clock_.StepWall(kHour);
  At(kHour + absl::Minutes(5));  // 2 h 5 min by the wall clock, 1 h 7 min of real time
  EXPECT_EQ(StateOf(*service_, "as", 1), v1::RETIRED);
  At(absl::Minutes(50));  // 1 h 57 min of real time
  EXPECT_EQ(StateOf(*service_, "as", 1), v1::RETIRED);

  // Two hours of real time after the last signature: retain is over.
  At(absl::Minutes(5));
  EXPECT_EQ(StateOf(*service_, "as", 1), v1::DESTROY_SCHEDULED);
}

TEST_F(LifecycleSchedulerTest, RetentionIsRealTimeWhenTheWallClockJumpsAndNothingWasSigned) {
  // No signature anchors this retirement (as on a DECRYPT ring, whose senders encrypt to the
  // published key until they refetch the JWKS): retention runs from the retirement itself.
  At(kDay + absl::Minutes(1));  // rotation: version 1 retires
  ASSERT_EQ(StateOf(*service_, "as", 1), v1::RETIRED);

  clock_.StepWall(kHour);        // an hour forward without an hour passing
  At(kHour + absl::Minutes(5));  // 2 h 5 min by the wall clock, 1 h 5 min of real time
  EXPECT_EQ(StateOf(*service_, "as", 1), v1::RETIRED);
  At(absl::Minutes(50));  // 1 h 55 min of real time
  EXPECT_EQ(StateOf(*service_, "as", 1), v1::RETIRED);

  At(absl::Minutes(6));  // two hours of real time: retain is over
  EXPECT_EQ(StateOf(*service_, "as", 1), v1::DESTROY_SCHEDULED);
}

TEST_F(LifecycleSchedulerTest, AWallClockSteppedBackKeepsRetentionFromTheStoredRetireTime) {
  At(kDay + absl::Minutes(1));
  ASSERT_EQ(StateOf(*service_, "as", 1), v1::RETIRED);
  clock_.StepWall(-kHour);  // back an hour: by the wall clock, less time has passed
  At(2 * kHour - absl::Minutes(1));
  EXPECT_EQ(StateOf(*service_, "as", 1), v1::RETIRED);
  At(kHour + absl::Minutes(2));  // the wall clock's two hours after retire_time
  EXPECT_EQ(StateOf(*service_, "as", 1), v1::DESTROY_SCHEDULED);
}

TEST_F(LifecycleSchedulerTest, AFailedDestructionIsRetriedAndTheStateSaysSoMeanwhile) {
  const std::string v1_object = absl::HexStringToBytes(ObjectIdOf(*service_, "as", 1));
  At(kDay + absl::Minutes(1));
  At(2 * kHour + absl::Minutes(1));
  ASSERT_EQ(StateOf(*service_, "as", 1), v1::DESTROY_SCHEDULED);

  token_.FailDestruction(absl::UnavailableError("C_DestroyObject: CKR_DEVICE_ERROR"));
  clock_.Advance(kDay);
  const int64_t retry_at = service_->RunDueTransitions();
  // Durable intent first: the version is DESTROYING (never back to usable), the key still there.
  EXPECT_EQ(StateOf(*service_, "as", 1), v1::DESTROYING);
  EXPECT_TRUE(token_.Holds(v1_object));
  EXPECT_GT(retry_at, clock_.NowMs());              // backs off instead of spinning
  EXPECT_LE(retry_at, clock_.NowMs() + 60 * 1000);  // and retries soon

  clock_.Advance(absl::Milliseconds(retry_at - clock_.NowMs()));
  service_->RunDueTransitions();
  EXPECT_EQ(StateOf(*service_, "as", 1), v1::DESTROYED);
  EXPECT_FALSE(token_.Holds(v1_object));
}

TEST_F(LifecycleSchedulerTest, APendingVersionTheTokenFailedToMakeIsMadeByALaterStep) {
  token_.FailGeneration(absl::UnavailableError("C_GenerateKeyPair: CKR_DEVICE_ERROR"));
  At(kDay + absl::Minutes(1));
  // The rotation itself is committed; only the next PENDING version is missing.
  EXPECT_EQ(StateOf(*service_, "as", 2), v1::ACTIVE);
  EXPECT_EQ(StateOf(*service_, "as", 3), v1::KEY_VERSION_STATE_UNSPECIFIED);

  At(absl::Seconds(10));
  EXPECT_EQ(StateOf(*service_, "as", 3), v1::PENDING);
}

TEST_F(LifecycleSchedulerTest, ManualRingsAreNeverRotatedByTheClock) {
  v1::RotationPolicy manual = DailyPolicy();
  manual.set_rotation_period_ms(0);
  ASSERT_THAT(CreateRing(*service_, "manual", manual).status(), IsOk());
  At(400 * kDay);
  EXPECT_EQ(StateOf(*service_, "manual", 1), v1::ACTIVE);
  EXPECT_THAT(service_->GetKeyRing("missing").status(), StatusIs(absl::StatusCode::kNotFound));
}

}  // namespace
}  // namespace custody::server
