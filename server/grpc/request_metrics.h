// Per-call metrics of custodyd: calls by operation, ring and gRPC code, and latency by
// operation. RequestGuard records every call (every batch item) here once its audit line is
// written; service_metrics.h renders them with the rest for a Prometheus scrape.
//
// Ring labels stay bounded: a ring gets a label of its own only once a call on it succeeded (or
// a scrape found it in the metadata, see RingLabel), and only while fewer than
// Options::max_rings rings have one; every other ring is counted under "_other" (not a valid
// ring name, so it cannot clash). Denied or failed calls naming rings that do not exist cannot
// use up the labels. With Options::ring_label false the ring label is left out altogether.
//
// Cost per call: one reader-locked hash lookup (ring → slot), one relaxed atomic increment and
// a histogram observation (three relaxed atomics). No lock is held across anything but the
// lookup. Thread-safe.
#ifndef CUSTODY_SERVER_GRPC_REQUEST_METRICS_H_
#define CUSTODY_SERVER_GRPC_REQUEST_METRICS_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "metrics/exposition.h"
#include "metrics/histogram.h"

namespace custody::server {

class RequestMetrics {
 public:
  struct Options {
    bool ring_label = true;
    size_t max_rings = 100;
  };
  // The label value for calls beyond the cap (and for rings with no successful call yet).
  static constexpr char kOtherRing[] = "_other";

  explicit RequestMetrics(Options options);
  ~RequestMetrics();
  RequestMetrics(const RequestMetrics&) = delete;
  RequestMetrics& operator=(const RequestMetrics&) = delete;

  // One finished call: `operation` as the access policy names it ("sign", "admin.read", ...),
  // `ring` as audited (a ring name; "" or a list/pattern for calls on no single ring, which
  // are labelled ring=""), `code` the gRPC status code sent, `elapsed` from the call's start to
  // its durable audit line.
  void ObserveCall(absl::string_view operation, absl::string_view ring, int code,
                   absl::Duration elapsed);

  // The label a ring's gauges carry: its own name when it has (or can now be given) a label of
  // its own, else kOtherRing. Only for rings that exist (the caller read them from the metadata).
  std::string RingLabel(const std::string& ring);
  bool ring_label() const { return options_.ring_label; }

  // custody_requests_total and custody_request_duration_seconds.
  void Write(metrics::ExpositionWriter& out) const;

 private:
  static constexpr int kCodes = 18;  // gRPC codes 0..16, and one for anything else
  struct Block {
    std::array<std::atomic<uint64_t>, kCodes * 9> calls{};  // [operation][code]
  };
  // Slot 0: no ring; slot 1: kOtherRing; 2..: rings with a label of their own.
  int SlotFor(absl::string_view ring, bool may_assign);
  int AssignSlot(absl::string_view ring) ABSL_LOCKS_EXCLUDED(mu_);

  const Options options_;
  const size_t slots_;
  std::unique_ptr<std::atomic<Block*>[]> blocks_;  // slots_ entries, owned, never replaced
  std::vector<std::unique_ptr<metrics::Histogram>> latency_;  // by operation
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, int> slot_of_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> names_ ABSL_GUARDED_BY(mu_);  // by slot
};

}  // namespace custody::server

#endif  // CUSTODY_SERVER_GRPC_REQUEST_METRICS_H_
