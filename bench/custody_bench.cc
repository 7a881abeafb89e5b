// custody-bench: how close custodyd comes to its token, in one run, on one SoftHSM2 token and
// the same keys (issue #8).
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
#include "bench/ceilings.h"
#include "bench/custodyd_process.h"
#include "bench/load.h"
#include "bench/ops.h"
#include "bench/proc_util.h"
#include "bench/replica_set.h"
#include "bench/report.h"
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
#include "server/embedded_token.h"

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

// Everything one measured op needs, prepared once and shared by the ceilings and both transports.
struct OpState {
  const OpSpec* spec = nullptr;
  std::string kid;  // the ACTIVE version's
  std::string token_object_id_hex;
  std::string decryption_mechanism;
  std::string jwks;                      // GetJwks of the ring
  std::shared_ptr<EVP_PKEY> verify_key;  // SignJws: the JWKS key with `kid`
  std::vector<std::string> jwes;         // DecryptJwe: JWEs to the ring, one per worker mod
  std::string signing_input;             // SignJws: what custodyd signs, for the ceilings
  Operation direct, openssl;             // prepared lazily
};

std::string Payload(int bytes) {
  std::string p = R"({"iss":"https://as.bank.example","sub":"custody-bench","aud":"rp","pad":")";
  const std::string tail = "\"}";
  while (p.size() + tail.size() < static_cast<size_t>(bytes)) p += 'x';
  p += tail;
  return p;
}

std::string GrpcError(const char* what, const grpc::Status& s) {
  return absl::StrCat(what, ": ", static_cast<int>(s.error_code()), " ", s.error_message());
}

std::chrono::system_clock::time_point Deadline(int seconds) {
  return std::chrono::system_clock::now() + std::chrono::seconds(seconds);
}

std::string LoadAvg() {
  auto text = ReadFile("/proc/loadavg");
  if (!text.ok()) return "?";
  std::vector<std::string> parts = absl::StrSplit(*text, ' ');
  if (parts.size() < 3) return "?";
  return absl::StrCat(parts[0], " ", parts[1], " ", parts[2]);
}

absl::Status CreateRing(custody::v1::KeyAdmin::Stub& admin, const OpSpec& spec) {
  custody::v1::CreateKeyRingRequest req;
  req.set_name(spec.ring);
  req.set_purpose(spec.rpc == Rpc::kSignJws ? custody::v1::SIGN : custody::v1::DECRYPT);
  req.set_alg(spec.alg);
  if (spec.rsa_bits > 0) req.set_rsa_bits(static_cast<uint32_t>(spec.rsa_bits));
  custody::v1::KeyRing ring;
  grpc::ClientContext ctx;
  ctx.set_deadline(Deadline(300));
  grpc::Status s = admin.CreateKeyRing(&ctx, req, &ring);
  if (!s.ok()) return absl::InternalError(GrpcError(("CreateKeyRing " + spec.ring).c_str(), s));
  return absl::OkStatus();
}

// Reads back the ring (ACTIVE version's kid and token object id) and its JWKS, and prepares the
// verification key, signing input or JWEs.
absl::Status DescribeRing(custody::v1::KeyAdmin::Stub& admin, custody::v1::Signer::Stub& signer,
                          const std::string& payload, OpState* op) {
  const OpSpec& spec = *op->spec;
  custody::v1::KeyRing ring;
  {
    custody::v1::GetKeyRingRequest req;
    req.set_name(spec.ring);
    grpc::ClientContext ctx;
    ctx.set_deadline(Deadline(30));
    grpc::Status s = admin.GetKeyRing(&ctx, req, &ring);
    if (!s.ok()) return absl::InternalError(GrpcError("GetKeyRing", s));
  }
  for (const auto& v : ring.versions()) {
    if (v.version() == ring.active_version()) {
      op->kid = v.kid();
      op->token_object_id_hex = v.token_object_id();
    }
  }
  if (op->token_object_id_hex.empty()) {
    return absl::InternalError(absl::StrCat("ring ", spec.ring, " has no ACTIVE version"));
  }
  op->decryption_mechanism = ring.decryption_mechanism();
  {
    custody::v1::GetJwksRequest req;
    req.add_rings(spec.ring);
    custody::v1::GetJwksResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(Deadline(30));
    grpc::Status s = signer.GetJwks(&ctx, req, &resp);
    if (!s.ok()) return absl::InternalError(GrpcError("GetJwks", s));
    op->jwks = resp.jwks();
  }
  if (spec.rpc == Rpc::kSignJws) {
    auto jwks = jose::ParseJson(op->jwks);
    if (!jwks.ok()) return jwks.status();
    const jose::Json* keys = jwks->Find("keys");
    if (keys == nullptr) return absl::InternalError("JWKS without keys");
    for (const jose::Json& k : keys->as_array()) {
      const jose::Json* kid = k.Find("kid");
      if (kid == nullptr || kid->as_string() != op->kid) continue;
      auto pkey = jose::PkeyFromPublicJwk(k);
      if (!pkey.ok()) return pkey.status();
      op->verify_key = std::shared_ptr<EVP_PKEY>(pkey->release(), EVP_PKEY_free);
    }
    if (op->verify_key == nullptr) {
      return absl::InternalError(absl::StrCat("JWKS of ", spec.ring, " lacks kid ", op->kid));
    }
    // The ceilings sign exactly what custodyd signs: the signing input of one of its JWS.
    custody::v1::SignJwsRequest req;
    req.set_ring(spec.ring);
    req.set_payload(payload);
    req.set_typ("JWT");
    custody::v1::SignJwsResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(Deadline(30));
    grpc::Status s = signer.SignJws(&ctx, req, &resp);
    if (!s.ok()) return absl::InternalError(GrpcError("SignJws", s));
    const size_t last_dot = resp.jws().rfind('.');
    if (last_dot == std::string::npos) return absl::InternalError("SignJws: not a compact JWS");
    op->signing_input = resp.jws().substr(0, last_dot);
    return absl::OkStatus();
  }
  client::EncryptOptions options;
  options.enc = jose::JweEnc::kA256Gcm;
  for (int i = 0; i < 16; ++i) {
    auto jwe = client::EncryptToJwks(payload, op->jwks, options);
    if (!jwe.ok()) return jwe.status();
    op->jwes.push_back(*std::move(jwe));
  }
  return absl::OkStatus();
}

class Bench {
 public:
  Bench(Report* report, absl::Duration row, std::vector<int> concurrency)
      : report_(report), row_(row), concurrency_(std::move(concurrency)) {}

  int Run();

 private:
  absl::Status Setup();
  absl::Status RunTransport(const std::string& transport);
  CeilingResult* EnsureCeiling(OpState& op, int concurrency);
  // The connections of one concurrency level: each channel with its stub and Client.
  struct Connections {
    std::vector<std::unique_ptr<custody::v1::Signer::Stub>> stubs;
    std::vector<std::unique_ptr<client::Client>> clients;
    // One more connection over `channel`: its stub, and with --client=library its Client.
    absl::Status Add(const std::shared_ptr<grpc::Channel>& channel);
  };
  RowResult RunRow(const std::string& transport, const Connections& connections, OpState& op,
                   int concurrency, const std::vector<pid_t>& daemon_pids);
  // The replicas row: ReplicaSet behind one client-library channel, rings of their own (created
  // through the replicas), the ceilings of the single-process run (same token, same key types).
  absl::Status RunReplicas();
  // Creates every op's ring through `channel`, waits for `ready` (when set), and describes each
  // ring into `ops`.
  absl::Status CreateRings(const std::shared_ptr<grpc::Channel>& channel, std::vector<OpState>& ops,
                           const std::function<absl::Status()>& ready = nullptr);
  void Fail(std::string what) {
    std::fprintf(stderr, "custody-bench: FAIL: %s\n", what.c_str());
    report_->failures.push_back(std::move(what));
  }

  Report* report_;
  absl::Duration row_;
  std::vector<int> concurrency_;
  std::unique_ptr<TempDir> tmp_;
  std::string state_dir_, log_path_, payload_;
  std::vector<std::string> common_flags_;
  TlsFiles tls_;
  std::vector<OpState> ops_;
  std::unique_ptr<pkcs11::Token> token_;
};

std::string ReadPemOrEmpty(const std::string& path) {
  if (path.empty()) return "";
  auto text = ReadFile(path);
  return text.ok() ? *text : "";
}

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

// Channel `index` of a row. Channel 0 is exactly what callers get from client::CreateChannel;
// further channels carry the same credentials but a subchannel pool of their own, so that each
// is a separate connection (channels with equal arguments share one connection otherwise).
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const client::ChannelOptions& options,
                                                           int index) {
  if (index == 0) return client::CreateChannel(options);
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(16 * 1024 * 1024);
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  if (options.ca_file.empty()) {
    return grpc::CreateCustomChannel(options.address, grpc::InsecureChannelCredentials(), args);
  }
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = ReadPemOrEmpty(options.ca_file);
  ssl.pem_cert_chain = ReadPemOrEmpty(options.cert_file);
  ssl.pem_private_key = ReadPemOrEmpty(options.key_file);
  if (ssl.pem_root_certs.empty()) {
    return absl::FailedPreconditionError("cannot read " + options.ca_file);
  }
  return grpc::CreateCustomChannel(options.address, grpc::SslCredentials(ssl), args);
}

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

CeilingResult* Bench::EnsureCeiling(OpState& op, int concurrency) {
  auto key = std::make_pair(op.spec->id, concurrency);
  auto it = report_->ceilings.find(key);
  if (it != report_->ceilings.end()) return &it->second;
  CeilingResult& c = report_->ceilings[key];
  c.op_id = op.spec->id;
  c.concurrency = concurrency;
  if (!op.direct) {
    DirectKey dk{op.token_object_id_hex, op.decryption_mechanism, op.signing_input,
                 op.jwes.empty() ? "" : op.jwes[0]};
    auto direct = MakeDirectCryptokiOp(*token_, *op.spec, dk);
    if (!direct.ok()) {
      c.error = absl::StrCat("direct Cryptoki setup: ", direct.status().ToString());
    } else {
      op.direct = *std::move(direct);
    }
  }
  if (!op.openssl) {
    auto soft = MakeOpenSslOp(*op.spec, op.signing_input);
    if (!soft.ok()) {
      absl::StrAppend(&c.error, c.error.empty() ? "" : "; ",
                      "OpenSSL setup: ", soft.status().ToString());
    } else {
      op.openssl = *std::move(soft);
    }
  }
  if (op.direct) {
    c.direct = RunLoad(concurrency, row_, op.direct);
    c.direct_ran = true;
  }
  if (op.openssl) {
    // A quarter of the row time: it is the CPU's limit for context, not a ratio's denominator.
    c.openssl = RunLoad(concurrency, row_ / 4, op.openssl);
    c.openssl_ran = true;
  }
  std::fprintf(
      stderr, "[ceiling] %-34s c=%-3d cryptoki %8.0f ops/s (%.1f us CPU/op)  openssl %8.0f ops/s\n",
      op.spec->label.c_str(), concurrency, c.direct.ops_per_s, c.DirectCpuUsPerOp(),
      c.openssl.ops_per_s);
  const std::string where = absl::StrCat("ceiling ", op.spec->label, " c=", concurrency);
  if (!c.error.empty()) Fail(absl::StrCat(where, ": ", c.error));
  if (c.direct_ran && (c.direct.ops == 0 || c.direct.errors > 0)) {
    Fail(absl::StrCat(where, ": direct Cryptoki ", c.direct.ops, " ops, ", c.direct.errors,
                      " errors ", c.direct.first_error));
  }
  if (c.openssl_ran && (c.openssl.ops == 0 || c.openssl.errors > 0)) {
    Fail(absl::StrCat(where, ": OpenSSL ", c.openssl.ops, " ops, ", c.openssl.errors, " errors ",
                      c.openssl.first_error));
  }
  return &c;
}

RowResult Bench::RunRow(const std::string& transport, const Connections& connections, OpState& op,
                        int concurrency, const std::vector<pid_t>& daemon_pids) {
  RowResult row;
  row.transport = transport;
  row.op = op.spec;
  row.concurrency = concurrency;
  const auto& stubs = connections.stubs;
  const auto& clients = connections.clients;
  row.channels = static_cast<int>(stubs.size());
  auto stub_of = [&](int t) -> custody::v1::Signer::Stub& {
    return *stubs[static_cast<size_t>(t) % stubs.size()];
  };
  const bool library = !clients.empty();
  const size_t n = static_cast<size_t>(concurrency);
  double cpu0 = -1, cpu1 = -1, self0 = -1, self1 = -1;
  int64_t switches0 = -1, switches1 = -1;
  // The service's CPU: every custodyd process of the row (one, or each replica).
  auto service_cpu = [&] {
    double total = 0;
    for (pid_t pid : daemon_pids) {
      const double s = ProcessCpuSeconds(pid);
      if (s < 0) return -1.0;
      total += s;
    }
    return total;
  };
  // Every custodyd's context switches: each hand-off between threads a call costs.
  auto service_switches = [&] {
    int64_t total = 0;
    for (pid_t pid : daemon_pids) {
      const int64_t n = ProcessContextSwitches(pid);
      if (n < 0) return int64_t{-1};
      total += n;
    }
    return total;
  };
  auto at_start = [&] {
    switches0 = service_switches();
    cpu0 = service_cpu();
    self0 = ProcessCpuSeconds(getpid());
  };
  auto at_end = [&] {
    cpu1 = service_cpu();
    switches1 = service_switches();
    self1 = ProcessCpuSeconds(getpid());
  };
  // Runs `library_op` (calls through the Clients) and records how many calls each RPC carried.
  auto run_library = [&](const Operation& library_op,
                         client::CoalescingStats (client::Client::*stats_of)() const) {
    auto sum = [&] {
      client::CoalescingStats total;
      for (const auto& c : clients) {
        client::CoalescingStats s = (c.get()->*stats_of)();
        total.plain_calls += s.plain_calls;
        total.batches += s.batches;
        total.batched_items += s.batched_items;
        total.fallbacks += s.fallbacks;
      }
      return total;
    };
    client::CoalescingStats before, after;
    row.client = "library";
    row.load = RunLoad(
        concurrency, row_, library_op,
        [&] {
          before = sum();
          at_start();
        },
        [&] {
          at_end();
          after = sum();
        });
    const uint64_t rpcs = (after.plain_calls - before.plain_calls) +
                          (after.batches - before.batches) + (after.fallbacks - before.fallbacks);
    const uint64_t calls =
        (after.plain_calls - before.plain_calls) + (after.batched_items - before.batched_items);
    if (rpcs > 0) row.calls_per_rpc = static_cast<double>(calls) / static_cast<double>(rpcs);
  };

  if (op.spec->rpc == Rpc::kSignJws) {
    std::vector<custody::v1::SignJwsRequest> requests(n);
    for (auto& r : requests) {
      r.set_ring(op.spec->ring);
      r.set_payload(payload_);
      r.set_typ("JWT");
    }
    std::vector<std::string> last(n);  // each worker's latest JWS
    client::SignJwsOptions jws_options;
    jws_options.typ = "JWT";
    // A reply must carry the ring's alg and ACTIVE kid; its JWS is kept for the check below.
    auto accept = [&](int t, const std::string& alg, const std::string& kid, std::string* jws,
                      std::string* error) {
      if (alg != op.spec->alg || kid != op.kid) {
        *error = absl::StrCat("SignJws answered alg ", alg, " kid ", kid);
        return Outcome::kError;
      }
      last[static_cast<size_t>(t)].swap(*jws);
      return Outcome::kOk;
    };
    Operation library_call = [&](int t, std::string* error) {
      auto jws = clients[static_cast<size_t>(t) % clients.size()]->SignJws(op.spec->ring, payload_,
                                                                           jws_options);
      if (!jws.ok()) return OutcomeOf("SignJws", jws.status(), error);
      return accept(t, jws->alg, jws->kid, &jws->jws, error);
    };
    Operation call = [&](int t, std::string* error) {
      custody::v1::SignJwsResponse resp;
      grpc::ClientContext ctx;
      ctx.set_deadline(Deadline(60));
      grpc::Status s = stub_of(t).SignJws(&ctx, requests[static_cast<size_t>(t)], &resp);
      if (!s.ok()) return OutcomeOf("SignJws", client::ToAbslStatus(s), error);
      return accept(t, resp.alg(), resp.kid(), resp.mutable_jws(), error);
    };
    if (library) {
      run_library(library_call, &client::Client::coalescing_stats);
    } else {
      row.load = RunLoad(concurrency, row_, call, at_start, at_end);
    }
    // Verify one JWS of the row against the ring's published key.
    const std::string& sample = last[0];
    if (sample.empty()) {
      row.check = "FAIL: no JWS to verify";
    } else {
      std::vector<jose::JwsAlg> allowed;
      if (auto alg = jose::ParseJwsAlg(op.spec->alg); alg.ok()) allowed.push_back(*alg);
      auto verified = jose::VerifyCompactJws(sample, op.verify_key.get(), allowed);
      if (!verified.ok()) {
        row.check = absl::StrCat("FAIL: JWS does not verify: ", verified.status().ToString());
      } else if (verified->payload != payload_) {
        row.check = "FAIL: verified JWS carries another payload";
      } else {
        row.check_ok = true;
        row.check = "JWS verified (JWKS key)";
      }
    }
  } else {
    std::vector<custody::v1::DecryptJweRequest> requests(n);
    for (size_t i = 0; i < n; ++i) {
      requests[i].set_ring(op.spec->ring);
      requests[i].set_jwe(op.jwes[i % op.jwes.size()]);
    }
    std::atomic<uint64_t> mismatches{0};
    std::atomic<uint64_t> checked{0};
    // A reply must carry the plaintext that was encrypted.
    auto accept = [&](const std::string& plaintext, std::string* error) {
      checked.fetch_add(1, std::memory_order_relaxed);
      if (plaintext != payload_) {
        mismatches.fetch_add(1, std::memory_order_relaxed);
        *error = "DecryptJwe returned another plaintext";
        return Outcome::kError;
      }
      return Outcome::kOk;
    };
    Operation call = [&](int t, std::string* error) {
      custody::v1::DecryptJweResponse resp;
      grpc::ClientContext ctx;
      ctx.set_deadline(Deadline(60));
      grpc::Status s = stub_of(t).DecryptJwe(&ctx, requests[static_cast<size_t>(t)], &resp);
      if (!s.ok()) return OutcomeOf("DecryptJwe", client::ToAbslStatus(s), error);
      return accept(resp.plaintext(), error);
    };
    Operation library_call = [&](int t, std::string* error) {
      auto plain = clients[static_cast<size_t>(t) % clients.size()]->DecryptJwe(
          op.spec->ring, requests[static_cast<size_t>(t)].jwe());
      if (!plain.ok()) return OutcomeOf("DecryptJwe", plain.status(), error);
      return accept(plain->plaintext, error);
    };
    if (library) {
      run_library(library_call, &client::Client::decrypt_coalescing_stats);
    } else {
      row.load = RunLoad(concurrency, row_, call, at_start, at_end);
    }
    if (mismatches.load() > 0) {
      row.check = absl::StrCat("FAIL: ", mismatches.load(), " replies with a wrong plaintext");
    } else if (checked.load() == 0) {
      row.check = "FAIL: no reply to check";
    } else {
      row.check_ok = true;
      row.check = absl::StrCat("plaintext ok (all ", checked.load(), ")");
    }
  }
  if (cpu0 >= 0 && cpu1 >= 0) row.service_cpu_s = cpu1 - cpu0;
  if (switches0 >= 0 && switches1 >= switches0) row.service_switches = switches1 - switches0;
  if (self0 >= 0 && self1 >= 0) row.client_cpu_s = self1 - self0;
  for (pid_t pid : daemon_pids) {
    row.vmhwm_kb = std::max(row.vmhwm_kb, ProcessStatusKb(pid, "VmHWM"));
  }
  return row;
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
  const int per_connection = absl::GetFlag(FLAGS_clients_per_connection);
  const int max_connections = std::max(1, absl::GetFlag(FLAGS_max_connections));
  for (int c : concurrency_) {
    int channels = 1;
    if (per_connection > 0) {
      channels = std::clamp((c + per_connection - 1) / per_connection, 1, max_connections);
    }
    Connections connections;
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

}  // namespace
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
