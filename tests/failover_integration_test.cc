// Callers fail over within their deadline: three custodyd replicas on PostgreSQL
// (tests/testing/replica_set.h), reached through the address list by custodyctl (a real process)
// and by the client library's Client. Every JWS is checked against the JWKS with
// tests/independent_jws (OpenSSL EVP, not custody's jose/).
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "client/jwe_encryption.h"
#include "gtest/gtest.h"
#include "rotation/testing/postgres_cluster.h"
#include "tests/testing/harness.h"
#include "tests/testing/independent_jws.h"
#include "tests/testing/prometheus_testing.h"
#include "tests/testing/replica_set.h"

namespace custody::testing {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

const ::testing::Environment* const environment =
    rotation::testing::PostgresClusterEnvironment::Register();

double MsSince(Clock::time_point from) {
  return std::chrono::duration<double, std::milli>(Clock::now() - from).count();
}

CommandResult Ctl(const std::string& addr, const std::vector<std::string>& args,
                  const std::string& input = "") {
  std::vector<std::string> argv = {BinDir() + "/custodyctl", "--addr=" + addr};
  argv.insert(argv.end(), args.begin(), args.end());
  return RunCommand(argv, input);
}

class FailoverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    replicas_ = ReplicaSet::OnTestCluster(3);
    ASSERT_NE(replicas_, nullptr);
    ASSERT_TRUE(replicas_->started()) << replicas_->logs();
    // The operator's way: custodyctl against one replica; the others learn of it by NOTIFY.
    CommandResult r = Ctl(replicas_->at(0).address(),
                          {"ring", "create", "ha/sign", "--purpose=sign", "--alg=ES256"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = Ctl(replicas_->at(0).address(), {"ring", "create", "ha/enc", "--purpose=decrypt",
                                         "--alg=ECDH-ES+A128KW", "--curve=P-256"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    ASSERT_EQ(replicas_->WaitUntilEveryReplicaServes({"ha/sign", "ha/enc"}), "");
    CommandResult jwks = Ctl(replicas_->addresses(), {"jwks", "ha/sign"});
    ASSERT_EQ(jwks.exit_code, 0) << jwks.err;
    std::string error;
    keys_ = JwsKeysOf(jwks.out, &error);
    ASSERT_EQ(error, "");
    CommandResult enc = Ctl(replicas_->addresses(), {"jwks", "ha/enc"});
    ASSERT_EQ(enc.exit_code, 0) << enc.err;
    enc_jwks_ = enc.out;
  }

  // "" when `jws` verifies against ha/sign's keys and carries `payload`, else why not.
  std::string Check(const std::string& jws, const std::string& payload) const {
    std::string got;
    if (std::string v = VerifyJws(keys_, jws, nullptr, &got); !v.empty()) return v;
    return got == payload ? "" : "payload differs";
  }

  std::unique_ptr<client::Client> NewClient() const {
    client::ChannelOptions channel;
    channel.address = replicas_->addresses();
    client::ClientOptions options;  // the defaults: 5 s deadline, retries until it
    auto c = client::Client::Connect(channel, options);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? *std::move(c) : nullptr;
  }

  std::unique_ptr<ReplicaSet> replicas_;
  JwsKeys keys_;
  std::string enc_jwks_;
};

// Every replica SIGSTOPped for 0.4 s, then SIGCONTed: a sign through the list with a 5 s deadline
// succeeds from custodyctl (a new process: new connections), a new Client and a Client whose
// connections are up, 20 rounds, with a busy-loop process taking CPU alongside. Before the fix,
// a connection attempt timed out after gRPC's minimum connect timeout (100 ms) and the call failed
// UNAVAILABLE after ~140 ms (custodyctl) / ~285 ms (Client: three attempts).
TEST_F(FailoverTest, SignSucceedsWhileEveryReplicaIsPaused) {
  TempDir dir;
  BackgroundProcess busy({"/usr/bin/timeout", "300", "/bin/sh", "-c", "while :; do :; done"},
                         dir.path() + "/busy.log");
  ASSERT_TRUE(busy.running());
  auto warm = NewClient();
  ASSERT_NE(warm, nullptr);
  ASSERT_TRUE(warm->SignJws("ha/sign", "warm-up").ok());
  std::vector<double> ctl_ms, fresh_ms, warm_ms;
  for (int round = 0; round < 20; ++round) {
    for (int i = 0; i < 3; ++i) replicas_->at(i).Signal(SIGSTOP);
    const auto paused = Clock::now();
    const std::string payload = absl::StrCat("round ", round);
    CommandResult ctl;
    absl::StatusOr<client::SignedJws> fresh = absl::UnknownError("not run");
    absl::StatusOr<client::SignedJws> warmed = absl::UnknownError("not run");
    double ctl_took = 0, fresh_took = 0, warm_took = 0;
    std::thread ctl_thread([&] {
      auto start = Clock::now();
      ctl = Ctl(replicas_->addresses(), {"sign", "ha/sign", "--timeout_ms=5000"}, payload);
      ctl_took = MsSince(start);
    });
    std::thread fresh_thread([&] {
      auto start = Clock::now();
      auto c = NewClient();
      if (c != nullptr) fresh = c->SignJws("ha/sign", payload);
      fresh_took = MsSince(start);
    });
    std::thread warm_thread([&] {
      auto start = Clock::now();
      warmed = warm->SignJws("ha/sign", payload);
      warm_took = MsSince(start);
    });
    std::this_thread::sleep_until(paused + 400ms);
    for (int i = 0; i < 3; ++i) replicas_->at(i).Signal(SIGCONT);
    ctl_thread.join();
    fresh_thread.join();
    warm_thread.join();
    ASSERT_EQ(ctl.exit_code, 0) << "round " << round << " custodyctl after " << ctl_took
                                << " ms: " << ctl.err;
    while (!ctl.out.empty() && ctl.out.back() == '\n') ctl.out.pop_back();
    EXPECT_EQ(Check(ctl.out, payload), "");
    ASSERT_TRUE(fresh.ok()) << "round " << round << " new Client after " << fresh_took
                            << " ms: " << fresh.status();
    EXPECT_EQ(Check(fresh->jws, payload), "");
    ASSERT_TRUE(warmed.ok()) << "round " << round << " Client after " << warm_took
                             << " ms: " << warmed.status();
    EXPECT_EQ(Check(warmed->jws, payload), "");
    ctl_ms.push_back(ctl_took);
    fresh_ms.push_back(fresh_took);
    warm_ms.push_back(warm_took);
  }
  EXPECT_TRUE(busy.running()) << "the busy loop ended early: the rounds ran without CPU load";
  auto range = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return absl::StrCat(static_cast<int>(v.front()), "-", static_cast<int>(v.back()), " ms");
  };
  std::printf(
      "paused 0.4 s, 20 rounds under a busy loop: custodyctl %s, new Client %s, Client %s\n",
      range(ctl_ms).c_str(), range(fresh_ms).c_str(), range(warm_ms).c_str());
}

// One replica SIGKILLed (and restarted) three times while the library Client (4 threads, sign and
// decrypt) and custodyctl processes (sign, decrypt, jwks, ring get) call through the list: no
// call fails.
TEST_F(FailoverTest, KillingAReplicaUnderLoadFailsNoCall) {
  auto client = NewClient();
  ASSERT_NE(client, nullptr);
  const std::string addresses = replicas_->addresses();  // read once: Restart() replaces replicas
  std::atomic<bool> stop{false};
  std::atomic<int> library_ok{0}, ctl_ok{0};
  std::mutex mu;
  std::vector<std::string> failures;
  auto fail = [&](const std::string& what) {
    std::lock_guard<std::mutex> lock(mu);
    failures.push_back(what);
  };
  std::vector<std::thread> workers;
  for (int t = 0; t < 4; ++t) {
    workers.emplace_back([&, t] {
      for (int n = 0; !stop.load(); ++n) {
        const std::string payload = absl::StrCat("library ", t, " ", n);
        if (t % 2 == 0) {
          auto jws = client->SignJws("ha/sign", payload);
          if (!jws.ok()) {
            fail(jws.status().ToString());
          } else if (std::string why = Check(jws->jws, payload); !why.empty()) {
            fail(why);
          } else {
            ++library_ok;
          }
        } else {
          auto jwe = client::EncryptToJwks(payload, enc_jwks_);
          auto pt = jwe.ok() ? client->DecryptJwe("ha/enc", *jwe)
                             : absl::StatusOr<client::DecryptedJwe>(jwe.status());
          if (!pt.ok()) {
            fail(pt.status().ToString());
          } else if (pt->plaintext != payload) {
            fail("wrong plaintext");
          } else {
            ++library_ok;
          }
        }
      }
    });
  }
  for (int t = 0; t < 2; ++t) {
    workers.emplace_back([&, t] {
      for (int n = 0; !stop.load(); ++n) {
        const std::string payload = absl::StrCat("custodyctl ", t, " ", n);
        CommandResult r;
        std::string why;
        switch (n % 4) {
          case 0:
            r = Ctl(addresses, {"sign", "ha/sign"}, payload);
            while (!r.out.empty() && r.out.back() == '\n') r.out.pop_back();
            if (r.exit_code == 0) why = Check(r.out, payload);
            break;
          case 1: {
            auto jwe = client::EncryptToJwks(payload, enc_jwks_);
            r = Ctl(addresses, {"decrypt", "ha/enc"}, jwe.ok() ? *jwe : "");
            if (r.exit_code == 0 && r.out != payload) why = "custodyctl decrypt: wrong plaintext";
            break;
          }
          case 2:
            r = Ctl(addresses, {"jwks", "ha/sign"});
            break;
          default:
            r = Ctl(addresses, {"ring", "get", "ha/sign"});
        }
        if (r.exit_code != 0) why = "custodyctl: " + r.err;
        if (why.empty()) {
          ++ctl_ok;
        } else {
          fail(why);
        }
      }
    });
  }
  for (int k = 0; k < 3; ++k) {
    std::this_thread::sleep_for(1500ms);
    replicas_->at(k).Kill();
    std::this_thread::sleep_for(1000ms);  // under load with one replica gone
    replicas_->Restart(k);
    ASSERT_TRUE(replicas_->at(k).started()) << replicas_->at(k).log();
  }
  std::this_thread::sleep_for(1s);
  stop = true;
  for (auto& w : workers) w.join();
  std::printf(
      "kill -9 of a replica x3 under load: %d library calls, %d custodyctl calls, %zu "
      "failed\n",
      library_ok.load(), ctl_ok.load(), failures.size());
  EXPECT_TRUE(failures.empty()) << failures.size() << " failed, first: " << failures.front();
  EXPECT_GT(library_ok.load(), 100);
  EXPECT_GT(ctl_ok.load(), 20);
}

// custodyctl jwks --watch with no ring names follows a ring created after it started (the watch
// of "every ring" is every ring at each change, not the rings of its first moment).
TEST_F(FailoverTest, WatchOfEveryRingFollowsRingsCreatedLater) {
  TempDir dir;
  const std::string log = dir.path() + "/watch.log";
  BackgroundProcess watch(
      {BinDir() + "/custodyctl", "--addr=" + replicas_->at(1).address(), "jwks", "--watch"}, log);
  auto wait_for = [&](const std::string& text) {
    auto deadline = Clock::now() + 10s;
    while (Clock::now() < deadline) {
      if (ReadFileOrDie(log).find(text) != std::string::npos) return true;
      std::this_thread::sleep_for(50ms);
    }
    return false;
  };
  ASSERT_TRUE(wait_for("\"keys\"")) << ReadFileOrDie(log);
  CommandResult r = Ctl(replicas_->at(0).address(),
                        {"ring", "create", "late/ring", "--purpose=sign", "--alg=ES256"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const size_t at = r.out.find("\"kid\": \"");
  ASSERT_NE(at, std::string::npos) << r.out;
  const std::string kid = r.out.substr(at + 8, r.out.find('"', at + 8) - at - 8);
  EXPECT_TRUE(wait_for(kid)) << "the watch never showed " << kid << ":\n" << ReadFileOrDie(log);
  EXPECT_TRUE(watch.running());
}

}  // namespace
}  // namespace custody::testing
