// custodyd on PostgreSQL: the real custodyd binary with --metadata=postgresql://... on a
// throw-away PostgreSQL 15 cluster (rotation/testing/postgres_cluster.h), a real SoftHSM2
// token, real gRPC. Signatures are checked with tests/testing/independent_jws.h (OpenSSL EVP, not
// custody's jose/).
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "client/jwe_encryption.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "rotation/testing/postgres_cluster.h"
#include "tests/testing/harness.h"
#include "tests/testing/independent_jws.h"
#include "tests/testing/prometheus_testing.h"
#include "tests/testing/rpc_helpers.h"

namespace custody::testing {
namespace {

namespace v1 = custody::v1;
using namespace std::chrono_literals;

const ::testing::Environment* const environment =
    rotation::testing::PostgresClusterEnvironment::Register();
rotation::testing::PostgresCluster* Cluster() {
  return rotation::testing::PostgresClusterEnvironment::Get();
}

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

using Clock = std::chrono::steady_clock;

double MsSince(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double, std::milli>(to - from).count();
}

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  size_t i =
      std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5));
  return v[i];
}

// Reads a WatchJwks stream on its own thread and lets the test wait for a pushed JWKS that
// satisfies a predicate, with the time it arrived.
class JwksWatcher {
 public:
  // Watches `ring` (a WatchJwks of every ring would cover only the rings known when it starts).
  JwksWatcher(Custodyd& d, const std::string& ring) {
    v1::WatchJwksRequest req;
    req.add_rings(ring);
    reader_ = d.signer().WatchJwks(&ctx_, req);
    thread_ = std::thread([this] {
      v1::GetJwksResponse msg;
      while (reader_->Read(&msg)) {
        std::lock_guard<std::mutex> lock(mu_);
        pushes_.push_back({Clock::now(), msg.jwks()});
        cv_.notify_all();
      }
    });
  }
  ~JwksWatcher() {
    ctx_.TryCancel();
    thread_.join();
  }
  // The arrival time of the first push after `from` (index into pushes) satisfying `pred`;
  // nullopt after `timeout`. *next receives the index after it.
  std::optional<Clock::time_point> WaitFor(size_t from,
                                           const std::function<bool(const std::string&)>& pred,
                                           std::chrono::milliseconds timeout, size_t* next) {
    std::unique_lock<std::mutex> lock(mu_);
    auto deadline = Clock::now() + timeout;
    size_t i = from;
    for (;;) {
      for (; i < pushes_.size(); ++i) {
        if (pred(pushes_[i].second)) {
          *next = i + 1;
          return pushes_[i].first;
        }
      }
      if (cv_.wait_until(lock, deadline) == std::cv_status::timeout && i == pushes_.size()) {
        return std::nullopt;
      }
    }
  }
  size_t count() {
    std::lock_guard<std::mutex> lock(mu_);
    return pushes_.size();
  }

 private:
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReader<v1::GetJwksResponse>> reader_;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::pair<Clock::time_point, std::string>> pushes_;
};

// The deadline of this file's RPCs (rpc_helpers.h's are a hang guard only).
constexpr std::chrono::milliseconds kCallTimeout = 10s;

class ReplicaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_NE(Cluster(), nullptr);
    static int n = 0;
    db_ = absl::StrCat("r", getpid(), "_", ++n);
    ASSERT_TRUE(Cluster()->CreateDatabase(db_).ok());
  }
  std::vector<std::string> MetadataFlags() const {
    // The tests' rings rotate and retire within seconds: the policy floors are lowered.
    return WithLowPolicyFloors({"--metadata=" + Cluster()->Uri(db_),
                                "--metadata_password_file=" + Cluster()->password_file()});
  }

  static grpc::Status CreateEs256(Custodyd& d, const std::string& name, v1::KeyRing* out) {
    v1::CreateKeyRingRequest req;
    req.set_name(name);
    req.set_purpose(v1::SIGN);
    req.set_alg("ES256");
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    return d.admin().CreateKeyRing(&ctx, req, out);
  }
  static grpc::Status Sign(Custodyd& d, const std::string& ring, const std::string& payload,
                           v1::SignJwsResponse* out) {
    v1::SignJwsRequest req;
    req.set_ring(ring);
    req.set_payload(payload);
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    return d.signer().SignJws(&ctx, req, out);
  }
  static std::string Jwks(Custodyd& d) {
    v1::GetJwksRequest req;
    v1::GetJwksResponse resp;
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    grpc::Status s = d.signer().GetJwks(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp.jwks();
  }

  // Replica 0 bootstraps the embedded SoftHSM2 token under its state directory; the others
  // load the same module on the same token directory (SOFTHSM2_CONF) with the same PIN.
  void StartReplicas(int n) {
    for (int i = 0; i < n; ++i) dirs_.push_back(std::make_unique<TempDir>());
    const std::string first = dirs_[0]->path();
    std::vector<std::string> first_flags = MetadataFlags();
    first_flags.insert(first_flags.end(), replica_flags_.begin(), replica_flags_.end());
    if (!metrics_ports_.empty()) {
      first_flags.push_back(absl::StrCat("--metrics_listen=127.0.0.1:", metrics_ports_[0]));
    }
    if (!jwks_ports_.empty()) {
      first_flags.push_back(absl::StrCat("--jwks_listen=127.0.0.1:", jwks_ports_[0]));
      first_flags.push_back("--jwks_publish=" + jwks_published_);
    }
    first_flags.push_back("--replica_id=r0");
    flags_.push_back(first_flags);
    envs_.push_back({});
    replicas_.push_back(std::make_unique<Custodyd>(first, first_flags));
    ASSERT_TRUE(replicas_[0]->started()) << replicas_[0]->log();
    for (int i = 1; i < n; ++i) {
      std::vector<std::string> flags = MetadataFlags();
      flags.insert(flags.end(), replica_flags_.begin(), replica_flags_.end());
      if (static_cast<size_t>(i) < metrics_ports_.size()) {
        flags.push_back(absl::StrCat("--metrics_listen=127.0.0.1:", metrics_ports_[i]));
      }
      if (static_cast<size_t>(i) < jwks_ports_.size()) {
        flags.push_back(absl::StrCat("--jwks_listen=127.0.0.1:", jwks_ports_[i]));
        flags.push_back("--jwks_publish=" + jwks_published_);
      }
      flags.push_back("--pkcs11_module=/usr/lib/softhsm/libsofthsm2.so");
      flags.push_back("--token_label=custody");
      flags.push_back("--pin_file=" + first + "/pin");
      flags.push_back("--replica_id=r" + std::to_string(i));
      flags_.push_back(flags);
      envs_.push_back({"SOFTHSM2_CONF=" + first + "/softhsm2.conf"});
      replicas_.push_back(
          std::make_unique<Custodyd>(dirs_[i]->path(), flags, Custodyd::Environment{envs_.back()}));
      ASSERT_TRUE(replicas_.back()->started()) << replicas_.back()->log();
    }
  }
  Custodyd& replica(int i) { return *replicas_[static_cast<size_t>(i)]; }
  // Starts replica i again on its state directory with its flags (after a Kill).
  void Restart(int i) {
    const size_t k = static_cast<size_t>(i);
    replicas_[k].reset();
    replicas_[k] =
        std::make_unique<Custodyd>(dirs_[k]->path(), flags_[k], Custodyd::Environment{envs_[k]});
  }
  // "unix:A,unix:B,...": every replica, for the client library.
  std::string AllAddresses() {
    std::string out;
    for (auto& r : replicas_) absl::StrAppend(&out, out.empty() ? "" : ",", r->address());
    return out;
  }

  std::string db_;
  std::vector<std::string> replica_flags_;  // added to every replica StartReplicas starts
  std::vector<int> metrics_ports_;          // replica i's --metrics_listen port, when given
  std::vector<int> jwks_ports_;             // replica i's --jwks_listen port, when given
  std::string jwks_published_;              // their --jwks_publish
  std::vector<std::unique_ptr<TempDir>> dirs_;
  std::vector<std::unique_ptr<Custodyd>> replicas_;
  std::vector<std::vector<std::string>> flags_;
  std::vector<std::vector<std::string>> envs_;
};

// Polls SignJws on `d` until it succeeds with a kid other than `not_kid`; the signature.
std::optional<v1::SignJwsResponse> SignWhenReady(Custodyd& d, const std::string& ring,
                                                 const std::string& not_kid,
                                                 std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    v1::SignJwsRequest req;
    req.set_ring(ring);
    req.set_payload("p");
    v1::SignJwsResponse resp;
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    if (d.signer().SignJws(&ctx, req, &resp).ok() && resp.kid() != not_kid) return resp;
    std::this_thread::sleep_for(2ms);
  }
  return std::nullopt;
}

std::string ActiveKid(const v1::KeyRing& ring) {
  for (const v1::KeyVersion& v : ring.versions()) {
    if (v.state() == v1::ACTIVE) return v.kid();
  }
  return "";
}

TEST_F(ReplicaTest, CustodydOnPostgresKeepsRingsAcrossRestart) {
  TempDir dir;
  std::string kid;
  {
    Custodyd d(dir.path(), MetadataFlags());
    ASSERT_TRUE(d.started()) << d.log();
    EXPECT_NE(d.log().find("\"store\":\"postgresql host="), std::string::npos) << d.log();
    v1::KeyRing ring;
    grpc::Status s = CreateEs256(d, "op/id-token", &ring);
    ASSERT_TRUE(s.ok()) << s.error_message();
    kid = ring.versions(0).kid();
    v1::SignJwsResponse signed_jws;
    s = Sign(d, "op/id-token", "hello", &signed_jws);
    ASSERT_TRUE(s.ok()) << s.error_message();
    std::string error;
    JwsKeys keys = JwsKeysOf(Jwks(d), &error);
    ASSERT_EQ(error, "");
    std::string signed_kid;
    EXPECT_EQ(VerifyJws(keys, signed_jws.jws(), &signed_kid), "");
    EXPECT_EQ(signed_kid, kid);
    d.Stop();
    EXPECT_EQ(d.log().find(Cluster()->password()), std::string::npos);
  }
  // The rows are in PostgreSQL, not in a file under the state directory.
  EXPECT_EQ(access((dir.path() + "/metadata.db").c_str(), F_OK), -1);
  auto rows =
      Cluster()->Psql(db_, "SELECT name, state, kid FROM rings JOIN versions ON ring = name");
  ASSERT_TRUE(rows.ok()) << rows.status();
  EXPECT_EQ(*rows, "op/id-token|ACTIVE|" + kid + "\n");
  Custodyd again(dir.path(), MetadataFlags());
  ASSERT_TRUE(again.started()) << again.log();
  v1::SignJwsResponse signed_jws;
  grpc::Status s = Sign(again, "op/id-token", "again", &signed_jws);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(signed_jws.kid(), kid);
}

TEST_F(ReplicaTest, PasswordOnTheCommandLineIsRefusedWithoutEchoingIt) {
  TempDir dir;
  std::string uri = Cluster()->Uri(db_);
  uri.insert(uri.find('@'), ":" + Cluster()->password());
  CommandResult r = RunCommand({BinDir() + "/custodyd", "--state_dir=" + dir.path(),
                                "--listen=unix:" + dir.path() + "/s.sock", "--metadata=" + uri});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("carries a password"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find(Cluster()->password()), std::string::npos) << r.err;
}

TEST_F(ReplicaTest, ConninfoFileAndPasswordFromEnvironment) {
  TempDir dir;
  const std::string conninfo = dir.path() + "/metadata.conninfo";
  WriteFileOrDie(conninfo, Cluster()->Conninfo(db_) + "\n");
  Custodyd::Environment env{{"CUSTODY_METADATA_PASSWORD=" + Cluster()->password()}};
  Custodyd d(dir.path(), {"--metadata=" + conninfo}, env);
  ASSERT_TRUE(d.started()) << d.log();
  v1::KeyRing ring;
  grpc::Status s = CreateEs256(d, "a/b", &ring);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(d.log().find(Cluster()->password()), std::string::npos);
}

// A ring created on A signs on B and C (the version found in the shared token by CKA_ID, no
// restart); a forced rotation on B is pushed to a WatchJwks stream on C; a compromise on A stops
// the compromised key signing on B and C. Every signature verifies against A's JWKS.
TEST_F(ReplicaTest, ChangesOnOneReplicaReachTheOthers) {
  StartReplicas(3);
  v1::KeyRing ring;
  auto created_at = Clock::now();
  grpc::Status s = CreateEs256(replica(0), "op/id-token", &ring);
  ASSERT_TRUE(s.ok()) << s.error_message();
  const std::string kid1 = ring.versions(0).kid();
  for (int i = 1; i < 3; ++i) {
    auto signed_jws = SignWhenReady(replica(i), "op/id-token", "", 5s);
    ASSERT_TRUE(signed_jws.has_value()) << "replica " << i << " never signed\n" << replica(i).log();
    std::printf("ring created on A signs on replica %d after %.1f ms\n", i,
                MsSince(created_at, Clock::now()));
    std::string error;
    JwsKeys keys = JwsKeysOf(Jwks(replica(0)), &error);
    ASSERT_EQ(error, "");
    std::string kid;
    EXPECT_EQ(VerifyJws(keys, signed_jws->jws(), &kid), "");
    EXPECT_EQ(kid, kid1);
  }

  // A forced rotation on B: C's WatchJwks of the ring pushes the new key.
  JwksWatcher watch_c(replica(2), "op/id-token");
  v1::RotateKeyRingRequest rotate;
  rotate.set_ring("op/id-token");
  rotate.set_force(true);
  v1::RotateKeyRingResponse rotated;
  grpc::ClientContext ctx;
  SetDeadline(&ctx, kCallTimeout);
  size_t from = watch_c.count();
  s = replica(1).admin().RotateKeyRing(&ctx, rotate, &rotated);
  ASSERT_TRUE(s.ok()) << s.error_message();
  const std::string kid2 = ActiveKid(rotated.ring());
  ASSERT_NE(kid2, kid1);
  size_t next = 0;
  auto pushed = watch_c.WaitFor(
      from, [&](const std::string& jwks) { return jwks.find(kid2) != std::string::npos; }, 5s,
      &next);
  ASSERT_TRUE(pushed.has_value()) << replica(2).log();
  auto on_c = SignWhenReady(replica(2), "op/id-token", kid1, 5s);
  ASSERT_TRUE(on_c.has_value());
  EXPECT_EQ(on_c->kid(), kid2);

  // Compromise the ACTIVE version on A: it stops signing on B and C.
  v1::CompromiseKeyVersionRequest compromise;
  compromise.set_ring("op/id-token");
  compromise.set_version(rotated.ring().versions_size() > 0 ? [&] {
    for (const v1::KeyVersion& v : rotated.ring().versions()) {
      if (v.kid() == kid2) return v.version();
    }
    return 0u;
  }() : 0u);
  v1::KeyRing after;
  grpc::ClientContext cctx;
  SetDeadline(&cctx, kCallTimeout);
  auto compromised_at = Clock::now();
  s = replica(0).admin().CompromiseKeyVersion(&cctx, compromise, &after);
  ASSERT_TRUE(s.ok()) << s.error_message();
  for (int i = 1; i < 3; ++i) {
    auto signed_jws = SignWhenReady(replica(i), "op/id-token", kid2, 5s);
    ASSERT_TRUE(signed_jws.has_value()) << replica(i).log();
    const double ms = MsSince(compromised_at, Clock::now());
    std::printf("compromised key stopped signing on replica %d after %.1f ms\n", i, ms);
    EXPECT_LT(ms, 1000);
    EXPECT_EQ(signed_jws->kid(), ActiveKid(after));
  }

  // Each replica's audit chain carries its id; custodyctl checks all of them at once.
  std::vector<std::string> argv = {BinDir() + "/custodyctl", "audit", "verify"};
  for (int i = 0; i < 3; ++i) {
    std::vector<std::string> files;
    for (const auto& e : std::filesystem::directory_iterator(dirs_[i]->path() + "/audit")) {
      if (e.path().filename().string().rfind("audit-", 0) == 0) files.push_back(e.path());
    }
    std::sort(files.begin(), files.end());
    ASSERT_FALSE(files.empty());
    EXPECT_NE(files[0].find("audit-r" + std::to_string(i) + "-000001.jsonl"), std::string::npos);
    EXPECT_NE(ReadFileOrDie(files[0]).find("\"replica\":\"r" + std::to_string(i) + "\""),
              std::string::npos);
    argv.insert(argv.end(), files.begin(), files.end());
  }
  CommandResult verified = RunCommand(argv);
  EXPECT_EQ(verified.exit_code, 0) << verified.out << verified.err;
  for (int i = 0; i < 3; ++i) {
    EXPECT_NE(verified.out.find("{\"replica\":\"r" + std::to_string(i) + "\""), std::string::npos)
        << verified.out;
  }
}

// Propagation time of >= 100 published-key-set changes made on A and B, seen in C's WatchJwks:
// a PENDING version disabled (its kid leaves the JWKS) and enabled again (it comes back). Each
// latency runs from just before the lifecycle call is sent to the push's arrival.
TEST_F(ReplicaTest, PropagationTimeOfJwksChanges) {
  StartReplicas(3);
  const int kChanges = kSanitized ? 30 : 120;
  v1::KeyRing ring;
  ASSERT_TRUE(CreateEs256(replica(0), "op/jwks", &ring).ok());
  v1::RotateKeyRingRequest prepare;
  prepare.set_ring("op/jwks");
  v1::RotateKeyRingResponse prepared;
  grpc::ClientContext pctx;
  SetDeadline(&pctx, kCallTimeout);
  // No PENDING version yet: the unforced rotation creates one and says it did not rotate.
  grpc::Status prepared_status = replica(0).admin().RotateKeyRing(&pctx, prepare, &prepared);
  ASSERT_GT(NotRotatedUntilMs(prepared_status), 0) << prepared_status.error_message();
  v1::GetKeyRingRequest get;
  get.set_name("op/jwks");
  v1::KeyRing prepared_ring;
  grpc::ClientContext gctx;
  SetDeadline(&gctx, kCallTimeout);
  ASSERT_TRUE(replica(0).admin().GetKeyRing(&gctx, get, &prepared_ring).ok());
  uint32_t pending = 0;
  std::string pending_kid;
  for (const v1::KeyVersion& v : prepared_ring.versions()) {
    if (v.state() == v1::PENDING) {
      pending = v.version();
      pending_kid = v.kid();
    }
  }
  ASSERT_NE(pending, 0u);
  // C knows the ring and its PENDING key before the watch starts.
  for (auto deadline = Clock::now() + 5s;
       Jwks(replica(2)).find(pending_kid) == std::string::npos && Clock::now() < deadline;) {
    std::this_thread::sleep_for(5ms);
  }
  ASSERT_NE(Jwks(replica(2)).find(pending_kid), std::string::npos);
  JwksWatcher watch_c(replica(2), "op/jwks");
  std::vector<double> latencies;
  for (int i = 0; i < kChanges; ++i) {
    const bool disable = i % 2 == 0;
    v1::KeyVersionRequest req;
    req.set_ring("op/jwks");
    req.set_version(pending);
    v1::KeyRing reply;
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    size_t from = watch_c.count();
    Custodyd& writer = replica(i % 4 < 2 ? 0 : 1);
    auto sent = Clock::now();
    grpc::Status s = disable ? writer.admin().DisableKeyVersion(&ctx, req, &reply)
                             : writer.admin().EnableKeyVersion(&ctx, req, &reply);
    ASSERT_TRUE(s.ok()) << i << ": " << s.error_message();
    size_t next = 0;
    auto pushed = watch_c.WaitFor(
        from,
        [&](const std::string& jwks) {
          return (jwks.find(pending_kid) == std::string::npos) == disable;
        },
        5s, &next);
    ASSERT_TRUE(pushed.has_value()) << "change " << i << " never reached C";
    latencies.push_back(std::max(0.0, MsSince(sent, *pushed)));
  }
  const double p50 = Percentile(latencies, 0.5), p99 = Percentile(latencies, 0.99);
  std::printf("JWKS propagation over %d changes: p50 %.1f ms, p99 %.1f ms, max %.1f ms\n", kChanges,
              p50, p99, Percentile(latencies, 1.0));
  RecordProperty("propagation_p50_ms", static_cast<int>(p50));
  RecordProperty("propagation_p99_ms", static_cast<int>(p99));
  EXPECT_LT(p99, 1000);
}

// The public JWKS listener follows the other replicas' changes as WatchJwks does: a ring created
// and rotated on replica 0 is served by replica 1's --jwks_listen, with replica 1's GetJwks etag,
// from the moment replica 1 has the change.
TEST_F(ReplicaTest, JwksListenerServesAnotherReplicasRotation) {
  jwks_ports_ = {FreePort(), FreePort()};
  jwks_published_ = "op/published";
  StartReplicas(2);
  const std::string url =
      absl::StrCat("http://127.0.0.1:", jwks_ports_[1], "/rings/op/published/jwks.json");
  long code = 0;
  HttpGet(url, &code);
  EXPECT_EQ(code, 404);  // published but not created yet
  v1::KeyRing ring;
  ASSERT_TRUE(CreateEs256(replica(0), "op/published", &ring).ok());
  ASSERT_TRUE(CreateEs256(replica(0), "op/unpublished", &ring).ok());
  auto served_until = [&](const std::function<bool(const std::string&)>& done) {
    std::string body;
    for (auto deadline = Clock::now() + 10s; Clock::now() < deadline;) {
      body = HttpGet(url, &code);
      if (code == 200 && done(body)) break;
      std::this_thread::sleep_for(20ms);
    }
    return body;
  };
  std::string first = served_until([](const std::string&) { return true; });
  ASSERT_EQ(code, 200) << first;
  v1::RotateKeyRingRequest req;
  req.set_ring("op/published");
  req.set_force(true);
  v1::RotateKeyRingResponse rotated;
  grpc::ClientContext ctx;
  SetDeadline(&ctx, kCallTimeout);
  const auto sent = Clock::now();  // the commit's notification may arrive before the reply
  ASSERT_TRUE(replica(0).admin().RotateKeyRing(&ctx, req, &rotated).ok());
  std::string after = served_until([&](const std::string& body) { return body != first; });
  const double ms = MsSince(sent, Clock::now());
  ASSERT_NE(after, first) << "replica 1's listener never served the rotation";
  // What replica 1 serves over HTTP is what its GetJwks says. The forced rotation's follow-up
  // PENDING version is a commit of its own that may land between the two reads (seen under
  // ASan): compare until both show the same generation's set.
  v1::GetJwksRequest get;
  get.add_rings("op/published");
  v1::GetJwksResponse expected;
  for (auto deadline = Clock::now() + 10s;; std::this_thread::sleep_for(20ms)) {
    grpc::ClientContext gctx;
    SetDeadline(&gctx, kCallTimeout);
    ASSERT_TRUE(replica(1).signer().GetJwks(&gctx, get, &expected).ok());
    after = HttpGet(url, &code);
    if (after == expected.jwks() || Clock::now() >= deadline) break;
  }
  EXPECT_EQ(after, expected.jwks());
  for (const v1::KeyVersion& v : rotated.ring().versions()) {
    if (v.state() == v1::ACTIVE) {
      EXPECT_NE(after.find(v.kid()), std::string::npos) << after;
    }
  }
  HttpGet(absl::StrCat("http://127.0.0.1:", jwks_ports_[1], "/rings/op/unpublished/jwks.json"),
          &code);
  EXPECT_EQ(code, 404);
  std::printf("rotation sent to replica 0: served by replica 1's JWKS listener %.0f ms later\n",
              ms);
}

// The CKA_IDs (hex) of the private keys in the shared token labelled custody/..., as pkcs11-tool
// (OpenSC) lists them.
std::set<std::string> TokenPrivateKeyIds(const std::string& state) {
  std::string pin = ReadFileOrDie(state + "/pin");
  while (!pin.empty() && (pin.back() == '\n' || pin.back() == ' ')) pin.pop_back();
  CommandResult r =
      RunCommand({"pkcs11-tool", "--module", "/usr/lib/softhsm/libsofthsm2.so", "--token-label",
                  "custody", "--login", "--pin", pin, "--list-objects", "--type", "privkey"},
                 "", {"SOFTHSM2_CONF=" + state + "/softhsm2.conf"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  std::set<std::string> ids;
  bool custody_label = false;
  size_t start = 0;
  for (size_t nl; (nl = r.out.find('\n', start)) != std::string::npos; start = nl + 1) {
    std::string line = r.out.substr(start, nl - start);
    if (line.find("label:") != std::string::npos) {
      custody_label = line.find("custody/") != std::string::npos;
    }
    size_t at = line.find("ID:");
    if (at != std::string::npos && custody_label) {
      std::string id = line.substr(at + 3);
      id.erase(0, id.find_first_not_of(" \t"));
      while (!id.empty() && (id.back() == ' ' || id.back() == '\t')) id.pop_back();
      ids.insert(id);
    }
  }
  return ids;
}

// Replicas issue concurrent lifecycle operations on the same rings, each through a random
// replica: forced and normal rotations, disable/enable, destruction scheduled and cancelled,
// compromise. Whatever wins each race, after each round PostgreSQL holds exactly one ACTIVE
// version per ring, contiguous version numbers and no CREATING intent left over, every
// version that is not destroyed has its key in the token, and the token holds no custody key
// that the metadata does not name. Round one runs on two replicas, round two on three.
TEST_F(ReplicaTest, ConcurrentLifecycleOperationsKeepEveryRingConsistent) {
  StartReplicas(3);
  const std::vector<std::string> rings = {"race/a", "race/b"};
  for (const std::string& name : rings) {
    v1::KeyRing ring;
    ASSERT_TRUE(CreateEs256(replica(0), name, &ring).ok());
  }
  const int kOpsPerRound = kSanitized ? 60 : 220;
  const int kThreads = 6;
  for (int replicas : {2, 3}) {
    std::atomic<int> next_op{0};
    std::mutex counts_mu;
    std::map<std::string, int> counts;  // by status code name
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937 rng(static_cast<unsigned>(t * 7919 + replicas));
        while (next_op.fetch_add(1) < kOpsPerRound) {
          Custodyd& d = replica(static_cast<int>(rng() % static_cast<unsigned>(replicas)));
          const std::string& ring = rings[rng() % rings.size()];
          // A version number near the top, where the action is.
          v1::KeyRing current;
          {
            v1::GetKeyRingRequest req;
            req.set_name(ring);
            grpc::ClientContext ctx;
            SetDeadline(&ctx, kCallTimeout);
            if (!d.admin().GetKeyRing(&ctx, req, &current).ok()) continue;
          }
          // One of the newest versions the replica shows (a version another replica is still
          // creating is not shown, and is NOT_FOUND until it completes).
          std::vector<uint32_t> shown;
          for (const v1::KeyVersion& v : current.versions()) shown.push_back(v.version());
          std::sort(shown.begin(), shown.end());
          if (shown.empty()) continue;
          const uint32_t top = shown.back();
          v1::KeyVersionRequest vreq;
          vreq.set_ring(ring);
          vreq.set_version(shown[shown.size() - 1 - std::min<size_t>(shown.size() - 1, rng() % 3)]);
          grpc::ClientContext ctx;
          SetDeadline(&ctx, 30s);
          grpc::Status s;
          v1::KeyRing reply;
          const int op = static_cast<int>(rng() % 9);
          if (op <= 1) {
            v1::RotateKeyRingRequest req;
            req.set_ring(ring);
            req.set_force(op == 0);
            v1::RotateKeyRingResponse resp;
            s = d.admin().RotateKeyRing(&ctx, req, &resp);
          } else if (op == 2) {
            s = d.admin().DisableKeyVersion(&ctx, vreq, &reply);
          } else if (op == 3) {
            s = d.admin().EnableKeyVersion(&ctx, vreq, &reply);
          } else if (op == 4) {
            s = d.admin().ScheduleKeyVersionDestruction(&ctx, vreq, &reply);
          } else if (op == 5) {
            s = d.admin().CancelKeyVersionDestruction(&ctx, vreq, &reply);
          } else if (op == 6) {
            v1::CompromiseKeyVersionRequest req;
            req.set_ring(ring);
            req.set_version(vreq.version());
            req.set_reason("race test");
            s = d.admin().CompromiseKeyVersion(&ctx, req, &reply);
          } else {
            v1::RotateKeyRingRequest req;
            req.set_ring(ring);
            req.set_force(true);
            v1::RotateKeyRingResponse resp;
            s = d.admin().RotateKeyRing(&ctx, req, &resp);
          }
          std::lock_guard<std::mutex> lock(counts_mu);
          ++counts[absl::StatusCodeToString(static_cast<absl::StatusCode>(s.error_code()))];
          if (s.error_code() != grpc::StatusCode::OK &&
              s.error_code() != grpc::StatusCode::FAILED_PRECONDITION &&
              s.error_code() != grpc::StatusCode::ABORTED) {
            auto row = Cluster()->Psql(
                db_, "SELECT version, state, create_time FROM versions WHERE ring = '" + ring +
                         "' AND version >= " + std::to_string(vreq.version() - 1));
            ADD_FAILURE() << "unexpected " << s.error_code() << ": " << s.error_message() << " op "
                          << op << " top " << top << "\n"
                          << (row.ok() ? *row : "");
          }
        }
      });
    }
    for (auto& t : threads) t.join();
    std::string summary;
    for (const auto& [code, n] : counts) absl::StrAppend(&summary, code, "=", n, " ");
    std::printf("round with %d replicas, %d ops: %s\n", replicas, kOpsPerRound, summary.c_str());
    EXPECT_GE(counts["OK"], kOpsPerRound / 4);

    for (const std::string& name : rings) {
      auto rows = Cluster()->Psql(
          db_,
          "SELECT count(*) FILTER (WHERE state = 'ACTIVE'), count(*), max(version), "
          "count(*) FILTER (WHERE state = 'CREATING') FROM versions WHERE ring = '" +
              name + "'");
      ASSERT_TRUE(rows.ok()) << rows.status();
      int active = 0, count = 0, max = 0, creating = 0;
      ASSERT_EQ(std::sscanf(rows->c_str(), "%d|%d|%d|%d", &active, &count, &max, &creating), 4)
          << *rows;
      EXPECT_EQ(active, 1) << name;
      EXPECT_EQ(count, max) << name << ": version numbers must be contiguous";
      EXPECT_EQ(creating, 0) << name;
    }
    auto live = Cluster()->Psql(
        db_, "SELECT object_id FROM versions WHERE state NOT IN ('DESTROYED') ORDER BY 1");
    ASSERT_TRUE(live.ok());
    std::set<std::string> metadata_ids;
    size_t start = 0;
    for (size_t nl; (nl = live->find('\n', start)) != std::string::npos; start = nl + 1) {
      metadata_ids.insert(live->substr(start, nl - start));
    }
    std::set<std::string> token_ids = TokenPrivateKeyIds(dirs_[0]->path());
    for (const std::string& id : metadata_ids) {
      EXPECT_EQ(token_ids.count(id), 1u) << "version object " << id << " missing from the token";
    }
    for (const std::string& id : token_ids) {
      EXPECT_EQ(metadata_ids.count(id), 1u) << "orphaned token object " << id;
    }
    if (HasFailure()) {
      for (int i = 0; i < 3; ++i) {
        std::string log = replica(i).log();
        size_t start = 0;
        for (size_t nl; (nl = log.find('\n', start)) != std::string::npos; start = nl + 1) {
          std::string line = log.substr(start, nl - start);
          if (line.find("roll") != std::string::npos || line.find("error") != std::string::npos ||
              line.find("version.created") != std::string::npos ||
              line.find("replica.retry") != std::string::npos) {
            std::printf("replica %d: %s\n", i, line.c_str());
          }
        }
      }
      auto all = Cluster()->Psql(
          db_, "SELECT ring, version, state, create_time FROM versions ORDER BY 1, 2");
      std::printf("%s\n", all.ok() ? all->c_str() : "");
      return;
    }
    // Every replica converges on the same ACTIVE version.
    for (const std::string& name : rings) {
      auto rows = Cluster()->Psql(
          db_, "SELECT kid FROM versions WHERE state = 'ACTIVE' AND ring = '" + name + "'");
      ASSERT_TRUE(rows.ok());
      std::string kid = rows->substr(0, rows->find('\n'));
      for (int i = 0; i < 3; ++i) {
        auto signed_jws = SignWhenReady(replica(i), name, "", 2s);
        ASSERT_TRUE(signed_jws.has_value());
        auto deadline = Clock::now() + 2s;
        while (signed_jws->kid() != kid && Clock::now() < deadline) {
          signed_jws = SignWhenReady(replica(i), name, "", 2s);
        }
        EXPECT_EQ(signed_jws->kid(), kid) << name << " on replica " << i;
      }
    }
  }
}

bool Serving(Custodyd& d) {
  auto health = grpc::health::v1::Health::NewStub(d.channel());
  grpc::ClientContext ctx;
  SetDeadline(&ctx, 2s);
  grpc::health::v1::HealthCheckRequest req;
  grpc::health::v1::HealthCheckResponse resp;
  return health->Check(&ctx, req, &resp).ok() &&
         resp.status() == grpc::health::v1::HealthCheckResponse::SERVING;
}

// Signing runs from memory while PostgreSQL restarts (pg_ctl restart -m immediate): no call
// fails. With PostgreSQL stopped, lifecycle writes fail UNAVAILABLE at once; signing goes on
// for --max_metadata_staleness (3 s here), then is refused UNAVAILABLE "metadata unreachable"
// and health turns NOT_SERVING; once PostgreSQL is back, the replica catches up and signs
// again without a restart, and a rotation acknowledged before the outage is still in force.
TEST_F(ReplicaTest, StalenessBoundFailsClosedAndRecovers) {
  TempDir dir;
  std::vector<std::string> flags = MetadataFlags();
  flags.push_back("--max_metadata_staleness=3s");
  Custodyd d(dir.path(), flags);
  ASSERT_TRUE(d.started()) << d.log();
  v1::KeyRing ring;
  ASSERT_TRUE(CreateEs256(d, "op/stale", &ring).ok());
  v1::RotateKeyRingRequest rotate;
  rotate.set_ring("op/stale");
  rotate.set_force(true);
  v1::RotateKeyRingResponse rotated;
  {
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    ASSERT_TRUE(d.admin().RotateKeyRing(&ctx, rotate, &rotated).ok());
  }
  const std::string acked_kid = ActiveKid(rotated.ring());

  // Signing load: every call's end time and outcome.
  struct Outcome {
    Clock::time_point at;
    grpc::StatusCode code;
    std::string message;
    std::string kid;
  };
  std::mutex mu;
  std::vector<Outcome> outcomes;
  std::atomic<bool> stop{false};
  std::thread load([&] {
    while (!stop.load()) {
      v1::SignJwsRequest req;
      req.set_ring("op/stale");
      req.set_payload("x");
      v1::SignJwsResponse resp;
      grpc::ClientContext ctx;
      SetDeadline(&ctx, 5s);
      grpc::Status s = d.signer().SignJws(&ctx, req, &resp);
      std::lock_guard<std::mutex> lock(mu);
      outcomes.push_back({Clock::now(), s.error_code(), s.error_message(), resp.kid()});
      if (!s.ok()) std::this_thread::sleep_for(5ms);
    }
  });
  auto failures_between = [&](Clock::time_point from, Clock::time_point to) {
    std::lock_guard<std::mutex> lock(mu);
    int n = 0;
    for (const Outcome& o : outcomes) n += o.at >= from && o.at <= to && o.code != grpc::OK;
    return n;
  };

  // 1. A restart of PostgreSQL, shorter than the bound: no signing call fails.
  std::this_thread::sleep_for(300ms);
  auto restart_from = Clock::now();
  ASSERT_TRUE(Cluster()->Restart("immediate").ok());
  std::this_thread::sleep_for(1500ms);
  EXPECT_EQ(failures_between(restart_from, Clock::now()), 0);

  // 2. Stopped for longer than the bound.
  auto stopped_at = Clock::now();
  ASSERT_TRUE(Cluster()->Stop("immediate").ok());
  {
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    v1::RotateKeyRingResponse refused;
    auto sent = Clock::now();
    grpc::Status s = d.admin().RotateKeyRing(&ctx, rotate, &refused);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
    EXPECT_LT(MsSince(sent, Clock::now()), 2000) << "a lifecycle write must fail at once";
  }
  std::optional<Clock::time_point> first_refusal;
  std::string refusal_message;
  auto deadline = Clock::now() + 15s;
  while (!first_refusal && Clock::now() < deadline) {
    std::this_thread::sleep_for(20ms);
    std::lock_guard<std::mutex> lock(mu);
    for (const Outcome& o : outcomes) {
      if (o.at > stopped_at && o.code == grpc::StatusCode::UNAVAILABLE) {
        first_refusal = o.at;
        refusal_message = o.message;
        break;
      }
    }
  }
  ASSERT_TRUE(first_refusal.has_value()) << "signing was never refused";
  const double refused_after = MsSince(stopped_at, *first_refusal);
  std::printf("PostgreSQL stopped: signing refused after %.0f ms (bound 3 s): %s\n", refused_after,
              refusal_message.c_str());
  // Refused only once custodyd's own count of seconds since its last successful read of the
  // store reached the bound. (Measured from the stop, the refusal can come sooner: after the
  // restart above, a slow reconnect — seen under ASan — leaves the last good read older than the
  // stop. That signing survives a short outage is step 1.)
  const size_t at = refusal_message.find("metadata unreachable for ");
  ASSERT_NE(at, std::string::npos) << refusal_message;
  const int unreachable_s = std::atoi(refusal_message.c_str() + at + 25);
  EXPECT_GE(unreachable_s, 3) << refusal_message;
  EXPECT_LT(refused_after, 5000);
  {
    auto health_deadline = Clock::now() + 3s;
    while (Serving(d) && Clock::now() < health_deadline) std::this_thread::sleep_for(50ms);
    EXPECT_FALSE(Serving(d)) << "health must be NOT_SERVING past the bound";
  }
  // Refused consistently, not intermittently, while the database is away.
  std::this_thread::sleep_for(1s);
  {
    std::lock_guard<std::mutex> lock(mu);
    int ok_after = 0;
    for (const Outcome& o : outcomes) {
      ok_after += o.at > *first_refusal + 100ms && o.code == grpc::OK;
    }
    EXPECT_EQ(ok_after, 0);
  }

  // 3. Back: catches up without a restart.
  auto started_at = Clock::now();
  ASSERT_TRUE(Cluster()->StartServer().ok());
  std::optional<Clock::time_point> resumed;
  deadline = Clock::now() + 20s;
  while (!resumed && Clock::now() < deadline) {
    std::this_thread::sleep_for(20ms);
    std::lock_guard<std::mutex> lock(mu);
    for (const Outcome& o : outcomes) {
      if (o.at > started_at && o.code == grpc::OK) {
        resumed = o.at;
        EXPECT_EQ(o.kid, acked_kid) << "the acknowledged rotation must still be in force";
        break;
      }
    }
  }
  stop = true;
  load.join();
  ASSERT_TRUE(resumed.has_value()) << "signing never resumed\n" << d.log();
  std::printf("PostgreSQL back: signing resumed %.0f ms after pg_ctl start returned\n",
              MsSince(started_at, *resumed));
  {
    // The health thread looks every 100 ms.
    auto health_deadline = Clock::now() + 3s;
    while (!Serving(d) && Clock::now() < health_deadline) std::this_thread::sleep_for(50ms);
    EXPECT_TRUE(Serving(d));
  }
  grpc::ClientContext ctx;
  SetDeadline(&ctx, kCallTimeout);
  v1::RotateKeyRingResponse again;
  grpc::Status s = d.admin().RotateKeyRing(&ctx, rotate, &again);
  EXPECT_TRUE(s.ok()) << s.error_message();
}

int CountLines(const std::string& log, const std::string& needle) {
  int n = 0;
  for (size_t at = 0; (at = log.find(needle, at)) != std::string::npos; at += needle.size()) ++n;
  return n;
}

// Exactly one replica runs the scheduler (a PostgreSQL session-level advisory lock). With a
// ring rotating every 2 s (and retiring and destroying old versions), the leader is SIGKILLed:
// another replica takes the lock and the rotations continue. Activations stay at least one
// period apart (no period rotated twice) and no version is destroyed twice.
TEST_F(ReplicaTest, SchedulerLeaderDiesAndAnotherTakesOver) {
  // Retention counts from retire_time + the staleness bound (RetiredVersionIsKeptForTheOther
  // ReplicasStalenessBound): a short bound, so that retired versions get destroyed in this test.
  replica_flags_ = {"--max_metadata_staleness=2s"};
  StartReplicas(3);
  const int64_t kPeriodMs = 2000;
  v1::CreateKeyRingRequest req;
  req.set_name("op/scheduled");
  req.set_purpose(v1::SIGN);
  req.set_alg("ES256");
  req.mutable_policy()->set_prepublish_ms(1000);
  req.mutable_policy()->set_rotation_period_ms(kPeriodMs);
  req.mutable_policy()->set_retain_ms(1000);
  req.mutable_policy()->set_destroy_delay_ms(1000);
  v1::KeyRing ring;
  {
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    grpc::Status s = replica(0).admin().CreateKeyRing(&ctx, req, &ring);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  const std::string kAcquired = "\"event\":\"scheduler.leader\",\"state\":\"acquired\"";
  auto leaders = [&] {
    std::vector<int> out;
    for (int i = 0; i < 3; ++i) {
      if (CountLines(replica(i).log(), kAcquired) > 0) out.push_back(i);
    }
    return out;
  };
  std::vector<int> first = leaders();
  ASSERT_EQ(first.size(), 1u) << "exactly one replica must lead";
  const int leader = first[0];
  std::this_thread::sleep_for(std::chrono::milliseconds(kSanitized ? 6000 : 5000));
  const int rotations_before = CountLines(replica(leader).log(), "\"event\":\"ring.rotated\"");
  EXPECT_GE(rotations_before, 1) << replica(leader).log();
  std::string killed_log_path = dirs_[static_cast<size_t>(leader)]->path() + "/custodyd.log";
  auto killed_at = Clock::now();
  replica(leader).Kill();
  std::optional<Clock::time_point> taken_over;
  int successor = -1;
  while (!taken_over && Clock::now() < killed_at + 15s) {
    for (int i = 0; i < 3; ++i) {
      if (i != leader && CountLines(replica(i).log(), kAcquired) > 0) {
        taken_over = Clock::now();
        successor = i;
      }
    }
    std::this_thread::sleep_for(10ms);
  }
  ASSERT_TRUE(taken_over.has_value()) << "no replica took over";
  const double gap = MsSince(killed_at, *taken_over);
  std::printf("scheduler leader SIGKILLed: replica %d took over after %.0f ms\n", successor, gap);
  RecordProperty("takeover_ms", static_cast<int>(gap));
  EXPECT_LT(gap, 5000);
  std::this_thread::sleep_for(std::chrono::milliseconds(3 * kPeriodMs + 1000));
  EXPECT_GE(CountLines(replica(successor).log(), "\"event\":\"ring.rotated\""), 2)
      << "rotations must continue on the new leader";
  for (int i = 0; i < 3; ++i) {
    if (i != leader && i != successor) {
      EXPECT_EQ(CountLines(replica(i).log(), kAcquired), 0) << "two leaders";
    }
  }

  // Activations at least a period apart.
  auto rows = Cluster()->Psql(db_,
                              "SELECT activate_time FROM versions WHERE ring = 'op/scheduled' AND "
                              "activate_time > 0 ORDER BY activate_time");
  ASSERT_TRUE(rows.ok());
  std::vector<int64_t> activations;
  size_t start = 0;
  for (size_t nl; (nl = rows->find('\n', start)) != std::string::npos; start = nl + 1) {
    activations.push_back(std::stoll(rows->substr(start, nl - start)));
  }
  ASSERT_GE(activations.size(), 4u);
  int64_t longest = 0;
  for (size_t i = 1; i < activations.size(); ++i) {
    const int64_t between = activations[i] - activations[i - 1];
    EXPECT_GE(between, kPeriodMs) << "activation " << i << " came early: a period rotated twice";
    longest = std::max(longest, between);
  }
  std::printf("%zu activations; longest interval %lld ms (period %lld ms)\n", activations.size(),
              static_cast<long long>(longest), static_cast<long long>(kPeriodMs));
  // Each destroyed version was destroyed once, by one replica.
  std::map<std::string, int> destroyed;
  std::vector<std::string> logs = {ReadFileOrDie(killed_log_path)};
  for (int i = 0; i < 3; ++i) {
    if (i != leader) logs.push_back(replica(i).log());
  }
  for (const std::string& log : logs) {
    size_t at = 0;
    const std::string needle = "\"event\":\"version.destroyed\"";
    while ((at = log.find(needle, at)) != std::string::npos) {
      size_t eol = log.find('\n', at);
      ++destroyed[log.substr(at, eol - at)];
      at = eol;
    }
  }
  EXPECT_GE(destroyed.size(), 1u);
  for (const auto& [line, n] : destroyed) EXPECT_EQ(n, 1) << line;
}

// With several replicas, one that has not yet learned of a rotation may still sign with the
// version just RETIRED: until the notification arrives, or, if it lost the store, until its
// --max_metadata_staleness bound. So the leader's retention of a RETIRED version counts from
// retire_time + max_metadata_staleness: with retain 1 s and a 4 s bound, the version stays
// published (RETIRED) for 5 s, not 1 s.
TEST_F(ReplicaTest, RetiredVersionIsKeptForTheOtherReplicasStalenessBound) {
  const int64_t kStalenessMs = 4000, kRetainMs = 1000;
  replica_flags_ = {"--max_metadata_staleness=4s"};
  StartReplicas(2);
  v1::CreateKeyRingRequest req;
  req.set_name("op/retained");
  req.set_purpose(v1::SIGN);
  req.set_alg("ES256");
  req.mutable_policy()->set_prepublish_ms(1000);
  req.mutable_policy()->set_retain_ms(kRetainMs);
  req.mutable_policy()->set_destroy_delay_ms(60000);
  v1::KeyRing ring;
  {
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    grpc::Status s = replica(0).admin().CreateKeyRing(&ctx, req, &ring);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  v1::RotateKeyRingRequest rotate;
  rotate.set_ring("op/retained");
  rotate.set_force(true);
  v1::RotateKeyRingResponse rotated;
  {
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    grpc::Status s = replica(1).admin().RotateKeyRing(&ctx, rotate, &rotated);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  // Version 1's retire time, as recorded.
  int64_t retire_ms = 0;
  for (const v1::KeyVersion& v : rotated.ring().versions()) {
    if (v.version() == 1) retire_ms = v.retire_time_ms();
  }
  ASSERT_GT(retire_ms, 0) << rotated.ring().DebugString();
  auto now_ms = [] {
    return std::chrono::duration_cast<std::chrono::milliseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  };
  // Watch version 1 on both replicas until it leaves RETIRED (the leader schedules its
  // destruction, and the other replica learns of it).
  int64_t left_retired_ms = 0;
  while (left_retired_ms == 0 && now_ms() < retire_ms + kStalenessMs + kRetainMs + 6000) {
    for (int i = 0; i < 2 && left_retired_ms == 0; ++i) {
      v1::GetKeyRingRequest get;
      get.set_name("op/retained");
      v1::KeyRing seen;
      grpc::ClientContext ctx;
      SetDeadline(&ctx, kCallTimeout);
      const int64_t asked_ms = now_ms();
      ASSERT_TRUE(replica(i).admin().GetKeyRing(&ctx, get, &seen).ok());
      for (const v1::KeyVersion& v : seen.versions()) {
        if (v.version() == 1 && v.state() != v1::RETIRED) {
          EXPECT_EQ(v.state(), v1::DESTROY_SCHEDULED);
          left_retired_ms = asked_ms;
        }
      }
    }
    std::this_thread::sleep_for(50ms);
  }
  ASSERT_GT(left_retired_ms, 0) << "version 1 was never scheduled for destruction";
  std::printf(
      "retired version left RETIRED %lld ms after its retirement (retain %lld ms + "
      "staleness bound %lld ms)\n",
      static_cast<long long>(left_retired_ms - retire_ms), static_cast<long long>(kRetainMs),
      static_cast<long long>(kStalenessMs));
  // It was still RETIRED when asked before the bound (the answer at asked_ms said so until then).
  EXPECT_GE(left_retired_ms - retire_ms, kRetainMs + kStalenessMs - 100);
}

// A sample's value on a /metrics page (a family without labels); nullopt when absent.
std::optional<double> MetricValue(const std::string& page, const std::string& name) {
  for (size_t start = 0, nl; (nl = page.find('\n', start)) != std::string::npos; start = nl + 1) {
    if (page.compare(start, name.size() + 1, name + " ") == 0) {
      return std::stod(page.substr(start + name.size() + 1, nl - start - name.size() - 1));
    }
  }
  return std::nullopt;
}

// Replica state on /metrics (server/daemon/replica_metrics.h), scraped by a real Prometheus that
// evaluates deploy/prometheus/alerts.yml: one leader among the replicas, a fresh last good read,
// another replica's change counted; with PostgreSQL stopped the age grows, failures are counted
// and CustodyMetadataStale fires on both replicas, then clears when the database is back (the
// time to the first good read after the start is printed).
TEST_F(ReplicaTest, ReplicaStateIsExportedAndTheStaleAlertFires) {
  metrics_ports_ = {FreePort(), FreePort()};
  replica_flags_ = {"--max_metadata_staleness=6s"};
  StartReplicas(2);
  TempDir prom_dir;
  Prometheus prometheus(prom_dir.path(), metrics_ports_);
  auto page = [&](int i) {
    return HttpGet(
        absl::StrCat("http://127.0.0.1:", metrics_ports_[static_cast<size_t>(i)], "/metrics"));
  };
  auto value = [&](int i, const std::string& name) {
    return MetricValue(page(i), name).value_or(-1);
  };
  // Exactly one leader (the second replica asks every 0.5 s, and is refused).
  double leaders = 0;
  for (int tries = 0; tries < 50 && leaders != 1; ++tries) {
    leaders = value(0, "custody_scheduler_leader") + value(1, "custody_scheduler_leader");
    std::this_thread::sleep_for(100ms);
  }
  EXPECT_EQ(leaders, 1);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(value(i, "custody_metadata_max_staleness_seconds"), 6);
    const double age = value(i, "custody_metadata_last_good_read_age_seconds");
    EXPECT_GE(age, 0);
    EXPECT_LT(age, 3);  // re-read at least every 1.5 s (a quarter of the bound)
  }
  const double refreshed = value(1, "custody_metadata_rings_refreshed_total");
  const double generation = value(1, "custody_jwks_generation");
  v1::KeyRing ring;
  ASSERT_TRUE(CreateEs256(replica(0), "op/metrics", &ring).ok());
  bool seen = false;
  for (int tries = 0; tries < 50 && !seen; ++tries) {
    seen = value(1, "custody_metadata_rings_refreshed_total") > refreshed &&
           value(1, "custody_jwks_generation") > generation;
    std::this_thread::sleep_for(100ms);
  }
  EXPECT_TRUE(seen) << page(1);
  CommandResult lint = RunCommand({"/usr/bin/promtool", "check", "metrics"}, page(1));
  EXPECT_EQ(lint.exit_code, 0) << lint.out << lint.err;
  EXPECT_EQ(prometheus.QueryUntil("sum(custody_scheduler_leader)", "1"), "1") << prometheus.log();

  // When each replica's first good read after `since` began, relative to it (negative: the
  // database answered before pg_ctl returned), from the age it exports; -1e9 if none in 10 s.
  auto first_good_read_ms = [&](Clock::time_point since) {
    std::vector<double> at(2, -1e9);
    while ((at[0] == -1e9 || at[1] == -1e9) && Clock::now() < since + 10s) {
      for (size_t i = 0; i < 2; ++i) {
        if (at[i] != -1e9) continue;
        const double age =
            value(static_cast<int>(i), "custody_metadata_last_good_read_age_seconds");
        const double now_ms = MsSince(since, Clock::now());
        // A read newer than the outage (which lasted more than half a second).
        if (age >= 0 && age < 0.5) at[i] = now_ms - age * 1000;
      }
      std::this_thread::sleep_for(10ms);
    }
    return at;
  };

  // A restart (-m immediate: crash recovery) shorter than the bound.
  ASSERT_TRUE(Cluster()->Restart("immediate").ok());
  const auto restarted = Clock::now();
  std::vector<double> after_restart = first_good_read_ms(restarted);
  std::printf(
      "PostgreSQL restarted (-m immediate): first good read %.0f ms and %.0f ms after "
      "pg_ctl returned\n",
      after_restart[0], after_restart[1]);
  EXPECT_GT(after_restart[0], -1e9);
  EXPECT_GT(after_restart[1], -1e9);

  const double failures = value(0, "custody_metadata_refresh_failures_total");
  ASSERT_TRUE(Cluster()->Stop("fast").ok());
  const std::string firing = prometheus.QueryUntil(
      "count(ALERTS{alertname=\"CustodyMetadataStale\",alertstate=\"firing\"})", "2", 20000);
  const double stale_age = value(0, "custody_metadata_last_good_read_age_seconds");
  const double failures_after = value(0, "custody_metadata_refresh_failures_total");
  ASSERT_TRUE(Cluster()->StartServer().ok());
  const auto started = Clock::now();
  EXPECT_EQ(firing, "2") << prometheus.log();
  EXPECT_GT(stale_age, 3);
  EXPECT_GT(failures_after, failures);
  // Back: each replica's next good read, timed from pg_ctl start's return.
  std::vector<double> after_start = first_good_read_ms(started);
  std::printf(
      "metadata stale alert fired on both replicas (age %.1f s); after the database "
      "started, first good read %.0f ms and %.0f ms after pg_ctl returned\n",
      stale_age, after_start[0], after_start[1]);
  EXPECT_GT(after_start[0], -1e9);
  EXPECT_GT(after_start[1], -1e9);
  EXPECT_EQ(
      prometheus.QueryUntil(
          "count(ALERTS{alertname=\"CustodyMetadataStale\",alertstate=\"firing\"}) or vector(0)",
          "0", 20000),
      "0");
}

// The client library with every replica's address, 8 threads signing and decrypting, a random
// replica SIGKILLed every 2 s and restarted: no call fails (each is retried on another replica
// within its deadline), every JWS verifies against the JWKS (OpenSSL, tests/independent_jws)
// and every plaintext comes back.
TEST_F(ReplicaTest, ClientFailsOverWhileReplicasAreKilled) {
  StartReplicas(3);
  const int kKills = kSanitized ? 8 : 30;
  v1::KeyRing ring;
  ASSERT_TRUE(CreateEs256(replica(0), "ha/sign", &ring).ok());
  {
    v1::CreateKeyRingRequest req;
    req.set_name("ha/enc");
    req.set_purpose(v1::DECRYPT);
    req.set_alg("ECDH-ES+A128KW");
    req.set_curve("P-256");
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    v1::KeyRing enc;
    grpc::Status s = replica(0).admin().CreateKeyRing(&ctx, req, &enc);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(SignWhenReady(replica(i), "ha/sign", "", 5s));
  std::this_thread::sleep_for(300ms);  // the decryption ring reached every replica too

  client::ChannelOptions channel;
  channel.address = AllAddresses();
  client::ClientOptions options;
  options.deadline = absl::Seconds(5);
  options.max_attempts = 100;
  options.initial_backoff = absl::Milliseconds(10);
  options.max_backoff = absl::Milliseconds(200);
  auto client = client::Client::Connect(channel, options);
  ASSERT_TRUE(client.ok()) << client.status();
  auto sign_jwks = (*client)->GetJwks({"ha/sign"});
  auto enc_jwks = (*client)->GetJwks({"ha/enc"});
  ASSERT_TRUE(sign_jwks.ok() && enc_jwks.ok());
  std::string error;
  JwsKeys keys = JwsKeysOf(sign_jwks->jwks, &error);
  ASSERT_EQ(error, "");

  std::atomic<bool> stop{false};
  std::atomic<int> signed_ok{0}, decrypted_ok{0}, failed{0};
  std::mutex failures_mu;
  std::vector<std::string> failures;
  std::vector<std::thread> workers;
  for (int t = 0; t < 8; ++t) {
    workers.emplace_back([&, t] {
      for (int n = 0; !stop.load(); ++n) {
        const std::string payload = absl::StrCat("thread ", t, " call ", n);
        std::string problem;
        auto started = Clock::now();
        if (t % 2 == 0) {
          auto jws = (*client)->SignJws("ha/sign", payload);
          std::string got;
          if (!jws.ok()) {
            problem = jws.status().ToString();
          } else if (std::string v = VerifyJws(keys, jws->jws, nullptr, &got); !v.empty()) {
            problem = "JWS does not verify: " + v;
          } else if (got != payload) {
            problem = "JWS payload differs";
          } else {
            ++signed_ok;
          }
        } else {
          auto jwe = client::EncryptToJwks(payload, enc_jwks->jwks);
          if (!jwe.ok()) {
            problem = jwe.status().ToString();
          } else if (auto pt = (*client)->DecryptJwe("ha/enc", *jwe); !pt.ok()) {
            problem = pt.status().ToString();
          } else if (pt->plaintext != payload) {
            problem = "wrong plaintext";
          } else {
            ++decrypted_ok;
          }
        }
        if (!problem.empty()) {
          ++failed;
          std::lock_guard<std::mutex> lock(failures_mu);
          failures.push_back(
              absl::StrCat(problem, " after ", MsSince(started, Clock::now()), " ms"));
        }
      }
    });
  }
  std::mt19937 rng(42);
  double longest_restart = 0;
  for (int k = 0; k < kKills; ++k) {
    std::this_thread::sleep_for(2s);
    const int victim = static_cast<int>(rng() % 3);
    replica(victim).Kill();
    auto killed = Clock::now();
    Restart(victim);
    ASSERT_TRUE(replica(victim).started()) << replica(victim).log();
    longest_restart = std::max(longest_restart, MsSince(killed, Clock::now()));
  }
  std::this_thread::sleep_for(1s);
  stop = true;
  for (auto& w : workers) w.join();
  std::printf(
      "failover: %d kills, %d signatures and %d decryptions, %d failed; longest restart "
      "%.0f ms\n",
      kKills, signed_ok.load(), decrypted_ok.load(), failed.load(), longest_restart);
  EXPECT_EQ(failed.load(), 0);
  for (size_t i = 0; i < std::min<size_t>(failures.size(), 5); ++i) {
    ADD_FAILURE() << failures[i];
  }
  EXPECT_GT(signed_ok.load(), kKills * 10);
  EXPECT_GT(decrypted_ok.load(), kKills * 10);
}

// Write access to the PostgreSQL database is not enough to publish a key or revive one: with psql,
// op/a's version is given an attacker's public key and kid, and op/c's compromised version is
// set back to ACTIVE (its successor RETIRED), the rings' generations bumped and a notification
// sent, as a replica's own commit does. Neither record's tag verifies: both replicas take the
// versions out of service, and no JWKS they serve meanwhile holds the attacker's key or the
// compromised one. An edit that moves no generation and sends no notification (op/b) is caught
// by the periodic re-read; a restarted replica refuses all of them at load.
TEST_F(ReplicaTest, RowsEditedWithPsqlAreRefusedByEveryReplica) {
  StartReplicas(2);
  v1::KeyRing a, b, c;
  ASSERT_TRUE(CreateEs256(replica(0), "op/a", &a).ok());
  ASSERT_TRUE(CreateEs256(replica(0), "op/b", &b).ok());
  ASSERT_TRUE(CreateEs256(replica(0), "op/c", &c).ok());
  const std::string compromised_kid = c.versions(0).kid();
  v1::CompromiseKeyVersionRequest compromise;
  compromise.set_ring("op/c");
  compromise.set_version(1);
  v1::KeyRing after;
  grpc::ClientContext cctx;
  SetDeadline(&cctx, kCallTimeout);
  ASSERT_TRUE(replica(0).admin().CompromiseKeyVersion(&cctx, compromise, &after).ok());
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(SignWhenReady(replica(i), "op/a", "", 5s).has_value()) << replica(i).log();
    ASSERT_TRUE(SignWhenReady(replica(i), "op/c", compromised_kid, 5s).has_value());
  }
  const std::string attacker_x = "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4";
  const std::string attacker_jwk =
      absl::StrCat(R"({"crv":"P-256","kty":"EC","x":")", attacker_x,
                   R"(","y":"4Etl6SRW2YilurN5n_3W5TTNg_yQCSN_bIEO4Ip4oDU"})");
  auto edited = Cluster()->Psql(
      db_,
      absl::StrCat("UPDATE versions SET public_jwk = '", attacker_jwk,
                   "', kid = 'attacker-kid' WHERE ring = 'op/a'; "
                   "UPDATE versions SET state = 'RETIRED' WHERE ring = 'op/c' AND version = 2; "
                   "UPDATE versions SET state = 'ACTIVE', compromised = false "
                   "WHERE ring = 'op/c' AND version = 1; "
                   "UPDATE rings SET generation = generation + 1 WHERE name IN ('op/a', 'op/c'); "
                   "SELECT pg_notify('custody_metadata', 'op/a,op/c');"));
  ASSERT_TRUE(edited.ok()) << edited.status();

  // Every JWKS read while the replicas catch up: never the attacker's key or the compromised one.
  auto check_jwks = [&](Custodyd& d) {
    const std::string jwks = Jwks(d);
    EXPECT_EQ(jwks.find(attacker_x), std::string::npos) << jwks;
    EXPECT_EQ(jwks.find("attacker-kid"), std::string::npos) << jwks;
    EXPECT_EQ(jwks.find(compromised_kid), std::string::npos) << jwks;
  };
  auto refused = [&](Custodyd& d, const std::string& ring) {
    check_jwks(d);
    v1::SignJwsResponse signed_jws;
    grpc::Status s = Sign(d, ring, "p", &signed_jws);
    return s.error_code() == grpc::StatusCode::FAILED_PRECONDITION &&
           s.error_message().find("tag does not verify") != std::string::npos;
  };
  for (int i = 0; i < 2; ++i) {
    for (const char* ring : {"op/a", "op/c"}) {
      auto deadline = Clock::now() + 10s;
      while (!refused(replica(i), ring) && Clock::now() < deadline) {
        std::this_thread::sleep_for(20ms);
      }
      EXPECT_TRUE(refused(replica(i), ring)) << "replica " << i << " " << ring << "\n"
                                             << replica(i).log();
    }
    EXPECT_NE(replica(i).log().find("\"event\":\"metadata.tag_mismatch\""), std::string::npos);
  }

  // A silent edit: no generation moved, no notification.
  edited = Cluster()->Psql(db_, absl::StrCat("UPDATE versions SET public_jwk = '", attacker_jwk,
                                             "', kid = 'attacker-kid' WHERE ring = 'op/b'"));
  ASSERT_TRUE(edited.ok()) << edited.status();
  for (int i = 0; i < 2; ++i) {
    auto deadline = Clock::now() + 15s;
    while (!refused(replica(i), "op/b") && Clock::now() < deadline) {
      std::this_thread::sleep_for(50ms);
    }
    EXPECT_TRUE(refused(replica(i), "op/b")) << "replica " << i << "\n" << replica(i).log();
  }

  Restart(1);
  ASSERT_TRUE(replica(1).started()) << replica(1).log();
  for (const char* ring : {"op/a", "op/b", "op/c"}) EXPECT_TRUE(refused(replica(1), ring)) << ring;
  v1::KeyRing ring;
  v1::GetKeyRingRequest get;
  get.set_name("op/c");
  grpc::ClientContext gctx;
  SetDeadline(&gctx, kCallTimeout);
  ASSERT_TRUE(replica(1).admin().GetKeyRing(&gctx, get, &ring).ok());
  EXPECT_TRUE(ring.versions(0).metadata_tag_mismatch());
  EXPECT_FALSE(ring.versions(0).object_missing());  // refused, not destroyed
}

// Rows from before tags (migration 4 gives them an empty tag) on a token without a tag key: the
// replica whose start generates the key tags them once; the other finds the key and serves them.
TEST_F(ReplicaTest, StateFromBeforeTagsIsAdoptedOnceByTheReplicaThatMakesTheKey) {
  StartReplicas(2);
  v1::KeyRing ring;
  ASSERT_TRUE(CreateEs256(replica(0), "op/old", &ring).ok());
  const std::string kid = ring.versions(0).kid();
  replica(0).Kill();
  replica(1).Kill();
  ASSERT_TRUE(Cluster()->Psql(db_, "UPDATE rings SET tag = ''; UPDATE versions SET tag = ''").ok());
  const std::string token_dir = dirs_[0]->path();
  CommandResult deleted = RunCommand({"pkcs11-tool", "--module", "/usr/lib/softhsm/libsofthsm2.so",
                                      "--login", "--pin", "env:CUSTODY_TEST_PIN", "--delete-object",
                                      "--type", "secrkey", "--label", "custody-metadata-tag"},
                                     "",
                                     {"SOFTHSM2_CONF=" + token_dir + "/softhsm2.conf",
                                      "CUSTODY_TEST_PIN=" + ReadFileOrDie(token_dir + "/pin")});
  ASSERT_EQ(deleted.exit_code, 0) << deleted.out << deleted.err;
  Restart(0);
  ASSERT_TRUE(replica(0).started()) << replica(0).log();
  EXPECT_NE(replica(0).log().find(
                "\"event\":\"metadata.tags_adopted\",\"rings\":\"1\",\"versions\":\"1\""),
            std::string::npos)
      << replica(0).log();
  Restart(1);
  ASSERT_TRUE(replica(1).started()) << replica(1).log();
  EXPECT_EQ(replica(1).log().find("metadata.tags_adopted"), std::string::npos);
  EXPECT_EQ(replica(1).log().find("metadata.tag_mismatch"), std::string::npos) << replica(1).log();
  for (int i = 0; i < 2; ++i) {
    auto signed_jws = SignWhenReady(replica(i), "op/old", "", 5s);
    ASSERT_TRUE(signed_jws.has_value()) << replica(i).log();
    EXPECT_EQ(signed_jws->kid(), kid);
  }
}

}  // namespace
}  // namespace custody::testing
