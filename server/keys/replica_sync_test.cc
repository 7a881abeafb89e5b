// The replica follower (server/keys/replica_sync.cc) on a fake clock: two KeyService instances over
// one metadata database and one (software) token, as two custodyd replicas over PostgreSQL and
// one HSM. What one commits reaches the other at its next re-read; a replica that cannot read
// the store refuses to sign once the staleness bound has passed on the clock, and serves again
// after a good read.
#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"
#include "server/keys/testing/key_service_fixture.h"

namespace custody::server {
namespace {

using custody::testing::IsOk;
using custody::testing::StatusIs;
using testing::FailableStore;
using ::testing::HasSubstr;
using testing::KeyServiceFixture;

class ReplicaFollowerTest : public KeyServiceFixture {
 protected:
  void SetUp() override {
    KeyServiceFixture::SetUp();
    KeyService::Options options = Options();
    options.shared_store = true;
    options.max_staleness = absl::Seconds(30);
    auto a = Start(options);
    ASSERT_THAT(a.status(), IsOk());
    a_ = *a;
    b_store_ = OpenStore(/*shared=*/true);
    auto b = Start(options, b_store_);
    ASSERT_THAT(b.status(), IsOk());
    b_ = *b;
  }

  KeyService* a_ = nullptr;
  KeyService* b_ = nullptr;
  FailableStore* b_store_ = nullptr;
};

TEST_F(ReplicaFollowerTest, ARingAndItsRotationReachTheOtherReplicaAtItsNextRead) {
  ASSERT_THAT(CreateRing(*a_, "as", DailyPolicy()).status(), IsOk());
  EXPECT_THAT(b_->GetKeyRing("as").status(), StatusIs(absl::StatusCode::kNotFound));
  const uint64_t generation = b_->JwksGeneration();

  ASSERT_THAT(b_->Refresh(), IsOk());
  EXPECT_EQ(SignAndVerify(*b_, "as").value_or(0), 1u);  // the key resolved in the token by id
  EXPECT_GT(b_->JwksGeneration(), generation);          // watchers are woken
  auto jwks = b_->GetJwks({"as"});
  ASSERT_THAT(jwks.status(), IsOk());
  EXPECT_THAT(*jwks->json, HasSubstr(VersionOf(*a_, "as", 1).kid()));

  v1::RotateKeyRingRequest rotate;
  rotate.set_ring("as");
  rotate.set_force(true);
  ASSERT_THAT(a_->RotateKeyRing(rotate).status(), IsOk());
  EXPECT_EQ(SignAndVerify(*b_, "as").value_or(0), 1u);  // not re-read yet
  ASSERT_THAT(b_->Refresh(), IsOk());
  EXPECT_EQ(SignAndVerify(*b_, "as").value_or(0), 2u);
  EXPECT_EQ(StateOf(*b_, "as", 1), v1::RETIRED);
}

TEST_F(ReplicaFollowerTest, AnUnreadableStoreRefusesSigningOnlyPastTheStalenessBound) {
  ASSERT_THAT(CreateRing(*a_, "as", DailyPolicy()).status(), IsOk());
  ASSERT_THAT(b_->Refresh(), IsOk());

  b_store_->failing = true;
  EXPECT_THAT(b_->Refresh(), StatusIs(absl::StatusCode::kUnavailable));
  clock_.Advance(absl::Seconds(29));  // a failed read does not count; the bound is not reached
  EXPECT_THAT(b_->CheckMetadataFresh(), IsOk());
  EXPECT_EQ(SignAndVerify(*b_, "as").value_or(0), 1u);

  clock_.Advance(absl::Seconds(2));
  EXPECT_THAT(b_->CheckMetadataFresh(),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("metadata unreachable for 31 s")));
  EXPECT_THAT(SignAndVerify(*b_, "as"), StatusIs(absl::StatusCode::kUnavailable));
  // A wall clock stepped back does not make the last read recent again: 31 s have passed.
  clock_.StepWall(-absl::Minutes(1));
  EXPECT_THAT(b_->CheckMetadataFresh(),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("metadata unreachable for 31 s")));
  ASSERT_THAT(a_->Refresh(), IsOk());  // the other replica reads its store: it signs
  EXPECT_EQ(SignAndVerify(*a_, "as").value_or(0), 1u);

  b_store_->failing = false;
  ASSERT_THAT(b_->Refresh(), IsOk());
  EXPECT_THAT(b_->CheckMetadataFresh(), IsOk());
  EXPECT_EQ(SignAndVerify(*b_, "as").value_or(0), 1u);
}

TEST_F(ReplicaFollowerTest, ARetiredKeyOutlivesRetainByTheOtherReplicasStalenessBound) {
  ASSERT_THAT(CreateRing(*a_, "as", DailyPolicy()).status(), IsOk());
  clock_.Advance(kDay + absl::Minutes(1));
  a_->RunDueTransitions();  // rotation: version 1 retires now
  ASSERT_EQ(StateOf(*a_, "as", 1), v1::RETIRED);

  // Another replica that missed the retirement may sign with version 1 until its own staleness
  // bound: retention counts from there, not from the retire time alone.
  clock_.Advance(2 * kHour + absl::Seconds(10));
  a_->RunDueTransitions();
  EXPECT_EQ(StateOf(*a_, "as", 1), v1::RETIRED);
  clock_.Advance(absl::Seconds(21));
  a_->RunDueTransitions();
  EXPECT_EQ(StateOf(*a_, "as", 1), v1::DESTROY_SCHEDULED);
}

}  // namespace
}  // namespace custody::server
