// The ordinary mistakes of an operator following docs/ and `--help`, made against the real
// custodyd and custodyctl: each row is one mistake, the exit status and message it must get, and
// the state afterwards (read back with `custodyctl ring get`), so that a typo never changes a
// key, a policy or a grant silently. Policy-file mistakes are made at startup, on SIGHUP and
// offline with `custodyctl policy check/explain`.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/testing/harness.h"

namespace custody::testing {
namespace {

struct Row {
  std::string what;               // the mistake, for failure messages
  std::vector<std::string> argv;  // custodyctl's arguments (--addr is added for remote commands)
  int exit_code;
  std::string message;  // expected in stderr + stdout
  // Checked after the command: the state it must (not) have changed. Empty: nothing to read.
  std::function<void()> check;
};

class OperatorMistakesTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir;
    daemon_ = new Custodyd(dir_->path() + "/state");
    ASSERT_TRUE(daemon_->started());
    ASSERT_EQ(Ctl({"ring", "create", "op/p", "--alg=ES256"}).exit_code, 0);
  }
  static void TearDownTestSuite() {
    delete daemon_;
    delete dir_;
  }

  static CommandResult Ctl(std::vector<std::string> args) {
    args.insert(args.begin(), {BinDir() + "/custodyctl", "--addr=" + daemon_->address()});
    return RunCommand(args);
  }
  // `custodyctl ring get NAME` as one JSON text ("" when the ring does not exist).
  static std::string Ring(const std::string& name) {
    CommandResult r = Ctl({"ring", "get", name});
    return r.exit_code == 0 ? r.out : "";
  }
  static std::string Field(const std::string& name, int64_t value) {
    return "\"" + name + "\": \"" + std::to_string(value) + "\"";
  }
  static void Run(const std::vector<Row>& rows, bool remote = true) {
    for (const Row& row : rows) {
      std::vector<std::string> argv = row.argv;
      if (remote) argv.insert(argv.begin(), "--addr=" + daemon_->address());
      argv.insert(argv.begin(), BinDir() + "/custodyctl");
      CommandResult r = RunCommand(argv);
      EXPECT_EQ(r.exit_code, row.exit_code) << row.what << "\n" << r.out << r.err;
      EXPECT_NE((r.err + r.out).find(row.message), std::string::npos)
          << row.what << ": expected '" << row.message << "' in\n"
          << r.err << r.out;
      if (row.check) {
        SCOPED_TRACE(row.what);
        row.check();
      }
    }
  }
  std::string Path(const std::string& name) const { return dir_->path() + "/" + name; }

  static constexpr int64_t kHour = 3600 * 1000;
  static constexpr int64_t kDay = 24 * kHour;

  static TempDir* dir_;
  static Custodyd* daemon_;
};

TempDir* OperatorMistakesTest::dir_ = nullptr;
Custodyd* OperatorMistakesTest::daemon_ = nullptr;

TEST_F(OperatorMistakesTest, MisspelledFlagsChangeNothingAndNameTheFlagMeant) {
  const std::string before = Ring("op/p");
  ASSERT_NE(before.find("\"active_version\": 1"), std::string::npos) << before;
  auto unchanged = [before] { EXPECT_EQ(Ring("op/p"), before); };
  Run({
      {"--rsa-bits (hyphen) on ring create",
       {"ring", "create", "op/rsa", "--alg=PS256", "--rsa-bits=4096"},
       2,
       "unknown flag --rsa-bits for 'ring create'; did you mean --rsa_bits?",
       [] { EXPECT_EQ(Ring("op/rsa"), ""); }},
      {"--rotation-period (hyphen) on ring set-policy",
       {"ring", "set-policy", "op/p", "--rotation-period=30d"},
       2,
       "unknown flag --rotation-period for 'ring set-policy'; did you mean --rotation_period?",
       unchanged},
      {"ring rotate --froce",
       {"ring", "rotate", "op/p", "--froce"},
       2,
       "unknown flag --froce for 'ring rotate'; did you mean --force?",
       unchanged},
      {"sign --tpy=JWT",
       {"sign", "op/p", "--tpy=JWT"},
       2,
       "unknown flag --tpy for 'sign'; did you mean --typ?",
       unchanged},
      {"a flag of another command",
       {"ring", "create", "op/f", "--alg=ES256", "--force"},
       2,
       "(--force is a flag of 'ring rotate')",
       [] { EXPECT_EQ(Ring("op/f"), ""); }},
      {"--address for --addr",
       {"ring", "get", "op/p", "--address=unix:/nowhere"},
       2,
       "did you mean --addr?",
       {}},
      {"a misspelled command",
       {"ring", "rotat", "op/p"},
       2,
       "unknown command 'ring rotat'; did you mean 'ring rotate'?",
       unchanged},
  });
}

TEST_F(OperatorMistakesTest, MissingValuesAndExtraArgumentsAreUsageErrors) {
  const std::string before = Ring("op/p");
  auto unchanged = [before] { EXPECT_EQ(Ring("op/p"), before); };
  Run({
      {"--typ without a value",
       {"sign", "op/p", "--typ"},
       2,
       "flag --typ for 'sign' needs a value; write --typ=TYP",
       unchanged},
      {"--typ JWT (space, not =)",
       {"sign", "op/p", "--typ", "JWT"},
       2,
       "write --typ=JWT (one argument, with '=')",
       unchanged},
      {"ring get with two names",
       {"ring", "get", "op/p", "op/q"},
       2,
       "extra argument 'op/q' for 'ring get'",
       {}},
      {"ring rotate with a version",
       {"ring", "rotate", "op/p", "2"},
       2,
       "extra argument '2' for 'ring rotate'",
       unchanged},
      {"version disable without the version",
       {"version", "disable", "op/p"},
       2,
       "'version disable' needs VERSION",
       unchanged},
      {"a duration without a unit",
       {"ring", "set-policy", "op/p", "--retain=86400"},
       2,
       "flag --retain='86400' for 'ring set-policy': not a duration",
       unchanged},
      {"set-policy without any field",
       {"ring", "set-policy", "op/p"},
       2,
       "ring set-policy needs at least one of --prepublish",
       unchanged},
      {"--force=yes",
       {"ring", "rotate", "op/p", "--force=yes"},
       2,
       "--force is a boolean: give it bare, =true or =false",
       unchanged},
      {"the same flag twice",
       {"ring", "set-policy", "op/p", "--retain=48h", "--retain=2d"},
       2,
       "flag --retain given twice",
       unchanged},
      {"a single-dash flag",
       {"ring", "rotate", "op/p", "-f"},
       2,
       "unknown flag -f: flags are --name=value",
       unchanged},
      {"ring create without --alg",
       {"ring", "create", "op/noalg"},
       2,
       "ring create needs --alg=ALG",
       [] { EXPECT_EQ(Ring("op/noalg"), ""); }},
  });
}

TEST_F(OperatorMistakesTest, OtherMistakesOfANewOperator) {
  const std::string before = Ring("op/p");
  auto unchanged = [before] { EXPECT_EQ(Ring("op/p"), before); };
  // Run() puts --addr=... first; these rows need the command line exactly as typed.
  CommandResult spaced = RunCommand(
      {BinDir() + "/custodyctl", "--addr", daemon_->address(), "ring", "rotate", "op/p"});
  EXPECT_EQ(spaced.exit_code, 2);
  EXPECT_NE(spaced.err.find("flag --addr needs a value; write --addr=" + daemon_->address()),
            std::string::npos)
      << spaced.err;
  unchanged();
  Run({
      {"a version written v1",
       {"version", "destroy", "op/p", "v1"},
       2,
       "VERSION 'v1': a version number such as 1",
       unchanged},
      {"an algorithm in lower case",
       {"ring", "create", "op/lower", "--alg=es256"},
       1,
       "INVALID_ARGUMENT: unsupported signing alg 'es256': use PS256, ES256",
       [] { EXPECT_EQ(Ring("op/lower"), ""); }},
      {"a retain shorter than the default prepublish",
       {"ring", "create", "op/short", "--alg=ES256", "--retain=30m"},
       1,
       "retain (1800000 ms) is shorter than prepublish (3600000 ms)",
       [] { EXPECT_EQ(Ring("op/short"), ""); }},
      {"--purpose=signing",
       {"ring", "create", "op/purpose", "--alg=ES256", "--purpose=signing"},
       2,
       "--purpose must be sign or decrypt",
       [] { EXPECT_EQ(Ring("op/purpose"), ""); }},
  });
}

TEST_F(OperatorMistakesTest, BooleansMeanWhatTheySay) {
  Run({
      {"--require_certificate=false",
       {"ring", "create", "op/nocert", "--alg=ES256", "--require_certificate=false"},
       0,
       "\"require_certificate\": false",
       [] {
         EXPECT_NE(Ring("op/nocert").find("\"require_certificate\": false"), std::string::npos);
       }},
      {"--require_certificate=true",
       {"ring", "create", "op/cert", "--alg=ES256", "--require_certificate=true"},
       0,
       "\"require_certificate\": true",
       [] { EXPECT_NE(Ring("op/cert").find("\"require_certificate\": true"), std::string::npos); }},
  });
}

TEST_F(OperatorMistakesTest, PartialPoliciesKeepTheDocumentedDefaults) {
  Run({
      {"ring create with only --rotation_period",
       {"ring", "create", "op/t2", "--alg=ES256", "--rotation_period=30d"},
       0,
       "\"policy_explicit\": true",
       [] {
         std::string ring = Ring("op/t2");
         EXPECT_NE(ring.find(Field("rotation_period_ms", 30 * kDay)), std::string::npos) << ring;
         EXPECT_NE(ring.find(Field("prepublish_ms", kHour)), std::string::npos) << ring;
         EXPECT_NE(ring.find(Field("retain_ms", kDay)), std::string::npos) << ring;
         EXPECT_NE(ring.find(Field("destroy_delay_ms", 7 * kDay)), std::string::npos) << ring;
       }},
      {"the DPoP ring of docs/client-library.md, as written",
       {"ring", "create", "clients/acme/dpop", "--alg=ES256", "--rotation_period=30d",
        "--prepublish=1h"},
       0,
       "\"policy_explicit\": true",
       [] {
         std::string ring = Ring("clients/acme/dpop");
         EXPECT_NE(ring.find(Field("retain_ms", kDay)), std::string::npos) << ring;
         EXPECT_NE(ring.find(Field("destroy_delay_ms", 7 * kDay)), std::string::npos) << ring;
       }},
      {"set-policy of one field keeps the others",
       {"ring", "set-policy", "op/t2", "--retain=48h"},
       0,
       Field("retain_ms", 2 * kDay),
       [] {
         std::string ring = Ring("op/t2");
         EXPECT_NE(ring.find(Field("rotation_period_ms", 30 * kDay)), std::string::npos) << ring;
         EXPECT_NE(ring.find(Field("prepublish_ms", kHour)), std::string::npos) << ring;
         EXPECT_NE(ring.find(Field("destroy_delay_ms", 7 * kDay)), std::string::npos) << ring;
       }},
  });
}

TEST_F(OperatorMistakesTest, HelpVersionAndOfflineCommandsSayWhatTheyAre) {
  CommandResult help = RunCommand({BinDir() + "/custodyctl", "ring", "rotate", "--help"});
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_NE(help.out.find("  --force "), std::string::npos) << help.out;
  EXPECT_EQ(help.out.find("--rsa_bits"), std::string::npos) << help.out;
  CommandResult general = RunCommand({BinDir() + "/custodyctl", "--help"});
  EXPECT_EQ(general.exit_code, 0);
  EXPECT_NE(general.out.find("--addr=ADDR[,ADDR...]"), std::string::npos) << general.out;
  for (const std::string program : {"custodyctl", "custodyd"}) {
    CommandResult v = RunCommand({BinDir() + "/" + program, "--version"});
    EXPECT_EQ(v.exit_code, 0) << program << v.err;
    EXPECT_EQ(v.out.rfind(program + " 0.", 0), 0u) << v.out;
    EXPECT_NE(v.out.find(" (git "), std::string::npos) << v.out;
  }
  CommandResult daemon_help = RunCommand({BinDir() + "/custodyd", "--help"});
  EXPECT_EQ(daemon_help.exit_code, 0) << daemon_help.err;
  EXPECT_NE(daemon_help.out.find("--state_dir"), std::string::npos);
  EXPECT_NE(daemon_help.out.find("--policy_file"), std::string::npos);
  // No build-machine path in what custodyd prints.
  EXPECT_EQ((daemon_help.out + daemon_help.err).find(SourceDir()), std::string::npos)
      << daemon_help.out;
  Run({{"audit verify with --addr",
        {"audit", "verify", "--addr=unix:/x", Path("none.jsonl")},
        2,
        "flag --addr does not apply to 'audit verify'",
        {}}},
      /*remote=*/false);
}

// custodyd's out-of-range bounds are refused before anything is opened: no state directory,
// no token, no store is touched, and the line names the flag and its bound.
TEST(CustodydFlagsTest, OutOfRangeBoundsAreRefusedBeforeAnythingIsOpened) {
  TempDir dir;
  struct Row {
    std::string flag, expected;
  };
  int n = 0;
  for (const Row& row : std::vector<Row>{
           {"--unary_threads=0", "--unary_threads (0) must be >= 1"},
           {"--unary_queue=-1", "--unary_queue (-1) >= 0"},
           {"--max_batch_items=0", "--max_batch_items must be >= 1"},
           {"--max_watch_streams=600", "at least --max_watch_streams + 32 (632)"},
           {"--http_max_connections=0", "--http_max_connections=0: give 1 to"},
       }) {
    const std::string state = absl::StrCat(dir.path(), "/state", ++n);
    CommandResult r = RunCommand({BinDir() + "/custodyd", row.flag, "--state_dir=" + state});
    EXPECT_EQ(r.exit_code, 1) << row.flag;
    const std::string out = r.out + r.err;
    EXPECT_NE(out.find("\"event\":\"startup.flags\""), std::string::npos) << row.flag << out;
    EXPECT_NE(out.find(row.expected), std::string::npos) << row.flag << out;
    EXPECT_FALSE(std::filesystem::exists(state)) << row.flag << ": the state directory was made";
  }
}

// The policy files of the rows below.
constexpr char kGoodPolicy[] = R"({"version": 1, "grants": [
  {"identities": ["uid:4242", "spiffe://bank.example/as"], "operations": ["sign"], "rings": ["op/*"]},
  {"identities": ["*"], "operations": ["jwks"], "rings": ["**"]}
]})";
constexpr char kRootPolicy[] = R"({"version": 1, "grants": [
  {"identities": ["root"], "operations": ["sign"], "rings": ["**"]}
]})";

TEST_F(OperatorMistakesTest, PolicyCheckAndExplainOffline) {
  WriteFileOrDie(Path("good.json"), kGoodPolicy);
  chmod(Path("good.json").c_str(), 0600);
  WriteFileOrDie(Path("root.json"), kRootPolicy);
  chmod(Path("root.json").c_str(), 0600);
  WriteFileOrDie(Path("wide.json"), kGoodPolicy);
  chmod(Path("wide.json").c_str(), 0666);
  const std::string good = "--policy_file=" + Path("good.json");
  Run(
      {
          {"policy check of a good file",
           {"policy", "check", Path("good.json")},
           0,
           "\"ok\":true",
           {}},
          {"\"identities\": [\"root\"]",
           {"policy", "check", Path("root.json")},
           1,
           "grants[0].identities[0]: identity 'root' can never match a caller: use uid:N",
           {}},
          {"a policy anyone may write",
           {"policy", "check", Path("wide.json")},
           1,
           "is writable by group or others; run chmod go-w on it",
           {}},
          {"explain: allowed",
           {"policy", "explain", "uid:4242", "sign", "op/id", good},
           0,
           "grants[0] allows it: identity grants[0].identities[0] 'uid:4242'",
           {}},
          {"explain: the ring pattern does not reach",
           {"policy", "explain", "uid:4242", "sign", "op/a/b", good},
           1,
           "none of its ring patterns matches 'op/a/b'",
           {}},
          {"explain: '*' is not anonymous",
           {"policy", "explain", "anonymous", "jwks", "op/id", good},
           1,
           "name \\\"anonymous\\\" to grant callers without credentials",
           {}},
          {"explain: a misspelled operation",
           {"policy", "explain", "uid:4242", "sing", "op/id", good},
           2,
           "unknown operation 'sing'; one of: sign, decrypt",
           {}},
      },
      /*remote=*/false);
}

// custodyd on a policy file of the test's own: a bad file at startup is refused, on SIGHUP it
// keeps the policy in force and logs why; a symlink or a FIFO is refused at once (a FIFO used to
// block startup, or the signal thread, in open() forever).
class PolicyFileTest : public ::testing::Test {
 protected:
  std::string Path(const std::string& name) const { return dir_.path() + "/" + name; }
  // custodyd that must exit by itself (bounded by timeout(1): 124 or 137 would mean it hung).
  CommandResult StartExpectingExit(const std::vector<std::string>& extra) {
    std::vector<std::string> argv = {"timeout",
                                     "-k",
                                     "5",
                                     "30",
                                     BinDir() + "/custodyd",
                                     "--state_dir=" + Path("state"),
                                     "--listen=unix:" + Path("state") + "/custodyd.sock"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return RunCommand(argv);
  }
  std::string PolicyWith(const std::string& identity) const {
    return R"({"version": 1, "grants": [{"identities": [")" + identity +
           R"("], "operations": ["sign", "jwks", "admin.read", "admin.create"], "rings": ["**"]}]})";
  }
  TempDir dir_;
};

TEST_F(PolicyFileTest, StartupRefusesABadPolicySymlinkFifoAndFifoPin) {
  const std::string policy = Path("policy.json");
  WriteFileOrDie(policy, PolicyWith("root"));
  chmod(policy.c_str(), 0600);
  CommandResult bad = StartExpectingExit({"--policy_file=" + policy});
  EXPECT_EQ(bad.exit_code, 1) << bad.err;
  EXPECT_NE(bad.err.find("grants[0].identities[0]: identity 'root' can never match a caller"),
            std::string::npos)
      << bad.err;

  WriteFileOrDie(policy, PolicyWith("uid:" + std::to_string(getuid())));
  chmod(policy.c_str(), 0600);
  const std::string link = Path("link.json");
  ASSERT_EQ(symlink(policy.c_str(), link.c_str()), 0);
  CommandResult linked = StartExpectingExit({"--policy_file=" + link});
  EXPECT_EQ(linked.exit_code, 1) << linked.err;
  EXPECT_NE(linked.err.find("is a symbolic link"), std::string::npos) << linked.err;

  const std::string fifo = Path("fifo.json");
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  auto started = std::chrono::steady_clock::now();
  CommandResult piped = StartExpectingExit({"--policy_file=" + fifo});
  EXPECT_EQ(piped.exit_code, 1) << piped.err;
  EXPECT_NE(piped.err.find("is a FIFO, not a regular file"), std::string::npos) << piped.err;
  CommandResult pin = StartExpectingExit({"--policy_file=" + policy, "--pin_file=" + fifo});
  EXPECT_EQ(pin.exit_code, 1) << pin.err;
  EXPECT_NE(pin.err.find("secret file '" + fifo + "' is a FIFO"), std::string::npos) << pin.err;
  EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::seconds(50));
}

TEST_F(PolicyFileTest, SighupKeepsThePolicyInForceAndLogsWhy) {
  const std::string policy = Path("policy.json");
  WriteFileOrDie(policy, PolicyWith("uid:" + std::to_string(getuid())));
  chmod(policy.c_str(), 0600);
  Custodyd d(Path("state"), {"--policy_file=" + policy});
  ASSERT_TRUE(d.started());
  auto ctl = [&](std::vector<std::string> args) {
    args.insert(args.begin(), {BinDir() + "/custodyctl", "--addr=" + d.address()});
    return RunCommand(args, "{}");
  };
  ASSERT_EQ(ctl({"ring", "create", "op/s", "--alg=ES256"}).exit_code, 0);
  auto wait_for_log = [&](const std::string& text) {
    for (int i = 0; i < 100 && d.log().find(text) == std::string::npos; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return d.log().find(text) != std::string::npos;
  };

  // A grant to "root" would grant nobody: refused, the old policy stays.
  WriteFileOrDie(policy, PolicyWith("root"));
  d.Signal(SIGHUP);
  EXPECT_TRUE(wait_for_log("identity 'root' can never match a caller")) << d.log();
  EXPECT_EQ(ctl({"sign", "op/s"}).exit_code, 0);

  // A FIFO in its place: refused at once; the signal thread still serves the next signals.
  std::filesystem::remove(policy);
  ASSERT_EQ(mkfifo(policy.c_str(), 0600), 0);
  d.Signal(SIGHUP);
  const bool refused = wait_for_log("is a FIFO, not a regular file");
  EXPECT_TRUE(refused) << d.log();
  if (!refused) {
    // The signal thread is stuck in open(): a writer's arrival releases it, so that the failure
    // is reported instead of a hang in Stop().
    int fd = open(policy.c_str(), O_WRONLY | O_NONBLOCK);
    if (fd >= 0) close(fd);
  }
  EXPECT_EQ(ctl({"sign", "op/s"}).exit_code, 0);
  d.Stop();  // SIGTERM must still be heard: fails the test if custodyd does not exit cleanly
}

// TLS without --client_ca: callers present no certificate and are "anonymous". A grant to "*"
// (every authenticated caller) must not reach them; a grant naming "anonymous" does.
TEST(AnonymousCallerTest, WildcardGrantsDoNotReachCallersWithoutCredentials) {
  TempDir dir;
  CommandResult pki =
      RunCommand({"/usr/bin/python3", SourceDir() + "/tests/tools/make_certs.py", dir.path()});
  ASSERT_EQ(pki.exit_code, 0) << pki.err;
  const std::string state = dir.path() + "/state";
  std::filesystem::create_directories(state);
  std::filesystem::permissions(state, std::filesystem::perms::owner_all);
  const std::string policy = state + "/policy.json";
  WriteFileOrDie(policy, R"({"version": 1, "grants": [
    {"identities": ["*"], "operations": ["sign", "jwks"], "rings": ["**"]},
    {"identities": ["anonymous"], "operations": ["admin.create"], "rings": ["anon/*"]}
  ]})");
  chmod(policy.c_str(), 0600);
  client::ChannelOptions tls;
  tls.address = "127.0.0.1:" + std::to_string(FreePort());
  tls.ca_file = dir.path() + "/ca.pem";
  Custodyd d(
      state,
      {"--tls_cert=" + dir.path() + "/server.pem", "--tls_key=" + dir.path() + "/server.key"}, tls);
  ASSERT_TRUE(d.started()) << d.log();
  auto ctl = [&](std::vector<std::string> args) {
    args.insert(args.begin(),
                {BinDir() + "/custodyctl", "--addr=" + tls.address, "--ca=" + tls.ca_file});
    return RunCommand(args, "{}");
  };
  CommandResult create = ctl({"ring", "create", "anon/r", "--alg=ES256"});
  ASSERT_EQ(create.exit_code, 0) << create.err;
  CommandResult sign = ctl({"sign", "anon/r"});
  EXPECT_EQ(sign.exit_code, 1);
  EXPECT_NE(sign.err.find("PERMISSION_DENIED: permission denied: 'anonymous' may not sign"),
            std::string::npos)
      << sign.err;
  CommandResult jwks = ctl({"jwks", "anon/r"});
  EXPECT_EQ(jwks.exit_code, 1) << jwks.out;
  // And the offline explanation says why.
  CommandResult why = RunCommand({BinDir() + "/custodyctl", "policy", "explain", "anonymous",
                                  "sign", "anon/r", "--policy_file=" + policy});
  EXPECT_EQ(why.exit_code, 1);
  EXPECT_NE(why.out.find("'*' is every authenticated caller"), std::string::npos) << why.out;
}

}  // namespace
}  // namespace custody::testing
