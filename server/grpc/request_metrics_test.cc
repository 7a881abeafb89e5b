// RequestMetrics: what a call is counted under (operation, ring label, code), the bound on ring
// labels, and its latency histogram, read back through the exposition text.
#include "server/grpc/request_metrics.h"

#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace custody::server {
namespace {

std::string Render(const RequestMetrics& m) {
  metrics::ExpositionWriter out;
  m.Write(out);
  return out.Release();
}

TEST(RequestMetricsTest, CountsByOperationRingAndCode) {
  RequestMetrics m({});
  m.ObserveCall("sign", "op/id", 0, absl::Milliseconds(2));
  m.ObserveCall("sign", "op/id", 0, absl::Milliseconds(3));
  m.ObserveCall("sign", "op/id", 14, absl::Milliseconds(1));  // UNAVAILABLE
  m.ObserveCall("jwks", "a,b", 0, absl::Milliseconds(1));     // several rings: ring=""
  m.ObserveCall("admin.read", "op/*", 7, absl::Milliseconds(1));
  const std::string text = Render(m);
  EXPECT_TRUE(absl::StrContains(
      text, "custody_requests_total{operation=\"sign\",ring=\"op/id\",code=\"OK\"} 2\n"));
  EXPECT_TRUE(absl::StrContains(
      text, "custody_requests_total{operation=\"sign\",ring=\"op/id\",code=\"UNAVAILABLE\"} 1\n"));
  EXPECT_TRUE(absl::StrContains(
      text, "custody_requests_total{operation=\"jwks\",ring=\"\",code=\"OK\"} 1\n"));
  EXPECT_TRUE(absl::StrContains(
      text,
      "custody_requests_total{operation=\"admin.read\",ring=\"\",code=\"PERMISSION_DENIED\"} 1\n"));
  EXPECT_TRUE(absl::StrContains(
      text, "custody_request_duration_seconds_bucket{operation=\"sign\",le=\"0.001\"} 1\n"));
  EXPECT_TRUE(absl::StrContains(
      text, "custody_request_duration_seconds_bucket{operation=\"sign\",le=\"0.0025\"} 2\n"));
  EXPECT_TRUE(
      absl::StrContains(text, "custody_request_duration_seconds_count{operation=\"sign\"} 3\n"));
  EXPECT_TRUE(
      absl::StrContains(text, "custody_request_duration_seconds_sum{operation=\"sign\"} 0.006\n"));
}

TEST(RequestMetricsTest, RingLabelsAreCappedAndFailuresCannotUseThemUp) {
  RequestMetrics::Options options;
  options.max_rings = 2;
  RequestMetrics m(options);
  // Failed calls naming unknown rings never get a label of their own.
  for (int i = 0; i < 1000; ++i) m.ObserveCall("sign", absl::StrCat("junk/", i), 5, {});
  m.ObserveCall("sign", "a", 0, {});
  m.ObserveCall("sign", "b", 0, {});
  m.ObserveCall("sign", "c", 0, {});  // over the cap
  m.ObserveCall("sign", "a", 5, {});  // a has its label now, failures included
  EXPECT_EQ(m.RingLabel("b"), "b");
  EXPECT_EQ(m.RingLabel("d"), "_other");
  const std::string text = Render(m);
  EXPECT_TRUE(absl::StrContains(
      text,
      "custody_requests_total{operation=\"sign\",ring=\"_other\",code=\"NOT_FOUND\"} 1000\n"));
  EXPECT_TRUE(absl::StrContains(
      text, "custody_requests_total{operation=\"sign\",ring=\"_other\",code=\"OK\"} 1\n"));
  EXPECT_TRUE(absl::StrContains(
      text, "custody_requests_total{operation=\"sign\",ring=\"a\",code=\"NOT_FOUND\"} 1\n"));
  EXPECT_FALSE(absl::StrContains(text, "junk/"));
  EXPECT_FALSE(absl::StrContains(text, "ring=\"c\""));
}

TEST(RequestMetricsTest, RingLabelCanBeDropped) {
  RequestMetrics::Options options;
  options.ring_label = false;
  RequestMetrics m(options);
  m.ObserveCall("decrypt", "x", 3, {});
  m.ObserveCall("decrypt", "y", 3, {});
  m.ObserveCall("unheard-of", "y", 99, {});
  const std::string text = Render(m);
  EXPECT_TRUE(absl::StrContains(
      text, "custody_requests_total{operation=\"decrypt\",code=\"INVALID_ARGUMENT\"} 2\n"));
  EXPECT_TRUE(absl::StrContains(
      text, "custody_requests_total{operation=\"other\",code=\"INVALID_CODE\"} 1\n"));
  EXPECT_FALSE(absl::StrContains(text, "ring="));
}

}  // namespace
}  // namespace custody::server
