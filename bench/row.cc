// custody-bench, one row: its connections (MakeChannel), the ceilings of its op and
// concurrency (the token through direct Cryptoki and OpenSSL, measured once), and custodyd
// under load with every reply checked (bench.h).
#include <algorithm>
#include <atomic>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/bench.h"
#include "bench/load.h"
#include "jose/jws.h"

namespace custody::bench {
namespace {

std::string ReadPemOrEmpty(const std::string& path) {
  if (path.empty()) return "";
  auto text = ReadFile(path);
  return text.ok() ? *text : "";
}

}  // namespace

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

}  // namespace custody::bench
