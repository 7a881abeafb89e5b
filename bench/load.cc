#include "bench/load.h"

#include <algorithm>
#include <chrono>
#include <latch>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/proc_util.h"

namespace custody::bench {
namespace {

using Clock = std::chrono::steady_clock;

struct WorkerResult {
  std::vector<float> latencies_us;
  uint64_t errors = 0;
  uint64_t shed = 0;
  double cpu_s = 0;
  Clock::time_point finished;
  std::string first_error;
};

double Percentile(const std::vector<float>& sorted, double p) {
  if (sorted.empty()) return 0;
  size_t i = static_cast<size_t>(p * static_cast<double>(sorted.size()));
  return sorted[std::min(sorted.size() - 1, i)];
}

}  // namespace

Outcome OutcomeOf(absl::string_view what, const absl::Status& status, std::string* error) {
  if (status.ok()) return Outcome::kOk;
  *error = what.empty() ? status.ToString() : absl::StrCat(what, ": ", status.ToString());
  return absl::IsResourceExhausted(status) ? Outcome::kShed : Outcome::kError;
}

LoadResult RunLoad(int threads, absl::Duration duration, const Operation& op,
                   const std::function<void()>& at_start, const std::function<void()>& at_end) {
  constexpr uint64_t kMaxErrorsPerWorker = 50;
  std::vector<WorkerResult> results(static_cast<size_t>(threads));
  std::latch ready(threads);
  std::latch go(1);
  Clock::time_point start, end;  // written before go.count_down(), read after go.wait()

  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(threads));
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      WorkerResult& r = results[static_cast<size_t>(t)];
      r.latencies_us.reserve(1 << 14);
      std::string error;
      if (op(t, &error) == Outcome::kError) {
        ++r.errors;
        r.first_error = "warm-up: " + error;
      }
      ready.count_down();
      go.wait();
      const double cpu0 = ThreadCpuSeconds();
      while (r.errors < kMaxErrorsPerWorker) {
        Clock::time_point t0 = Clock::now();
        if (t0 >= end) break;
        Outcome outcome = op(t, &error);
        Clock::time_point t1 = Clock::now();
        if (outcome == Outcome::kOk) {
          r.latencies_us.push_back(std::chrono::duration<float, std::micro>(t1 - t0).count());
        } else if (outcome == Outcome::kShed) {
          ++r.shed;
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
        } else {
          ++r.errors;
          if (r.first_error.empty()) r.first_error = error;
        }
      }
      r.cpu_s = ThreadCpuSeconds() - cpu0;
      r.finished = Clock::now();
    });
  }
  ready.wait();
  if (at_start) at_start();
  start = Clock::now();
  end = start + absl::ToChronoNanoseconds(duration);
  go.count_down();
  for (std::thread& w : workers) w.join();
  if (at_end) at_end();

  LoadResult out;
  std::vector<float> all;
  Clock::time_point last = start;
  for (WorkerResult& r : results) {
    all.insert(all.end(), r.latencies_us.begin(), r.latencies_us.end());
    out.errors += r.errors;
    out.shed += r.shed;
    out.worker_cpu_s += r.cpu_s;
    last = std::max(last, r.finished);
    if (out.first_error.empty()) out.first_error = r.first_error;
  }
  std::sort(all.begin(), all.end());
  out.ops = all.size();
  out.elapsed_s = std::chrono::duration<double>(last - start).count();
  out.ops_per_s = out.elapsed_s > 0 ? static_cast<double>(out.ops) / out.elapsed_s : 0;
  out.p50_us = Percentile(all, 0.50);
  out.p99_us = Percentile(all, 0.99);
  out.p999_us = Percentile(all, 0.999);
  return out;
}

}  // namespace custody::bench
