// custody-bench results: the table for people, the JSON for machines, the targets.
#ifndef CUSTODY_BENCH_REPORT_H_
#define CUSTODY_BENCH_REPORT_H_

#include <cstdint>
#include <cstdio>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "bench/load.h"
#include "bench/ops.h"

namespace custody::bench {

// The ceilings of one (op, concurrency): measured in the bench process, no gRPC.
struct CeilingResult {
  std::string op_id;
  int concurrency = 0;
  LoadResult direct;   // pkcs11::Token on custodyd's key object
  LoadResult openssl;  // OpenSSL in-process, fresh key of the same type
  bool direct_ran = false, openssl_ran = false;
  std::string error;  // set up failure
  // The bench process's CPU per direct token operation (worker threads, RUSAGE_THREAD).
  double DirectCpuUsPerOp() const;
};

struct RowResult {
  std::string transport;  // "unix" or "tcp+mtls"
  const OpSpec* op = nullptr;
  int concurrency = 0;
  int channels = 1;
  // "library": custody::client::Client (coalesces concurrent calls into batch RPCs); "stub":
  // one unary RPC per call through the generated stub.
  std::string client = "stub";
  double calls_per_rpc = -1;  // calls per RPC the library sent (-1: stub)
  LoadResult load;
  double service_cpu_s = -1;      // custodyd utime+stime during the row
  double client_cpu_s = -1;       // the bench process's (the callers') utime+stime during the row
  int64_t service_switches = -1;  // custodyd's context switches (all threads) during the row
  int64_t vmhwm_kb = -1;          // custodyd VmHWM right after the row
  const CeilingResult* ceiling = nullptr;
  bool check_ok = false;
  std::string check;  // what was checked, or why it failed

  bool HasNumber() const { return load.ops > 0; }
  double Ratio() const;              // custodyd ops/s / direct Cryptoki ops/s; -1 if unknown
  double ServiceCpuUsPerOp() const;  // -1 if unknown
  double ClientCpuUsPerOp() const;   // -1 if unknown
  double SwitchesPerOp() const;      // custodyd context switches per op; -1 if unknown
  // custodyd CPU per op minus the bench's CPU per direct token op (same op and threads), in
  // microseconds. Only meaningful when HasOverhead().
  double OverheadUs() const;
  bool HasOverhead() const;
};

struct TargetResult {
  std::string name;
  std::string row;  // which row it was read from
  double value = 0;
  double threshold = 0;
  bool at_most = false;  // value <= threshold (else >=)
  bool available = false;
  bool met = false;
};

// One row of the gRPC floor (bench/grpc_floor.h): custody-grpc-floor under stub SignJws calls.
struct FloorResult {
  std::string mode;  // "inline" (gRPC's callback thread answers) or "handoff" (UnaryPool)
  int concurrency = 0;
  LoadResult load;
  double server_cpu_s = -1;
  int64_t server_switches = -1;
  double CpuUsPerOp() const {
    return server_cpu_s < 0 || load.ops == 0 ? -1 : server_cpu_s * 1e6 / load.ops;
  }
  double SwitchesPerOp() const {
    return server_switches < 0 || load.ops == 0 ? -1
                                                : static_cast<double>(server_switches) / load.ops;
  }
};

struct ScaleResult {
  int rings = 0;         // rings created (ES256, explicit policy, rotated once)
  int64_t versions = 0;  // key versions in those rings
  double create_s = 0;   // wall time to create and rotate them
  int64_t rss_kb_before = -1, rss_kb_after_create = -1, hwm_kb_after_create = -1;
  int64_t jwks_keys = 0, jwks_bytes = 0;
  int jwks_calls = 0;
  double jwks_p50_ms = 0, jwks_p99_ms = 0, jwks_max_ms = 0;
  double startup_ms = 0;              // restart with that state until health SERVING
  int64_t rss_kb_after_restart = -1;  // fresh process after startup and one GetJwks
  int64_t hwm_kb_after_restart = -1;
};

struct Report {
  std::string custodyd;
  double seconds = 0;
  bool quick = false;
  int max_sessions = 0;
  int payload_bytes = 0;
  int cores = 0;
  std::string loadavg;  // /proc/loadavg at start, to judge how busy the machine was
  // p50 of a 300-byte append + fdatasync on the audit directory's file system, measured in the
  // same run (-1 if not measured): the one flush an acknowledged call must wait for.
  double fdatasync_p50_us = -1;
  std::map<std::pair<std::string, int>, CeilingResult> ceilings;  // (op id, concurrency)
  std::vector<RowResult> rows;
  std::vector<FloorResult> floors;                   // the gRPC floor (stub client only)
  std::map<std::string, int64_t> custodyd_vmhwm_kb;  // per transport run
  std::vector<TargetResult> targets;
  std::optional<ScaleResult> scale;
  std::vector<std::string> failures;  // anything that makes the exit status non-zero
  double total_s = 0;
};

// Fills report->targets from the rows (reported, never asserted). `target_concurrency` is the
// concurrency the targets are read at (16 when measured, else the highest measured).
void EvaluateTargets(Report* report, int target_concurrency);

void PrintReport(const Report& report, std::FILE* out);
absl::Status WriteJsonReport(const Report& report, const std::string& path);

}  // namespace custody::bench

#endif  // CUSTODY_BENCH_REPORT_H_
