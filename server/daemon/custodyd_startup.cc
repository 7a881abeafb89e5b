// custodyd's start up to its listeners: the token, the metadata store, the access policy and
// audit log, the key service and the gRPC services (custodyd_startup.h).
#include "server/daemon/custodyd_startup.h"

#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <tuple>
#include <utility>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/log.h"
#include "common/secret.h"
#include "common/stderr_capture.h"
#include "server/daemon/custodyd_flags.h"
#include "server/daemon/embedded_token.h"

namespace custody::server {
namespace {

// The default policy written on first start: the uid custodyd runs as (the operator's service
// account), connecting over the Unix socket, may do everything; every authenticated caller may
// read public keys. Other local users and remote callers need a grant.
std::string DefaultPolicy() {
  return absl::StrCat(R"({
  "version": 1,
  "grants": [
    {"identities": ["uid:)",
                      getuid(), R"("],
     "operations": ["sign", "decrypt", "jwks", "admin.read", "admin.rotate", "admin.create",
                    "admin.destroy", "admin.import", "admin.certificate"],
     "rings": ["**"]},
    {"identities": ["*"], "operations": ["jwks"], "rings": ["**"]}
  ]
}
)");
}

absl::Status EnsureDefaultPolicy(const std::string& path) {
  if (access(path.c_str(), F_OK) == 0) return absl::OkStatus();
  const std::string policy = DefaultPolicy();
  std::FILE* f = std::fopen(path.c_str(), "wx");
  if (f == nullptr)
    return absl::FailedPreconditionError(absl::StrCat("cannot create '", path, "'"));
  bool ok = std::fputs(policy.c_str(), f) >= 0;
  ok = std::fflush(f) == 0 && fsync(fileno(f)) == 0 && ok;
  std::fclose(f);
  if (!ok) return absl::FailedPreconditionError(absl::StrCat("cannot write '", path, "'"));
  chmod(path.c_str(), 0600);
  return absl::OkStatus();
}

absl::StatusOr<Secret> ReadPin(const std::string& state_dir, bool embedded) {
  std::string pin_file = absl::GetFlag(FLAGS_pin_file);
  if (pin_file.empty() && embedded) pin_file = state_dir + "/pin";
  if (!pin_file.empty()) return ReadSecretFile(pin_file);
  auto pin = ReadSecretEnv(absl::GetFlag(FLAGS_pin_env).c_str());
  if (!pin.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("no PIN: pass --pin_file=FILE or set ", absl::GetFlag(FLAGS_pin_env),
                     " (PINs are never taken from the command line)"));
  }
  return pin;
}

// A duration flag given a bare number (`--http_request_deadline=5`): Abseil says only "Illegal

}  // namespace

bool StartupFailed(absl::string_view event, const absl::Status& s) {
  Log(LogLevel::kError, event, {{"error", std::string(s.message())}});
  return false;
}

void BeginStartup() {
  // The first line, before anything that can block (reading files a FIFO could stand in for,
  // C_Initialize, the metadata store): a custodyd that never gets further is never silent.
  Log(LogLevel::kInfo, "custodyd.starting", {{"pid", absl::StrCat(getpid())}});
  // Core dumps would carry PINs and plaintexts: off unless an operator re-enables them.
  struct rlimit no_core {
    0, 0
  };
  setrlimit(RLIMIT_CORE, &no_core);
}

bool OpenToken(Daemon* d) {
  const std::string& state_dir = d->state_dir;
  const bool embedded = absl::GetFlag(FLAGS_pkcs11_module).empty();
  std::string module = embedded ? kDefaultSoftHsmModule : absl::GetFlag(FLAGS_pkcs11_module);
  std::string label = absl::GetFlag(FLAGS_token_label);
  if (embedded) {
    if (absl::Status s = PrepareEmbeddedToken(state_dir, module); !s.ok()) {
      return StartupFailed("startup.embedded_token", s);
    }
    if (label.empty()) label = kEmbeddedTokenLabel;
  } else {
    if (absl::Status s = EnsurePrivateDirectory(state_dir); !s.ok())
      return StartupFailed("startup", s);
    if (label.empty()) {
      return StartupFailed(
          "startup", absl::InvalidArgumentError("--token_label is required with --pkcs11_module"));
    }
  }
  auto selector = pkcs11::ParseTokenSelector(label);
  if (!selector.ok()) return StartupFailed("startup.token_label", selector.status());
  auto pin = ReadPin(state_dir, embedded);
  if (!pin.ok()) return StartupFailed("startup.pin", pin.status());

  // The module's own diagnostics become JSON lines naming it (before it is loaded: modules
  // write during C_Initialize).
  if (absl::Status s = CaptureStderr(module); !s.ok()) {
    Log(LogLevel::kWarning, "startup.stderr_capture", {{"error", std::string(s.message())}});
  }
  pkcs11::Token::Options token_options;
  token_options.module_path = module;
  token_options.init_args = absl::GetFlag(FLAGS_pkcs11_init_args);
  token_options.selector = *selector;
  token_options.pin = *std::move(pin);
  token_options.max_sessions = static_cast<size_t>(std::max(1, absl::GetFlag(FLAGS_max_sessions)));
  auto token = pkcs11::Token::Open(std::move(token_options));
  if (!token.ok()) return StartupFailed("startup.token", token.status());
  d->token = *std::move(token);
  return true;
}

bool OpenMetadataStore(Daemon* d) {
  // The key in the token that vouches for every metadata record (found, or made at first start).
  auto tag_key = MetadataTagKey::Open(d->token.get());
  if (!tag_key.ok()) return StartupFailed("startup.metadata_tag_key", tag_key.status());
  d->tag_key = *std::move(tag_key);
  Log(LogLevel::kInfo, "metadata.tag_key",
      {{"key", d->tag_key->Describe()}, {"generated", d->tag_key->generated() ? "true" : "false"}});
  MetadataBackendOptions metadata_options;
  metadata_options.tagger = d->tag_key.get();
  metadata_options.spec = absl::GetFlag(FLAGS_metadata);
  metadata_options.state_dir = d->state_dir;
  metadata_options.password_file = absl::GetFlag(FLAGS_metadata_password_file);
  metadata_options.password_env = absl::GetFlag(FLAGS_metadata_password_env);
  auto metadata = OpenMetadataBackend(metadata_options);
  if (!metadata.ok()) return StartupFailed("startup.metadata", metadata.status());
  d->metadata = *std::move(metadata);
  Log(LogLevel::kInfo, "metadata.opened", {{"store", d->metadata.describe}});
  return true;
}

bool OpenPolicyAndAudit(Daemon* d) {
  std::string& policy_path = d->policy_path;
  policy_path = absl::GetFlag(FLAGS_policy_file);
  if (policy_path.empty()) {
    policy_path = d->state_dir + "/policy.json";
    if (absl::Status s = EnsureDefaultPolicy(policy_path); !s.ok())
      return StartupFailed("startup.policy", s);
  }
  if (absl::Status s = d->policy.LoadFrom(policy_path); !s.ok())
    return StartupFailed("startup.policy", s);
  std::string& audit_dir = d->audit_dir;
  audit_dir = absl::GetFlag(FLAGS_audit_dir);
  if (audit_dir.empty()) audit_dir = d->state_dir + "/audit";
  AuditLog::Options audit_options;
  audit_options.dir = audit_dir;
  std::string& replica_id = d->replica_id;
  replica_id = absl::GetFlag(FLAGS_replica_id);
  if (replica_id.empty() && d->metadata.shared) {
    char host[256] = {};
    if (gethostname(host, sizeof(host) - 1) == 0) replica_id = host;
  }
  if (replica_id.size() > 64 ||
      replica_id.find_first_not_of(
          "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") !=
          std::string::npos) {
    return StartupFailed(
        "startup.flags",
        absl::InvalidArgumentError("--replica_id: at most 64 characters of [A-Za-z0-9._-]"));
  }
  audit_options.replica_id = replica_id;
  audit_options.max_file_bytes =
      static_cast<uint64_t>(std::max<int64_t>(4096, absl::GetFlag(FLAGS_audit_max_file_bytes)));
  auto audit = AuditLog::Open(audit_options);
  if (!audit.ok()) return StartupFailed("startup.audit", audit.status());
  d->audit = *std::move(audit);
  AuditAnchoring::Options anchor_options;
  anchor_options.chain = replica_id;
  anchor_options.every_lines =
      static_cast<uint64_t>(std::max<int64_t>(1, absl::GetFlag(FLAGS_audit_anchor_lines)));
  anchor_options.every = absl::GetFlag(FLAGS_audit_anchor_interval);
  d->anchoring =
      std::make_unique<AuditAnchoring>(d->audit.get(), d->metadata.store.get(), anchor_options);
  if (absl::Status s = d->anchoring->CheckAtStartup(absl::GetFlag(FLAGS_audit_new_chain));
      !s.ok()) {
    return StartupFailed("startup.audit", s);
  }
  d->anchoring->Tick(/*force=*/true);
  RequestMetrics::Options request_metrics_options;
  request_metrics_options.ring_label = absl::GetFlag(FLAGS_metrics_ring_label);
  request_metrics_options.max_rings =
      static_cast<size_t>(std::max(0, absl::GetFlag(FLAGS_metrics_max_rings)));
  d->request_metrics = std::make_unique<RequestMetrics>(request_metrics_options);
  d->guard = std::make_unique<RequestGuard>(&d->policy, d->audit.get(), d->request_metrics.get());
  return true;
}

bool CreateKeyService(Daemon* d) {
  KeyService::Options key_options;
  key_options.max_payload_bytes = static_cast<size_t>(absl::GetFlag(FLAGS_max_payload_bytes));
  key_options.shared_store = d->metadata.shared;
  key_options.adopt_untagged_metadata =
      d->tag_key->generated() || absl::GetFlag(FLAGS_adopt_untagged_metadata);
  key_options.max_staleness = absl::GetFlag(FLAGS_max_metadata_staleness);
  key_options.retired_sign_grace = absl::GetFlag(FLAGS_retired_sign_grace);
  for (auto [flag, value, out] :
       {std::tuple{"--min_destroy_delay", absl::GetFlag(FLAGS_min_destroy_delay),
                   &key_options.floors.min_destroy_delay_ms},
        std::tuple{"--min_retain", absl::GetFlag(FLAGS_min_retain),
                   &key_options.floors.min_retain_ms},
        std::tuple{"--min_rotation_period", absl::GetFlag(FLAGS_min_rotation_period),
                   &key_options.floors.min_rotation_period_ms}}) {
    if (value < absl::ZeroDuration()) {
      return StartupFailed("startup.flags",
                           absl::InvalidArgumentError(absl::StrCat(flag, " must not be negative")));
    }
    *out = absl::ToInt64Milliseconds(value);
  }
  // A few re-reads per staleness period, so that one slow read does not fail the replica.
  key_options.refresh_interval =
      std::clamp(key_options.max_staleness / 4, absl::Milliseconds(200), absl::Seconds(5));
  auto keys = KeyService::Create(d->token.get(), d->metadata.store.get(), key_options);
  if (!keys.ok()) return StartupFailed("startup.reconcile", keys.status());
  d->keys = *std::move(keys);
  return true;
}

bool CheckServiceBounds() {
  if (absl::GetFlag(FLAGS_max_batch_items) < 1) {
    return StartupFailed("startup.flags",
                         absl::InvalidArgumentError("--max_batch_items must be >= 1"));
  }
  const int max_watch_streams = absl::GetFlag(FLAGS_max_watch_streams);
  const int max_watch_streams_per_caller = absl::GetFlag(FLAGS_max_watch_streams_per_caller);
  const int max_threads = absl::GetFlag(FLAGS_max_threads);
  // Watchers hold a thread each: the rest of the quota is what every other call has.
  if (max_watch_streams < 1 || max_watch_streams_per_caller < 1 ||
      max_threads < max_watch_streams + 32) {
    return StartupFailed(
        "startup.flags",
        absl::InvalidArgumentError(absl::StrCat(
            "--max_watch_streams and --max_watch_streams_per_caller must be >= 1 and "
            "--max_threads (",
            max_threads, ") at least --max_watch_streams + 32 (", max_watch_streams + 32, ")")));
  }
  const int unary_threads = absl::GetFlag(FLAGS_unary_threads);
  const int unary_queue = absl::GetFlag(FLAGS_unary_queue);
  if (unary_threads < 1 || unary_queue < 0) {
    return StartupFailed("startup.flags",
                         absl::InvalidArgumentError(
                             absl::StrCat("--unary_threads (", unary_threads, ") must be >= 1 and ",
                                          "--unary_queue (", unary_queue, ") >= 0")));
  }
  return true;
}

bool CreateGrpcServices(Daemon* d) {
  const int max_batch_items = absl::GetFlag(FLAGS_max_batch_items);
  BatchRunner::Options runner_options;
  runner_options.threads = std::max(1, absl::GetFlag(FLAGS_max_sessions)) - 1;
  runner_options.parallel_after =
      absl::Microseconds(std::max<int64_t>(0, absl::GetFlag(FLAGS_batch_parallel_after_us)));
  d->batch_runner = std::make_unique<BatchRunner>(runner_options);
  SignerService::JwksLimits jwks_limits;
  jwks_limits.max_reply_bytes =
      static_cast<size_t>(std::max<int64_t>(1024, absl::GetFlag(FLAGS_max_jwks_reply_bytes)));
  jwks_limits.max_watch_streams = absl::GetFlag(FLAGS_max_watch_streams);
  jwks_limits.max_watch_streams_per_caller = absl::GetFlag(FLAGS_max_watch_streams_per_caller);
  d->max_threads = absl::GetFlag(FLAGS_max_threads);
  const int unary_threads = absl::GetFlag(FLAGS_unary_threads);
  const int unary_queue = absl::GetFlag(FLAGS_unary_queue);
  d->unary_pool = std::make_unique<UnaryPool>(unary_threads, static_cast<size_t>(unary_queue));
  d->signer =
      std::make_unique<SignerService>(d->keys.get(), d->guard.get(), max_batch_items,
                                      d->batch_runner.get(), jwks_limits, d->unary_pool.get());
  d->admin = std::make_unique<KeyAdminService>(d->keys.get(), d->guard.get());
  return true;
}

}  // namespace custody::server
