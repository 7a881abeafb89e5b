// custody-bench: how close custodyd comes to its token, in one run, on one SoftHSM2 token and
// the same keys (issue #8). This file: the flags, the setup (custodyd, the token, the rings), the
// transports and the replicas row, and the report; one row is measured in row.cc (bench.h).
//
// It starts its own custodyd on a temporary state directory, creates one ring per measured
// algorithm, and for each (op, concurrency) measures
//   - the ceilings, in this process with the same number of threads and no gRPC: the token
//     operation alone through custody's pkcs11::Token on the SAME key object custodyd uses
//     (found by the version's token_object_id), and OpenSSL's software operation with a fresh
//     key of the same type (the CPU's limit);
//   - custodyd end to end (SignJws / DecryptJwe, 1 KB payloads) over its Unix socket, then,
//     after restarting custodyd on the same state directory with TLS, over TCP+mTLS.
// Every row reports ops/s, p50/p99/p99.9 latency, the ratio to the direct Cryptoki ceiling,
// custodyd's CPU per operation and the service overhead (that minus the token's CPU per
// operation), and custodyd's VmHWM. One JWS per SignJws row is verified against the ring's
// JWKS, and every DecryptJwe reply is compared with the plaintext. The exit status is 1 when any
// row produced no number, failed a call or failed its check.
//
//   custody-bench [--custodyd=PATH] [--seconds=2] [--quick] [--json=FILE]
//                 [--concurrency=1,4,16,64] [--ops=ES256,...] [--transports=unix,tcp]
//                 [--scale [--scale_rings=1000]] [--rows=false]
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "bench/bench.h"
#include "bench/ceilings.h"
#include "bench/custodyd_process.h"
#include "bench/grpc_floor.h"
#include "bench/load.h"
#include "bench/ops.h"
#include "bench/proc_util.h"
#include "bench/replica_set.h"
#include "bench/report.h"
#include "bench/rings.h"
#include "bench/scale.h"
#include "bench/tls_files.h"
#include "client/channel.h"
#include "client/client.h"
#include "client/jwe_encryption.h"
#include "common/secret.h"
#include "custody/v1/custody.grpc.pb.h"
#include "jose/json.h"
#include "jose/jwk.h"
#include "jose/jws.h"
#include "pkcs11/token.h"
#include "server/daemon/embedded_token.h"

ABSL_FLAG(std::string, custodyd, "", "custodyd binary; default: custodyd next to custody-bench");
ABSL_FLAG(double, seconds, 0, "measured seconds per row; 0 = 2 (0.3 with --quick)");
ABSL_FLAG(bool, quick, false,
          "CI mode: 0.3 s per row, concurrency 1 and 4, every op, Unix socket and TCP+mTLS");
ABSL_FLAG(std::string, json, "", "also write the results as JSON to this file");
ABSL_FLAG(std::vector<std::string>, concurrency, {},
          "client threads per row, e.g. 1,4,16,64 (the default; --quick: 1,4)");
ABSL_FLAG(std::vector<std::string>, ops, {},
          "subset of ES256,PS256-2048,PS256-3072,EdDSA,RSA-OAEP-256,ECDH-ES+A256KW (default all)");
ABSL_FLAG(std::vector<std::string>, transports,
          std::vector<std::string>({"unix", "tcp", "replicas"}),
          "unix (custodyd's Unix socket), tcp (TCP+mTLS on 127.0.0.1), replicas (three custodyd "
          "replicas on a throw-away PostgreSQL and the same token, behind one client-library "
          "channel over their Unix sockets; after unix or tcp)");
ABSL_FLAG(int, replicas, 3, "custodyd replicas of the replicas row");
ABSL_FLAG(int, clients_per_connection, 0,
          "0 (default): one channel (one connection) per concurrency level, shared by all its "
          "client threads; N: ceil(c/N) channels, each its own connection (at most "
          "--max_connections). On 2 cores several connections did not raise throughput");
ABSL_FLAG(int, max_connections, 4, "upper bound of connections per row");
ABSL_FLAG(int, max_sessions, 16,
          "PKCS#11 session pool of custodyd (--max_sessions) and of the direct ceiling. 16, not "
          "custodyd's default 8: the pool lets 4 x max_sessions callers wait and refuses more "
          "(RESOURCE_EXHAUSTED), so with 8 a 64-thread row measures load shedding (reported as "
          "'shed') rather than throughput");
ABSL_FLAG(std::string, client, "library",
          "how rows call: library (custody::client::Client, which coalesces concurrent calls "
          "into SignJwsBatch/DecryptJweBatch RPCs, as an authorization server linking it does) "
          "or stub (one unary RPC per call, as any other gRPC client)");
ABSL_FLAG(int, rpcs_in_flight, custody::client::ClientOptions{}.max_rpcs_in_flight,
          "--client=library: the Client's max_rpcs_in_flight (0: no coalescing)");
ABSL_FLAG(int, payload_bytes, 1024, "SignJws payload and DecryptJwe plaintext size");
ABSL_FLAG(bool, grpc_floor, true,
          "with --client=stub and the unix transport: also measure custody-grpc-floor, gRPC "
          "alone answering SignJws, at each concurrency (the floor under custodyd's CPU per call)");
ABSL_FLAG(bool, rows, true, "run the throughput rows (false with --scale: scale only)");
ABSL_FLAG(bool, scale, false,
          "also measure custodyd with --scale_rings ES256 rings x 3 versions: VmRSS, GetJwks of "
          "every key, restart time (slow: creates 3 keys per ring)");
ABSL_FLAG(int, scale_rings, 1000, "rings for --scale");
ABSL_FLAG(std::string, pkcs11_module, custody::server::kDefaultSoftHsmModule,
          "PKCS#11 module: with --token_label, of the token custodyd and the direct ceiling use; "
          "without, the SoftHSM2 module of custodyd's embedded token");
ABSL_FLAG(std::string, token_label, "",
          "measure on this token of --pkcs11_module (label or PKCS#11 URI) instead of an "
          "embedded SoftHSM2 token; the bench's keys stay in it (a token for benchmarking)");
ABSL_FLAG(std::string, pin_file, "", "the user PIN of --token_label's token (a file)");
ABSL_FLAG(std::string, pkcs11_init_args, "",
          "the module's initialization string (C_Initialize pReserved), as custodyd takes it");
ABSL_FLAG(std::vector<std::string>, custodyd_flags, {},
          "extra custodyd flags, comma-separated, e.g. --custodyd_flags=--audit_dir=/dev/shm/a "
          "to see what the audit log's fsync costs (not a configuration to run)");

namespace custody::bench {
namespace {

// --token_label: the operator's token instead of custodyd's embedded SoftHSM2 one.
bool ExternalToken() { return !absl::GetFlag(FLAGS_token_label).empty(); }

std::string LoadAvg() {
  auto text = ReadFile("/proc/loadavg");
  if (!text.ok()) return "?";
  std::vector<std::string> parts = absl::StrSplit(*text, ' ');
  if (parts.size() < 3) return "?";
  return absl::StrCat(parts[0], " ", parts[1], " ", parts[2]);
}

// The channels (each its own connection) of a row at concurrency c.
int ChannelsFor(int c) {
  const int per_connection = absl::GetFlag(FLAGS_clients_per_connection);
  if (per_connection <= 0) return 1;
  return std::clamp((c + per_connection - 1) / per_connection, 1,
                    std::max(1, absl::GetFlag(FLAGS_max_connections)));
}

}  // namespace

absl::Status Bench::Connections::Add(const std::shared_ptr<grpc::Channel>& channel) {
  stubs.push_back(custody::v1::Signer::NewStub(channel));
  if (absl::GetFlag(FLAGS_client) != "library") return absl::OkStatus();
  client::ClientOptions client_options;
  client_options.deadline = absl::Seconds(60);
  client_options.max_rpcs_in_flight = absl::GetFlag(FLAGS_rpcs_in_flight);
  auto client = client::Client::FromChannel(channel, client_options);
  if (!client.ok()) return client.status();
  clients.push_back(*std::move(client));
  return absl::OkStatus();
}

namespace {

CustodydOptions UnixOptions(const std::string& binary, const std::string& state_dir,
                            const std::vector<std::string>& flags, const std::string& log) {
  CustodydOptions o;
  o.binary = binary;
  o.state_dir = state_dir;
  o.listen = "unix:" + state_dir + "/custodyd.sock";
  o.extra_flags = flags;
  o.log_path = log;
  o.channel.address = o.listen;
  return o;
}

}  // namespace

absl::Status Bench::Setup() {
  auto tmp = TempDir::Create("custody-bench");
  if (!tmp.ok()) return tmp.status();
  tmp_ = std::make_unique<TempDir>(*std::move(tmp));
  state_dir_ = tmp_->path() + "/state";
  log_path_ = tmp_->path() + "/custodyd.log";
  payload_ = Payload(report_->payload_bytes);
  std::fprintf(stderr, "custody-bench: state in %s, custodyd log %s\n", tmp_->path().c_str(),
               log_path_.c_str());

  common_flags_ = {absl::StrCat("--max_sessions=", report_->max_sessions)};
  if (ExternalToken()) {
    // custodyd on the operator's token, exactly as it would be started for it.
    if (absl::GetFlag(FLAGS_pin_file).empty()) {
      return absl::InvalidArgumentError("--token_label needs --pin_file (the token's user PIN)");
    }
    common_flags_.push_back("--pkcs11_module=" + absl::GetFlag(FLAGS_pkcs11_module));
    common_flags_.push_back("--token_label=" + absl::GetFlag(FLAGS_token_label));
    common_flags_.push_back("--pin_file=" + absl::GetFlag(FLAGS_pin_file));
    if (!absl::GetFlag(FLAGS_pkcs11_init_args).empty()) {
      common_flags_.push_back("--pkcs11_init_args=" + absl::GetFlag(FLAGS_pkcs11_init_args));
    }
  }
  // custodyd with an access policy (--policy_file) denies mTLS callers by default: grant the
  // bench's client certificate (any authenticated caller) everything on every ring.
  auto help = CaptureCommandOutput({report_->custodyd, "--helpfull"});
  if (help.ok() && absl::StrContains(*help, "policy_file")) {
    const std::string policy = tmp_->path() + "/policy.json";
    if (absl::Status s = WriteFile(policy,
                                   R"({"version": 1, "grants": [{"identities": ["*"], )"
                                   R"("operations": ["sign", "decrypt", "jwks", "admin.read", )"
                                   R"("admin.rotate", "admin.create", "admin.destroy", )"
                                   R"("admin.import"], "rings": ["**"]}]})"
                                   "\n",
                                   0600);
        !s.ok()) {
      return s;
    }
    common_flags_.push_back("--policy_file=" + policy);
  }
  for (const std::string& flag : absl::GetFlag(FLAGS_custodyd_flags)) {
    common_flags_.push_back(flag);
  }

  const std::string tls_dir = tmp_->path() + "/tls";
  std::filesystem::create_directory(tls_dir);
  auto tls = MakeTlsFiles(tls_dir);
  if (!tls.ok()) return tls.status();
  tls_ = *tls;

  // The embedded token lives under the state directory: this process opens it with the same
  // config.
  if (!ExternalToken()) setenv("SOFTHSM2_CONF", (state_dir_ + "/softhsm2.conf").c_str(), 1);

  std::vector<std::string> selected = absl::GetFlag(FLAGS_ops);
  for (const OpSpec& spec : AllOps()) {
    if (!selected.empty() &&
        std::find(selected.begin(), selected.end(), spec.id) == selected.end()) {
      continue;
    }
    OpState op;
    op.spec = &spec;
    ops_.push_back(std::move(op));
  }
  for (const std::string& id : selected) {
    if (std::none_of(AllOps().begin(), AllOps().end(),
                     [&](const OpSpec& s) { return s.id == id; })) {
      return absl::InvalidArgumentError(absl::StrCat("--ops: unknown op '", id, "'"));
    }
  }
  return absl::OkStatus();
}

absl::Status Bench::CreateRings(const std::shared_ptr<grpc::Channel>& channel,
                                std::vector<OpState>& ops,
                                const std::function<absl::Status()>& ready) {
  auto admin = custody::v1::KeyAdmin::NewStub(channel);
  auto signer = custody::v1::Signer::NewStub(channel);
  std::fprintf(stderr, "custody-bench: creating %zu rings in the token...\n", ops.size());
  std::vector<absl::Status> created(ops.size());
  std::vector<std::thread> creators;
  for (size_t i = 0; i < ops.size(); ++i) {
    creators.emplace_back([&, i] { created[i] = CreateRing(*admin, *ops[i].spec); });
  }
  for (std::thread& t : creators) t.join();
  for (size_t i = 0; i < ops.size(); ++i) {
    if (!created[i].ok()) return created[i];
  }
  if (ready != nullptr) {
    if (absl::Status s = ready(); !s.ok()) return s;
  }
  for (size_t i = 0; i < ops.size(); ++i) {
    if (absl::Status s = DescribeRing(*admin, *signer, payload_, &ops[i]); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status Bench::RunReplicas() {
  if (token_ == nullptr) {
    return absl::FailedPreconditionError(
        "--transports: replicas runs after unix or tcp (whose custodyd makes the token)");
  }
  const std::string name = absl::StrCat("replicas", absl::GetFlag(FLAGS_replicas));
  ReplicaSet::Options set_options;
  set_options.binary = report_->custodyd;
  set_options.dir = tmp_->path() + "/replicas";
  set_options.replicas = std::max(1, absl::GetFlag(FLAGS_replicas));
  if (!ExternalToken()) {  // else common_flags_ name the token
    set_options.module_path = absl::GetFlag(FLAGS_pkcs11_module);
    set_options.pin_file = state_dir_ + "/pin";
  }
  set_options.flags = common_flags_;
  std::fprintf(stderr, "custody-bench: starting PostgreSQL and %d custodyd replicas\n",
               set_options.replicas);
  auto set = ReplicaSet::Start(set_options);
  if (!set.ok()) return set.status();
  client::ChannelOptions channel_options;
  channel_options.address = (*set)->addresses();
  auto channel = client::CreateChannel(channel_options);
  if (!channel.ok()) return channel.status();
  // Rings of the replicas' own metadata (names as in the single-process run: another store).
  std::vector<OpState> ops;
  for (const OpState& op : ops_) {
    OpState fresh;
    fresh.spec = op.spec;
    ops.push_back(std::move(fresh));
  }
  // Every replica serves every ring before they are described (through any replica) and used.
  auto every_replica_knows = [&]() -> absl::Status {
    for (const std::string& address :
         std::vector<std::string>(absl::StrSplit((*set)->addresses(), ','))) {
      client::ChannelOptions one;
      one.address = address;
      auto direct = client::CreateChannel(one);
      if (!direct.ok()) return direct.status();
      auto admin = custody::v1::KeyAdmin::NewStub(*direct);
      for (const OpState& op : ops) {
        grpc::Status s;
        for (int i = 0; i < 500; ++i) {
          custody::v1::GetKeyRingRequest req;
          req.set_name(op.spec->ring);
          custody::v1::KeyRing ring;
          grpc::ClientContext ctx;
          ctx.set_deadline(Deadline(10));
          s = admin->GetKeyRing(&ctx, req, &ring);
          if (s.ok()) break;
          std::this_thread::sleep_for(std::chrono::milliseconds(10));
        }
        if (!s.ok()) return absl::InternalError(GrpcError(("replica " + address).c_str(), s));
      }
    }
    return absl::OkStatus();
  };
  if (absl::Status s = CreateRings(*channel, ops, every_replica_knows); !s.ok()) return s;
  for (int c : concurrency_) {
    // One channel over every replica (round-robin over the SERVING ones), as callers get it.
    Connections connections;
    if (absl::Status s = connections.Add(*channel); !s.ok()) return s;
    for (size_t k = 0; k < ops.size(); ++k) {
      CeilingResult* ceiling = EnsureCeiling(ops_[k], c);
      RowResult row = RunRow(name, connections, ops[k], c, (*set)->pids());
      row.ceiling = ceiling;
      std::fprintf(stderr,
                   "[%s] %-34s c=%-3d %8.0f ops/s  p50 %7.0f us  p99 %7.0f us  ratio %.2f  "
                   "svc %.1f us/op  c/rpc %.1f  %s\n",
                   name.c_str(), ops[k].spec->label.c_str(), c, row.load.ops_per_s, row.load.p50_us,
                   row.load.p99_us, row.Ratio(), row.ServiceCpuUsPerOp(), row.calls_per_rpc,
                   row.check.c_str());
      const std::string where = absl::StrCat(name, " ", ops[k].spec->label, " c=", c);
      if (!row.HasNumber()) {
        Fail(absl::StrCat(where, ": no successful operation (", row.load.first_error, ")"));
      } else if (row.load.errors > 0) {
        Fail(absl::StrCat(where, ": ", row.load.errors, " failed calls (", row.load.first_error,
                          ")"));
      }
      if (!row.check_ok) Fail(absl::StrCat(where, ": ", row.check));
      report_->rows.push_back(std::move(row));
    }
  }
  int64_t hwm = -1;
  for (pid_t pid : (*set)->pids()) hwm = std::max(hwm, ProcessStatusKb(pid, "VmHWM"));
  report_->custodyd_vmhwm_kb[name + " (largest replica)"] = hwm;
  if (absl::Status s = (*set)->Stop(); !s.ok()) Fail(absl::StrCat(name, ": ", s.ToString()));
  return absl::OkStatus();
}

absl::Status Bench::RunTransport(const std::string& transport) {
  if (transport == "replicas") return RunReplicas();
  CustodydOptions options = UnixOptions(report_->custodyd, state_dir_, common_flags_, log_path_);
  std::string name = "unix";
  if (transport == "tcp") {
    name = "tcp+mtls";
    auto port = PickFreeLoopbackPort();
    if (!port.ok()) return port.status();
    options.listen = absl::StrCat("127.0.0.1:", *port);
    options.extra_flags.push_back("--tls_cert=" + tls_.server_cert);
    options.extra_flags.push_back("--tls_key=" + tls_.server_key);
    options.extra_flags.push_back("--client_ca=" + tls_.ca_cert);
    options.channel.address = options.listen;
    options.channel.ca_file = tls_.ca_cert;
    options.channel.cert_file = tls_.client_cert;
    options.channel.key_file = tls_.client_key;
  } else if (transport != "unix") {
    return absl::InvalidArgumentError(absl::StrCat("--transports: unknown '", transport, "'"));
  }
  std::fprintf(stderr, "custody-bench: starting custodyd (%s, %s)\n", name.c_str(),
               options.listen.c_str());
  auto daemon = CustodydProcess::Start(options);
  if (!daemon.ok()) return daemon.status();
  const pid_t pid = (*daemon)->pid();
  if (report_->fdatasync_p50_us < 0) {
    // The flush every acknowledged call waits for, on the file system custodyd writes its audit
    // to, measured now: the floor of one caller's latency (report: "One caller").
    std::string audit_dir = state_dir_ + "/audit";
    for (const std::string& flag : options.extra_flags) {
      if (absl::StartsWith(flag, "--audit_dir="))
        audit_dir = flag.substr(std::string_view("--audit_dir=").size());
    }
    auto p50 = FdatasyncP50Us(audit_dir, 200);
    if (!p50.ok()) return p50.status();
    report_->fdatasync_p50_us = *p50;
  }

  // First run: the rings, their keys and the token handle of this process.
  if (token_ == nullptr) {
    auto channel = client::CreateChannel(options.channel);
    if (!channel.ok()) return channel.status();
    if (absl::Status s = CreateRings(*channel, ops_); !s.ok()) return s;
    auto pin =
        ReadSecretFile(ExternalToken() ? absl::GetFlag(FLAGS_pin_file) : state_dir_ + "/pin");
    if (!pin.ok()) return pin.status();
    pkcs11::Token::Options token_options;
    token_options.module_path = absl::GetFlag(FLAGS_pkcs11_module);
    token_options.init_args = absl::GetFlag(FLAGS_pkcs11_init_args);
    if (ExternalToken()) {
      auto selector = pkcs11::ParseTokenSelector(absl::GetFlag(FLAGS_token_label));
      if (!selector.ok()) return selector.status();
      token_options.selector = *selector;
    } else {
      token_options.selector.label = server::kEmbeddedTokenLabel;
    }
    token_options.pin = *std::move(pin);
    token_options.max_sessions = static_cast<size_t>(report_->max_sessions);
    auto token = pkcs11::Token::Open(std::move(token_options));
    if (!token.ok()) return token.status();
    token_ = *std::move(token);
  }

  // The channels of a concurrency level are reused by every op at that level (connection reuse);
  // high concurrency spreads over a few connections.
  for (int c : concurrency_) {
    Connections connections;
    const int channels = ChannelsFor(c);
    for (int i = 0; i < channels; ++i) {
      auto channel = MakeChannel(options.channel, i);
      if (!channel.ok()) return channel.status();
      if (absl::Status s = connections.Add(*channel); !s.ok()) return s;
    }
    for (OpState& op : ops_) {
      CeilingResult* ceiling = EnsureCeiling(op, c);
      RowResult row = RunRow(name, connections, op, c, {pid});
      row.ceiling = ceiling;
      std::fprintf(stderr,
                   "[%s] %-34s c=%-3d %8.0f ops/s  p50 %7.0f us  p99 %7.0f us  ratio %.2f  "
                   "svc %.1f us/op  ovh %.1f us  cli %.1f us/op  c/rpc %.1f  %s\n",
                   name.c_str(), op.spec->label.c_str(), c, row.load.ops_per_s, row.load.p50_us,
                   row.load.p99_us, row.Ratio(), row.ServiceCpuUsPerOp(), row.OverheadUs(),
                   row.ClientCpuUsPerOp(), row.calls_per_rpc, row.check.c_str());
      const std::string where = absl::StrCat(name, " ", op.spec->label, " c=", c);
      if (!row.HasNumber()) {
        Fail(absl::StrCat(where, ": no successful operation (", row.load.first_error, ")"));
      } else if (row.load.errors > 0) {
        Fail(absl::StrCat(where, ": ", row.load.errors, " failed calls (", row.load.first_error,
                          ")"));
      }
      if (!row.check_ok) Fail(absl::StrCat(where, ": ", row.check));
      report_->rows.push_back(std::move(row));
    }
  }
  report_->custodyd_vmhwm_kb[name] = ProcessStatusKb(pid, "VmHWM");
  if (absl::Status s = (*daemon)->Stop(); !s.ok()) Fail(absl::StrCat(name, ": ", s.ToString()));
  return absl::OkStatus();
}

int Bench::Run() {
  const absl::Time start = absl::Now();
  if (absl::Status s = Setup(); !s.ok()) {
    std::fprintf(stderr, "custody-bench: setup: %s\n", s.ToString().c_str());
    return 1;
  }
  if (absl::GetFlag(FLAGS_rows)) {
    for (const std::string& transport : absl::GetFlag(FLAGS_transports)) {
      if (absl::Status s = RunTransport(transport); !s.ok()) {
        Fail(absl::StrCat(transport, ": ", s.ToString()));
        break;
      }
    }
    const auto& transports = absl::GetFlag(FLAGS_transports);
    if (absl::GetFlag(FLAGS_grpc_floor) && absl::GetFlag(FLAGS_client) == "stub" &&
        std::find(transports.begin(), transports.end(), "unix") != transports.end()) {
      // The reply's size: custodyd's ES256 JWS for this payload (header, payload, signature).
      const int reply_bytes = static_cast<int>(payload_.size() * 4 / 3 + 150);
      auto floors = MeasureGrpcFloor(SelfExeDir() + "/custody-grpc-floor", tmp_->path(),
                                     concurrency_, ChannelsFor, reply_bytes, row_);
      if (floors.ok()) {
        report_->floors = *std::move(floors);
      } else {
        Fail(absl::StrCat("gRPC floor: ", floors.status().ToString(),
                          " (custody-grpc-floor is built with custody-bench, next to it: build "
                          "that target, or pass --grpc_floor=false)"));
      }
    }
    int tc = concurrency_.empty() ? 0 : *std::max_element(concurrency_.begin(), concurrency_.end());
    if (std::find(concurrency_.begin(), concurrency_.end(), 16) != concurrency_.end()) tc = 16;
    EvaluateTargets(report_, tc);
  }
  if (absl::GetFlag(FLAGS_scale)) {
    auto scale = RunScale(UnixOptions(report_->custodyd, state_dir_, common_flags_, log_path_),
                          absl::GetFlag(FLAGS_scale_rings), 8, 50);
    if (!scale.ok()) {
      Fail(absl::StrCat("scale: ", scale.status().ToString()));
    } else {
      report_->scale = *scale;
    }
  }
  token_.reset();
  report_->total_s = absl::ToDoubleSeconds(absl::Now() - start);
  PrintReport(*report_, stdout);
  std::fflush(stdout);
  if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
    if (absl::Status s = WriteJsonReport(*report_, path); !s.ok()) {
      std::fprintf(stderr, "custody-bench: %s\n", s.ToString().c_str());
      return 1;
    }
  }
  return report_->failures.empty() ? 0 : 1;
}

}  // namespace custody::bench

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "custody-bench [--custodyd=PATH] [--seconds=2] [--quick] [--json=FILE] "
      "[--concurrency=1,4,16,64] [--ops=...] [--transports=unix,tcp] [--client=library|stub] "
      "[--scale]");
  std::vector<char*> rest = absl::ParseCommandLine(argc, argv);
  if (rest.size() > 1) {
    std::fprintf(stderr, "custody-bench: unexpected argument '%s'\n", rest[1]);
    return 2;
  }
  if (const std::string c = absl::GetFlag(FLAGS_client); c != "library" && c != "stub") {
    std::fprintf(stderr, "custody-bench: --client must be library or stub, not '%s'\n", c.c_str());
    return 2;
  }
  using custody::bench::Report;
  Report report;
  report.quick = absl::GetFlag(FLAGS_quick);
  report.seconds = absl::GetFlag(FLAGS_seconds);
  if (report.seconds <= 0) report.seconds = report.quick ? 0.3 : 2.0;
  report.custodyd = absl::GetFlag(FLAGS_custodyd);
  if (report.custodyd.empty()) report.custodyd = custody::bench::SelfExeDir() + "/custodyd";
  if (access(report.custodyd.c_str(), X_OK) != 0) {
    std::fprintf(stderr, "custody-bench: no custodyd at '%s' (pass --custodyd=PATH)\n",
                 report.custodyd.c_str());
    return 2;
  }
  report.max_sessions = std::max(1, absl::GetFlag(FLAGS_max_sessions));
  report.payload_bytes = std::max(64, absl::GetFlag(FLAGS_payload_bytes));
  report.cores = static_cast<int>(std::thread::hardware_concurrency());
  report.loadavg = custody::bench::LoadAvg();

  std::vector<int> concurrency;
  std::vector<std::string> given = absl::GetFlag(FLAGS_concurrency);
  if (given.empty()) {
    given = report.quick ? std::vector<std::string>{"1", "4"}
                         : std::vector<std::string>{"1", "4", "16", "64"};
  }
  for (const std::string& c : given) {
    int n = 0;
    if (!absl::SimpleAtoi(c, &n) || n < 1 || n > 1024) {
      std::fprintf(stderr, "custody-bench: bad --concurrency value '%s'\n", c.c_str());
      return 2;
    }
    concurrency.push_back(n);
  }
  custody::bench::Bench bench(&report, absl::Seconds(report.seconds), std::move(concurrency));
  return bench.Run();
}
