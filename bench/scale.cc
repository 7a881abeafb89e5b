#include "bench/scale.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "bench/proc_util.h"
#include "custody/v1/custody.grpc.pb.h"
#include "jose/json.h"

namespace custody::bench {
namespace {

std::string RingName(int i) { return absl::StrFormat("scale/r%04d", i); }

absl::Status CreateAndRotate(custody::v1::KeyAdmin::Stub& admin, const std::string& name) {
  {
    custody::v1::CreateKeyRingRequest req;
    req.set_name(name);
    req.set_purpose(custody::v1::SIGN);
    req.set_alg("ES256");
    // prepublish 0: the PENDING version may be promoted at once; retain long enough that the
    // RETIRED version stays published for the whole measurement.
    req.mutable_policy()->set_prepublish_ms(0);
    req.mutable_policy()->set_rotation_period_ms(0);
    req.mutable_policy()->set_retain_ms(30LL * 24 * 3600 * 1000);
    req.mutable_policy()->set_destroy_delay_ms(7LL * 24 * 3600 * 1000);
    custody::v1::KeyRing ring;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    grpc::Status s = admin.CreateKeyRing(&ctx, req, &ring);
    if (!s.ok() && s.error_code() != grpc::StatusCode::ALREADY_EXISTS) {
      return absl::InternalError(absl::StrCat("CreateKeyRing ", name, ": ", s.error_message()));
    }
  }
  custody::v1::RotateKeyRingRequest req;
  req.set_ring(name);
  custody::v1::RotateKeyRingResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  grpc::Status s = admin.RotateKeyRing(&ctx, req, &resp);
  if (!s.ok()) {
    return absl::InternalError(absl::StrCat("RotateKeyRing ", name, ": ", s.error_message()));
  }
  if (!resp.rotated()) {
    return absl::InternalError(
        absl::StrCat("RotateKeyRing ", name, " did not rotate: ", resp.message()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ScaleResult> RunScale(const CustodydOptions& options, int rings, int threads,
                                     int jwks_calls) {
  ScaleResult result;
  auto daemon = CustodydProcess::Start(options);
  if (!daemon.ok()) return daemon.status();
  auto channel = client::CreateChannel(options.channel);
  if (!channel.ok()) return channel.status();
  auto admin = custody::v1::KeyAdmin::NewStub(*channel);
  auto signer = custody::v1::Signer::NewStub(*channel);
  result.rss_kb_before = ProcessStatusKb((*daemon)->pid(), "VmRSS");

  std::fprintf(stderr, "[scale] creating %d ES256 rings (ACTIVE+PENDING) and rotating each...\n",
               rings);
  const absl::Time start = absl::Now();
  std::atomic<int> next{0};
  std::atomic<int> done{0};
  std::mutex mu;
  absl::Status first_error;
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&] {
      for (int i = next++; i < rings; i = next++) {
        absl::Status s = CreateAndRotate(*admin, RingName(i));
        if (!s.ok()) {
          std::lock_guard<std::mutex> lock(mu);
          if (first_error.ok()) first_error = s;
          next = rings;  // stop everyone
          return;
        }
        int n = ++done;
        if (n % 100 == 0) std::fprintf(stderr, "[scale]   %d/%d\n", n, rings);
      }
    });
  }
  for (std::thread& w : workers) w.join();
  if (!first_error.ok()) return first_error;
  result.create_s = absl::ToDoubleSeconds(absl::Now() - start);
  std::fprintf(stderr, "[scale] created in %.1f s\n", result.create_s);
  result.rings = rings;
  result.rss_kb_after_create = ProcessStatusKb((*daemon)->pid(), "VmRSS");
  result.hwm_kb_after_create = ProcessStatusKb((*daemon)->pid(), "VmHWM");

  {
    custody::v1::ListKeyRingsRequest req;
    req.set_prefix("scale/");
    custody::v1::ListKeyRingsResponse resp;
    grpc::ClientContext ctx;
    grpc::Status s = admin->ListKeyRings(&ctx, req, &resp);
    if (!s.ok()) return absl::InternalError(absl::StrCat("ListKeyRings: ", s.error_message()));
    for (const auto& ring : resp.rings()) result.versions += ring.versions_size();
  }

  // GetJwks of every ring (the scale rings plus the few bench rings).
  std::vector<double> ms;
  for (int i = 0; i < jwks_calls + 1; ++i) {
    custody::v1::GetJwksRequest req;
    custody::v1::GetJwksResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto t0 = std::chrono::steady_clock::now();
    grpc::Status s = signer->GetJwks(&ctx, req, &resp);
    double elapsed =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (!s.ok()) return absl::InternalError(absl::StrCat("GetJwks: ", s.error_message()));
    if (i == 0) {  // the first call also checks the set; it is not timed
      result.jwks_bytes = static_cast<int64_t>(resp.jwks().size());
      jose::JsonLimits limits;
      limits.max_bytes = 64 * 1024 * 1024;
      auto jwks = jose::ParseJson(resp.jwks(), limits);
      if (!jwks.ok()) return jwks.status();
      const jose::Json* keys = jwks->Find("keys");
      if (keys == nullptr) return absl::InternalError("GetJwks: no \"keys\"");
      result.jwks_keys = static_cast<int64_t>(keys->as_array().size());
      if (result.jwks_keys < 3LL * rings) {
        return absl::InternalError(absl::StrCat("GetJwks lists ", result.jwks_keys,
                                                " keys, expected at least ", 3LL * rings));
      }
      continue;
    }
    ms.push_back(elapsed);
  }
  std::sort(ms.begin(), ms.end());
  result.jwks_calls = static_cast<int>(ms.size());
  if (!ms.empty()) {
    result.jwks_p50_ms = ms[ms.size() / 2];
    result.jwks_p99_ms = ms[std::min(ms.size() - 1, ms.size() * 99 / 100)];
    result.jwks_max_ms = ms.back();
  }

  if (absl::Status s = (*daemon)->Stop(); !s.ok()) return s;
  daemon->reset();
  std::fprintf(stderr,
               "[scale] restarting custodyd with that state (startup reconciles every "
               "version against the token; allowed up to 30 minutes)...\n");
  CustodydOptions restart_options = options;
  restart_options.startup_timeout = absl::Minutes(30);
  auto restarted = CustodydProcess::Start(restart_options);
  if (!restarted.ok()) return restarted.status();
  result.startup_ms = absl::ToDoubleMilliseconds((*restarted)->startup_time());
  std::fprintf(stderr, "[scale] SERVING after %.0f ms\n", result.startup_ms);
  {
    auto fresh = client::CreateChannel(options.channel);
    if (!fresh.ok()) return fresh.status();
    auto fresh_signer = custody::v1::Signer::NewStub(*fresh);
    custody::v1::GetJwksRequest req;
    custody::v1::GetJwksResponse resp;
    grpc::ClientContext ctx;
    grpc::Status s = fresh_signer->GetJwks(&ctx, req, &resp);
    if (!s.ok()) return absl::InternalError(absl::StrCat("GetJwks: ", s.error_message()));
  }
  result.rss_kb_after_restart = ProcessStatusKb((*restarted)->pid(), "VmRSS");
  result.hwm_kb_after_restart = ProcessStatusKb((*restarted)->pid(), "VmHWM");
  if (absl::Status s = (*restarted)->Stop(); !s.ok()) return s;
  return result;
}

}  // namespace custody::bench
