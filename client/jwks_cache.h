// JwksCache: an always-fresh copy of custodyd's JWKS for verifiers in the same process.
//
// A background thread subscribes to Signer.WatchJwks (a push of the set at subscribe time and
// on every change). When the stream fails it reconnects with jittered exponential backoff and,
// meanwhile, polls Signer.GetJwks whenever the copy is older than its max_age_seconds (and at
// once when there is no copy). When custodyd does not implement WatchJwks (UNIMPLEMENTED) the
// cache polls only, every max_age_seconds (at least every min_poll_interval).
//
// While custodyd is unreachable the watch call waits for the connection (wait_for_ready): it
// starts as soon as custodyd is back, and a poll would fail the same way meanwhile. Keys already
// cached stay available throughout.
//
// Thread-safe. The destructor cancels the stream and joins the thread.
#ifndef CUSTODY_CLIENT_JWKS_CACHE_H_
#define CUSTODY_CLIENT_JWKS_CACHE_H_

#include <cstdint>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "custody/client/client.h"
#include "custody/jose/json.h"
#include "custody/jose/jwk.h"
#include "grpcpp/grpcpp.h"

namespace custody::client {

struct JwksCacheOptions {
  std::vector<std::string> rings;  // empty: every ring
  absl::Duration initial_backoff = absl::Milliseconds(100);
  absl::Duration max_backoff = absl::Seconds(10);
  absl::Duration min_poll_interval = absl::Seconds(1);
};

class JwksCache {
 public:
  // `client` must outlive the cache. Starts the background thread at once.
  explicit JwksCache(const Client& client, JwksCacheOptions options = {});
  ~JwksCache();
  JwksCache(const JwksCache&) = delete;
  JwksCache& operator=(const JwksCache&) = delete;

  // Blocks until a first JWKS arrived (OK) or `timeout` passed (DEADLINE_EXCEEDED).
  absl::Status WaitReady(absl::Duration timeout) const;

  // The public JWK with this kid: UNAVAILABLE before the first JWKS, NOT_FOUND when absent.
  absl::StatusOr<jose::Json> Key(std::string_view kid) const;
  // The same as an OpenSSL key (validated by jose::PkeyFromPublicJwk).
  absl::StatusOr<jose::PkeyPtr> PublicKey(std::string_view kid) const;

  // The current JWKS JSON and its etag ("" before the first).
  std::string jwks() const;
  std::string etag() const;
  // Number of JWKS updates applied so far (watch pushes + successful polls that changed it).
  uint64_t updates() const;

 private:
  void Run();
  void Apply(const std::string& jwks, const std::string& etag, int64_t max_age_seconds);
  // Waits `d` or until stopped; true when stopped.
  bool SleepUnlessStopped(absl::Duration d);
  // Polls GetJwks when the copy is missing or older than its max_age (or when `force`).
  void PollIfStale(bool force);

  const Client& client_;
  const JwksCacheOptions options_;

  mutable absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  grpc::ClientContext* watch_ctx_ ABSL_GUARDED_BY(mu_) = nullptr;
  bool ready_ ABSL_GUARDED_BY(mu_) = false;
  std::string jwks_ ABSL_GUARDED_BY(mu_);
  std::string etag_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, jose::Json, std::less<>> keys_ ABSL_GUARDED_BY(mu_);
  absl::Time fetched_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  absl::Duration max_age_ ABSL_GUARDED_BY(mu_) = absl::ZeroDuration();
  uint64_t updates_ ABSL_GUARDED_BY(mu_) = 0;

  std::thread thread_;  // last: started when everything above is initialised
};

}  // namespace custody::client

#endif  // CUSTODY_CLIENT_JWKS_CACHE_H_
