// The Prometheus text exposition format, version 0.0.4
// (https://prometheus.io/docs/instrumenting/exposition_formats/): what a /metrics reply holds.
//
// ExpositionWriter appends families (# HELP, # TYPE) and their samples to a string, escaping
// HELP text (backslash, newline) and label values (backslash, double quote, newline) and
// formatting values as Prometheus parses them (+Inf, -Inf, NaN, integers without exponent).
// Metric and label names are the caller's constants and are checked only in debug builds.
// Not thread-safe (one writer per scrape).
#ifndef CUSTODY_METRICS_EXPOSITION_H_
#define CUSTODY_METRICS_EXPOSITION_H_

#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/string_view.h"

namespace custody::metrics {

// The Content-Type of a reply in this format.
inline constexpr char kExpositionContentType[] = "text/plain; version=0.0.4; charset=utf-8";

// One label: name (a constant matching [a-zA-Z_][a-zA-Z0-9_]*) and value (any UTF-8).
using Label = std::pair<absl::string_view, absl::string_view>;
using Labels = std::vector<Label>;

// Label value escaping: \ → \\, " → \", newline → \n.
std::string EscapeLabelValue(absl::string_view value);
// HELP text escaping: \ → \\, newline → \n.
std::string EscapeHelp(absl::string_view help);
// A sample value: "+Inf", "-Inf", "NaN", integers as digits, others with up to 17 significant
// digits (round-trips a double).
std::string FormatValue(double value);
// Whether `name` is a valid metric or label name.
bool IsValidMetricName(absl::string_view name);

enum class MetricType { kCounter, kGauge, kHistogram, kSummary, kUntyped };

class ExpositionWriter {
 public:
  // Starts a family: "# HELP name help" and "# TYPE name type". Each family once per scrape.
  void Family(absl::string_view name, absl::string_view help, MetricType type);
  // One sample line: name{l1="v1",...} value. For histograms and summaries `name` carries the
  // suffix (_bucket, _sum, _count).
  void Sample(absl::string_view name, const Labels& labels, double value);
  // The buckets (cumulative counts, ascending upper bounds, +Inf last), _sum and _count of one
  // histogram series. `counts[i]` is the number of observations <= bounds[i]; counts has one
  // more entry than bounds (the +Inf bucket, equal to the total count).
  void Histogram(absl::string_view name, const Labels& labels, const std::vector<double>& bounds,
                 const std::vector<uint64_t>& cumulative_counts, double sum);

  const std::string& text() const { return out_; }
  std::string Release() { return std::move(out_); }

 private:
  std::string out_;
};

}  // namespace custody::metrics

#endif  // CUSTODY_METRICS_EXPOSITION_H_
