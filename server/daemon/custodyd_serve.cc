// custodyd at work: health kept current (token, audit log, metadata freshness), HSM metrics
// logged, SIGHUP reloads, and the drain on SIGTERM/SIGINT (custodyd_startup.h).
#include <signal.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <utility>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/log.h"
#include "grpcpp/health_check_service_interface.h"
#include "server/daemon/custodyd_flags.h"
#include "server/daemon/custodyd_startup.h"
#include "server/daemon/systemd_notify.h"

namespace custody::server {

void ServeUntilShutdown(Daemon* d) {
  std::atomic<bool> stopping{false};
  // Health follows the audit log and the token: while either cannot do its job every call
  // would fail, and load balancers should send traffic elsewhere until it recovers. The token is
  // probed (a cheap C_GetSessionInfo, recovering sessions if needed) every second; HSM metrics
  // are logged every --metrics_log_seconds.
  std::thread health([&] {
    bool serving = true;
    std::string cause;
    auto last_probe = absl::Now(), last_metrics = absl::Now(), last_audit_probe = absl::Now();
    const absl::Duration metrics_every = absl::Seconds(absl::GetFlag(FLAGS_metrics_log_seconds));
    while (!stopping.load()) {
      bool token_ok = d->token->Healthy();
      if (!token_ok || absl::Now() - last_probe > absl::Seconds(1)) {
        token_ok = d->token->Probe().ok();
        last_probe = absl::Now();
      }
      bool audit_ok = d->guard->healthy();
      // After a failure the audit log is re-tested on its own, once a second, so that service
      // returns when the disk does (not only when a caller's line happens to succeed).
      if (!audit_ok && absl::Now() - last_audit_probe > absl::Seconds(1)) {
        last_audit_probe = absl::Now();
        audit_ok = d->audit->Probe().ok();
      }
      d->anchoring->Tick(/*force=*/false);
      bool metadata_ok = d->keys->CheckMetadataFresh().ok();
      bool healthy = token_ok && audit_ok && metadata_ok;
      if (healthy != serving) {
        serving = healthy;
        cause = !audit_ok      ? "audit log"
                : !token_ok    ? "token unreachable"
                : !metadata_ok ? "metadata unreachable past --max_metadata_staleness"
                               : "recovered";
        d->server->GetHealthCheckService()->SetServingStatus(serving);
        d->serving_now = serving;
        Log(serving ? LogLevel::kInfo : LogLevel::kError, "health.changed",
            {{"serving", serving ? "true" : "false"}, {"cause", cause}});
      }
      if (metrics_every > absl::ZeroDuration() && absl::Now() - last_metrics > metrics_every) {
        last_metrics = absl::Now();
        pkcs11::Token::Metrics m = d->token->GetMetrics();
        std::string errors;
        for (const auto& [ckr, n] : m.errors) absl::StrAppend(&errors, ckr, "=", n, " ");
        auto mean = [](const pkcs11::Token::Latency& l) {
          return absl::StrCat(l.count == 0 ? 0 : l.total_micros / l.count);
        };
        Log(LogLevel::kInfo, "metrics.hsm",
            {{"errors", errors},
             {"retries", absl::StrCat(m.retries)},
             {"recoveries", absl::StrCat(m.recoveries)},
             {"module_reinitializations", absl::StrCat(m.module_reinitializations)},
             {"reinit_backoffs", absl::StrCat(m.reinit_backoffs)},
             {"pool_waits", absl::StrCat(m.pool_waits)},
             {"pool_rejections", absl::StrCat(m.pool_rejections)},
             {"pool_timeouts", absl::StrCat(m.pool_timeouts)},
             {"sign_count", absl::StrCat(m.sign.count)},
             {"sign_mean_us", mean(m.sign)},
             {"sign_max_us", absl::StrCat(m.sign.max_micros)},
             {"decrypt_count", absl::StrCat(m.decrypt.count)},
             {"decrypt_mean_us", mean(m.decrypt)},
             {"derive_count", absl::StrCat(m.derive.count)},
             {"derive_mean_us", mean(m.derive)}});
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });

  // SIGTERM/SIGINT: stop accepting, let in-flight calls finish (bounded), then exit.
  // SIGHUP: reload the access policy and the HTTP listeners' TLS files (a bad file keeps the old
  // one in use, and says why).
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  std::thread waiter([&] {
    for (;;) {
      int sig = 0;
      sigwait(&signals, &sig);
      if (sig == SIGHUP) {
        NotifySystemd("RELOADING=1");
        absl::Status s = d->policy.LoadFrom(d->policy_path);
        for (auto [flag, http] : {std::pair{"--metrics_listen", d->metrics_server.get()},
                                  std::pair{"--jwks_listen", d->jwks_server.get()}}) {
          if (http != nullptr && http->serves_tls()) {
            LogTlsReload(flag, http->tls_cert(), http->tls_key(), "SIGHUP", http->ReloadTls());
          }
        }
        NotifySystemd("READY=1");
        Log(s.ok() ? LogLevel::kInfo : LogLevel::kError, "policy.reloaded",
            {{"path", d->policy_path}, {"result", s.ok() ? "ok" : std::string(s.message())}});
        continue;
      }
      Log(LogLevel::kInfo, "custodyd.shutdown", {{"signal", absl::StrCat(sig)}});
      NotifySystemd("STOPPING=1");
      d->guard->BeginShutdown();  // new calls: UNAVAILABLE "shutting down", so clients fail over
      d->server->GetHealthCheckService()->SetServingStatus(false);
      d->keys->StopScheduler();
      // For a moment every new call is answered at once (UNAVAILABLE) while the server still
      // takes them: the handler threads stay free, so no call waits unserved when the server
      // stops (gRPC cancels those: CANCELLED, which clients do not fail over on).
      absl::SleepFor(absl::GetFlag(FLAGS_drain_grace));
      if (d->unix_listener != nullptr) d->unix_listener->Stop();
      d->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(10));
      return;
    }
  });
  d->server->Wait();
  waiter.join();
  stopping = true;
  health.join();
  d->anchoring->Tick(/*force=*/true);  // the head at shutdown
  if (d->metrics_server != nullptr) d->metrics_server->Stop();
  if (d->jwks_server != nullptr) d->jwks_server->Stop();
}

}  // namespace custody::server
