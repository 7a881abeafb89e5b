// A Prometheus histogram kept in atomics: Observe is lock-free (a bucket search over a few
// bounds and three relaxed atomic adds), so it can sit on a request path; Snapshot reads it for
// a scrape. Buckets are counted individually and made cumulative at snapshot time.
// Thread-safe.
#ifndef CUSTODY_METRICS_HISTOGRAM_H_
#define CUSTODY_METRICS_HISTOGRAM_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace custody::metrics {

class Histogram {
 public:
  // Upper bounds in seconds for call latencies: 100 µs .. 10 s.
  static std::vector<double> LatencyBounds();

  // `bounds`: ascending upper bounds (the +Inf bucket is implicit).
  explicit Histogram(std::vector<double> bounds);
  Histogram(const Histogram&) = delete;
  Histogram& operator=(const Histogram&) = delete;

  void Observe(double value);

  struct Snapshot {
    std::vector<double> bounds;
    std::vector<uint64_t> cumulative;  // bounds.size() + 1 entries; the last is the count
    double sum = 0;
  };
  // Individual reads are atomic, the whole is not: under concurrent Observe calls the count may
  // be ahead of or behind the sum by the observations in flight, as with any Prometheus client.
  Snapshot Read() const;

 private:
  const std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;  // bounds_.size() + 1, not cumulative
  std::atomic<double> sum_{0};
};

}  // namespace custody::metrics

#endif  // CUSTODY_METRICS_HISTOGRAM_H_
