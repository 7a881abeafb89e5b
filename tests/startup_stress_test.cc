// Issue 29: custodyd started and SIGKILLed over and over by a test process that is as busy as the
// rotation crash test's (threads allocating, gRPC channels to dead servers reconnecting, a
// CPU-bound process alongside). Every start must reach SERVING: a child that blocks between fork
// and exec, or a custodyd that blocks before its first line, fails here with a description of
// where the process is (the harness prints /proc's view of a process that never answered).
#include <signal.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/testing/harness.h"

namespace custody::testing {
namespace {

namespace v1 = custody::v1;
using namespace std::chrono_literals;

int Iterations() {
  const char* env = std::getenv("CUSTODY_STARTUP_STRESS_ITERATIONS");
  return env != nullptr ? std::atoi(env) : 20;
}

grpc::Status SignOnce(Custodyd& d, const std::string& ring) {
  v1::SignJwsRequest req;
  req.set_ring(ring);
  req.set_payload(R"({"sub":"stress"})");
  v1::SignJwsResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 20s);
  return d.signer().SignJws(&ctx, req, &resp);
}

TEST(StartupStressTest, EveryStartServesWhileTheTestProcessIsBusy) {
  const int iterations = Iterations();
  absl::StatusOr<ChildProcess> cpu_hog =
      ChildProcess::Start({.argv = {"sh", "-c", "while :; do :; done"}});
  ASSERT_TRUE(cpu_hog.ok()) << cpu_hog.status();

  std::atomic<bool> stop{false};
  std::vector<std::thread> allocators;
  for (int t = 0; t < 3; ++t) {
    allocators.emplace_back([&stop, t] {
      std::mt19937 rng(t);
      std::vector<std::string> pool;
      while (!stop.load(std::memory_order_relaxed)) {
        pool.emplace_back(1 + rng() % 20000, 'x');
        if (pool.size() > 256) pool.clear();
      }
    });
  }

  TempDir dir;
  const std::string state = dir.path() + "/state";
  const std::string ring = "stress/sign";
  std::mt19937 rng(29);
  // Channels to the killed servers stay open, so gRPC's threads keep reconnecting (and
  // allocating) through every later start, as in the crash test.
  std::vector<std::shared_ptr<grpc::Channel>> dead_channels;
  int started = 0, signed_ok = 0;
  for (int i = 0; i < iterations; ++i) {
    Custodyd d(state);
    ASSERT_TRUE(d.started()) << "start " << i << " of " << iterations << " never served; its log:\n"
                             << d.log();
    ++started;
    if (i == 0) {
      v1::CreateKeyRingRequest req;
      req.set_name(ring);
      req.set_purpose(v1::SIGN);
      req.set_alg("ES256");
      v1::KeyRing created;
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + 30s);
      grpc::Status s = d.admin().CreateKeyRing(&ctx, req, &created);
      ASSERT_TRUE(s.ok()) << s.error_message();
    }
    grpc::Status s = SignOnce(d, ring);
    EXPECT_TRUE(s.ok()) << "start " << i << ": " << s.error_message();
    signed_ok += s.ok();
    // A sign in flight when the kill comes, at a random moment.
    std::thread in_flight([&d, &ring] { SignOnce(d, ring); });
    std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 40));
    d.Kill();
    in_flight.join();
    dead_channels.push_back(d.channel());
  }
  stop = true;
  for (std::thread& t : allocators) t.join();
  cpu_hog->Kill();
  EXPECT_EQ(started, iterations);
  EXPECT_EQ(signed_ok, iterations);
}

}  // namespace
}  // namespace custody::testing
