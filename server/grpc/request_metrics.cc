#include "server/grpc/request_metrics.h"

#include "absl/status/status.h"
#include "absl/strings/match.h"

namespace custody::server {
namespace {

// The operations of the access policy (grpc_services.h), and one for anything else.
constexpr absl::string_view kOperations[] = {"sign",         "decrypt",       "jwks",
                                             "admin.read",   "admin.create",  "admin.import",
                                             "admin.rotate", "admin.destroy", "other"};
constexpr int kOperationCount = sizeof(kOperations) / sizeof(kOperations[0]);

int OperationIndex(absl::string_view operation) {
  for (int i = 0; i < kOperationCount - 1; ++i) {
    if (kOperations[i] == operation) return i;
  }
  return kOperationCount - 1;
}

std::string CodeName(int code) {
  std::string name = absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
  return name.empty() ? "UNKNOWN" : name;
}

}  // namespace

RequestMetrics::RequestMetrics(Options options)
    : options_(options),
      slots_(options.ring_label ? options.max_rings + 2 : 1),
      blocks_(new std::atomic<Block*>[slots_]) {
  static_assert(kOperationCount == 9, "Block::calls is sized for 9 operations");
  for (size_t i = 0; i < slots_; ++i) blocks_[i].store(nullptr, std::memory_order_relaxed);
  blocks_[0].store(new Block(), std::memory_order_relaxed);
  if (slots_ > 1) blocks_[1].store(new Block(), std::memory_order_relaxed);
  for (int i = 0; i < kOperationCount; ++i) {
    latency_.push_back(std::make_unique<metrics::Histogram>(metrics::Histogram::LatencyBounds()));
  }
  names_ = {"", kOtherRing};
}

RequestMetrics::~RequestMetrics() {
  for (size_t i = 0; i < slots_; ++i) delete blocks_[i].load(std::memory_order_relaxed);
}

int RequestMetrics::AssignSlot(absl::string_view ring) {
  absl::MutexLock lock(&mu_);
  if (auto it = slot_of_.find(ring); it != slot_of_.end()) return it->second;
  if (names_.size() >= slots_) return 1;
  const int slot = static_cast<int>(names_.size());
  names_.emplace_back(ring);
  slot_of_.emplace(std::string(ring), slot);
  // Published after the name: a reader that sees the block finds its name under mu_.
  blocks_[slot].store(new Block(), std::memory_order_release);
  return slot;
}

int RequestMetrics::SlotFor(absl::string_view ring, bool may_assign) {
  if (!options_.ring_label) return 0;
  // Calls on no single ring: a JWKS of several rings ("a,b"), a listing ("prefix*").
  if (ring.empty() || absl::StrContains(ring, ',') || absl::StrContains(ring, '*')) return 0;
  {
    absl::ReaderMutexLock lock(&mu_);
    if (auto it = slot_of_.find(ring); it != slot_of_.end()) return it->second;
  }
  return may_assign ? AssignSlot(ring) : 1;
}

void RequestMetrics::ObserveCall(absl::string_view operation, absl::string_view ring, int code,
                                 absl::Duration elapsed) {
  const int op = OperationIndex(operation);
  const int slot = SlotFor(ring, code == 0);
  const int code_index = code >= 0 && code < kCodes - 1 ? code : kCodes - 1;
  Block* block = blocks_[slot].load(std::memory_order_acquire);
  block->calls[static_cast<size_t>(op * kCodes + code_index)].fetch_add(1,
                                                                        std::memory_order_relaxed);
  latency_[static_cast<size_t>(op)]->Observe(absl::ToDoubleSeconds(elapsed));
}

std::string RequestMetrics::RingLabel(const std::string& ring) {
  const int slot = SlotFor(ring, /*may_assign=*/true);
  return slot == 1 ? std::string(kOtherRing) : ring;
}

void RequestMetrics::Write(metrics::ExpositionWriter& out) const {
  std::vector<std::string> names;
  {
    absl::ReaderMutexLock lock(&mu_);
    names = names_;
  }
  out.Family("custody_requests_total",
             "Calls answered by custodyd (each batch item counts as one call), by operation "
             "(access-policy name), ring and gRPC status code.",
             metrics::MetricType::kCounter);
  for (size_t slot = 0; slot < names.size() && slot < slots_; ++slot) {
    const Block* block = blocks_[slot].load(std::memory_order_acquire);
    if (block == nullptr) continue;
    for (int op = 0; op < kOperationCount; ++op) {
      for (int code = 0; code < kCodes; ++code) {
        const uint64_t n =
            block->calls[static_cast<size_t>(op * kCodes + code)].load(std::memory_order_relaxed);
        if (n == 0) continue;
        const std::string code_name = code < kCodes - 1 ? CodeName(code) : "INVALID_CODE";
        metrics::Labels labels = {{"operation", kOperations[op]}};
        if (options_.ring_label) labels.emplace_back("ring", names[slot]);
        labels.emplace_back("code", code_name);
        out.Sample("custody_requests_total", labels, static_cast<double>(n));
      }
    }
  }
  out.Family("custody_request_duration_seconds",
             "Time from a call's arrival in custodyd to its durable audit line (a batch item: "
             "its batch's), by operation.",
             metrics::MetricType::kHistogram);
  for (int op = 0; op < kOperationCount; ++op) {
    metrics::Histogram::Snapshot s = latency_[static_cast<size_t>(op)]->Read();
    if (s.cumulative.back() == 0) continue;
    out.Histogram("custody_request_duration_seconds", {{"operation", kOperations[op]}}, s.bounds,
                  s.cumulative, s.sum);
  }
}

}  // namespace custody::server
