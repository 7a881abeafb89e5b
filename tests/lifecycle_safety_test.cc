// An operator's ordinary mistakes against the real custodyd (issue 22): policy floors that keep
// keys from being destroyed or unpublished early, a rotation that did not rotate saying so, a
// compromised version that never returns, one custodyd per Unix socket, errors that explain
// without leaking the server's internals, and the audit chain's end and archived beginning made
// provable by anchors kept outside the chain's files.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "jose/json.h"
#include "rotation/testing/postgres_cluster.h"
#include "tests/testing/harness.h"
#include "tests/testing/rpc_helpers.h"

namespace custody::testing {
namespace {

using namespace std::chrono_literals;

// The deadline of this file's RPCs (rpc_helpers.h's are a hang guard only).
constexpr std::chrono::milliseconds kCallTimeout = 20s;

int64_t UnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

grpc::Status Create(Custodyd& d, const std::string& name, const v1::RotationPolicy* policy,
                    v1::KeyRing* out = nullptr, const std::string& import_pem = "") {
  v1::CreateKeyRingRequest req;
  req.set_name(name);
  req.set_purpose(v1::SIGN);
  req.set_alg("ES256");
  if (policy != nullptr) *req.mutable_policy() = *policy;
  if (!import_pem.empty()) req.mutable_import_key()->set_pkcs8_pem(import_pem);
  return CreateRing(d, req, out, kCallTimeout);
}

std::set<std::string> JwksKids(Custodyd& d, const std::string& ring) {
  std::set<std::string> kids;
  auto json = jose::ParseJson(Jwks(d, {ring}));
  if (!json.ok()) return kids;
  const jose::Json* keys = json->Find("keys");
  if (keys == nullptr || !keys->is_array()) return kids;
  for (const jose::Json& k : keys->as_array()) {
    if (const jose::Json* kid = k.Find("kid"); kid != nullptr) kids.insert(kid->as_string());
  }
  return kids;
}

enum class Op { kDisable, kEnable, kSchedule, kCancel, kCompromise };

grpc::Status VersionOp(Custodyd& d, Op op, const std::string& ring, uint32_t version) {
  v1::KeyVersionRequest req;
  req.set_ring(ring);
  req.set_version(version);
  v1::KeyRing out;
  grpc::ClientContext ctx;
  SetDeadline(&ctx, kCallTimeout);
  switch (op) {
    case Op::kDisable:
      return d.admin().DisableKeyVersion(&ctx, req, &out);
    case Op::kEnable:
      return d.admin().EnableKeyVersion(&ctx, req, &out);
    case Op::kSchedule:
      return d.admin().ScheduleKeyVersionDestruction(&ctx, req, &out);
    case Op::kCancel:
      return d.admin().CancelKeyVersionDestruction(&ctx, req, &out);
    case Op::kCompromise: {
      v1::CompromiseKeyVersionRequest c;
      c.set_ring(ring);
      c.set_version(version);
      c.set_reason("test");
      return d.admin().CompromiseKeyVersion(&ctx, c, &out);
    }
  }
  return grpc::Status::OK;
}

grpc::Status Sign(Custodyd& d, const std::string& ring, v1::SignJwsResponse* out = nullptr) {
  v1::SignJwsRequest req;
  req.set_ring(ring);
  req.set_payload("{\"sub\":\"alice\"}");
  return SignJws(d, req, out, kCallTimeout);
}

const v1::KeyVersion* Version(const v1::KeyRing& ring, uint32_t n) {
  for (const v1::KeyVersion& v : ring.versions()) {
    if (v.version() == n) return &v;
  }
  return nullptr;
}

CommandResult Ctl(Custodyd& d, std::vector<std::string> args) {
  args.insert(args.begin(), "--addr=" + d.address());
  args.insert(args.begin(), BinDir() + "/custodyctl");
  return RunCommand(args);
}

bool Contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// ---------------------------------------------------------------------------------------------
// 1. Floors that protect keys.

TEST(PolicyFloorsTest, DefaultFloorsRefuseAPolicyThatWouldDestroyOrUnpublishEarly) {
  TempDir dir;
  Custodyd d(dir.path() + "/state");
  ASSERT_TRUE(d.started()) << d.log();
  // The mistake of issue 22: a policy naming only a rotation period, the rest zero.
  v1::RotationPolicy zeros = Policy(0, 30LL * 86400000, 0, 0);
  grpc::Status s = Create(d, "op/zeros", &zeros);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(), "destroy_delay 0s is below --min_destroy_delay=24h");
  v1::RotationPolicy short_retain = Policy(0, 0, 1000, 7LL * 86400000);
  s = Create(d, "op/short-retain", &short_retain);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(), "retain 1s is below --min_retain=1h");
  // Issue 28 #8: a rotation every millisecond.
  v1::RotationPolicy busy = Policy(0, 1, 86400000, 7LL * 86400000);
  s = Create(d, "op/busy", &busy);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(Contains(s.error_message(), "rotation_period 1ms is below --min_rotation_period=1h"))
      << s.error_message();
  // Nothing was created by the refusals.
  for (const char* name : {"op/zeros", "op/short-retain", "op/busy"}) {
    v1::GetKeyRingRequest req;
    req.set_name(name);
    v1::KeyRing ring;
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    EXPECT_EQ(d.admin().GetKeyRing(&ctx, req, &ring).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  // set-policy on an existing ring: refused the same way, the stored policy unchanged.
  ASSERT_TRUE(Create(d, "op/defaults", nullptr).ok());
  s = UpdatePolicy(d, "op/defaults", Policy(3600000, 0, 3600000, 60000));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(s.error_message(), "destroy_delay 1m is below --min_destroy_delay=24h");
  EXPECT_EQ(GetRing(d, "op/defaults").policy().destroy_delay_ms(), 7LL * 86400000);
  // What the floors allow is accepted.
  EXPECT_TRUE(UpdatePolicy(d, "op/defaults", Policy(3600000, 86400000, 3600000, 86400000)).ok());
  // Through custodyctl, the message reaches the operator.
  CommandResult r = Ctl(d, {"ring", "set-policy", "op/defaults", "--destroy_delay=1h"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(Contains(r.err, "destroy_delay 1h is below --min_destroy_delay=24h")) << r.err;
}

TEST(PolicyFloorsTest, FloorsAreLoweredOnlyByFlagsAndARingBelowThemRunsRaised) {
  TempDir dir;
  const std::string state = dir.path() + "/state";
  {
    Custodyd low(state, {"--min_destroy_delay=1s", "--min_retain=2s", "--min_rotation_period=0"});
    ASSERT_TRUE(low.started()) << low.log();
    v1::RotationPolicy p = Policy(1000, 0, 2000, 1000);
    ASSERT_TRUE(Create(low, "op/low", &p).ok());
    v1::RotationPolicy below = Policy(0, 0, 1999, 1000);
    grpc::Status s = Create(low, "op/below", &below);
    EXPECT_EQ(s.error_message(), "retain 1.999s is below --min_retain=2s");
    low.Stop();
  }
  // Restarted with the default floors: the ring stored below them runs with them (logged).
  Custodyd d(state);
  ASSERT_TRUE(d.started()) << d.log();
  v1::KeyRing ring = GetRing(d, "op/low");
  EXPECT_EQ(ring.policy().destroy_delay_ms(), 86400000);
  EXPECT_EQ(ring.policy().retain_ms(), 3600000);
  EXPECT_TRUE(Contains(d.log(), "ring.policy_below_floor")) << d.log();
  // A negative floor is refused at startup.
  CommandResult r = RunCommand({"timeout", "60", BinDir() + "/custodyd",
                                "--state_dir=" + dir.path() + "/other", "--min_retain=-1s"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(Contains(r.err, "--min_retain must not be negative")) << r.err;
}

// ---------------------------------------------------------------------------------------------
// 2. A rotation that did not rotate says so.

TEST(RotationAnswerTest, ARotationThatDidNotRotateExitsNonZeroWithTheTimeItCanBeDone) {
  TempDir dir;
  Custodyd d(dir.path() + "/state");
  ASSERT_TRUE(d.started()) << d.log();
  v1::RotationPolicy p = Policy(3600000, 0, 86400000, 86400000);
  v1::KeyRing ring;
  ASSERT_TRUE(Create(d, "op/slow", &p, &ring).ok());
  ASSERT_EQ(ring.versions_size(), 2);
  CommandResult r = Ctl(d, {"ring", "rotate", "op/slow"});
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_TRUE(Contains(r.err,
                       "FAILED_PRECONDITION: ring 'op/slow' was not rotated: PENDING "
                       "version 2 has not been published for prepublish (1h) yet; it can "
                       "be promoted from "))
      << r.err;
  const int64_t from = Version(ring, 2)->publish_time_ms() + 3600000;
  v1::RotateKeyRingResponse resp;
  grpc::Status s = Rotate(d, "op/slow", false, &resp);
  EXPECT_NEAR(NotRotatedUntilMs(s), from, 1) << s.error_message();
  EXPECT_EQ(GetRing(d, "op/slow").active_version(), 1u);
  // --force rotates, exits 0 and says which version is ACTIVE.
  r = Ctl(d, {"ring", "rotate", "op/slow", "--force"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(Contains(r.out, "\"active_version\": 2")) << r.out;
}

// ---------------------------------------------------------------------------------------------
// 3. A compromised version never returns.

std::string NewP256Pem(const std::string& dir) {
  const std::string path = dir + "/key.pem";
  CommandResult r = RunCommand({"openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                                "ec_paramgen_curve:P-256", "-out", path});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return ReadFileOrDie(path);
}

TEST(CompromiseTest, ACompromisedVersionCanOnlyBeDestroyed) {
  TempDir dir;
  Custodyd d(dir.path() + "/state", WithLowPolicyFloors());
  ASSERT_TRUE(d.started()) << d.log();
  const std::string pem = NewP256Pem(dir.path());
  v1::RotationPolicy p = Policy(60000, 0, 120000, 600000);
  v1::KeyRing ring;
  ASSERT_TRUE(Create(d, "op/c", &p, &ring, pem).ok());
  const std::string kid1 = Version(ring, 1)->kid();
  // The sequence of issue 22: compromise, cancel-destroy, enable.
  ASSERT_TRUE(VersionOp(d, Op::kCompromise, "op/c", 1).ok());
  EXPECT_EQ(JwksKids(d, "op/c").count(kid1), 0u);
  grpc::Status s = VersionOp(d, Op::kCancel, "op/c", 1);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(Contains(s.error_message(), "version 1 of ring 'op/c' is compromised"))
      << s.error_message();
  s = VersionOp(d, Op::kEnable, "op/c", 1);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(Contains(s.error_message(), "is compromised")) << s.error_message();
  s = VersionOp(d, Op::kDisable, "op/c", 1);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(GetRing(d, "op/c").versions(0).state(), v1::DESTROY_SCHEDULED);
  // Importing the same key again (its thumbprint is the kid) is refused too.
  v1::ImportKeyVersionRequest imp;
  imp.set_ring("op/c");
  imp.mutable_key()->set_pkcs8_pem(pem);
  v1::KeyRing out;
  grpc::ClientContext ctx;
  SetDeadline(&ctx, kCallTimeout);
  s = d.admin().ImportKeyVersion(&ctx, imp, &out);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  EXPECT_TRUE(Contains(s.error_message(), "compromised")) << s.error_message();
  // Signing uses the new ACTIVE version, never the compromised one; the JWKS never shows kid1.
  v1::SignJwsResponse signed_with;
  ASSERT_TRUE(Sign(d, "op/c", &signed_with).ok());
  EXPECT_NE(signed_with.kid(), kid1);
  EXPECT_EQ(JwksKids(d, "op/c").count(kid1), 0u);
  // And after a restart.
  d.Stop();
  Custodyd again(dir.path() + "/state", WithLowPolicyFloors());
  ASSERT_TRUE(again.started()) << again.log();
  EXPECT_EQ(JwksKids(again, "op/c").count(kid1), 0u);
  EXPECT_EQ(VersionOp(again, Op::kCancel, "op/c", 1).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
}

// ---------------------------------------------------------------------------------------------
// 4. One listener per socket.

TEST(SocketTest, ASecondCustodydOnALiveSocketRefusesAndTheFirstKeepsServing) {
  TempDir one, two;
  Custodyd first(one.path() + "/state");
  ASSERT_TRUE(first.started()) << first.log();
  ASSERT_TRUE(Create(first, "op/first", nullptr).ok());
  const std::string socket = one.path() + "/state/custodyd.sock";
  struct stat before {};
  ASSERT_EQ(stat(socket.c_str(), &before), 0);
  // The mistake: a second custodyd, another state dir, the first's socket.
  CommandResult r = RunCommand({"timeout", "60", BinDir() + "/custodyd",
                                "--state_dir=" + two.path() + "/state", "--listen=unix:" + socket});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_TRUE(Contains(r.err, "another custodyd is listening on " + socket)) << r.err;
  // The first's socket is still there (the same file) and it answers with its rings.
  struct stat after {};
  ASSERT_EQ(stat(socket.c_str(), &after), 0);
  EXPECT_EQ(after.st_ino, before.st_ino);
  EXPECT_EQ(GetRing(first, "op/first").name(), "op/first");
  EXPECT_TRUE(Sign(first, "op/first").ok());

  // A stale socket left by kill -9 is replaced by the next start.
  first.Kill();
  ASSERT_EQ(stat(socket.c_str(), &after), 0) << "kill -9 leaves the socket file";
  Custodyd next(one.path() + "/state");
  ASSERT_TRUE(next.started()) << next.log();
  EXPECT_TRUE(Contains(next.log(), "unix_listener.stale_socket_replaced")) << next.log();
  EXPECT_TRUE(Sign(next, "op/first").ok());
}

TEST(SocketTest, ShutdownRemovesOnlyItsOwnSocket) {
  TempDir one;
  Custodyd first(one.path() + "/state");
  ASSERT_TRUE(first.started()) << first.log();
  const std::string socket = one.path() + "/state/custodyd.sock";
  // Someone replaced the socket file behind custodyd's back (a second server after a wrong
  // "it is dead" decision): at shutdown custodyd leaves the file it does not own.
  const std::string moved = one.path() + "/moved.sock";
  ASSERT_EQ(rename(socket.c_str(), moved.c_str()), 0);
  WriteFileOrDie(socket, "not ours");
  first.Stop();
  EXPECT_TRUE(std::filesystem::exists(socket));
  EXPECT_EQ(ReadFileOrDie(socket), "not ours");
  EXPECT_TRUE(Contains(first.log(), "unix_listener.socket_not_removed")) << first.log();
}

TEST(SocketTest, CallsDuringShutdownAreUnavailableNotCancelled) {
  TempDir dir;
  auto d = std::make_unique<Custodyd>(dir.path() + "/state");
  ASSERT_TRUE(d->started()) << d->log();
  ASSERT_TRUE(Create(*d, "op/drain", nullptr).ok());
  // Callers as the client library behaves: sign until the first failure, then fail over (here:
  // stop). Each one's first failure must be one a client fails over on, and say why.
  std::atomic<int> signed_ok{0};
  std::vector<grpc::Status> first_failure(16);
  std::vector<std::thread> callers;
  for (size_t t = 0; t < first_failure.size(); ++t) {
    callers.emplace_back([&, t] {
      for (int i = 0; i < 100000; ++i) {
        grpc::Status s = Sign(*d, "op/drain");
        if (!s.ok()) {
          first_failure[t] = s;
          return;
        }
        ++signed_ok;
      }
    });
  }
  std::this_thread::sleep_for(300ms);
  d->Signal(SIGTERM);
  for (std::thread& t : callers) t.join();
  EXPECT_GT(signed_ok.load(), 0);
  int shutting_down = 0;
  for (const grpc::Status& s : first_failure) {
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
    shutting_down += Contains(s.error_message(), "custodyd is shutting down");
  }
  EXPECT_GT(shutting_down, 0) << "no caller was told why";
}

// ---------------------------------------------------------------------------------------------
// 5. Errors that explain without leaking.

TEST(ErrorTextTest, MetadataStoreDownIsUnavailableWithoutDriverText) {
  auto cluster = rotation::testing::PostgresCluster::Start();
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  ASSERT_TRUE((*cluster)->CreateDatabase("down").ok());
  TempDir dir;
  Custodyd d(dir.path() + "/state", {"--metadata=" + (*cluster)->Uri("down"),
                                     "--metadata_password_file=" + (*cluster)->password_file()});
  ASSERT_TRUE(d.started()) << d.log();
  ASSERT_TRUE(Create(d, "op/pg", nullptr).ok());
  ASSERT_TRUE((*cluster)->Stop("fast").ok());
  grpc::Status s = Create(d, "op/pg-2", nullptr);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_EQ(s.error_message(), "metadata store unreachable");
  s = UpdatePolicy(d, "op/pg", Policy(3600000, 0, 86400000, 86400000 * 7));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_FALSE(Contains(s.error_message(), (*cluster)->dir())) << s.error_message();
  EXPECT_FALSE(Contains(s.error_message(), "/")) << s.error_message();
  // The log has the details the caller did not get.
  EXPECT_TRUE(Contains(d.log(), "call.failed")) << d.log();
  ASSERT_TRUE((*cluster)->StartServer().ok());
}

// ---------------------------------------------------------------------------------------------
// 6. The audit chain's end and archived beginning, provable through anchors.

std::vector<std::string> AuditFiles(const std::string& dir) {
  std::vector<std::string> files;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("audit-", 0) == 0) files.push_back(entry.path().string());
  }
  std::sort(files.begin(), files.end());
  return files;
}

// The "anchor" member (SEQ:HASH) of the last audit.anchor line in a custodyd log.
std::string LastLoggedAnchor(const std::string& log) {
  std::string anchor;
  std::istringstream in(log);
  for (std::string line; std::getline(in, line);) {
    if (!Contains(line, "\"audit.anchor\"")) continue;
    auto json = jose::ParseJson(line);
    if (!json.ok()) continue;
    if (const jose::Json* a = json->Find("anchor"); a != nullptr) anchor = a->as_string();
  }
  return anchor;
}

CommandResult Verify(std::vector<std::string> flags, const std::vector<std::string>& files) {
  std::vector<std::string> argv = {BinDir() + "/custodyctl", "audit", "verify"};
  argv.insert(argv.end(), files.begin(), files.end());
  argv.insert(argv.end(), flags.begin(), flags.end());
  return RunCommand(argv);
}

void CutLastLines(const std::string& path, size_t n) {
  std::vector<std::string> lines;
  std::istringstream in(ReadFileOrDie(path));
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  ASSERT_GT(lines.size(), n);
  lines.resize(lines.size() - n);
  std::string out;
  for (const std::string& line : lines) out += line + "\n";
  WriteFileOrDie(path, out);
}

TEST(AuditAnchorTest, ATruncatedChainIsDetectedByVerifyAndRefusedAtStartup) {
  TempDir dir;
  const std::string state = dir.path() + "/state";
  {
    Custodyd d(state, {"--audit_anchor_lines=1"});
    ASSERT_TRUE(d.started()) << d.log();
    ASSERT_TRUE(Create(d, "op/audit", nullptr).ok());
    for (int i = 0; i < 10; ++i) ASSERT_TRUE(Sign(d, "op/audit").ok());
    d.Stop();
  }
  const std::string log = ReadFileOrDie(state + "/custodyd.log");
  const std::string anchor = LastLoggedAnchor(log);
  ASSERT_FALSE(anchor.empty()) << log;
  const uint64_t anchored_seq = std::stoull(anchor.substr(0, anchor.find(':')));
  const std::vector<std::string> files = AuditFiles(state + "/audit");
  ASSERT_EQ(files.size(), 1u);
  CommandResult r = Verify({"--state_dir=" + state}, files);
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_TRUE(Contains(r.out, "\"anchored\":true")) << r.out;
  EXPECT_TRUE(Contains(r.out, "\"last_seq\":" + std::to_string(anchored_seq))) << r.out;

  // Three lines cut off the end: every remaining link is valid; the anchor says what is missing.
  CutLastLines(files[0], 3);
  const std::string expected = "truncated: anchor at seq " + std::to_string(anchored_seq) +
                               ", file ends at " + std::to_string(anchored_seq - 3);
  EXPECT_EQ(Verify({}, files).exit_code, 0) << "without an anchor nothing shows";
  r = Verify({"--state_dir=" + state}, files);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(Contains(r.out, expected)) << r.out;
  r = Verify({"--anchor=" + anchor}, files);  // from the journal's audit.anchor line
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(Contains(r.out, expected)) << r.out;

  // custodyd refuses to continue the shortened chain unless told to.
  r = RunCommand({"timeout", "60", BinDir() + "/custodyd", "--state_dir=" + state,
                  "--listen=unix:" + dir.path() + "/refused.sock"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(Contains(r.err, "ends at seq " + std::to_string(anchored_seq - 3) +
                                  " but the metadata store anchored seq " +
                                  std::to_string(anchored_seq)))
      << r.err;
  EXPECT_TRUE(Contains(r.err, "--audit_new_chain")) << r.err;
  Custodyd again(state, {"--audit_new_chain", "--audit_anchor_lines=1"});
  ASSERT_TRUE(again.started()) << again.log();
  EXPECT_TRUE(Contains(again.log(), "audit.new_chain")) << again.log();
  EXPECT_TRUE(Sign(again, "op/audit").ok());
}

TEST(AuditAnchorTest, ADeletedAuditFileFailsClosedAndARestartIsRefused) {
  TempDir dir;
  const std::string state = dir.path() + "/state";
  Custodyd d(state, {"--audit_anchor_lines=1"});
  ASSERT_TRUE(d.started()) << d.log();
  ASSERT_TRUE(Create(d, "op/rm", nullptr).ok());
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(Sign(d, "op/rm").ok());
  for (int i = 0; i < 50 && LastLoggedAnchor(d.log()).empty(); ++i) {
    std::this_thread::sleep_for(100ms);
  }
  ASSERT_FALSE(LastLoggedAnchor(d.log()).empty()) << d.log();
  const std::vector<std::string> files = AuditFiles(state + "/audit");
  ASSERT_EQ(files.size(), 1u);
  ASSERT_EQ(unlink(files[0].c_str()), 0);
  // Issue 28 #4: today three signs are acknowledged into the deleted inode.
  grpc::Status s = Sign(d, "op/rm");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_TRUE(Contains(s.error_message(), "audit log")) << s.error_message();
  EXPECT_FALSE(Contains(s.error_message(), state)) << "no server path: " << s.error_message();
  EXPECT_FALSE(Sign(d, "op/rm").ok());
  bool not_serving = false;
  for (int i = 0; i < 40 && !not_serving; ++i) {
    not_serving = Ctl(d, {"health"}).exit_code != 0;
    if (!not_serving) std::this_thread::sleep_for(100ms);
  }
  EXPECT_TRUE(not_serving);
  EXPECT_TRUE(Contains(d.log(), "was deleted")) << d.log();
  d.Stop();
  CommandResult r = RunCommand({"timeout", "60", BinDir() + "/custodyd", "--state_dir=" + state,
                                "--listen=unix:" + dir.path() + "/refused.sock"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(Contains(r.err, "ends at seq 0 but the metadata store anchored seq")) << r.err;
}

TEST(AuditAnchorTest, ArchivingTheFirstFileKeepsTheRestVerifiableFromAStartAnchor) {
  TempDir dir;
  const std::string state = dir.path() + "/state";
  const std::vector<std::string> flags = {"--audit_max_file_bytes=4096", "--audit_anchor_lines=1"};
  {
    Custodyd d(state, flags);
    ASSERT_TRUE(d.started()) << d.log();
    ASSERT_TRUE(Create(d, "op/archive", nullptr).ok());
    for (int i = 0; i < 40; ++i) ASSERT_TRUE(Sign(d, "op/archive").ok());
    d.Stop();
  }
  std::vector<std::string> files = AuditFiles(state + "/audit");
  ASSERT_GE(files.size(), 3u);
  // As docs/access-control-and-audit.md says: verify the file, keep its last seq:hash, archive.
  CommandResult r = Verify({}, {files[0]});
  ASSERT_EQ(r.exit_code, 0) << r.out;
  auto summary = jose::ParseJson(r.out.substr(0, r.out.find('\n')));
  ASSERT_TRUE(summary.ok()) << r.out;
  const std::string start = std::to_string(*summary->Find("last_seq")->as_int()) + ":" +
                            summary->Find("last_hash")->as_string();
  const std::string archived = dir.path() + "/archived.jsonl";
  std::filesystem::rename(files[0], archived);
  files.erase(files.begin());
  r = Verify({"--state_dir=" + state}, files);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(Contains(r.out, "first line not anchored")) << r.out;
  r = Verify({"--state_dir=" + state, "--start=" + start}, files);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_TRUE(Contains(r.out, "\"anchored\":true")) << r.out;
  // custodyd continues the chain without the archived file, and the kept files still verify.
  {
    Custodyd d(state, flags);
    ASSERT_TRUE(d.started()) << d.log();
    EXPECT_TRUE(Sign(d, "op/archive").ok());
    d.Stop();
  }
  r = Verify({"--state_dir=" + state, "--start=" + start}, AuditFiles(state + "/audit"));
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_TRUE(Contains(r.out, "\"anchored\":true")) << r.out;
  // The archived file and the rest, together, verify from seq 1.
  std::vector<std::string> all = {archived};
  for (const std::string& f : AuditFiles(state + "/audit")) all.push_back(f);
  EXPECT_EQ(Verify({"--state_dir=" + state}, all).exit_code, 0);
}

TEST(AuditAnchorTest, TwoReplicasOnPostgresEachAnchorTheirOwnChain) {
  auto cluster = rotation::testing::PostgresCluster::Start();
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  ASSERT_TRUE((*cluster)->CreateDatabase("anchors").ok());
  TempDir dir;
  auto flags = [&](const std::string& replica) {
    return std::vector<std::string>{"--metadata=" + (*cluster)->Uri("anchors"),
                                    "--metadata_password_file=" + (*cluster)->password_file(),
                                    "--replica_id=" + replica, "--audit_anchor_lines=1"};
  };
  const std::string r0 = dir.path() + "/r0", r1 = dir.path() + "/r1";
  {
    Custodyd a(r0, flags("r0"));
    Custodyd b(r1, flags("r1"));
    ASSERT_TRUE(a.started()) << a.log();
    ASSERT_TRUE(b.started()) << b.log();
    for (int i = 0; i < 5; ++i) {
      for (Custodyd* d : {&a, &b}) {  // audited calls (NOT_FOUND): no ring, no shared token
        v1::GetKeyRingRequest req;
        req.set_name("op/none");
        v1::KeyRing ring;
        grpc::ClientContext ctx;
        SetDeadline(&ctx, kCallTimeout);
        EXPECT_EQ(d->admin().GetKeyRing(&ctx, req, &ring).error_code(),
                  grpc::StatusCode::NOT_FOUND);
      }
    }
    a.Stop();
    b.Stop();
  }
  auto rows = (*cluster)->Psql("anchors", "SELECT chain, seq FROM audit_anchors ORDER BY chain");
  ASSERT_TRUE(rows.ok()) << rows.status();
  EXPECT_TRUE(Contains(*rows, "r0|")) << *rows;
  EXPECT_TRUE(Contains(*rows, "r1|")) << *rows;
  // r1's file loses its last two lines: r1 refuses to start, r0 starts; verify says which.
  const std::vector<std::string> r1_files = AuditFiles(r1 + "/audit");
  ASSERT_EQ(r1_files.size(), 1u);
  CutLastLines(r1_files[0], 2);
  CommandResult r =
      RunCommand({"timeout", "60", BinDir() + "/custodyd", "--state_dir=" + r1,
                  "--metadata=" + (*cluster)->Uri("anchors"),
                  "--metadata_password_file=" + (*cluster)->password_file(), "--replica_id=r1"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(Contains(r.err, "but the metadata store anchored seq")) << r.err;
  Custodyd a(r0, flags("r0"));
  EXPECT_TRUE(a.started()) << a.log();
  const std::string log = ReadFileOrDie(r1 + "/custodyd.log");
  const std::string anchor = LastLoggedAnchor(log);
  r = Verify({"--anchor=" + anchor}, r1_files);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(Contains(r.out, "truncated: anchor at seq")) << r.out;
}

// ---------------------------------------------------------------------------------------------
// 7. Randomized lifecycle sequences, with the floors set low, checking after every step:
//    - no kid leaves the JWKS sooner than retain after its last signature (nor after its
//      retirement), unless an operator removed it (disable, destroy, compromise);
//    - no key is destroyed sooner than destroy_delay after it was unpublished;
//    - a compromised kid never reappears (JWKS or signature).
// Each check is definite: a violation is reported only when no ordering of the events within
// the test's observation windows would make it legal (the test's and custodyd's clocks are the
// same machine's).

struct KidHistory {
  int64_t last_sign_send = 0;     // the latest signature request that came back with this kid
  int64_t last_present_send = 0;  // the latest JWKS request whose answer listed it
  bool published = false;
  bool operator_removed = false;  // disable/destroy/compromise since it was last published
  bool compromised = false;
  int64_t retire_time = 0;
  std::string ring;
};

struct RingHistory {
  int64_t min_retain = 0;         // the smallest retain the ring had (policies change)
  int64_t min_destroy_delay = 0;  // likewise
  v1::KeyRing last;
  int64_t last_send = 0;  // when `last` was asked for
};

v1::RotationPolicy RandomPolicy(std::mt19937& rng) {
  auto pick = [&](int64_t lo, int64_t hi) {
    return lo + static_cast<int64_t>(rng() % static_cast<uint32_t>(hi - lo + 1));
  };
  v1::RotationPolicy p;
  // A partial policy: each field named or left out (0 at the API), then made valid.
  if (rng() % 2) p.set_prepublish_ms(pick(0, 400));
  if (rng() % 3 == 0) p.set_rotation_period_ms(pick(800, 2500));
  if (rng() % 4 != 0) p.set_retain_ms(pick(300, 1500));
  if (rng() % 4 != 0) p.set_destroy_delay_ms(pick(200, 4000));
  p.set_retain_ms(std::max(p.retain_ms(), p.prepublish_ms()));
  if (p.rotation_period_ms() != 0) {
    p.set_rotation_period_ms(std::max(p.rotation_period_ms(), p.prepublish_ms()));
  }
  return p;
}

TEST(RandomizedLifecycleTest, NoKeyLeavesEarlyIsDestroyedEarlyOrComesBackCompromised) {
  uint32_t seed = 22;
  if (const char* env = std::getenv("CUSTODY_LIFECYCLE_SEED")) seed = std::stoul(env);
  int steps = 120;
  if (const char* env = std::getenv("CUSTODY_LIFECYCLE_STEPS")) steps = std::stoi(env);
  std::printf("[lifecycle] seed %u (rerun with CUSTODY_LIFECYCLE_SEED=%u), %d steps\n", seed, seed,
              steps);
  std::fflush(stdout);
  std::mt19937 rng(seed);
  TempDir dir;
  const std::string state = dir.path() + "/state";
  auto d = std::make_unique<Custodyd>(state, WithLowPolicyFloors());
  ASSERT_TRUE(d->started()) << d->log();
  const std::vector<std::string> names = {"rnd/a", "rnd/b", "rnd/c"};
  std::map<std::string, RingHistory> rings;
  std::map<std::string, KidHistory> kids;
  std::vector<std::string> violations;
  std::map<std::string, int> ops;
  auto fail = [&](int step, const std::string& what) {
    if (violations.size() < 20) {
      violations.push_back("step " + std::to_string(step) + ": " + what);
    }
  };

  auto observe = [&](int step) {
    // Rings first (states, retire and destroy times), then the JWKS.
    for (const std::string& name : names) {
      if (rings.count(name) == 0) continue;
      RingHistory& h = rings[name];
      const int64_t send = UnixMs();
      v1::GetKeyRingRequest req;
      req.set_name(name);
      v1::KeyRing ring;
      grpc::ClientContext ctx;
      SetDeadline(&ctx, kCallTimeout);
      if (!d->admin().GetKeyRing(&ctx, req, &ring).ok()) continue;
      for (const v1::KeyVersion& v : ring.versions()) {
        if (v.kid().empty()) continue;
        KidHistory& k = kids[v.kid()];
        k.ring = name;
        k.retire_time = v.retire_time_ms();
        if (v.compromised()) k.compromised = true;
        if (v.state() == v1::DESTROYED) {
          // Unpublished no earlier than the last time the test saw it in a state before
          // DESTROY_SCHEDULED.
          const v1::KeyVersion* before = Version(h.last, v.version());
          if (before != nullptr && before->state() != v1::DESTROY_SCHEDULED &&
              before->state() != v1::DESTROYING && before->state() != v1::DESTROYED &&
              v.destroy_time_ms() - h.last_send < h.min_destroy_delay) {
            fail(step, name + " v" + std::to_string(v.version()) + " destroyed " +
                           std::to_string(v.destroy_time_ms() - h.last_send) +
                           " ms after the test last saw it " +
                           v1::KeyVersionState_Name(before->state()) +
                           "; destroy_delay >= " + std::to_string(h.min_destroy_delay));
          }
        }
      }
      h.last = ring;
      h.last_send = send;
    }
    const int64_t send = UnixMs();
    v1::GetJwksRequest req;
    v1::GetJwksResponse resp;
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    grpc::Status s = d->signer().GetJwks(&ctx, req, &resp);
    const int64_t recv = UnixMs();
    if (!s.ok()) {
      fail(step, "GetJwks: " + s.error_message());
      return;
    }
    std::set<std::string> present;
    auto json = jose::ParseJson(resp.jwks());
    if (json.ok()) {
      for (const jose::Json& key : json->Find("keys")->as_array()) {
        present.insert(key.Find("kid")->as_string());
      }
    }
    for (auto& [kid, k] : kids) {
      const bool now = present.count(kid) > 0;
      if (now && k.compromised) fail(step, "compromised kid " + kid + " is in the JWKS");
      if (k.published && !now && !k.operator_removed) {
        const int64_t retain = rings[k.ring].min_retain;
        // Removed at the latest at `recv`; signed at the earliest at last_sign_send.
        if (k.last_sign_send > 0 && recv - k.last_sign_send < retain) {
          fail(step, "kid " + kid + " of " + k.ring + " left the JWKS " +
                         std::to_string(recv - k.last_sign_send) +
                         " ms after its last signature; retain " + std::to_string(retain));
        }
        if (k.retire_time > 0 && recv - k.retire_time < retain) {
          fail(step, "kid " + kid + " of " + k.ring + " left the JWKS " +
                         std::to_string(recv - k.retire_time) +
                         " ms after its retirement; retain " + std::to_string(retain));
        }
      }
      if (now) {
        k.last_present_send = send;
        if (!k.published) k.operator_removed = false;  // published (again)
      }
      k.published = now;
    }
  };

  // Marks the kid of `ring` version `v` as removed by the operator (when the call succeeded).
  auto removed_by_operator = [&](const std::string& ring, uint32_t v) {
    const v1::KeyVersion* version = Version(rings[ring].last, v);
    if (version != nullptr) kids[version->kid()].operator_removed = true;
  };
  auto set_policy_bounds = [&](const std::string& ring, const v1::RotationPolicy& p, bool first) {
    RingHistory& h = rings[ring];
    h.min_retain = first ? p.retain_ms() : std::min(h.min_retain, p.retain_ms());
    h.min_destroy_delay =
        first ? p.destroy_delay_ms() : std::min(h.min_destroy_delay, p.destroy_delay_ms());
  };

  for (int step = 0; step < steps && violations.empty(); ++step) {
    const std::string name = names[rng() % names.size()];
    const bool exists = rings.count(name) > 0;
    uint32_t version = 0;
    if (exists && rings[name].last.versions_size() > 0) {
      const auto& vs = rings[name].last.versions();
      version = vs[static_cast<int>(rng() % static_cast<uint32_t>(vs.size()))].version();
    }
    // Versions in the states an operation applies to, when there are any (a random one else):
    // the sequences that matter (compromise, cancel-destroy, enable) need the right states.
    auto pick = [&](std::initializer_list<v1::KeyVersionState> states) {
      std::vector<uint32_t> fit;
      if (exists) {
        for (const v1::KeyVersion& v : rings[name].last.versions()) {
          for (v1::KeyVersionState st : states) {
            if (v.state() == st) fit.push_back(v.version());
          }
        }
      }
      return fit.empty() || rng() % 5 == 0 ? version : fit[rng() % fit.size()];
    };
    const uint32_t dice = rng() % 100;
    std::string op;
    grpc::Status s;
    if (!exists) {
      op = "create";
      v1::RotationPolicy p = RandomPolicy(rng);
      s = Create(*d, name, &p);
      if (s.ok()) set_policy_bounds(name, p, true);
    } else if (dice < 30) {
      op = "sign";
      const int64_t send = UnixMs();
      v1::SignJwsResponse resp;
      s = Sign(*d, name, &resp);
      if (s.ok()) {
        KidHistory& k = kids[resp.kid()];
        k.last_sign_send = std::max(k.last_sign_send, send);
        if (k.compromised) fail(step, "signed with compromised kid " + resp.kid());
      }
    } else if (dice < 42) {
      const bool force = rng() % 2;
      op = force ? "rotate-force" : "rotate";
      v1::RotateKeyRingResponse resp;
      s = Rotate(*d, name, force, &resp);
      if (!s.ok() && !force && NotRotatedUntilMs(s) < 0 &&
          s.error_code() == grpc::StatusCode::FAILED_PRECONDITION &&
          !Contains(s.error_message(), "was not rotated")) {
        fail(step, "rotate refused without saying when: " + s.error_message());
      }
      if (s.ok() && !resp.rotated()) fail(step, "rotate answered OK without rotating");
    } else if (dice < 52) {
      op = "disable";
      version = pick({v1::PENDING, v1::RETIRED, v1::DESTROY_SCHEDULED});
      s = VersionOp(*d, Op::kDisable, name, version);
      if (s.ok()) removed_by_operator(name, version);
    } else if (dice < 60) {
      op = "enable";
      version = pick({v1::DISABLED, v1::DESTROY_SCHEDULED});
      s = VersionOp(*d, Op::kEnable, name, version);
    } else if (dice < 68) {
      op = "schedule-destroy";
      version = pick({v1::PENDING, v1::RETIRED, v1::DISABLED});
      s = VersionOp(*d, Op::kSchedule, name, version);
      if (s.ok()) removed_by_operator(name, version);
    } else if (dice < 76) {
      op = "cancel-destroy";
      version = pick({v1::DESTROY_SCHEDULED});
      s = VersionOp(*d, Op::kCancel, name, version);
    } else if (dice < 82) {
      op = "compromise";
      version = pick({v1::ACTIVE, v1::PENDING, v1::RETIRED, v1::DISABLED});
      s = VersionOp(*d, Op::kCompromise, name, version);
      if (s.ok()) {
        removed_by_operator(name, version);
        const v1::KeyVersion* v = Version(rings[name].last, version);
        if (v != nullptr) kids[v->kid()].compromised = true;
        // The mistake of issue 22, at once: cancel the destruction, then enable.
        if (rng() % 2 == 0) {
          ++ops[VersionOp(*d, Op::kCancel, name, version).ok() ? "cancel-compromised"
                                                               : "cancel-compromised/refused"];
          ++ops[VersionOp(*d, Op::kEnable, name, version).ok() ? "enable-compromised"
                                                               : "enable-compromised/refused"];
        }
      }
    } else if (dice < 88) {
      op = "set-policy";
      v1::RotationPolicy p = RandomPolicy(rng);
      s = UpdatePolicy(*d, name, p);
      if (s.ok()) set_policy_bounds(name, p, false);
    } else if (dice < 92) {
      op = "restart";
      d->Stop();
      d = std::make_unique<Custodyd>(state, WithLowPolicyFloors());
      ASSERT_TRUE(d->started()) << d->log();
    } else {
      op = "wait";
      std::this_thread::sleep_for(std::chrono::milliseconds(200 + rng() % 600));
    }
    ++ops[op + (s.ok() ? "" : "/" + std::to_string(s.error_code()))];
    if (s.error_code() == grpc::StatusCode::INTERNAL ||
        s.error_code() == grpc::StatusCode::UNKNOWN ||
        s.error_code() == grpc::StatusCode::DATA_LOSS) {
      fail(step, op + ": " + s.error_message());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 120));
    observe(step);
  }
  std::string summary;
  for (const auto& [op, n] : ops) summary += op + "=" + std::to_string(n) + " ";
  size_t destroyed = 0, compromised = 0;
  for (const auto& [name, h] : rings) {
    for (const v1::KeyVersion& v : h.last.versions()) {
      destroyed += v.state() == v1::DESTROYED;
      compromised += v.compromised();
    }
  }
  std::printf("[lifecycle] %zu kids, %zu destroyed, %zu compromised; ops: %s\n", kids.size(),
              destroyed, compromised, summary.c_str());
  for (const std::string& v : violations) ADD_FAILURE() << v << " (seed " << seed << ")";
}

}  // namespace
}  // namespace custody::testing
