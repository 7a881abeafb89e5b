// Test-only: KeyService over its narrow dependencies, for unit tests of the logic it owns (the
// scheduler, the replica follower, version creation) that run in milliseconds: a FakeClock the
// test moves, SoftwareKeyOperations instead of a token, and the real SQLite metadata store in a
// temporary directory (a store that can be made to fail, for the follower). Integration tests
// run custodyd on real tokens instead (tests/).
#ifndef CUSTODY_SERVER_KEYS_TESTING_KEY_SERVICE_FIXTURE_H_
#define CUSTODY_SERVER_KEYS_TESTING_KEY_SERVICE_FIXTURE_H_

#include <stdlib.h>

#include <atomic>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/testing/fake_clock.h"
#include "gtest/gtest.h"
#include "jose/json.h"
#include "jose/jwk.h"
#include "jose/jws.h"
#include "rotation/sqlite_metadata_store.h"
#include "server/keys/key_service.h"
#include "server/keys/testing/software_key_operations.h"

namespace custody::server::testing {

// What PostgreSQL's ring generations are to replicas, modelled over SQLite (which keeps them at
// 0): one counter per ring shared by every FailableStore of a test, checked against a mutation's
// expect_generations (ABORTED when stale) and incremented by each commit that touches the ring.
struct SharedGenerations {
  absl::Mutex mu;
  std::map<std::string, uint64_t> by_ring ABSL_GUARDED_BY(mu);
};

// A MetadataStore that forwards to another and fails every call while `failing` is set
// (UNAVAILABLE, as an unreachable PostgreSQL answers); with `generations`, rings carry shared
// generations as a store shared between replicas does.
class FailableStore final : public rotation::MetadataStore {
 public:
  FailableStore(std::unique_ptr<rotation::MetadataStore> store, SharedGenerations* generations)
      : store_(std::move(store)), generations_(generations) {}
  std::atomic<bool> failing{false};

  absl::Status Commit(const rotation::Mutation& mutation) override {
    if (failing) return Unreachable();
    if (generations_ == nullptr) return store_->Commit(mutation);
    absl::MutexLock lock(&generations_->mu);
    for (const auto& [ring, generation] : mutation.expect_generations) {
      if (generations_->by_ring[ring] != generation) {
        return absl::AbortedError("ring changed by another replica (test)");
      }
    }
    if (absl::Status s = store_->Commit(mutation); !s.ok()) return s;
    std::set<std::string> touched;
    for (const auto& r : mutation.insert_rings) touched.insert(r.name);
    for (const auto& r : mutation.update_rings) touched.insert(r.name);
    for (const auto& v : mutation.insert_versions) touched.insert(v.ring);
    for (const auto& v : mutation.update_versions) touched.insert(v.ring);
    for (const auto& [ring, version] : mutation.delete_versions) touched.insert(ring);
    for (const std::string& ring : touched) ++generations_->by_ring[ring];
    return absl::OkStatus();
  }
  absl::StatusOr<std::vector<rotation::RingRecord>> LoadRings() override {
    if (failing) return Unreachable();
    if (generations_ == nullptr) return store_->LoadRings();
    absl::MutexLock lock(&generations_->mu);
    auto rings = store_->LoadRings();
    if (!rings.ok()) return rings.status();
    for (rotation::RingRecord& r : *rings) r.generation = generations_->by_ring[r.name];
    return rings;
  }
  absl::StatusOr<std::vector<rotation::VersionRecord>> LoadVersions() override {
    if (failing) return Unreachable();
    return store_->LoadVersions();
  }

 private:
  static absl::Status Unreachable() { return absl::UnavailableError("store unreachable (test)"); }
  std::unique_ptr<rotation::MetadataStore> store_;
  SharedGenerations* const generations_;
};

class KeyServiceFixture : public ::testing::Test {
 protected:
  static constexpr absl::Duration kHour = absl::Hours(1);
  static constexpr absl::Duration kDay = absl::Hours(24);

  void SetUp() override {
    char tmpl[] = "/tmp/custody-key-service-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    services_.clear();  // before the stores they use
    stores_.clear();
    std::filesystem::remove_all(dir_);
  }

  // A new connection to the test's one SQLite database (one per KeyService: replicas); with
  // `shared`, its rings carry the generations every shared connection sees.
  FailableStore* OpenStore(bool shared) {
    auto store = rotation::OpenSqliteMetadataStore(dir_ + "/metadata.db");
    EXPECT_TRUE(store.ok()) << store.status();
    if (!store.ok()) return nullptr;
    stores_.push_back(
        std::make_unique<FailableStore>(*std::move(store), shared ? &generations_ : nullptr));
    return stores_.back().get();
  }

  // The options every test starts from: no threads (the test calls RunDueTransitions and
  // Refresh), the fake clock, the default floors.
  KeyService::Options Options() const {
    KeyService::Options options;
    options.run_scheduler = false;
    options.run_follower = false;
    options.clock = &clock_;
    return options;
  }

  // A KeyService over the fake token and `store` (when null, a new connection, shared as the
  // options say).
  absl::StatusOr<KeyService*> Start(KeyService::Options options,
                                    rotation::MetadataStore* store = nullptr) {
    if (store == nullptr) store = OpenStore(options.shared_store);
    auto service = KeyService::Create(&token_, store, options);
    if (!service.ok()) return service.status();
    services_.push_back(*std::move(service));
    return services_.back().get();
  }
  // Ends the most recent service (a stop or crash of custodyd; the store and token stay).
  void Stop() { services_.pop_back(); }

  // A policy at the default floors' level: rotation daily, prepublish 1 h, retain 2 h, destroy
  // delay 24 h.
  static v1::RotationPolicy DailyPolicy() {
    v1::RotationPolicy policy;
    policy.set_rotation_period_ms(absl::ToInt64Milliseconds(kDay));
    policy.set_prepublish_ms(absl::ToInt64Milliseconds(kHour));
    policy.set_retain_ms(absl::ToInt64Milliseconds(2 * kHour));
    policy.set_destroy_delay_ms(absl::ToInt64Milliseconds(kDay));
    return policy;
  }
  static absl::StatusOr<v1::KeyRing> CreateRing(KeyService& service, const std::string& name,
                                                const v1::RotationPolicy& policy) {
    v1::CreateKeyRingRequest request;
    request.set_name(name);
    request.set_purpose(v1::SIGN);
    request.set_alg("ES256");
    *request.mutable_policy() = policy;
    return service.CreateKeyRing(request);
  }
  static v1::KeyRing Ring(const KeyService& service, const std::string& name) {
    auto ring = service.GetKeyRing(name);
    EXPECT_TRUE(ring.ok()) << ring.status();
    return ring.ok() ? *ring : v1::KeyRing();
  }
  // Version `version` of `ring` as the service reports it; an empty KeyVersion (number 0, state
  // KEY_VERSION_STATE_UNSPECIFIED, no ids) when there is none.
  static v1::KeyVersion VersionOf(const KeyService& service, const std::string& ring,
                                  uint32_t version) {
    const v1::KeyRing r = Ring(service, ring);  // kept: the loop reads its versions
    for (const v1::KeyVersion& v : r.versions()) {
      if (v.version() == version) return v;
    }
    return v1::KeyVersion();
  }
  static v1::KeyVersionState StateOf(const KeyService& service, const std::string& ring,
                                     uint32_t version) {
    return VersionOf(service, ring, version).state();
  }
  static std::string ObjectIdOf(const KeyService& service, const std::string& ring,
                                uint32_t version) {
    return VersionOf(service, ring, version).token_object_id();
  }
  // Signs with the ring's ACTIVE version and verifies the JWS against the public JWK the
  // service publishes for it; the version that signed.
  static absl::StatusOr<uint32_t> SignAndVerify(const KeyService& service,
                                                const std::string& ring) {
    v1::SignJwsRequest request;
    request.set_ring(ring);
    request.set_payload("{\"sub\":\"unit\"}");
    auto signed_jws = service.SignJws(request);
    if (!signed_jws.ok()) return signed_jws.status();
    const v1::KeyVersion v = VersionOf(service, ring, signed_jws->version());
    if (v.version() == 0) return absl::InternalError("the signing version is not in the ring");
    auto jwk = jose::ParseJson(v.public_jwk());
    if (!jwk.ok()) return jwk.status();
    auto key = jose::PkeyFromPublicJwk(*jwk);
    if (!key.ok()) return key.status();
    auto verified = jose::VerifyCompactJws(signed_jws->jws(), key->get(), {jose::JwsAlg::kES256});
    if (!verified.ok()) return verified.status();
    return signed_jws->version();
  }

  std::string dir_;
  custody::testing::FakeClock clock_;
  SoftwareKeyOperations token_;
  SharedGenerations generations_;
  std::vector<std::unique_ptr<FailableStore>> stores_;
  std::vector<std::unique_ptr<KeyService>> services_;
};

}  // namespace custody::server::testing

#endif  // CUSTODY_SERVER_KEYS_TESTING_KEY_SERVICE_FIXTURE_H_
