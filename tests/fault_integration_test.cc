// custodyd surviving its HSM, end to end: the real custodyd on the fault-injecting PKCS#11
// module (pkcs11/testing/fault_module.cc, forwarding to SoftHSM2), driven from this process
// through the module's control file ($CUSTODY_FAULT_CONTROL, see fault_module.h), under a
// steady load of concurrent SignJws calls over real gRPC; and custodyd killed with SIGKILL and
// restarted 100 times while signing and changing keys.
//
// What is checked against what:
// - Signatures are verified by tests/testing/independent_jws.h, written on OpenSSL's EVP API alone
//   (public JWK → EVP_PKEY via OSSL_PARAM, JOSE r||s → DER, RSA-PSS parameters set explicitly),
//   never by custody's jose/ code (only its JSON parser reads the JWKS and headers).
// - The only acceptable failure while a fault is injected is UNAVAILABLE naming a CKR code; on a
//   slow token, RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED, promptly. Memory is custodyd's own
//   VmRSS/VmHWM from /proc/PID/status.
// - After a restart, every change custodyd acknowledged before the kill is there.
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "common/secret.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "jose/json.h"
#include "openssl/bn.h"
#include "openssl/core_names.h"
#include "openssl/ec.h"
#include "openssl/evp.h"
#include "openssl/params.h"
#include "openssl/rsa.h"
#include "pkcs11/testing/softhsm_testing.h"
#include "pkcs11/token.h"
#include "tests/testing/harness.h"
#include "tests/testing/independent_jws.h"
#include "tests/testing/rpc_helpers.h"

namespace custody::testing {
namespace {

namespace v1 = custody::v1;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using Ms = std::chrono::milliseconds;

constexpr char kFaultModule[] = CUSTODY_FAULT_MODULE;
constexpr char kUserPin[] = "fault-user-pin-1234";
constexpr char kSoPin[] = "fault-so-pin-5678";

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

int64_t MsBetween(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration_cast<Ms>(to - from).count();
}

int EnvInt(const char* name, int fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? std::atoi(value) : fallback;
}

// The independent verifier (tests/testing/independent_jws.h), checking the payload too.
std::string VerifyJws(const JwsKeys& keys, const std::string& jws, const std::string& payload) {
  std::string signed_payload;
  std::string error = VerifyJws(keys, jws, nullptr, &signed_payload);
  if (!error.empty()) return error;
  return signed_payload == payload ? "" : "the payload changed";
}

// ---------------------------------------------------------------------------------------------
// RPC helpers.

grpc::Status CreateRing(Custodyd& d, const std::string& name, const std::string& alg,
                        v1::KeyRing* out, Ms timeout = 30s) {
  v1::CreateKeyRingRequest req;
  req.set_name(name);
  req.set_purpose(v1::SIGN);
  req.set_alg(alg);
  return custody::testing::CreateRing(d, req, out, timeout);
}

std::string GetJwks(Custodyd& d, grpc::Status* status) {
  v1::GetJwksRequest req;
  v1::GetJwksResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(&ctx, 10s);
  *status = d.signer().GetJwks(&ctx, req, &resp);
  return resp.jwks();
}

// SERVING, NOT_SERVING, or nullopt when the health service did not answer.
std::optional<grpc::health::v1::HealthCheckResponse::ServingStatus> Health(Custodyd& d) {
  auto stub = grpc::health::v1::Health::NewStub(d.channel());
  grpc::ClientContext ctx;
  SetDeadline(&ctx, 2s);
  grpc::health::v1::HealthCheckRequest req;
  grpc::health::v1::HealthCheckResponse resp;
  if (!stub->Check(&ctx, req, &resp).ok()) return std::nullopt;
  return resp.status();
}

bool Alive(pid_t pid) {
  int status = 0;
  return pid > 0 && waitpid(pid, &status, WNOHANG) == 0;
}

// custodyd's VmRSS and VmHWM in KiB.
std::pair<int64_t, int64_t> Memory(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  int64_t rss = -1, hwm = -1;
  for (std::string line; std::getline(in, line);) {
    std::istringstream fields(line);
    std::string name;
    int64_t kib = 0;
    fields >> name >> kib;
    if (name == "VmRSS:") rss = kib;
    if (name == "VmHWM:") hwm = kib;
  }
  return {rss, hwm};
}

std::string LogTail(const std::string& log, size_t lines = 30) {
  size_t pos = log.size();
  for (size_t n = 0; n <= lines && pos != std::string::npos && pos > 0; ++n) {
    pos = log.rfind('\n', pos - 1);
  }
  return pos == std::string::npos ? log : log.substr(pos + 1);
}

// ---------------------------------------------------------------------------------------------
// The fault module's control file.

class FaultControl {
 public:
  explicit FaultControl(std::string path) : path_(std::move(path)) {}
  const std::string& path() const { return path_; }

  // Replaces the file (write + rename) with `commands` under a new seq, and waits until custodyd's
  // copy of the module has applied it (its .ack names the seq). Returns the ack, "" on timeout.
  std::string Apply(const std::vector<std::string>& commands, Ms timeout = 10s) {
    const int seq = ++seq_;
    std::string content = "seq " + std::to_string(seq) + "\n";
    for (const std::string& command : commands) content += command + "\n";
    WriteFileOrDie(path_ + ".new", content);
    std::filesystem::rename(path_ + ".new", path_);
    const std::string expected = "seq " + std::to_string(seq) + "\n";
    const Clock::time_point deadline = Clock::now() + timeout;
    while (Clock::now() < deadline) {
      std::string ack = ReadFileOrDie(path_ + ".ack");
      if (ack.rfind(expected, 0) == 0) return ack;
      std::this_thread::sleep_for(2ms);
    }
    return "";
  }

  // "total FUNCTION N" from an ack: calls since the module was loaded.
  static uint64_t Total(const std::string& ack, const std::string& function) {
    const std::string key = "total " + function + " ";
    const size_t at = ack.find(key);
    return at == std::string::npos ? 0 : std::stoull(ack.substr(at + key.size()));
  }

 private:
  std::string path_;
  int seq_ = 0;
};

// ---------------------------------------------------------------------------------------------
// A SoftHSM2 directory for the whole binary (SoftHSM2 reads SOFTHSM2_CONF at C_Initialize);
// each test initializes its own token in it.

pkcs11::TemporarySoftHsm* softhsm = nullptr;

class SoftHsmEnvironment : public ::testing::Environment {
 public:
  void SetUp() override {
    auto setup = pkcs11::TemporarySoftHsm::Create();
    ASSERT_TRUE(setup.ok()) << setup.status();
    owned_ = std::move(*setup);
    softhsm = owned_.get();
  }
  void TearDown() override {
    softhsm = nullptr;
    owned_.reset();
  }

 private:
  std::unique_ptr<pkcs11::TemporarySoftHsm> owned_;
};

const ::testing::Environment* const kEnvironment =
    ::testing::AddGlobalTestEnvironment(new SoftHsmEnvironment);

// custodyd on the fault module in front of a fresh token labelled `label`.
class FaultyCustodyd {
 public:
  // `extra`: more custodyd flags.
  explicit FaultyCustodyd(const std::string& label, std::vector<std::string> extra = {})
      : state_(dir_.path() + "/state"), control_(dir_.path() + "/fault.ctl") {
    absl::Status initialized = pkcs11::Token::InitializeToken(
        pkcs11::TemporarySoftHsm::ModulePath(), label, Secret(kSoPin), Secret(kUserPin));
    EXPECT_TRUE(initialized.ok()) << initialized;
    const std::string pin_file = dir_.path() + "/pin";
    WriteFileOrDie(pin_file, kUserPin);
    std::filesystem::permissions(
        pin_file, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
    WriteFileOrDie(control_.path(), "");
    std::vector<std::string> environment = {
        "SOFTHSM2_CONF=" + softhsm->dir() + "/softhsm2.conf",
        "CUSTODY_FAULT_REAL_MODULE=" + pkcs11::TemporarySoftHsm::ModulePath(),
        "CUSTODY_FAULT_CONTROL=" + control_.path()};
    if (kSanitized) {
      // ASan keeps freed memory in a quarantine of up to 256 MiB, which would be measured as
      // custodyd's growth: a small one keeps VmRSS about custodyd.
      const char* asan = std::getenv("ASAN_OPTIONS");
      environment.push_back(std::string("ASAN_OPTIONS=") + (asan != nullptr ? asan : "") +
                            ":quarantine_size_mb=16");
    }
    std::vector<std::string> flags = {std::string("--pkcs11_module=") + kFaultModule,
                                      "--token_label=" + label, "--pin_file=" + pin_file,
                                      "--metrics_log_seconds=1"};
    flags.insert(flags.end(), extra.begin(), extra.end());
    d_ = std::make_unique<Custodyd>(state_, std::move(flags),
                                    Custodyd::Environment{std::move(environment)});
  }

  Custodyd& d() { return *d_; }
  // Every audit file, concatenated.
  std::string Audit() const {
    std::string audit;
    for (const auto& e : std::filesystem::directory_iterator(state_ + "/audit")) {
      audit += ReadFileOrDie(e.path());
    }
    return audit;
  }
  FaultControl& control() { return control_; }

 private:
  TempDir dir_;
  std::string state_;
  FaultControl control_;
  std::unique_ptr<Custodyd> d_;
};

// Checks that `custodyd` started, creates `rings` (name, alg) in it, reads their published keys
// into *keys and clears any fault. Call with ASSERT_NO_FATAL_FAILURE.
void StartWithRings(FaultyCustodyd& custodyd,
                    const std::vector<std::pair<std::string, std::string>>& rings, JwsKeys* keys) {
  Custodyd& d = custodyd.d();
  ASSERT_TRUE(d.started()) << LogTail(d.log());
  for (const auto& [name, alg] : rings) {
    v1::KeyRing ring;
    ASSERT_TRUE(CreateRing(d, name, alg, &ring).ok()) << name;
  }
  grpc::Status status;
  ASSERT_EQ(AddJwks(GetJwks(d, &status), *keys), "");
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_FALSE(custodyd.control().Apply({"reset"}).empty()) << "the fault module never acked";
}

// ---------------------------------------------------------------------------------------------
// Steady signing load and what it saw.

struct CallOutcome {
  // The phase when the call started, and when it returned. A call in flight when a fault is
  // injected is exposed to that fault although it started in the phase before.
  int phase = 0;
  int end_phase = 0;
  grpc::StatusCode code = grpc::StatusCode::OK;
  std::string message;
  Clock::time_point start;
  Clock::time_point end;
};

class SigningLoad {
 public:
  // `threads` callers sign in a loop on `rings` (round robin), each call with `timeout`; every
  // returned JWS is verified against `keys` at once.
  SigningLoad(Custodyd& d, std::vector<std::string> rings, JwsKeys keys, int threads, Ms timeout,
              Ms pause_after_failure = 5ms)
      : d_(d), rings_(std::move(rings)), keys_(std::move(keys)) {
    for (int i = 0; i < threads; ++i) {
      threads_.emplace_back([this, i, timeout, pause_after_failure] {
        for (uint64_t n = 0; !stop_.load(); ++n) {
          const std::string& ring = rings_[(i + n) % rings_.size()];
          const std::string payload = "{\"sub\":\"load-" + std::to_string(i) + "-" +
                                      std::to_string(n) + "\",\"ring\":\"" + ring + "\"}";
          CallOutcome outcome;
          outcome.phase = phase_.load();
          outcome.start = Clock::now();
          v1::SignJwsResponse resp;
          grpc::Status status = SignJws(d_, ring, payload, &resp, timeout);
          outcome.end = Clock::now();
          outcome.end_phase = phase_.load();
          outcome.code = status.error_code();
          outcome.message = status.error_message();
          std::string wrong;
          if (status.ok()) wrong = VerifyJws(keys_, resp.jws(), payload);
          {
            std::lock_guard<std::mutex> lock(mu_);
            outcomes_.push_back(outcome);
            if (!wrong.empty()) wrong_.push_back(ring + ": " + wrong);
          }
          if (!status.ok()) std::this_thread::sleep_for(pause_after_failure);
        }
      });
    }
  }
  ~SigningLoad() { Stop(); }

  void SetPhase(int phase) { phase_.store(phase); }
  void Stop() {
    stop_.store(true);
    for (std::thread& t : threads_) {
      if (t.joinable()) t.join();
    }
  }
  std::vector<CallOutcome> Outcomes() {
    std::lock_guard<std::mutex> lock(mu_);
    return outcomes_;
  }
  std::vector<std::string> Wrong() {
    std::lock_guard<std::mutex> lock(mu_);
    return wrong_;
  }

 private:
  Custodyd& d_;
  const std::vector<std::string> rings_;
  const JwsKeys keys_;
  std::atomic<bool> stop_{false};
  std::atomic<int> phase_{0};
  std::mutex mu_;
  std::vector<CallOutcome> outcomes_;
  std::vector<std::string> wrong_;
  std::vector<std::thread> threads_;
};

// The "errors" field of the last metrics.hsm line in `log` ("CKR_X=n CKR_Y=m "), parsed.
std::map<std::string, uint64_t> MetricsErrors(const std::string& log, std::string* line_out) {
  std::map<std::string, uint64_t> errors;
  const size_t at = log.rfind("\"event\":\"metrics.hsm\"");
  if (at == std::string::npos) return errors;
  const size_t begin = log.rfind('\n', at) == std::string::npos ? 0 : log.rfind('\n', at) + 1;
  const std::string line = log.substr(begin, log.find('\n', at) - begin);
  if (line_out != nullptr) *line_out = line;
  auto parsed = jose::ParseJson(line);
  if (!parsed.ok()) return errors;
  std::istringstream fields(JsonString(*parsed, "errors"));
  for (std::string field; fields >> field;) {
    const size_t eq = field.find('=');
    if (eq != std::string::npos) errors[field.substr(0, eq)] = std::stoull(field.substr(eq + 1));
  }
  return errors;
}

// ---------------------------------------------------------------------------------------------
// 1. Every fault under load: only UNAVAILABLE, every JWS verifies, recovery without a restart.

struct Fault {
  std::string name;
  std::vector<std::string> inject;  // control commands
  Ms hold;                          // how long the fault stays before it is cleared
  std::string ckr;                  // the CKR custodyd's metrics must count ("" none)
  bool removes_device = false;      // health must turn NOT_SERVING while it holds
};

std::vector<Fault> Faults() {
  std::vector<Fault> faults;
  const std::vector<std::pair<std::string, std::string>> ckrs = {
      {"CKR_SESSION_HANDLE_INVALID", "C_Sign"},   {"CKR_SESSION_CLOSED", "C_Sign"},
      {"CKR_USER_NOT_LOGGED_IN", "C_SignInit"},   {"CKR_DEVICE_REMOVED", "C_Sign"},
      {"CKR_TOKEN_NOT_PRESENT", "C_Sign"},        {"CKR_DEVICE_ERROR", "C_Sign"},
      {"CKR_OBJECT_HANDLE_INVALID", "C_SignInit"}};
  for (const auto& [ckr, function] : ckrs) {
    // A few failures (each recovered and retried), then the same error on every call.
    faults.push_back(
        {ckr + " x3 (" + function + ")", {"inject " + function + " " + ckr + " 3"}, 300ms, ckr});
    faults.push_back(
        {ckr + " held (" + function + ")", {"inject " + function + " " + ckr + " -1"}, 600ms, ckr});
  }
  faults.push_back({"close_all_sessions", {"close_all_sessions"}, 300ms, ""});
  faults.push_back({"device_removed, back at re-init", {"device_removed 1"}, 300ms, ""});
  faults.push_back(
      {"device_removed held", {"device_removed -1"}, 2000ms, "CKR_DEVICE_REMOVED", true});
  faults.push_back({"C_Sign +150 ms", {"delay C_Sign 150"}, 800ms, ""});
  // CUSTODY_FAULT_ONLY=TEXT: only the faults whose name contains TEXT (to study one).
  if (const char* only = std::getenv("CUSTODY_FAULT_ONLY"); only != nullptr && *only != '\0') {
    std::erase_if(faults, [&](const Fault& f) { return f.name.find(only) == std::string::npos; });
  }
  return faults;
}

TEST(FaultIntegrationTest, EveryHsmFaultUnderSigningLoadFailsOnlyUnavailableAndRecovers) {
  FaultyCustodyd custodyd("fault-load");
  Custodyd& d = custodyd.d();
  JwsKeys keys;
  ASSERT_NO_FATAL_FAILURE(
      StartWithRings(custodyd, {{"fault/es256", "ES256"}, {"fault/ps256", "PS256"}}, &keys));
  ASSERT_EQ(keys.size(), 2u);

  const std::vector<Fault> faults = Faults();
  SigningLoad load(d, {"fault/es256", "fault/es256", "fault/ps256"}, keys, /*threads=*/6, 10s);
  std::this_thread::sleep_for(300ms);
  struct Measured {
    Clock::time_point cleared;
    int64_t recovery_ms = -1;     // cleared → first SignJws that succeeds
    int64_t not_serving_ms = -1;  // injected → health NOT_SERVING (device removal)
    int64_t serving_ms = -1;      // cleared → health SERVING again
    Clock::time_point ended;      // the next fault starts
  };
  std::vector<Measured> measured(faults.size());
  std::vector<std::string> problems;
  for (size_t i = 0; i < faults.size(); ++i) {
    const Fault& fault = faults[i];
    if (i > 0) measured[i - 1].ended = Clock::now();
    load.SetPhase(static_cast<int>(i) + 1);
    const Clock::time_point injected = Clock::now();
    const std::string ack = custodyd.control().Apply(fault.inject);
    ASSERT_FALSE(ack.empty()) << fault.name << ": the fault module did not apply the fault";
    ASSERT_EQ(ack.find("\nerror "), std::string::npos) << ack;
    if (fault.removes_device) {
      for (Clock::time_point until = Clock::now() + 10s; Clock::now() < until;) {
        if (Health(d) == grpc::health::v1::HealthCheckResponse::NOT_SERVING) {
          measured[i].not_serving_ms = MsBetween(injected, Clock::now());
          break;
        }
        std::this_thread::sleep_for(20ms);
      }
      EXPECT_GE(measured[i].not_serving_ms, 0) << "health never said NOT_SERVING";
    }
    std::this_thread::sleep_for(fault.hold);
    ASSERT_FALSE(custodyd.control().Apply({"reset"}).empty())
        << fault.name << ": the fault module did not apply the reset; custodyd "
        << (Alive(d.pid()) ? "is alive" : "died") << "; its log ends:\n"
        << LogTail(d.log());
    measured[i].cleared = Clock::now();
    // The next calls succeed, without a restart.
    for (Clock::time_point until = Clock::now() + 15s; Clock::now() < until;) {
      v1::SignJwsResponse resp;
      const std::string payload = "{\"sub\":\"after " + fault.name + "\"}";
      if (SignJws(d, "fault/es256", payload, &resp, 5s).ok()) {
        measured[i].recovery_ms = MsBetween(measured[i].cleared, Clock::now());
        const std::string wrong = VerifyJws(keys, resp.jws(), payload);
        EXPECT_TRUE(wrong.empty()) << fault.name << ": " << wrong;
        break;
      }
      std::this_thread::sleep_for(5ms);
    }
    EXPECT_GE(measured[i].recovery_ms, 0) << fault.name << ": no success within 15 s";
    if (fault.removes_device) {
      for (Clock::time_point until = Clock::now() + 10s; Clock::now() < until;) {
        if (Health(d) == grpc::health::v1::HealthCheckResponse::SERVING) {
          measured[i].serving_ms = MsBetween(measured[i].cleared, Clock::now());
          break;
        }
        std::this_thread::sleep_for(20ms);
      }
      EXPECT_GE(measured[i].serving_ms, 0) << "health never said SERVING again";
    }
    std::this_thread::sleep_for(300ms);  // steady state again before the next fault
    ASSERT_TRUE(Alive(d.pid())) << fault.name << ": custodyd died\n" << LogTail(d.log());
  }
  if (!faults.empty()) measured.back().ended = Clock::now();
  load.SetPhase(static_cast<int>(faults.size()) + 1);
  std::this_thread::sleep_for(1500ms);  // one more metrics.hsm line, after the last fault
  load.Stop();

  // Zero crashes, zero restarts, zero wrong signatures.
  EXPECT_TRUE(Alive(d.pid())) << LogTail(d.log());
  const std::string log = d.log();
  size_t readies = 0;
  for (size_t at = log.find("\"custodyd.ready\""); at != std::string::npos;
       at = log.find("\"custodyd.ready\"", at + 1)) {
    ++readies;
  }
  EXPECT_EQ(readies, 1u) << "custodyd restarted";
  for (const std::string& wrong : load.Wrong()) ADD_FAILURE() << "wrong signature: " << wrong;

  // Per phase: only UNAVAILABLE naming a CKR code; and the calls that started once a phase's
  // first post-fault success was seen all succeeded.
  const std::vector<CallOutcome> outcomes = load.Outcomes();
  std::printf("[fault] %-44s %6s %6s %6s %9s %9s %9s\n", "fault", "ok", "unavail", "other",
              "recov_ms", "down_ms", "up_ms");
  // A failed call is charged to the last fault it was exposed to: the phase it ended in, when a
  // fault was injected while it ran (a call that started in phase 0 and failed once the first
  // fault was in place failed because of that fault). One that started and ended with no fault
  // injected — phase 0, or after the last fault was cleared — is a failure of custodyd.
  const int fault_phases = static_cast<int>(faults.size());
  auto charged_phase = [fault_phases](const CallOutcome& o) {
    return o.code != grpc::StatusCode::OK && o.end_phase > o.phase && o.end_phase <= fault_phases
               ? o.end_phase
               : o.phase;
  };
  std::map<int, std::map<grpc::StatusCode, int>> by_phase;
  std::set<std::string> reported;
  for (const CallOutcome& o : outcomes) {
    const int phase = charged_phase(o);
    ++by_phase[phase][o.code];
    if (o.code == grpc::StatusCode::OK) continue;
    const std::string where =
        phase == 0 || phase > fault_phases
            ? std::string(phase == 0 ? "before any fault" : "after the last fault")
            : faults[phase - 1].name;
    if (o.code != grpc::StatusCode::UNAVAILABLE) {
      if (reported.insert(where + std::to_string(o.code)).second) {
        ADD_FAILURE() << where << ": status " << o.code << " " << o.message;
      }
    } else if (o.message.find("CKR_") == std::string::npos) {
      if (reported.insert(where + "noCKR").second) {
        ADD_FAILURE() << where << ": UNAVAILABLE without a CKR code: " << o.message;
      }
    }
    if (phase == 0 || phase > fault_phases) {
      if (reported.insert(where).second) {
        ADD_FAILURE() << where << ": a call failed: " << o.message << " (phases " << o.phase << ".."
                      << o.end_phase << ", " << MsBetween(o.start, o.end) << " ms)";
      }
    }
  }
  for (size_t i = 0; i < faults.size(); ++i) {
    const int phase = static_cast<int>(i) + 1;
    int other = 0;
    for (const auto& [code, n] : by_phase[phase]) {
      if (code != grpc::StatusCode::OK && code != grpc::StatusCode::UNAVAILABLE) other += n;
    }
    std::printf("[fault] %-44s %6d %6d %6d %9lld %9lld %9lld\n", faults[i].name.c_str(),
                by_phase[phase][grpc::StatusCode::OK],
                by_phase[phase][grpc::StatusCode::UNAVAILABLE], other,
                static_cast<long long>(measured[i].recovery_ms),
                static_cast<long long>(measured[i].not_serving_ms),
                static_cast<long long>(measured[i].serving_ms));
    // Calls that started 100 ms after the first success following the clear, and ended before
    // the next fault, all succeed.
    if (measured[i].recovery_ms < 0) continue;
    const Clock::time_point settled = measured[i].cleared + Ms(measured[i].recovery_ms) + 100ms;
    for (const CallOutcome& o : outcomes) {
      if (o.phase == phase && o.start > settled && o.end < measured[i].ended &&
          o.code != grpc::StatusCode::OK) {
        ADD_FAILURE() << faults[i].name << ": a call started "
                      << MsBetween(measured[i].cleared, o.start)
                      << " ms after the clear failed: " << o.message;
        break;
      }
    }
  }
  std::fflush(stdout);

  // custodyd's own count of HSM errors, by CKR code.
  std::string line;
  const std::map<std::string, uint64_t> errors = MetricsErrors(log, &line);
  std::printf("[fault] last metrics.hsm: %s\n", line.c_str());
  for (const Fault& fault : faults) {
    if (fault.ckr.empty()) continue;
    auto it = errors.find(fault.ckr);
    EXPECT_TRUE(it != errors.end() && it->second >= 3)
        << fault.ckr << " not counted in metrics.hsm: " << line;
  }
}

// ---------------------------------------------------------------------------------------------
// 2. A slow token: callers are refused promptly instead of piling up, and memory stays flat.

// The client library's coalesced calls under a held HSM fault: items that come back UNAVAILABLE
// inside a batch are retried on their own (plain SignJws with backoff), so callers see either a
// JWS that verifies, carrying their own payload, or UNAVAILABLE naming a CKR; never another
// caller's result or another code.
TEST(FaultIntegrationTest, CoalescedCallsUnderAHeldFaultAreRetriedAloneOrFailUnavailable) {
  FaultyCustodyd custodyd("fault-batch");
  Custodyd& d = custodyd.d();
  JwsKeys keys;
  ASSERT_NO_FATAL_FAILURE(StartWithRings(custodyd, {{"fault/batch", "ES256"}}, &keys));
  client::ClientOptions options;
  options.max_rpcs_in_flight = 1;
  options.max_batch_items = 16;
  options.initial_backoff = absl::Milliseconds(100);
  auto c = client::Client::FromChannel(d.channel(), options);
  ASSERT_TRUE(c.ok()) << c.status();

  std::atomic<bool> stop{false};
  std::atomic<int> ok{0}, unavailable{0};
  std::mutex mu;
  std::vector<std::string> problems;
  std::vector<std::thread> callers;
  for (int t = 0; t < 8; ++t) {
    callers.emplace_back([&, t] {
      for (int n = 0; !stop.load(); ++n) {
        const std::string payload = absl::StrCat(R"({"caller":)", t, R"(,"n":)", n, "}");
        auto jws = (*c)->SignJws("fault/batch", payload);
        std::string problem;
        if (jws.ok()) {
          std::string signed_payload;
          problem = VerifyJws(keys, jws->jws, nullptr, &signed_payload);
          if (problem.empty() && signed_payload != payload) problem = "payload of another call";
          ++ok;
        } else if (jws.status().code() == absl::StatusCode::kUnavailable &&
                   jws.status().message().find("CKR_") != absl::string_view::npos) {
          ++unavailable;
        } else {
          problem = jws.status().ToString();
        }
        if (!problem.empty()) {
          std::lock_guard<std::mutex> lock(mu);
          problems.push_back(problem);
        }
      }
    });
  }
  std::this_thread::sleep_for(300ms);
  const int ok_before = ok.load();
  ASSERT_FALSE(custodyd.control().Apply({"inject C_Sign CKR_DEVICE_ERROR -1"}).empty());
  std::this_thread::sleep_for(800ms);
  // The fault is held until a batch has come back with an UNAVAILABLE item: at least 800 ms, at
  // most 10 s. (Under the sanitizers on a busy machine the batch in flight when the fault began,
  // with its token recovery, took longer than 800 ms and no batch came back within the window.)
  for (int i = 0; i < 92 && (*c)->coalescing_stats().fallbacks == 0; ++i) {
    std::this_thread::sleep_for(100ms);
  }
  ASSERT_FALSE(custodyd.control().Apply({"reset"}).empty());
  const int ok_at_reset = ok.load();
  std::this_thread::sleep_for(500ms);
  stop = true;
  for (std::thread& t : callers) t.join();

  EXPECT_TRUE(problems.empty()) << problems.size() << " problems, first: " << problems.front();
  EXPECT_GT(ok_before, 0);
  EXPECT_GT(ok.load(), ok_at_reset) << "signing did not resume after the fault";
  const client::CoalescingStats stats = (*c)->coalescing_stats();
  EXPECT_GT(stats.batches, 0u);
  EXPECT_GT(stats.fallbacks, 0u) << "no batch item came back UNAVAILABLE during the fault";
  RecordProperty("ok", ok.load());
  RecordProperty("unavailable", unavailable.load());
  RecordProperty("fallbacks", static_cast<int>(stats.fallbacks));
}

TEST(FaultIntegrationTest, SlowTokenRefusesCallersPromptlyAndMemoryStaysFlat) {
  FaultyCustodyd custodyd("fault-slow");
  Custodyd& d = custodyd.d();
  JwsKeys keys;
  ASSERT_NO_FATAL_FAILURE(StartWithRings(custodyd, {{"slow/es256", "ES256"}}, &keys));
  constexpr int kCallers = 64;
  const int seconds = EnvInt("CUSTODY_FAULT_SLOW_SECONDS", 6);
  const Ms call_timeout = 5s;

  // Warm-up at full concurrency on a fast token: gRPC's threads and buffers, allocator arenas.
  {
    SigningLoad warm(d, {"slow/es256"}, keys, kCallers, call_timeout);
    std::this_thread::sleep_for(1500ms);
  }
  const auto [rss_before, hwm_before] = Memory(d.pid());

  ASSERT_FALSE(custodyd.control().Apply({"delay C_Sign 200"}).empty());
  int64_t rss_peak = rss_before;
  std::vector<CallOutcome> slow;
  std::vector<std::string> wrong;
  {
    SigningLoad load(d, {"slow/es256"}, keys, kCallers, call_timeout, /*pause_after_failure=*/5ms);
    for (Clock::time_point until = Clock::now() + std::chrono::seconds(seconds);
         Clock::now() < until;) {
      rss_peak = std::max(rss_peak, Memory(d.pid()).first);
      std::this_thread::sleep_for(100ms);
    }
    load.Stop();
    slow = load.Outcomes();
    wrong = load.Wrong();
  }
  const auto [rss_during_end, hwm_during] = Memory(d.pid());
  ASSERT_FALSE(custodyd.control().Apply({"reset"}).empty());
  std::vector<CallOutcome> after;
  {
    SigningLoad load(d, {"slow/es256"}, keys, kCallers, call_timeout);
    std::this_thread::sleep_for(1500ms);
    load.Stop();
    after = load.Outcomes();
    for (const std::string& w : load.Wrong()) wrong.push_back(w);
  }
  const auto [rss_after, hwm_after] = Memory(d.pid());
  EXPECT_TRUE(Alive(d.pid())) << LogTail(d.log());
  for (const std::string& w : wrong) ADD_FAILURE() << "wrong signature: " << w;

  std::map<grpc::StatusCode, int> codes;
  std::map<grpc::StatusCode, int64_t> slowest;
  std::vector<int64_t> refused_ms;
  for (const CallOutcome& o : slow) {
    ++codes[o.code];
    const int64_t ms = MsBetween(o.start, o.end);
    slowest[o.code] = std::max(slowest[o.code], ms);
    if (o.code == grpc::StatusCode::RESOURCE_EXHAUSTED ||
        o.code == grpc::StatusCode::DEADLINE_EXCEEDED) {
      refused_ms.push_back(ms);
    } else {
      EXPECT_EQ(o.code, grpc::StatusCode::OK) << o.message;
    }
  }
  std::sort(refused_ms.begin(), refused_ms.end());
  const int64_t refused_p50 = refused_ms.empty() ? -1 : refused_ms[refused_ms.size() / 2];
  const int64_t refused_p99 = refused_ms.empty() ? -1 : refused_ms[refused_ms.size() * 99 / 100];
  int after_ok = 0;
  for (const CallOutcome& o : after) after_ok += o.code == grpc::StatusCode::OK;
  std::printf(
      "[slow] %d callers, C_Sign +200 ms for %d s: ok=%d resource_exhausted=%d "
      "deadline_exceeded=%d; refused in p50 %lld ms, p99 %lld ms, max %lld ms; ok max %lld ms\n",
      kCallers, seconds, codes[grpc::StatusCode::OK], codes[grpc::StatusCode::RESOURCE_EXHAUSTED],
      codes[grpc::StatusCode::DEADLINE_EXCEEDED], static_cast<long long>(refused_p50),
      static_cast<long long>(refused_p99),
      static_cast<long long>(std::max(slowest[grpc::StatusCode::RESOURCE_EXHAUSTED],
                                      slowest[grpc::StatusCode::DEADLINE_EXCEEDED])),
      static_cast<long long>(slowest[grpc::StatusCode::OK]));
  std::printf(
      "[slow] custodyd memory (KiB): before VmRSS %lld VmHWM %lld; during peak VmRSS %lld VmHWM "
      "%lld; after VmRSS %lld VmHWM %lld; %d/%zu calls ok after the token sped up\n",
      static_cast<long long>(rss_before), static_cast<long long>(hwm_before),
      static_cast<long long>(rss_peak), static_cast<long long>(hwm_during),
      static_cast<long long>(rss_after), static_cast<long long>(hwm_after), after_ok, after.size());
  std::fflush(stdout);

  // The token signs 8 sessions / 200 ms = 40 per second; the rest is refused.
  EXPECT_GE(codes[grpc::StatusCode::OK], 10 * seconds);
  EXPECT_GE(codes[grpc::StatusCode::RESOURCE_EXHAUSTED], 100);
  // Promptly: nobody waits beyond the pool's queue deadline (2 s) plus slack, and most are
  // refused at once.
  EXPECT_LT(refused_p50, kSanitized ? 1000 : 500);
  EXPECT_LT(std::max(slowest[grpc::StatusCode::RESOURCE_EXHAUSTED],
                     slowest[grpc::StatusCode::DEADLINE_EXCEEDED]),
            kSanitized ? 4500 : 3500);
  EXPECT_LT(slowest[grpc::StatusCode::OK], kSanitized ? 4500 : 3500);
  // Flat memory: a generous bound on growth over the warmed-up process (a pile-up of 64 threads'
  // requests per second for seconds would exceed it many times over).
  const int64_t bound_kib = (kSanitized ? 192 : 48) * 1024;
  EXPECT_LT(hwm_during - hwm_before, bound_kib);
  EXPECT_LT(rss_after - rss_before, bound_kib);
  // With the token fast again, callers are served (64 callers exceed the 8 sessions + 32
  // waiters, so refusals at once remain possible; nothing else is).
  EXPECT_GE(after_ok, kSanitized ? 30 : 100);
  for (const CallOutcome& o : after) {
    if (o.code != grpc::StatusCode::OK && o.code != grpc::StatusCode::RESOURCE_EXHAUSTED) {
      ADD_FAILURE() << "after the token sped up: " << o.code << " " << o.message;
      break;
    }
  }
}

// The threads that run SignJws, Sign and DecryptJwe (served with gRPC's callback API) are
// bounded: while a slow token holds --unary_threads of them and --unary_queue calls wait, a
// further call is refused at once, RESOURCE_EXHAUSTED naming the flag, and audited; an accepted
// call is answered and verifies.
TEST(FaultIntegrationTest, SaturatedUnaryThreadsRefuseAtOnceAndAreAudited) {
  FaultyCustodyd custodyd("fault-unary", {"--unary_threads=2", "--unary_queue=2"});
  Custodyd& d = custodyd.d();
  JwsKeys keys;
  ASSERT_NO_FATAL_FAILURE(StartWithRings(custodyd, {{"busy/es256", "ES256"}}, &keys));
  ASSERT_FALSE(custodyd.control().Apply({"delay C_Sign 300"}).empty());
  std::vector<CallOutcome> outcomes;
  std::vector<std::string> wrong;
  {
    SigningLoad load(d, {"busy/es256"}, keys, /*threads=*/12, /*timeout=*/10s,
                     /*pause_after_failure=*/20ms);
    std::this_thread::sleep_for(2s);
    load.Stop();
    outcomes = load.Outcomes();
    wrong = load.Wrong();
  }
  ASSERT_FALSE(custodyd.control().Apply({"reset"}).empty());
  for (const std::string& w : wrong) ADD_FAILURE() << "wrong signature: " << w;
  int ok = 0, refused = 0;
  int64_t slowest_refusal = 0, slowest_ok = 0;
  for (const CallOutcome& o : outcomes) {
    const int64_t ms = MsBetween(o.start, o.end);
    if (o.code == grpc::StatusCode::OK) {
      ++ok;
      slowest_ok = std::max(slowest_ok, ms);
    } else if (o.code == grpc::StatusCode::RESOURCE_EXHAUSTED &&
               o.message.find("(--unary_queue)") != std::string::npos) {
      ++refused;
      slowest_refusal = std::max(slowest_refusal, ms);
    } else {
      ADD_FAILURE() << o.code << " " << o.message;
    }
  }
  std::printf(
      "[unary] 12 callers, 2 threads + 2 waiting, C_Sign +300 ms: ok=%d refused=%d; "
      "slowest refusal %lld ms, slowest ok %lld ms\n",
      ok, refused, static_cast<long long>(slowest_refusal), static_cast<long long>(slowest_ok));
  std::fflush(stdout);
  // Two threads at 300 ms a signature sign ~13 in 2 s; the other callers are turned away.
  EXPECT_GE(ok, 4);
  EXPECT_GE(refused, 20);
  // At once: a refusal never waits for the token (300 ms).
  EXPECT_LT(slowest_refusal, kSanitized ? 1000 : 250);
  // An accepted call waits for at most the two ahead of it and its own signature.
  EXPECT_LT(slowest_ok, kSanitized ? 6000 : 3000);
  // Each refusal has its audit line.
  const std::string audit = custodyd.Audit();
  int audited = 0;
  for (size_t at = 0;
       (at = audit.find("\"result\":\"RESOURCE_EXHAUSTED\"", at)) != std::string::npos; ++at) {
    const size_t end = audit.find('\n', at);
    if (audit.substr(at, end - at).find("(--unary_queue)") != std::string::npos) ++audited;
  }
  EXPECT_EQ(audited, refused);
  // With the token fast again, a call is served.
  v1::SignJwsResponse resp;
  grpc::Status status = SignJws(d, "busy/es256", "{}", &resp, 5s);
  EXPECT_TRUE(status.ok()) << status.error_message();
}

// ---------------------------------------------------------------------------------------------
// 3. SIGKILL and restart, 100 times, while signing and changing keys: no acknowledged change is
//    lost and every returned JWS verifies.

struct AckedFacts {
  std::set<std::string> rings;
  std::map<std::pair<std::string, uint32_t>, std::string> kids;  // (ring, version) → kid
  std::map<std::string, uint32_t> min_active;                    // acknowledged rotations
  std::set<std::pair<std::string, uint32_t>> disabled;
};

void RecordRing(const v1::KeyRing& ring, AckedFacts& facts) {
  facts.rings.insert(ring.name());
  for (const v1::KeyVersion& v : ring.versions()) {
    if (!v.kid().empty()) facts.kids[{ring.name(), v.version()}] = v.kid();
  }
}

std::vector<std::string> CheckAckedFacts(const v1::ListKeyRingsResponse& list,
                                         const AckedFacts& facts) {
  std::vector<std::string> errors;
  std::map<std::string, const v1::KeyRing*> rings;
  for (const v1::KeyRing& r : list.rings()) rings[r.name()] = &r;
  for (const std::string& name : facts.rings) {
    if (rings.count(name) == 0) errors.push_back("acknowledged ring " + name + " is gone");
  }
  for (const auto& [key, kid] : facts.kids) {
    auto r = rings.find(key.first);
    if (r == rings.end()) continue;
    const v1::KeyVersion* found = nullptr;
    for (const v1::KeyVersion& v : r->second->versions()) {
      if (v.version() == key.second) found = &v;
    }
    if (found == nullptr) {
      errors.push_back(key.first + " v" + std::to_string(key.second) + " is gone");
    } else if (found->kid() != kid) {
      errors.push_back(key.first + " v" + std::to_string(key.second) + " changed kid");
    }
  }
  for (const auto& [name, version] : facts.min_active) {
    auto r = rings.find(name);
    if (r != rings.end() && r->second->active_version() < version) {
      errors.push_back(name + " active v" + std::to_string(r->second->active_version()) +
                       " is older than the acknowledged rotation to v" + std::to_string(version));
    }
  }
  for (const auto& [name, version] : facts.disabled) {
    auto r = rings.find(name);
    if (r == rings.end()) continue;
    for (const v1::KeyVersion& v : r->second->versions()) {
      if (v.version() == version && v.state() != v1::DISABLED) {
        errors.push_back(name + " v" + std::to_string(version) + " was disabled and is now " +
                         v1::KeyVersionState_Name(v.state()));
      }
    }
  }
  for (const v1::KeyRing& r : list.rings()) {
    for (const v1::KeyVersion& v : r.versions()) {
      if (v.state() == v1::CREATING) {
        errors.push_back(r.name() + " v" + std::to_string(v.version()) + " CREATING after start");
      }
    }
  }
  return errors;
}

// Issue 22: a forced rotation of a ring without a PENDING version makes a fresh key ACTIVE, then
// pre-publishes the next one. When only that follow-up generation fails, the rotation is
// committed: the answer is OK with the new ACTIVE version and the failed follow-up, so that an
// operator does not retry and rotate twice (today: an error, although version 2 signs).
TEST(LifecycleAnswerTest, ForcedRotationWhoseFollowUpPendingFailsReportsTheCommittedRotation) {
  FaultyCustodyd custodyd("forced-follow-up");
  JwsKeys keys;
  ASSERT_NO_FATAL_FAILURE(StartWithRings(custodyd, {{"op/forced", "ES256"}}, &keys));
  Custodyd& d = custodyd.d();
  // The first C_GenerateKeyPair (the new ACTIVE key) goes through; the next ones (the PENDING
  // key, and the token layer's retry after its repair) fail.
  ASSERT_FALSE(
      custodyd.control().Apply({"inject_ex C_GenerateKeyPair CKR_DEVICE_ERROR 4 1 0"}).empty());
  v1::RotateKeyRingRequest req;
  req.set_ring("op/forced");
  req.set_force(true);
  v1::RotateKeyRingResponse resp;
  grpc::ClientContext ctx;
  SetDeadline(&ctx, Ms(60000));
  grpc::Status s = d.admin().RotateKeyRing(&ctx, req, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message() << "\n" << LogTail(d.log());
  EXPECT_TRUE(resp.rotated());
  EXPECT_EQ(resp.active_version(), 2u);
  EXPECT_NE(resp.pending_error().find("creating the next PENDING version failed"),
            std::string::npos)
      << resp.pending_error();
  EXPECT_NE(resp.pending_error().find("CKR_DEVICE_ERROR"), std::string::npos)
      << resp.pending_error();
  ASSERT_FALSE(custodyd.control().Apply({"reset"}).empty());
  // What the answer says is what is committed: v2 ACTIVE and signing, v1 RETIRED, no PENDING.
  EXPECT_EQ(resp.ring().active_version(), 2u);
  int pending = 0;
  for (const v1::KeyVersion& v : resp.ring().versions()) {
    if (v.version() == 1) {
      EXPECT_EQ(v.state(), v1::RETIRED);
    }
    pending += v.state() == v1::PENDING;
  }
  EXPECT_EQ(pending, 0);
  v1::SignJwsRequest sign;
  sign.set_ring("op/forced");
  sign.set_payload("{}");
  v1::SignJwsResponse signed_with;
  grpc::ClientContext sign_ctx;
  SetDeadline(&sign_ctx, Ms(10000));
  ASSERT_TRUE(d.signer().SignJws(&sign_ctx, sign, &signed_with).ok());
  EXPECT_EQ(signed_with.version(), 2u);
  EXPECT_NE(d.log().find("ring.pending_failed"), std::string::npos);
}

TEST(RestartUnderLoadTest, SigkillWhileSigningAndChangingKeysLosesNoAcknowledgedChange) {
  // 100 kills take about 70 s on two loaded cores; under ASan each start is several times slower
  // (30 kills took 117 s), and the sanitizers look for memory errors on the start and recovery
  // paths, which 15 kills walk as well: the kill points are the normal pass's job
  // (CUSTODY_RESTART_ITERATIONS=N sets the count).
  const int iterations = EnvInt("CUSTODY_RESTART_ITERATIONS", kSanitized ? 15 : 100);
  uint32_t seed = std::random_device()();
  if (const char* env = std::getenv("CUSTODY_RESTART_SEED")) seed = std::stoul(env);
  std::printf("[restart] seed %u (CUSTODY_RESTART_SEED), %d kills\n", seed, iterations);
  std::fflush(stdout);
  std::mt19937 rng(seed);
  TempDir dir;
  const std::string state = dir.path() + "/state";
  AckedFacts facts;
  JwsKeys keys;
  std::vector<std::pair<std::string, std::string>> unverified;  // (jws, payload)
  std::map<std::string, int> acked_ops;
  std::map<int, int> sign_codes;
  std::map<std::string, int> admin_codes;  // "op:code"
  std::vector<std::string> unexpected;
  int64_t signed_total = 0;
  const Clock::time_point start = Clock::now();

  for (int it = 0; it <= iterations; ++it) {
    Custodyd d(state);
    ASSERT_TRUE(d.started()) << "custodyd did not start after kill " << it << " (seed " << seed
                             << "):\n"
                             << LogTail(d.log());
    // Everything acknowledged before the kill is there.
    v1::ListKeyRingsResponse list;
    {
      v1::ListKeyRingsRequest req;
      grpc::ClientContext ctx;
      SetDeadline(&ctx, 10s);
      ASSERT_TRUE(d.admin().ListKeyRings(&ctx, req, &list).ok());
    }
    for (const std::string& e : CheckAckedFacts(list, facts)) {
      ADD_FAILURE() << "after kill " << it << " (seed " << seed << "): " << e;
    }
    if (::testing::Test::HasFailure()) break;
    // Every key that may have signed is published (nothing disables a version this test has not
    // seen published): collect them, then check what was signed before the kill.
    grpc::Status status;
    ASSERT_EQ(AddJwks(GetJwks(d, &status), keys), "");
    ASSERT_TRUE(status.ok()) << status.error_message();
    for (const auto& [jws, payload] : unverified) {
      const std::string wrong = VerifyJws(keys, jws, payload);
      if (!wrong.empty()) ADD_FAILURE() << "before kill " << it << ": " << wrong;
    }
    unverified.clear();
    if (it == iterations) {
      d.Stop();
      break;
    }

    std::vector<std::string> rings(facts.rings.begin(), facts.rings.end());
    std::atomic<bool> stop{false};
    std::mutex mu;
    // Signers, on the rings known at this start.
    std::vector<std::thread> signers;
    for (int t = 0; t < 3 && !rings.empty(); ++t) {
      signers.emplace_back([&, t] {
        for (int n = 0; !stop.load(); ++n) {
          const std::string& ring = rings[(t + n) % rings.size()];
          const std::string payload = "{\"it\":" + std::to_string(it) +
                                      ",\"t\":" + std::to_string(t) +
                                      ",\"n\":" + std::to_string(n) + "}";
          v1::SignJwsResponse resp;
          grpc::Status s = SignJws(d, ring, payload, &resp, 3s);
          std::lock_guard<std::mutex> lock(mu);
          ++sign_codes[s.error_code()];
          if (s.ok()) {
            unverified.emplace_back(resp.jws(), payload);
            ++signed_total;
          }
          if (s.error_code() == grpc::StatusCode::INTERNAL ||
              s.error_code() == grpc::StatusCode::DATA_LOSS) {
            unexpected.push_back("SignJws: " + s.error_message());
          }
          if (!s.ok()) std::this_thread::sleep_for(2ms);
        }
      });
    }
    // One admin caller, one change at a time: create a ring (up to 4), force a rotation, or
    // disable a RETIRED version whose key this test has seen published.
    std::thread admin([&] {
      std::mt19937 local(rng());
      for (int n = 0; !stop.load(); ++n) {
        const int choice = facts.rings.size() < 2 ? 0 : static_cast<int>(local() % 5);
        grpc::Status s;
        std::string op;
        if (choice == 0 && facts.rings.size() < 4) {
          op = "create";
          const std::string name = "restart/r" + std::to_string(facts.rings.size());
          v1::KeyRing out;
          s = CreateRing(d, name, "ES256", &out, 5s);
          if (s.ok()) RecordRing(out, facts);
          if (s.error_code() == grpc::StatusCode::ALREADY_EXISTS) facts.rings.insert(name);
        } else if (choice <= 2 && !facts.rings.empty()) {
          op = "rotate";
          std::vector<std::string> names(facts.rings.begin(), facts.rings.end());
          v1::RotateKeyRingRequest req;
          req.set_ring(names[local() % names.size()]);
          req.set_force(true);
          v1::RotateKeyRingResponse resp;
          grpc::ClientContext ctx;
          SetDeadline(&ctx, 5s);
          s = d.admin().RotateKeyRing(&ctx, req, &resp);
          if (s.ok() && resp.rotated()) {
            RecordRing(resp.ring(), facts);
            uint32_t& min = facts.min_active[resp.ring().name()];
            min = std::max(min, resp.ring().active_version());
          }
        } else {
          op = "disable";
          std::vector<std::pair<std::string, uint32_t>> candidates;
          for (const v1::KeyRing& r : list.rings()) {
            for (const v1::KeyVersion& v : r.versions()) {
              if (v.state() == v1::RETIRED && keys.count(v.kid()) != 0 &&
                  facts.disabled.count({r.name(), v.version()}) == 0) {
                candidates.emplace_back(r.name(), v.version());
              }
            }
          }
          if (candidates.empty()) continue;
          const auto target = candidates[local() % candidates.size()];
          v1::KeyVersionRequest req;
          req.set_ring(target.first);
          req.set_version(target.second);
          v1::KeyRing out;
          grpc::ClientContext ctx;
          SetDeadline(&ctx, 5s);
          s = d.admin().DisableKeyVersion(&ctx, req, &out);
          if (s.ok()) facts.disabled.insert(target);
        }
        std::lock_guard<std::mutex> lock(mu);
        ++admin_codes[op + ":" + std::to_string(s.error_code())];
        if (s.ok()) ++acked_ops[op];
        if (s.error_code() == grpc::StatusCode::INTERNAL ||
            s.error_code() == grpc::StatusCode::DATA_LOSS) {
          unexpected.push_back(op + ": " + s.error_message());
        }
        if (!s.ok()) std::this_thread::sleep_for(2ms);
      }
    });
    // Long enough for a few changes to be acknowledged (a rotation generates a key and fsyncs).
    std::this_thread::sleep_for(kSanitized ? Ms(400 + rng() % 1200) : Ms(50 + rng() % 250));
    d.Kill();
    stop.store(true);
    admin.join();
    for (std::thread& t : signers) t.join();
  }
  const double seconds = MsBetween(start, Clock::now()) / 1000.0;
  std::string ops, codes;
  for (const auto& [op, n] : acked_ops) ops += " " + op + "=" + std::to_string(n);
  for (const auto& [code, n] : sign_codes) {
    codes += " " + std::to_string(code) + ":" + std::to_string(n);
  }
  std::string admin;
  for (const auto& [op_code, n] : admin_codes) admin += " " + op_code + "=" + std::to_string(n);
  std::printf(
      "[restart] seed %u: %d kills in %.1f s; acknowledged changes:%s; %zu rings, %zu versions; "
      "%lld JWS verified; SignJws codes (0=OK, 14=UNAVAILABLE):%s; admin op:code:%s\n",
      seed, iterations, seconds, ops.c_str(), facts.rings.size(), facts.kids.size(),
      static_cast<long long>(signed_total), codes.c_str(), admin.c_str());
  std::fflush(stdout);
  EXPECT_GE(acked_ops["rotate"], 1);
  EXPECT_GT(signed_total, 0);
  for (const std::string& u : unexpected) ADD_FAILURE() << "unexpected status: " << u;
}

}  // namespace
}  // namespace custody::testing
