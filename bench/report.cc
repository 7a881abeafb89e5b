#include "bench/report.h"

#include <cmath>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/proc_util.h"

namespace custody::bench {
namespace {

std::string Num(double v, int precision = 0) {
  if (v < 0 || std::isnan(v)) return "-";
  return absl::StrFormat("%.*f", precision, v);
}

// Latency: one decimal below 100 µs, none above.
std::string Us(double v) { return Num(v, v < 100 ? 1 : 0); }

std::string Mb(int64_t kb) {
  if (kb < 0) return "-";
  return absl::StrFormat("%.1f", static_cast<double>(kb) / 1024.0);
}

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += absl::StrFormat("\\u%04x", static_cast<unsigned char>(c));
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

// A JSON number, or null for "unknown" (negative) values.
std::string JsonNum(double v, bool allow_negative = false) {
  if (std::isnan(v) || std::isinf(v) || (!allow_negative && v < 0)) return "null";
  return absl::StrFormat("%.3f", v);
}

std::string LoadJson(const LoadResult& r) {
  return absl::StrCat("{\"ops\":", r.ops, ",\"errors\":", r.errors, ",\"shed\":", r.shed,
                      ",\"elapsed_s\":", JsonNum(r.elapsed_s),
                      ",\"ops_per_s\":", JsonNum(r.ops_per_s), ",\"p50_us\":", JsonNum(r.p50_us),
                      ",\"p99_us\":", JsonNum(r.p99_us), ",\"p999_us\":", JsonNum(r.p999_us),
                      ",\"worker_cpu_s\":", JsonNum(r.worker_cpu_s),
                      r.first_error.empty() ? "" : ",\"first_error\":",
                      r.first_error.empty() ? "" : JsonString(r.first_error), "}");
}

// The least a single caller can wait for `r`'s op: the token's p50 at c=1 plus one fdatasync
// (the audit line an acknowledged call needs); -1 when either was not measured.
double SingleCallerFloorUs(const Report& report, const RowResult& r) {
  if (report.fdatasync_p50_us < 0 || r.ceiling == nullptr || !r.ceiling->direct_ran) return -1;
  return r.ceiling->direct.p50_us + report.fdatasync_p50_us;
}

}  // namespace

double CeilingResult::DirectCpuUsPerOp() const {
  if (!direct_ran || direct.ops == 0) return -1;
  return direct.worker_cpu_s / static_cast<double>(direct.ops) * 1e6;
}

double RowResult::Ratio() const {
  if (ceiling == nullptr || !ceiling->direct_ran || ceiling->direct.ops_per_s <= 0) return -1;
  return load.ops_per_s / ceiling->direct.ops_per_s;
}

double RowResult::ServiceCpuUsPerOp() const {
  if (service_cpu_s < 0 || load.ops == 0) return -1;
  return service_cpu_s / static_cast<double>(load.ops) * 1e6;
}

double RowResult::ClientCpuUsPerOp() const {
  if (client_cpu_s < 0 || load.ops == 0) return -1;
  return client_cpu_s / static_cast<double>(load.ops) * 1e6;
}

double RowResult::SwitchesPerOp() const {
  if (service_switches < 0 || load.ops == 0) return -1;
  return static_cast<double>(service_switches) / static_cast<double>(load.ops);
}

bool RowResult::HasOverhead() const {
  return ServiceCpuUsPerOp() >= 0 && ceiling != nullptr && ceiling->DirectCpuUsPerOp() >= 0;
}

double RowResult::OverheadUs() const {
  if (!HasOverhead()) return 0;
  return ServiceCpuUsPerOp() - ceiling->DirectCpuUsPerOp();
}

void EvaluateTargets(Report* report, int tc) {
  auto find = [&](const std::string& transport, const std::string& op_id) -> const RowResult* {
    for (const RowResult& r : report->rows) {
      if (r.transport == transport && r.op->id == op_id && r.concurrency == tc) return &r;
    }
    return nullptr;
  };
  auto ratio_target = [&](const std::string& name, const std::string& transport,
                          const std::string& op_id, double threshold) {
    TargetResult t;
    t.name = name;
    t.threshold = threshold;
    t.row = absl::StrCat(transport, " ", op_id, " c=", tc);
    if (const RowResult* r = find(transport, op_id); r != nullptr && r->Ratio() >= 0) {
      t.available = true;
      t.value = r->Ratio();
      t.met = t.value >= threshold;
    }
    report->targets.push_back(t);
  };
  // custodyd's CPU per ES256 call beyond the token's, over the Unix socket.
  auto overhead_target = [&](const std::string& name, double threshold) {
    TargetResult t;
    t.name = name;
    t.threshold = threshold;
    t.at_most = true;
    t.row = absl::StrCat("unix ES256 c=", tc);
    if (const RowResult* r = find("unix", "ES256"); r != nullptr && r->HasOverhead()) {
      t.available = true;
      t.value = r->OverheadUs();
      t.met = t.value <= t.threshold;
    }
    report->targets.push_back(t);
  };
  ratio_target("SignJws ES256 Unix >= 0.70 x direct C_Sign", "unix", "ES256", 0.70);
  overhead_target("service overhead ES256 (Unix) <= 15 us/op", 15);
  ratio_target("SignJws PS256/RSA-2048 Unix >= 0.90 x direct", "unix", "PS256-2048", 0.90);
  ratio_target("SignJws PS256/RSA-3072 Unix >= 0.90 x direct", "unix", "PS256-3072", 0.90);
  ratio_target("DecryptJwe RSA-OAEP-256 Unix >= 0.90 x direct", "unix", "RSA-OAEP-256", 0.90);
  ratio_target("SignJws ES256 TCP+mTLS >= 0.65 x direct C_Sign", "tcp+mtls", "ES256", 0.65);

  // Per-call cost (issue 26), by caller kind: a unary stub pays every RPC; the client library
  // coalesces concurrent calls.
  const RowResult* any = report->rows.empty() ? nullptr : &report->rows.front();
  const bool stub = any != nullptr && any->client == "stub";
  if (stub) overhead_target("stub: ES256 custodyd CPU beyond token <= 100 us", 100);
  ratio_target(stub ? "stub: ES256 Unix >= 0.35 x direct" : "library: ES256 Unix >= 0.45 x direct",
               "unix", "ES256", stub ? 0.35 : 0.45);
  {
    TargetResult t;
    t.name = "ES256 c=1 p50 <= 1.3 x (token p50 + fdatasync p50)";
    t.threshold = 1.3;
    t.at_most = true;
    t.row = "unix ES256 c=1";
    for (const RowResult& r : report->rows) {
      if (r.transport != "unix" || r.op->id != "ES256" || r.concurrency != 1 || !r.HasNumber()) {
        continue;
      }
      const double floor_us = SingleCallerFloorUs(*report, r);
      if (floor_us <= 0) continue;
      t.available = true;
      t.value = r.load.p50_us / floor_us;
      t.met = t.value <= t.threshold;
    }
    report->targets.push_back(t);
  }
}

namespace {

// The custodyd stub ES256 row over the Unix socket at `concurrency`, or null.
const RowResult* UnixEs256Row(const Report& report, int concurrency) {
  for (const RowResult& r : report.rows) {
    if (r.transport == "unix" && r.op->id == "ES256" && r.client == "stub" &&
        r.concurrency == concurrency) {
      return &r;
    }
  }
  return nullptr;
}

// gRPC alone (custody-grpc-floor) beside custodyd's ES256 rows of the same concurrency: how much
// of custodyd's CPU beyond the token is gRPC's, and how much is left to custody's own code.
void PrintGrpcFloor(const Report& report, std::FILE* out) {
  if (report.floors.empty()) return;
  std::fprintf(
      out,
      "\ngRPC floor (custody-grpc-floor: SignJws answered with a fixed reply, no token, no "
      "audit; stub callers, Unix socket, this run):\n");
  std::fprintf(out, "%-8s %3s %9s %9s %9s %10s %6s %12s %14s\n", "mode", "c", "ops/s", "p50_us",
               "p99_us", "cpu_us/op", "sw/op", "custodyd_ovh", "ovh-floor_us");
  for (const FloorResult& f : report.floors) {
    const RowResult* row = UnixEs256Row(report, f.concurrency);
    const bool both = row != nullptr && row->HasOverhead() && f.CpuUsPerOp() >= 0;
    std::fprintf(out, "%-8s %3d %9s %9s %9s %10s %6s %12s %14s\n", f.mode.c_str(), f.concurrency,
                 Num(f.load.ops_per_s, 0).c_str(), Us(f.load.p50_us).c_str(),
                 Us(f.load.p99_us).c_str(), Us(f.CpuUsPerOp()).c_str(),
                 Num(f.SwitchesPerOp(), 1).c_str(), both ? Us(row->OverheadUs()).c_str() : "-",
                 both ? Us(row->OverheadUs() - f.CpuUsPerOp()).c_str() : "-");
  }
}

// One caller's latency against the floor the work sets: the token's own p50 at c=1 (ceiling,
// same run) plus one durable audit flush (fdatasync p50 on the audit directory, same run).
void PrintSingleCallerLatency(const Report& report, std::FILE* out) {
  bool header = false;
  for (const RowResult& r : report.rows) {
    if (r.concurrency != 1 || !r.HasNumber() || r.ceiling == nullptr || !r.ceiling->direct_ran) {
      continue;
    }
    if (!header) {
      std::fprintf(out,
                   "\nOne caller (c=1; floor = token p50 + fdatasync p50 %s us on the audit "
                   "directory, both measured in this run):\n",
                   Us(report.fdatasync_p50_us).c_str());
      std::fprintf(out, "%-9s %-8s %-34s %9s %9s %9s %9s %7s\n", "transport", "client", "op",
                   "token_p50", "floor_us", "p50_us", "p99_us", "p50/flr");
      header = true;
    }
    std::fprintf(
        out, "%-9s %-8s %-34s %9s %9s %9s %9s %7s\n", r.transport.c_str(), r.client.c_str(),
        r.op->label.c_str(), Us(r.ceiling->direct.p50_us).c_str(),
        Us(SingleCallerFloorUs(report, r)).c_str(), Us(r.load.p50_us).c_str(),
        Us(r.load.p99_us).c_str(),
        Num(SingleCallerFloorUs(report, r) > 0 ? r.load.p50_us / SingleCallerFloorUs(report, r)
                                               : -1,
            2)
            .c_str());
  }
}

}  // namespace

void PrintReport(const Report& report, std::FILE* out) {
  std::fprintf(out,
               "\ncustody-bench: %.2f s per row%s, %d cores, load average at start %s, "
               "PKCS#11 sessions %d (custodyd and bench), payload %d bytes\n",
               report.seconds, report.quick ? " (--quick)" : "", report.cores,
               report.loadavg.c_str(), report.max_sessions, report.payload_bytes);

  if (!report.ceilings.empty()) {
    std::fprintf(out, "\nCeilings (in the bench process, no gRPC, same thread count):\n");
    std::fprintf(out, "%-34s %3s %11s %9s %9s %10s %6s %11s\n", "op", "c", "cryptoki/s", "p50_us",
                 "p99_us", "cpu_us/op", "shed", "openssl/s");
    for (const auto& [key, c] : report.ceilings) {
      std::string label = key.first;
      for (const OpSpec& op : AllOps()) {
        if (op.id == key.first) label = op.label;
      }
      std::fprintf(out, "%-34s %3d %11s %9s %9s %10s %6llu %11s%s%s\n", label.c_str(),
                   c.concurrency, c.direct_ran ? Num(c.direct.ops_per_s).c_str() : "-",
                   c.direct_ran ? Us(c.direct.p50_us).c_str() : "-",
                   c.direct_ran ? Us(c.direct.p99_us).c_str() : "-",
                   Num(c.DirectCpuUsPerOp(), 1).c_str(),
                   static_cast<unsigned long long>(c.direct.shed),
                   c.openssl_ran ? Num(c.openssl.ops_per_s).c_str() : "-",
                   c.error.empty() ? "" : "  ERROR: ", c.error.c_str());
    }

    std::fprintf(
        out,
        "\ncustodyd end to end (ratio = custodyd ops/s / direct Cryptoki ops/s at the "
        "same threads; svc = custodyd CPU per op; tok = bench CPU per direct token op; "
        "ovh = svc - tok; shed = RESOURCE_EXHAUSTED from the session pool's back-pressure; "
        "c/rpc = calls per RPC the client library sent, coalescing included; cli = the "
        "bench process's CPU per op, i.e. the callers' share of the two cores; sw/op = "
        "custodyd's context switches per op, all threads):\n");
    std::fprintf(
        out, "%-9s %-34s %3s %2s %5s %9s %9s %9s %9s %6s %9s %8s %8s %8s %6s %7s %4s %5s  %s\n",
        "transport", "op", "c", "ch", "c/rpc", "ops/s", "p50_us", "p99_us", "p99.9_us", "ratio",
        "svc_us/op", "tok_us", "ovh_us", "cli_us", "sw/op", "hwm_MB", "err", "shed", "check");
    for (const RowResult& r : report.rows) {
      std::fprintf(
          out,
          "%-9s %-34s %3d %2d %5s %9s %9s %9s %9s %6s %9s %8s %8s %8s %6s %7s %4llu %5llu  %s\n",
          r.transport.c_str(), r.op->label.c_str(), r.concurrency, r.channels,
          Num(r.calls_per_rpc, 1).c_str(), r.HasNumber() ? Num(r.load.ops_per_s).c_str() : "NONE",
          r.HasNumber() ? Us(r.load.p50_us).c_str() : "-",
          r.HasNumber() ? Us(r.load.p99_us).c_str() : "-",
          r.HasNumber() ? Us(r.load.p999_us).c_str() : "-", Num(r.Ratio(), 2).c_str(),
          Num(r.ServiceCpuUsPerOp(), 1).c_str(),
          r.ceiling != nullptr ? Num(r.ceiling->DirectCpuUsPerOp(), 1).c_str() : "-",
          r.HasOverhead() ? absl::StrFormat("%.1f", r.OverheadUs()).c_str() : "-",
          Num(r.ClientCpuUsPerOp(), 1).c_str(), Num(r.SwitchesPerOp(), 1).c_str(),
          Mb(r.vmhwm_kb).c_str(), static_cast<unsigned long long>(r.load.errors),
          static_cast<unsigned long long>(r.load.shed), r.check.c_str());
    }
  }
  uint64_t shed_rows = 0;
  for (const RowResult& r : report.rows) shed_rows += r.load.shed > 0 ? 1 : 0;
  if (shed_rows > 0) {
    std::fprintf(out,
                 "Note: %llu rows had calls shed by the session pool's back-pressure (more callers "
                 "than %d sessions + 4 x %d waiting); their ops/s count successes only.\n",
                 static_cast<unsigned long long>(shed_rows), report.max_sessions,
                 report.max_sessions);
  }
  for (const auto& [transport, kb] : report.custodyd_vmhwm_kb) {
    std::fprintf(out, "custodyd peak RSS (VmHWM) over the %s run: %s MB\n", transport.c_str(),
                 Mb(kb).c_str());
  }

  PrintSingleCallerLatency(report, out);
  PrintGrpcFloor(report, out);

  if (!report.targets.empty()) {
    std::fprintf(out, "\nTargets (reported, not asserted):\n");
    for (const TargetResult& t : report.targets) {
      std::fprintf(out, "  %-48s %-26s %8s  %s\n", t.name.c_str(), t.row.c_str(),
                   t.available ? absl::StrFormat("%.2f", t.value).c_str() : "-",
                   !t.available ? "not measured" : (t.met ? "met" : "MISSED"));
    }
  }

  if (report.scale.has_value()) {
    const ScaleResult& s = *report.scale;
    std::fprintf(out,
                 "\nScale: %d ES256 rings, %lld key versions (created and rotated in %.1f s)\n",
                 s.rings, static_cast<long long>(s.versions), s.create_s);
    std::fprintf(out, "  custodyd VmRSS before %s MB, after creation %s MB (VmHWM %s MB)\n",
                 Mb(s.rss_kb_before).c_str(), Mb(s.rss_kb_after_create).c_str(),
                 Mb(s.hwm_kb_after_create).c_str());
    std::fprintf(out,
                 "  GetJwks (all rings, %lld keys, %lld bytes) x%d: p50 %.2f ms, p99 %.2f ms, "
                 "max %.2f ms\n",
                 static_cast<long long>(s.jwks_keys), static_cast<long long>(s.jwks_bytes),
                 s.jwks_calls, s.jwks_p50_ms, s.jwks_p99_ms, s.jwks_max_ms);
    std::fprintf(
        out, "  restart with that state: SERVING after %.0f ms; VmRSS %s MB (VmHWM %s MB)\n",
        s.startup_ms, Mb(s.rss_kb_after_restart).c_str(), Mb(s.hwm_kb_after_restart).c_str());
  }

  std::fprintf(out, "\nTotal %.1f s. ", report.total_s);
  if (report.failures.empty()) {
    std::fprintf(out, "Every row produced a number and passed its check.\n");
  } else {
    std::fprintf(out, "FAILURES (%zu):\n", report.failures.size());
    for (const std::string& f : report.failures) std::fprintf(out, "  %s\n", f.c_str());
  }
}

absl::Status WriteJsonReport(const Report& report, const std::string& path) {
  std::string j = "{";
  absl::StrAppend(&j, "\"custodyd\":", JsonString(report.custodyd),
                  ",\"seconds_per_row\":", JsonNum(report.seconds),
                  ",\"quick\":", report.quick ? "true" : "false", ",\"cores\":", report.cores,
                  ",\"loadavg_at_start\":", JsonString(report.loadavg),
                  ",\"pkcs11_sessions\":", report.max_sessions,
                  ",\"payload_bytes\":", report.payload_bytes,
                  ",\"fdatasync_p50_us\":", JsonNum(report.fdatasync_p50_us),
                  ",\"total_s\":", JsonNum(report.total_s));
  j += ",\"ceilings\":[";
  bool first = true;
  for (const auto& [key, c] : report.ceilings) {
    absl::StrAppend(
        &j, first ? "" : ",", "{\"op\":", JsonString(key.first), ",\"concurrency\":", c.concurrency,
        ",\"direct_cryptoki\":", c.direct_ran ? LoadJson(c.direct) : "null",
        ",\"direct_cpu_us_per_op\":", JsonNum(c.DirectCpuUsPerOp()),
        ",\"openssl\":", c.openssl_ran ? LoadJson(c.openssl) : "null",
        c.error.empty() ? "" : ",\"error\":", c.error.empty() ? "" : JsonString(c.error), "}");
    first = false;
  }
  j += "],\"rows\":[";
  first = true;
  for (const RowResult& r : report.rows) {
    absl::StrAppend(
        &j, first ? "" : ",", "{\"transport\":", JsonString(r.transport),
        ",\"op\":", JsonString(r.op->id),
        ",\"rpc\":", JsonString(r.op->rpc == Rpc::kSignJws ? "SignJws" : "DecryptJwe"),
        ",\"concurrency\":", r.concurrency, ",\"channels\":", r.channels,
        ",\"client\":", JsonString(r.client), ",\"calls_per_rpc\":", JsonNum(r.calls_per_rpc),
        ",\"custodyd\":", LoadJson(r.load), ",\"direct_cryptoki_ops_per_s\":",
        r.ceiling != nullptr && r.ceiling->direct_ran ? JsonNum(r.ceiling->direct.ops_per_s)
                                                      : "null",
        ",\"openssl_ops_per_s\":",
        r.ceiling != nullptr && r.ceiling->openssl_ran ? JsonNum(r.ceiling->openssl.ops_per_s)
                                                       : "null",
        ",\"ratio_vs_direct\":", JsonNum(r.Ratio()),
        ",\"custodyd_cpu_s\":", JsonNum(r.service_cpu_s),
        ",\"custodyd_cpu_us_per_op\":", JsonNum(r.ServiceCpuUsPerOp()),
        ",\"client_cpu_us_per_op\":", JsonNum(r.ClientCpuUsPerOp()),
        ",\"custodyd_context_switches_per_op\":", JsonNum(r.SwitchesPerOp()),
        ",\"single_caller_floor_us\":", JsonNum(SingleCallerFloorUs(report, r)),
        ",\"direct_cpu_us_per_op\":",
        r.ceiling != nullptr ? JsonNum(r.ceiling->DirectCpuUsPerOp()) : "null",
        ",\"service_overhead_us\":", r.HasOverhead() ? JsonNum(r.OverheadUs(), true) : "null",
        ",\"custodyd_vmhwm_kb\":", r.vmhwm_kb >= 0 ? absl::StrCat(r.vmhwm_kb) : "null",
        ",\"check_ok\":", r.check_ok ? "true" : "false", ",\"check\":", JsonString(r.check), "}");
    first = false;
  }
  j += "],\"grpc_floor\":[";
  first = true;
  for (const FloorResult& f : report.floors) {
    absl::StrAppend(&j, first ? "" : ",", "{\"mode\":", JsonString(f.mode),
                    ",\"concurrency\":", f.concurrency, ",\"load\":", LoadJson(f.load),
                    ",\"cpu_us_per_op\":", JsonNum(f.CpuUsPerOp()),
                    ",\"context_switches_per_op\":", JsonNum(f.SwitchesPerOp()), "}");
    first = false;
  }
  j += "],\"custodyd_vmhwm_kb\":{";
  first = true;
  for (const auto& [transport, kb] : report.custodyd_vmhwm_kb) {
    absl::StrAppend(&j, first ? "" : ",", JsonString(transport), ":", kb);
    first = false;
  }
  j += "},\"targets\":[";
  first = true;
  for (const TargetResult& t : report.targets) {
    absl::StrAppend(&j, first ? "" : ",", "{\"name\":", JsonString(t.name),
                    ",\"row\":", JsonString(t.row),
                    ",\"value\":", t.available ? JsonNum(t.value, true) : "null",
                    ",\"threshold\":", JsonNum(t.threshold),
                    ",\"comparison\":", JsonString(t.at_most ? "<=" : ">="),
                    ",\"met\":", !t.available ? "null" : (t.met ? "true" : "false"), "}");
    first = false;
  }
  j += "]";
  if (report.scale.has_value()) {
    const ScaleResult& s = *report.scale;
    absl::StrAppend(
        &j, ",\"scale\":{\"rings\":", s.rings, ",\"versions\":", s.versions,
        ",\"create_s\":", JsonNum(s.create_s), ",\"vmrss_kb_before\":", s.rss_kb_before,
        ",\"vmrss_kb_after_create\":", s.rss_kb_after_create,
        ",\"vmhwm_kb_after_create\":", s.hwm_kb_after_create, ",\"jwks_keys\":", s.jwks_keys,
        ",\"jwks_bytes\":", s.jwks_bytes, ",\"jwks_calls\":", s.jwks_calls,
        ",\"jwks_p50_ms\":", JsonNum(s.jwks_p50_ms), ",\"jwks_p99_ms\":", JsonNum(s.jwks_p99_ms),
        ",\"jwks_max_ms\":", JsonNum(s.jwks_max_ms), ",\"startup_ms\":", JsonNum(s.startup_ms),
        ",\"vmrss_kb_after_restart\":", s.rss_kb_after_restart,
        ",\"vmhwm_kb_after_restart\":", s.hwm_kb_after_restart, "}");
  }
  j += ",\"failures\":[";
  first = true;
  for (const std::string& f : report.failures) {
    absl::StrAppend(&j, first ? "" : ",", JsonString(f));
    first = false;
  }
  j += "],\"ok\":";
  j += report.failures.empty() ? "true" : "false";
  j += "}\n";
  return WriteFile(path, j, 0644);
}

}  // namespace custody::bench
