// Version creation (server/keys/key_creation.cc) and its reconciliation at startup
// (server/keys/key_service.cc) over software keys and a store that can be made to fail: a durable
// CREATING intent comes before the key, a failed creation leaves neither intent nor key, and an
// intent a crash left behind is completed when its key pair exists and rolled back when it does
// not — except, on a shared store, while it is young enough to be another replica's creation in
// flight (timed on the fake clock).
#include "absl/strings/escaping.h"
#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"
#include "rotation/testing/records.h"
#include "server/keys/testing/key_service_fixture.h"

namespace custody::server {
namespace {

using custody::testing::IsOk;
using custody::testing::StatusIs;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using testing::KeyServiceFixture;

class VersionCreationTest : public KeyServiceFixture {
 protected:
  // The versions the database holds for `ring`, read past any KeyService.
  std::vector<rotation::VersionRecord> StoredVersions(const std::string& ring) {
    std::vector<rotation::VersionRecord> out;
    rotation::MetadataStore* store = OpenStore(/*shared=*/false);
    if (store == nullptr) return out;
    auto versions = store->LoadVersions();
    EXPECT_TRUE(versions.ok()) << versions.status();
    if (!versions.ok()) return out;
    for (rotation::VersionRecord& v : *versions) {
      if (v.ring == ring) out.push_back(std::move(v));
    }
    return out;
  }
  // What a crash between the durable intent and the end of key generation leaves: a CREATING
  // row for version 3 of `ring` (written now on the clock), and the key pair when `with_key`.
  void LeaveIntent(const std::string& ring, bool with_key) {
    rotation::VersionRecord intent =
        rotation::testing::Version(ring, 3, absl::BytesToHexString("crashed-v3"));
    intent.create_time = clock_.NowMs();
    rotation::MetadataStore* store = OpenStore(/*shared=*/false);
    ASSERT_NE(store, nullptr);
    ASSERT_THAT(store->InsertVersion(intent), IsOk());
    if (with_key) {
      ASSERT_THAT(token_
                      .GenerateKeyPair({pkcs11::KeyType::kEcP256, 0}, "crashed-v3",
                                       intent.object_label, false)
                      .status(),
                  IsOk());
    }
  }
  // Ring "as" made by one KeyService, which then stops as a crash would stop it after the
  // durable intent of version 3 (LeaveIntent); the clock moves on by `later` and a new
  // KeyService starts over the same store and token.
  absl::StatusOr<KeyService*> CrashAfterIntentAndRestart(
      const KeyService::Options& options, bool with_key,
      absl::Duration later = absl::ZeroDuration()) {
    auto first = Start(options);
    if (!first.ok()) return first.status();
    if (auto ring = CreateRing(**first, "as", DailyPolicy()); !ring.ok()) return ring.status();
    Stop();
    LeaveIntent("as", with_key);
    clock_.Advance(later);
    return Start(options);
  }
};

TEST_F(VersionCreationTest, ATokenThatCannotGenerateLeavesNoIntentNoKeyAndTheNameFree) {
  auto service = Start(Options());
  ASSERT_THAT(service.status(), IsOk());
  token_.FailGeneration(absl::UnavailableError("C_GenerateKeyPair: CKR_DEVICE_ERROR"));
  EXPECT_THAT(CreateRing(**service, "as", DailyPolicy()).status(),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("CKR_DEVICE_ERROR")));
  EXPECT_THAT(StoredVersions("as"), IsEmpty());
  EXPECT_THAT(token_.Ids(), IsEmpty());
  // Nothing is half made: the same request succeeds once the token is back.
  ASSERT_THAT(CreateRing(**service, "as", DailyPolicy()).status(), IsOk());
  EXPECT_EQ(SignAndVerify(**service, "as").value_or(0), 1u);
  EXPECT_EQ(token_.Ids().size(), 2u);  // ACTIVE and PENDING
}

TEST_F(VersionCreationTest, TheIntentIsDurableBeforeTheKeyAndNamesItsObject) {
  auto service = Start(Options());
  ASSERT_THAT(service.status(), IsOk());
  ASSERT_THAT(CreateRing(**service, "as", DailyPolicy()).status(), IsOk());
  const std::vector<rotation::VersionRecord> stored = StoredVersions("as");
  ASSERT_EQ(stored.size(), 2u);
  for (const rotation::VersionRecord& v : stored) {
    EXPECT_TRUE(token_.Holds(absl::HexStringToBytes(v.object_id))) << v.version;
    EXPECT_FALSE(v.kid.empty());
    EXPECT_EQ(v.create_time, clock_.NowMs());
  }
}

TEST_F(VersionCreationTest, AnIntentWhoseKeyExistsIsCompletedAtTheNextStart) {
  auto service = CrashAfterIntentAndRestart(Options(), /*with_key=*/true);
  ASSERT_THAT(service.status(), IsOk());
  EXPECT_EQ(StateOf(**service, "as", 3), v1::PENDING);  // ACTIVE exists: published, not signing
  EXPECT_FALSE(VersionOf(**service, "as", 3).kid().empty());
  EXPECT_TRUE(token_.Holds("crashed-v3"));
}

TEST_F(VersionCreationTest, AnIntentWithoutItsKeyIsRolledBackAtTheNextStart) {
  auto service = CrashAfterIntentAndRestart(Options(), /*with_key=*/false);
  ASSERT_THAT(service.status(), IsOk());
  EXPECT_EQ(StateOf(**service, "as", 3), v1::KEY_VERSION_STATE_UNSPECIFIED);
  EXPECT_EQ(StoredVersions("as").size(), 2u);
  EXPECT_EQ(SignAndVerify(**service, "as").value_or(0), 1u);
}

TEST_F(VersionCreationTest, OnASharedStoreAYoungIntentIsLeftToTheReplicaMakingIt) {
  KeyService::Options shared = Options();
  shared.shared_store = true;
  // Nine minutes after the intent: another replica may be generating that key right now.
  ASSERT_THAT(CrashAfterIntentAndRestart(shared, /*with_key=*/false, absl::Minutes(9)).status(),
              IsOk());
  EXPECT_EQ(StoredVersions("as").size(), 3u);  // left alone
  Stop();

  clock_.Advance(absl::Minutes(2));  // ten minutes on: that creation was abandoned
  ASSERT_THAT(Start(shared).status(), IsOk());
  EXPECT_EQ(StoredVersions("as").size(), 2u);
}

}  // namespace
}  // namespace custody::server
