#include "client/jwks_cache.h"

#include <algorithm>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"

namespace custody::client {
namespace {

double Jitter() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  return std::uniform_real_distribution<double>(0.8, 1.2)(rng);
}

}  // namespace

JwksCache::JwksCache(const Client& client, JwksCacheOptions options)
    : client_(client), options_(std::move(options)), thread_([this] { Run(); }) {}

JwksCache::~JwksCache() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
    // TryCancel before the call started is honoured by gRPC once it starts.
    if (watch_ctx_ != nullptr) watch_ctx_->TryCancel();
  }
  thread_.join();
}

absl::Status JwksCache::WaitReady(absl::Duration timeout) const {
  absl::MutexLock lock(&mu_);
  if (mu_.AwaitWithTimeout(absl::Condition(&ready_), timeout)) return absl::OkStatus();
  return absl::DeadlineExceededError("no JWKS received yet");
}

void JwksCache::Apply(const std::string& jwks, const std::string& etag, int64_t max_age_seconds) {
  auto parsed = jose::ParseJson(jwks, jose::JsonLimits{.max_bytes = 4 * 1024 * 1024});
  std::map<std::string, jose::Json, std::less<>> keys;
  if (parsed.ok()) {
    const jose::Json* list = parsed->Find("keys");
    if (list != nullptr) {
      for (const jose::Json& k : list->as_array()) {
        const jose::Json* kid = k.Find("kid");
        if (kid != nullptr && kid->is_string()) keys.emplace(kid->as_string(), k);
      }
    }
  }
  if (!parsed.ok()) return;  // keep the last good copy
  absl::MutexLock lock(&mu_);
  fetched_ = absl::Now();
  max_age_ = absl::Seconds(std::max<int64_t>(max_age_seconds, 0));
  if (jwks_ == jwks && ready_) return;
  jwks_ = jwks;
  etag_ = etag;
  keys_ = std::move(keys);
  ready_ = true;
  ++updates_;
}

bool JwksCache::SleepUnlessStopped(absl::Duration d) {
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithTimeout(absl::Condition(&stop_), d);
  return stop_;
}

void JwksCache::PollIfStale(bool force) {
  {
    absl::MutexLock lock(&mu_);
    if (stop_) return;
    if (!force && ready_ && absl::Now() - fetched_ < max_age_) return;
  }
  auto got = client_.GetJwks(options_.rings);
  if (got.ok()) Apply(got->jwks, got->etag, got->max_age_seconds);
}

void JwksCache::Run() {
  custody::v1::WatchJwksRequest req;
  for (const std::string& r : options_.rings) req.add_rings(r);
  absl::Duration backoff = options_.initial_backoff;
  bool poll_only = false;
  for (;;) {
    if (poll_only) {
      PollIfStale(/*force=*/true);
      absl::Duration wait;
      {
        absl::MutexLock lock(&mu_);
        wait = std::max(max_age_, options_.min_poll_interval);
      }
      if (SleepUnlessStopped(wait)) return;
      continue;
    }
    grpc::ClientContext ctx;
    // Queue rather than fail while the channel is (re)connecting: the stream starts as soon as
    // custodyd is reachable again. Cancelled by the destructor like any watch.
    ctx.set_wait_for_ready(true);
    {
      absl::MutexLock lock(&mu_);
      if (stop_) return;
      watch_ctx_ = &ctx;
    }
    bool got_any = false;
    std::unique_ptr<grpc::ClientReader<custody::v1::GetJwksResponse>> reader =
        client_.signer().WatchJwks(&ctx, req);
    custody::v1::GetJwksResponse resp;
    while (reader->Read(&resp)) {
      got_any = true;
      Apply(resp.jwks(), resp.etag(), resp.max_age_seconds());
    }
    grpc::Status status = reader->Finish();
    {
      absl::MutexLock lock(&mu_);
      watch_ctx_ = nullptr;
      if (stop_) return;
    }
    if (status.error_code() == grpc::StatusCode::UNIMPLEMENTED) {
      poll_only = true;
      continue;
    }
    if (got_any) backoff = options_.initial_backoff;
    // Kick the channel out of IDLE so that the next attempt finds a connection being made.
    client_.channel()->GetState(/*try_to_connect=*/true);
    PollIfStale(/*force=*/false);
    if (SleepUnlessStopped(std::min(backoff, options_.max_backoff) * Jitter())) return;
    backoff = std::min(backoff * 2, options_.max_backoff);
  }
}

absl::StatusOr<jose::Json> JwksCache::Key(std::string_view kid) const {
  absl::MutexLock lock(&mu_);
  if (!ready_) return absl::UnavailableError("JWKS not received yet");
  auto it = keys_.find(kid);
  if (it == keys_.end()) return absl::NotFoundError(absl::StrCat("unknown kid ", std::string(kid)));
  return it->second;
}

absl::StatusOr<jose::PkeyPtr> JwksCache::PublicKey(std::string_view kid) const {
  auto jwk = Key(kid);
  if (!jwk.ok()) return jwk.status();
  return jose::PkeyFromPublicJwk(*jwk);
}

std::string JwksCache::jwks() const {
  absl::MutexLock lock(&mu_);
  return jwks_;
}

std::string JwksCache::etag() const {
  absl::MutexLock lock(&mu_);
  return etag_;
}

uint64_t JwksCache::updates() const {
  absl::MutexLock lock(&mu_);
  return updates_;
}

}  // namespace custody::client
