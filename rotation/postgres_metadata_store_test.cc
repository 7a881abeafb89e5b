// The PostgreSQL metadata store against a real PostgreSQL 15 (a throw-away cluster per test
// binary, a fresh database per test): the SQLite store's contract (metadata_store_test.cc), and
// what replicas sharing one database need: conditional commits on the per-ring generation, next
// version numbers only, one ACTIVE version per ring, migrations run once, racing writers.
#include "rotation/postgres_metadata_store.h"

#include <atomic>
#include <iostream>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "rotation/record_tag.h"
#include "rotation/testing/postgres_cluster.h"
#include "rotation/testing/postgres_store.h"
#include "rotation/testing/records.h"

namespace custody::rotation {
namespace {

using testing::Active;
using testing::Ring;
using testing::Version;

const ::testing::Environment* const environment = testing::PostgresClusterEnvironment::Register();
testing::PostgresCluster* Cluster() { return testing::PostgresClusterEnvironment::Get(); }

class PostgresMetadataStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_NE(Cluster(), nullptr);
    static int n = 0;
    db_ = absl::StrCat("t", ++n);
    ASSERT_TRUE(Cluster()->CreateDatabase(db_).ok());
  }

  absl::StatusOr<std::unique_ptr<PostgresMetadataStore>> Open(
      const RecordTagger* tagger = nullptr) {
    return testing::OpenPostgresStore(*Cluster(), db_, tagger);
  }
  std::unique_ptr<PostgresMetadataStore> MustOpen() {
    auto store = Open();
    EXPECT_TRUE(store.ok()) << store.status();
    return store.ok() ? *std::move(store) : nullptr;
  }
  std::string Sql(const std::string& sql) {
    auto out = Cluster()->Psql(db_, sql);
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? *out : "";
  }

  std::string db_;
};

// The contract shared with the SQLite store is metadata_store_contract_test.cc.

// --- What replicas sharing the database need. ---

TEST_F(PostgresMetadataStoreTest, StaleGenerationIsAbortedAndChangesNothing) {
  auto a = MustOpen();
  auto b = MustOpen();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  ASSERT_TRUE(a->InsertRingWithVersion(Ring("op/id"), Version("op/id", 1, "aa")).ok());
  const uint64_t seen = (*b->LoadRings())[0].generation;
  // A changes the ring; B's change, made on what it read before, must not land.
  Mutation first;
  first.update_versions.push_back(Active(Version("op/id", 1, "aa")));
  first.expect_generations.emplace_back("op/id", seen);
  ASSERT_TRUE(a->Commit(first).ok());
  Mutation second;
  VersionRecord disabled = Version("op/id", 1, "aa");
  disabled.state = VersionState::kDisabled;
  second.update_versions.push_back(disabled);
  second.expect_generations.emplace_back("op/id", seen);
  absl::Status s = b->Commit(second);
  EXPECT_EQ(s.code(), absl::StatusCode::kAborted) << s;
  EXPECT_NE(s.message().find("changed by another replica"), absl::string_view::npos) << s;
  EXPECT_EQ((*b->LoadVersions())[0].state, VersionState::kActive);
  EXPECT_EQ((*b->LoadRings())[0].generation, seen + 1);
}

TEST_F(PostgresMetadataStoreTest, OnlyTheNextVersionNumberIsAccepted) {
  auto store = MustOpen();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->InsertRingWithVersion(Ring("op/id"), Version("op/id", 1, "aa")).ok());
  absl::Status gap = store->InsertVersion(Version("op/id", 3, "cc"));
  EXPECT_EQ(gap.code(), absl::StatusCode::kAborted) << gap;
  EXPECT_NE(gap.message().find("not the next number (2)"), absl::string_view::npos) << gap;
  EXPECT_TRUE(store->InsertVersion(Version("op/id", 2, "bb")).ok());
  EXPECT_EQ(store->LoadVersions()->size(), 2u);
}

TEST_F(PostgresMetadataStoreTest, SecondActiveVersionIsRefusedButASwapIsNot) {
  auto store = MustOpen();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->InsertRingWithVersion(Ring("op/id"), Version("op/id", 1, "aa")).ok());
  ASSERT_TRUE(store->UpdateVersion(Active(Version("op/id", 1, "aa"))).ok());
  ASSERT_TRUE(store->InsertVersion(Version("op/id", 2, "bb")).ok());
  absl::Status s = store->UpdateVersion(Active(Version("op/id", 2, "bb")));
  EXPECT_EQ(s.code(), absl::StatusCode::kAborted) << s;
  EXPECT_NE(s.message().find("second ACTIVE"), absl::string_view::npos) << s;
  // A rotation lists the new ACTIVE version first: the store orders the swap itself.
  Mutation rotate;
  rotate.update_versions.push_back(Active(Version("op/id", 2, "bb")));
  VersionRecord retired = Active(Version("op/id", 1, "aa"));
  retired.state = VersionState::kRetired;
  rotate.update_versions.push_back(retired);
  ASSERT_TRUE(store->Commit(rotate).ok());
  EXPECT_EQ(Sql("SELECT version FROM versions WHERE state = 'ACTIVE'"), "2\n");
}

TEST_F(PostgresMetadataStoreTest, CommitNotifiesTheTouchedRings) {
  auto store = MustOpen();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->InsertRingWithVersion(Ring("op/id"), Version("op/id", 1, "aa")).ok());
  // A listener in psql: LISTEN, then a commit from the store, then psql reads the notification
  // (psql prints notifications after each command).
  std::string out;
  std::thread listener([&] {
    auto r = Cluster()->Psql(db_, "LISTEN custody_metadata; SELECT pg_sleep(1.5); SELECT 'done';");
    out = r.ok() ? *r : r.status().ToString();
  });
  absl::SleepFor(absl::Milliseconds(700));
  ASSERT_TRUE(store->InsertVersion(Version("op/id", 2, "bb")).ok());
  listener.join();
  EXPECT_NE(out.find("Asynchronous notification \"custody_metadata\" with payload \"op/id\""),
            std::string::npos)
      << out;
}

TEST_F(PostgresMetadataStoreTest, ConnectionStringWithPasswordIsRefused) {
  PostgresMetadataStore::Options options;
  options.conninfo = Cluster()->Conninfo(db_) + " password=" + Cluster()->password();
  auto store = PostgresMetadataStore::Open(std::move(options));
  ASSERT_EQ(store.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store.status().message().find(Cluster()->password()), absl::string_view::npos);
  EXPECT_NE(store.status().message().find("never on the command line"), absl::string_view::npos);
  EXPECT_EQ(CheckConninfo("postgresql://custody:secret@localhost/db").code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckConninfo("host=/tmp dbname=x").code(), absl::StatusCode::kOk);
}

TEST_F(PostgresMetadataStoreTest, WrongOrMissingPasswordIsUnavailableWithoutThePassword) {
  PostgresMetadataStore::Options options;
  options.conninfo = Cluster()->Conninfo(db_);
  options.password = Secret("not-the-password");
  auto store = PostgresMetadataStore::Open(std::move(options));
  ASSERT_EQ(store.status().code(), absl::StatusCode::kUnavailable) << store.status();
  EXPECT_NE(store.status().message().find("password authentication failed"),
            absl::string_view::npos)
      << store.status();
  EXPECT_EQ(store.status().message().find("not-the-password"), absl::string_view::npos);
}

TEST_F(PostgresMetadataStoreTest, PgpassFileAndUriWork) {
  setenv("PGPASSFILE", Cluster()->pgpass_file().c_str(), 1);
  PostgresMetadataStore::Options options;
  options.conninfo = Cluster()->Uri(db_);
  auto store = PostgresMetadataStore::Open(std::move(options));
  unsetenv("PGPASSFILE");
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_NE((*store)->DescribeTarget().find("dbname=" + db_), std::string::npos);
  EXPECT_TRUE((*store)->LoadRings().ok());
}

TEST_F(PostgresMetadataStoreTest, ReplicasStartingTogetherMigrateOnce) {
  constexpr int kReplicas = 6;
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int i = 0; i < kReplicas; ++i) {
    threads.emplace_back([&] {
      auto store = Open();
      if (store.ok() && (*store)->LoadRings().ok()) ++ok;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), kReplicas);
  EXPECT_EQ(Sql("SELECT count(*), max(version) FROM custody_schema_migrations"),
            absl::StrCat(PostgresMetadataStore::LatestSchemaVersion(), "|",
                         PostgresMetadataStore::LatestSchemaVersion(), "\n"));
}

// Writers on separate connections race to add the next version and to swap ACTIVE, each
// reading the ring first and committing conditionally, as replicas do. Whatever interleaving
// happens: numbers contiguous, exactly one ACTIVE, every acknowledged change present.
TEST_F(PostgresMetadataStoreTest, RacingWritersNeverBreakTheRing) {
  constexpr int kWriters = 3;
  constexpr int kOpsPerWriter = 40;
  {
    auto store = MustOpen();
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->InsertRingWithVersion(Ring("op/id"), Version("op/id", 1, "w-init")).ok());
    ASSERT_TRUE(store->UpdateVersion(Active(Version("op/id", 1, "w-init"))).ok());
  }
  std::atomic<int> committed{0}, aborted{0}, other{0};
  std::mutex acked_mu;
  std::set<std::string> acked_objects;
  std::vector<std::thread> threads;
  for (int w = 0; w < kWriters; ++w) {
    threads.emplace_back([&, w] {
      auto store = Open();
      if (!store.ok()) {
        ++other;
        return;
      }
      for (int i = 0; i < kOpsPerWriter; ++i) {
        auto rings = (*store)->LoadRings();
        auto versions = (*store)->LoadVersions();
        if (!rings.ok() || !versions.ok()) {
          ++other;
          continue;
        }
        uint32_t next = 1;
        const VersionRecord* active = nullptr;
        for (const VersionRecord& v : *versions) {
          next = std::max(next, v.version + 1);
          if (v.state == VersionState::kActive) active = &v;
        }
        // A rotation: the new version ACTIVE, the old one RETIRED, on what this writer read.
        Mutation m;
        const std::string id = absl::StrCat("w", w, "-", i);
        m.expect_generations.emplace_back("op/id", (*rings)[0].generation);
        m.insert_versions.push_back(Active(Version("op/id", next, id)));
        if (active != nullptr) {
          VersionRecord old = *active;
          old.state = VersionState::kRetired;
          m.update_versions.push_back(old);
        }
        absl::Status s = (*store)->Commit(m);
        if (s.ok()) {
          ++committed;
          std::lock_guard<std::mutex> lock(acked_mu);
          acked_objects.insert(id);
        } else if (absl::IsAborted(s)) {
          ++aborted;
        } else {
          ++other;
          ADD_FAILURE() << s;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(other.load(), 0);
  EXPECT_GT(committed.load(), 0);
  auto store = MustOpen();
  ASSERT_NE(store, nullptr);
  auto versions = store->LoadVersions();
  ASSERT_TRUE(versions.ok());
  ASSERT_EQ(versions->size(), static_cast<size_t>(committed.load()) + 1);
  int active = 0;
  for (size_t i = 0; i < versions->size(); ++i) {
    EXPECT_EQ((*versions)[i].version, i + 1) << "numbers must be contiguous";
    if ((*versions)[i].state == VersionState::kActive) ++active;
    if (i > 0) {
      EXPECT_EQ(acked_objects.count((*versions)[i].object_id), 1u);
    }
  }
  EXPECT_EQ(active, 1);
  EXPECT_EQ(versions->back().state, VersionState::kActive);
  EXPECT_EQ((*store->LoadRings())[0].generation, static_cast<uint64_t>(committed.load()) + 2);
  std::cout << "racing writers: " << committed.load() << " committed, " << aborted.load()
            << " aborted\n";
}

// The store comes back by itself after the server restarts: the call during the outage is
// UNAVAILABLE, the next one after it succeeds on a new connection.
TEST_F(PostgresMetadataStoreTest, ReconnectsAfterServerRestart) {
  auto store = MustOpen();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->InsertRingWithVersion(Ring("op/id"), Version("op/id", 1, "aa")).ok());
  ASSERT_TRUE(Cluster()->Stop("immediate").ok());
  absl::Status down = store->InsertVersion(Version("op/id", 2, "bb"));
  EXPECT_EQ(down.code(), absl::StatusCode::kUnavailable) << down;
  EXPECT_EQ(store->LoadRings().status().code(), absl::StatusCode::kUnavailable);
  ASSERT_TRUE(Cluster()->StartServer().ok());
  absl::Status up = store->InsertVersion(Version("op/id", 2, "bb"));
  EXPECT_TRUE(up.ok()) << up;
  EXPECT_EQ(store->LoadVersions()->size(), 2u);
}

// Migration 4 leaves the rows of schema 3 untagged (adopted by custodyd at its first start with
// tags); rows written with a tagger verify, and a row edited with psql does not. The tagger is a
// software HMAC key here (the store's logic); custodyd's key is in the token.
TEST_F(PostgresMetadataStoreTest, TagsAreWrittenCheckedAndMigratedUntagged) {
  {
    auto store = MustOpen();  // no tagger: the rows of a custodyd from before tags
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(
        store->InsertRingWithVersion(Ring("op/old"), Active(Version("op/old", 1, "aa"))).ok());
  }
  SoftwareRecordTagger tagger("k");
  auto store = Open(&tagger);
  ASSERT_TRUE(store.ok()) << store.status();
  auto versions = (*store)->LoadVersions();
  ASSERT_TRUE(versions.ok()) << versions.status();
  EXPECT_EQ(versions->front().tag_check, TagCheck::kMissing);
  ASSERT_TRUE((*store)->UpdateVersion(versions->front()).ok());  // what adoption does
  ASSERT_TRUE(
      (*store)->InsertRingWithVersion(Ring("op/new"), Active(Version("op/new", 1, "bb"))).ok());
  auto rings = (*store)->LoadRings();
  versions = (*store)->LoadVersions();
  ASSERT_TRUE(rings.ok() && versions.ok());
  EXPECT_EQ((*rings)[0].tag_check, TagCheck::kValid);    // op/new
  EXPECT_EQ((*rings)[1].tag_check, TagCheck::kMissing);  // op/old: its ring row was not adopted
  for (const VersionRecord& v : *versions) EXPECT_EQ(v.tag_check, TagCheck::kValid) << v.ring;
  Sql("UPDATE versions SET compromised = true, state = 'RETIRED' WHERE ring = 'op/new'");
  Sql("UPDATE rings SET retain_ms = 1 WHERE name = 'op/new'");
  rings = (*store)->LoadRings();
  versions = (*store)->LoadVersions();
  ASSERT_TRUE(rings.ok() && versions.ok());
  EXPECT_EQ((*rings)[0].tag_check, TagCheck::kMismatch);
  EXPECT_EQ((*versions)[0].tag_check, TagCheck::kMismatch);  // op/new sorts first
  EXPECT_EQ((*versions)[1].tag_check, TagCheck::kValid);
}

}  // namespace
}  // namespace custody::rotation
