// custody-bench (first cut): SignJws round-trip latency and throughput against a running
// custodyd, per algorithm, at a chosen concurrency. Creates bench/* rings when missing.
//
//   custody-bench --addr=unix:.state/custodyd.sock [--seconds=3] [--concurrency=1]
//                 [--payload_bytes=1024] [--algs=ES256,PS256,EdDSA]
//
// Prints one row per algorithm: ops/s, p50/p99/p99.9 latency in microseconds.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "client/channel.h"
#include "custody/v1/custody.grpc.pb.h"

namespace {

using Clock = std::chrono::steady_clock;

std::string Flag(const std::map<std::string, std::string>& flags, const std::string& name,
                 const std::string& fallback) {
  auto it = flags.find(name);
  return it == flags.end() ? fallback : it->second;
}

double Percentile(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  size_t i = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())));
  std::nth_element(v.begin(), v.begin() + static_cast<long>(i), v.end());
  return v[i];
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> flags;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    size_t eq = a.find('=');
    if (a.rfind("--", 0) != 0 || eq == std::string::npos) {
      std::fprintf(stderr, "usage: custody-bench --addr=ADDR [--seconds=N] [--concurrency=N]\n");
      return 2;
    }
    flags[a.substr(2, eq - 2)] = a.substr(eq + 1);
  }
  custody::client::ChannelOptions options;
  options.address = Flag(flags, "addr", "unix:.state/custodyd.sock");
  int seconds = 3, concurrency = 1, payload_bytes = 1024;
  if (!absl::SimpleAtoi(Flag(flags, "seconds", "3"), &seconds) ||
      !absl::SimpleAtoi(Flag(flags, "concurrency", "1"), &concurrency) ||
      !absl::SimpleAtoi(Flag(flags, "payload_bytes", "1024"), &payload_bytes)) {
    std::fprintf(stderr, "custody-bench: numeric flags must be numbers\n");
    return 2;
  }
  auto channel = custody::client::CreateChannel(options);
  if (!channel.ok()) return 2;
  auto admin = custody::v1::KeyAdmin::NewStub(*channel);
  auto signer = custody::v1::Signer::NewStub(*channel);
  std::string payload(static_cast<size_t>(payload_bytes), 'p');

  std::printf("%-8s %6s %10s %10s %10s %10s\n", "alg", "conc", "ops/s", "p50_us", "p99_us",
              "p99.9_us");
  for (absl::string_view alg : absl::StrSplit(Flag(flags, "algs", "ES256,PS256,EdDSA"), ',')) {
    std::string ring = "bench/" + std::string(alg);
    for (char& c : ring) c = static_cast<char>(std::tolower(c));
    {
      custody::v1::CreateKeyRingRequest req;
      req.set_name(ring);
      req.set_purpose(custody::v1::SIGN);
      req.set_alg(std::string(alg));
      custody::v1::KeyRing out;
      grpc::ClientContext ctx;
      grpc::Status s = admin->CreateKeyRing(&ctx, req, &out);
      if (!s.ok() && s.error_code() != grpc::StatusCode::ALREADY_EXISTS) {
        std::fprintf(stderr, "create %s: %s\n", ring.c_str(), s.error_message().c_str());
        return 1;
      }
    }
    std::atomic<bool> failed{false};
    std::vector<std::vector<double>> latencies(static_cast<size_t>(concurrency));
    auto end = Clock::now() + std::chrono::seconds(seconds);
    std::vector<std::thread> threads;
    for (int t = 0; t < concurrency; ++t) {
      threads.emplace_back([&, t] {
        custody::v1::SignJwsRequest req;
        req.set_ring(ring);
        req.set_payload(payload);
        req.set_typ("JWT");
        while (Clock::now() < end && !failed) {
          custody::v1::SignJwsResponse resp;
          grpc::ClientContext ctx;
          auto start = Clock::now();
          grpc::Status s = signer->SignJws(&ctx, req, &resp);
          auto us = std::chrono::duration<double, std::micro>(Clock::now() - start).count();
          if (!s.ok()) {
            std::fprintf(stderr, "SignJws %s: %s\n", ring.c_str(), s.error_message().c_str());
            failed = true;
          }
          latencies[static_cast<size_t>(t)].push_back(us);
        }
      });
    }
    for (auto& th : threads) th.join();
    if (failed) return 1;
    std::vector<double> all;
    for (auto& l : latencies) all.insert(all.end(), l.begin(), l.end());
    double ops = static_cast<double>(all.size()) / seconds;
    std::printf("%-8s %6d %10.0f %10.0f %10.0f %10.0f\n", std::string(alg).c_str(), concurrency,
                ops, Percentile(all, 0.5), Percentile(all, 0.99), Percentile(all, 0.999));
  }
  return 0;
}
