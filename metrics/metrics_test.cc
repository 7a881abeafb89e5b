// The exposition format (escaping and number formatting as the 0.0.4 format defines them),
// the histogram, and the /metrics HTTP server over real loopback sockets, in clear and TLS.
// custodyd's own page is checked by a real Prometheus in tests/prometheus_integration_test.cc.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"
#include "metrics/exposition.h"
#include "metrics/histogram.h"
#include "metrics/http_server.h"
#include "metrics/http_test_client.h"
#include "openssl/ssl.h"

namespace custody::metrics {
namespace {

TEST(ExpositionTest, EscapesLabelValuesPerTheFormat) {
  EXPECT_EQ(EscapeLabelValue("plain/ring-1"), "plain/ring-1");
  EXPECT_EQ(EscapeLabelValue(R"(a"b)"), R"(a\"b)");
  EXPECT_EQ(EscapeLabelValue(R"(back\slash)"), R"(back\\slash)");
  EXPECT_EQ(EscapeLabelValue("two\nlines"), R"(two\nlines)");
  EXPECT_EQ(EscapeLabelValue("\\\"\n"), R"(\\\"\n)");
  EXPECT_EQ(EscapeLabelValue("ünïcode"), "ünïcode");  // UTF-8 passes through
}

TEST(ExpositionTest, EscapesHelpButNotQuotes) {
  EXPECT_EQ(EscapeHelp(R"(say "hi")"), R"(say "hi")");
  EXPECT_EQ(EscapeHelp("a\\b\nc"), R"(a\\b\nc)");
}

TEST(ExpositionTest, FormatsValuesAsPrometheusParsesThem) {
  EXPECT_EQ(FormatValue(0), "0");
  EXPECT_EQ(FormatValue(42), "42");
  EXPECT_EQ(FormatValue(-3), "-3");
  EXPECT_EQ(FormatValue(0.005), "0.005");
  EXPECT_EQ(FormatValue(2.5), "2.5");
  EXPECT_EQ(FormatValue(1e-7), "1e-07");
  EXPECT_EQ(FormatValue(std::numeric_limits<double>::infinity()), "+Inf");
  EXPECT_EQ(FormatValue(-std::numeric_limits<double>::infinity()), "-Inf");
  EXPECT_EQ(FormatValue(std::nan("")), "NaN");
  EXPECT_EQ(std::strtod(FormatValue(0.1 + 0.2).c_str(), nullptr), 0.1 + 0.2);  // round-trips
  EXPECT_EQ(FormatValue(18446744073709551615.0), "1.8446744073709552e+19");
}

TEST(ExpositionTest, ValidatesNames) {
  EXPECT_TRUE(IsValidMetricName("custody_requests_total"));
  EXPECT_TRUE(IsValidMetricName("_x:y1"));
  EXPECT_FALSE(IsValidMetricName(""));
  EXPECT_FALSE(IsValidMetricName("1abc"));
  EXPECT_FALSE(IsValidMetricName("a-b"));
  EXPECT_FALSE(IsValidMetricName("a.b"));
}

TEST(ExpositionTest, WritesFamiliesAndSamples) {
  ExpositionWriter out;
  out.Family("custody_x_total", "Calls, by \"ring\".\nSecond line \\ end.", MetricType::kCounter);
  out.Sample("custody_x_total", {{"ring", "op/id"}, {"code", "OK"}}, 3);
  out.Sample("custody_x_total", {{"ring", "we\"ird\\\n"}}, 1);
  out.Family("custody_up", "Up.", MetricType::kGauge);
  out.Sample("custody_up", {}, 1);
  EXPECT_EQ(out.text(),
            "# HELP custody_x_total Calls, by \"ring\".\\nSecond line \\\\ end.\n"
            "# TYPE custody_x_total counter\n"
            "custody_x_total{ring=\"op/id\",code=\"OK\"} 3\n"
            "custody_x_total{ring=\"we\\\"ird\\\\\\n\"} 1\n"
            "# HELP custody_up Up.\n"
            "# TYPE custody_up gauge\n"
            "custody_up 1\n");
}

TEST(HistogramTest, BucketsAreCumulativeWithSumAndCount) {
  Histogram h({0.1, 0.5, 1});
  for (double v : {0.05, 0.1, 0.2, 0.7, 3.0}) h.Observe(v);  // 0.1 lands in le="0.1"
  Histogram::Snapshot s = h.Read();
  EXPECT_EQ(s.cumulative, (std::vector<uint64_t>{2, 3, 4, 5}));
  EXPECT_DOUBLE_EQ(s.sum, 4.05);

  ExpositionWriter out;
  out.Family("lat_seconds", "Latency.", MetricType::kHistogram);
  out.Histogram("lat_seconds", {{"operation", "sign"}}, s.bounds, s.cumulative, s.sum);
  EXPECT_EQ(out.text(),
            "# HELP lat_seconds Latency.\n"
            "# TYPE lat_seconds histogram\n"
            "lat_seconds_bucket{operation=\"sign\",le=\"0.1\"} 2\n"
            "lat_seconds_bucket{operation=\"sign\",le=\"0.5\"} 3\n"
            "lat_seconds_bucket{operation=\"sign\",le=\"1\"} 4\n"
            "lat_seconds_bucket{operation=\"sign\",le=\"+Inf\"} 5\n"
            "lat_seconds_sum{operation=\"sign\"} 4.05\n"
            "lat_seconds_count{operation=\"sign\"} 5\n");
}

TEST(HistogramTest, ConcurrentObservationsAreAllCounted) {
  Histogram h(Histogram::LatencyBounds());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 10000; ++i) h.Observe(0.001 * (i % 7));
    });
  }
  for (auto& t : threads) t.join();
  Histogram::Snapshot s = h.Read();
  EXPECT_EQ(s.cumulative.back(), 40000u);
  EXPECT_NEAR(s.sum, 4 * (10000 / 7 * 0.021 + 0.001 * (0 + 1 + 2 + 3)), 1e-6);
}

using testing::ClosedByPeer;
using testing::ConnectLoopback;
using testing::Exchange;
using testing::P99;
using testing::ReadResponse;
using testing::SendAll;

HttpServer::Options At(const std::string& address) {
  HttpServer::Options options;
  options.address = address;
  return options;
}

TEST(HttpServerTest, ServesMetricsAndRefusesTheRest) {
  int renders = 0;
  auto server = HttpServer::Start(At("127.0.0.1:0"), [&] {
    ++renders;
    return std::string("custody_up 1\n");
  });
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  ASSERT_GT(port, 0);

  std::string ok = Exchange(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_TRUE(absl::StartsWith(ok, "HTTP/1.1 200 OK\r\n")) << ok;
  EXPECT_TRUE(absl::StrContains(ok, "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
  EXPECT_TRUE(absl::StrContains(ok, "Content-Length: 13\r\n"));
  EXPECT_TRUE(absl::EndsWith(ok, "\r\n\r\ncustody_up 1\n"));
  EXPECT_TRUE(
      absl::StartsWith(Exchange(port, "GET /metrics?x=1 HTTP/1.0\r\n\r\n"), "HTTP/1.1 200 OK"));
  std::string head = Exchange(port, "HEAD /metrics HTTP/1.1\r\n\r\n");
  EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 200 OK")) << head;
  EXPECT_TRUE(absl::EndsWith(head, "\r\n\r\n")) << head;

  EXPECT_TRUE(absl::StartsWith(Exchange(port, "GET / HTTP/1.1\r\n\r\n"), "HTTP/1.1 404"));
  EXPECT_TRUE(absl::StartsWith(Exchange(port, "POST /metrics HTTP/1.1\r\n\r\n"), "HTTP/1.1 405"));
  EXPECT_EQ(renders, 3);  // GET x2 and HEAD
  (*server)->Stop();
  EXPECT_EQ(Exchange(port, "GET /metrics HTTP/1.1\r\n\r\n"), "connect failed");
}

// Each bad request is answered at once (the old server waited 5 s for LF-only lines and for
// more header bytes), with `Connection: close`, and the server keeps serving.
TEST(HttpServerTest, AnswersBadRequestsPromptly) {
  HttpServer::Options options = At("127.0.0.1:0");
  options.request_deadline = absl::Seconds(1);
  auto server = HttpServer::Start(options, [] { return std::string("custody_up 1\n"); });
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  auto timed = [&](const std::string& request, double* ms) {
    auto t0 = std::chrono::steady_clock::now();
    std::string reply = Exchange(port, request, 3000);
    *ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    return reply;
  };
  double ms = 0;
  // Oversized headers, one long header or many: 431 without waiting for the end.
  std::string huge = timed("GET /metrics HTTP/1.1\r\nX: " + std::string(20000, 'a'), &ms);
  EXPECT_TRUE(absl::StartsWith(huge, "HTTP/1.1 431")) << huge;
  EXPECT_LT(ms, 500);
  std::string many = "GET /metrics HTTP/1.1\r\n";
  for (int i = 0; i < 2000; ++i) absl::StrAppend(&many, "X-", i, ": y\r\n");
  EXPECT_TRUE(absl::StartsWith(timed(many + "\r\n", &ms), "HTTP/1.1 431"));
  EXPECT_LT(ms, 500);
  EXPECT_TRUE(absl::StartsWith(timed("GET /" + std::string(20000, 'a') + " HTTP/1.1\r\n\r\n", &ms),
                               "HTTP/1.1 414"));
  EXPECT_LT(ms, 500);
  // A malformed request line or header (libmicrohttpd's own 400s).
  for (std::string bad : {"garbage garbage\r\n\r\n", "GET /metrics HTTP/1.1\r\nno colon\r\n\r\n",
                          "GET /metrics HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n"}) {
    std::string reply = timed(bad, &ms);
    EXPECT_TRUE(absl::StartsWith(reply, "HTTP/1.1 400")) << bad << ": " << reply;
    EXPECT_TRUE(absl::StrContains(reply, "\r\nConnection: close\r\n")) << reply;
    EXPECT_LT(ms, 500);
  }
  // What libmicrohttpd 0.9.75 accepts and custody refuses: LF-only lines, NULs, bare CRs,
  // extra spaces, folded fields. Each would otherwise be a 200 (or, for a NUL, a request for
  // a truncated path).
  for (const testing::MalformedRequest& bad : testing::MalformedRequests("/metrics")) {
    const int fd = ConnectLoopback(port);
    ASSERT_GE(fd, 0);
    const auto t0 = std::chrono::steady_clock::now();
    SendAll(fd, bad.bytes);
    std::string reply = ReadResponse(fd, 3000);
    ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_TRUE(absl::StartsWith(reply, "HTTP/1.1 400")) << bad.what << ": " << reply;
    EXPECT_TRUE(absl::StrContains(reply, "\r\nConnection: close\r\n")) << bad.what;
    EXPECT_FALSE(absl::StrContains(reply, "custody_up")) << bad.what;
    EXPECT_LT(ms, 500) << bad.what;
    EXPECT_TRUE(ClosedByPeer(fd, 500)) << bad.what;
    close(fd);
  }
  // On a kept-alive connection too: the second request, LF-only, gets the 400.
  {
    const int fd = ConnectLoopback(port);
    SendAll(fd, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    EXPECT_TRUE(absl::StartsWith(ReadResponse(fd, 2000), "HTTP/1.1 200 OK"));
    SendAll(fd, "GET /metrics HTTP/1.1\nHost: x\n\n");
    EXPECT_TRUE(absl::StartsWith(ReadResponse(fd, 2000), "HTTP/1.1 400"));
    close(fd);
  }
  // Pipelined in one write: each head is checked where it lies in the buffer.
  {
    const int fd = ConnectLoopback(port);
    SendAll(fd,
            "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
            "GET /metrics HTTP/1.1\nHost: x\n\n");
    std::string all;  // until the server closes, after the 400
    char buf[8192];
    for (pollfd p{fd, POLLIN, 0}; poll(&p, 1, 2000) > 0;) {
      const ssize_t n = read(fd, buf, sizeof(buf));
      if (n <= 0) break;
      all.append(buf, static_cast<size_t>(n));
    }
    close(fd);
    std::vector<std::string> statuses;
    for (size_t at = all.find("HTTP/1.1 "); at != std::string::npos;
         at = all.find("HTTP/1.1 ", at + 1)) {
      if (std::isdigit(static_cast<unsigned char>(all[at + 9]))) {  // a status line, not the body
        statuses.push_back(all.substr(at + 9, 3));
      }
    }
    EXPECT_EQ(statuses, (std::vector<std::string>{"200", "200", "400"})) << all;
  }
  // A large well-formed head (8 KB) arriving in 100-byte pieces, the read buffer growing
  // meanwhile: still one contiguous head, answered 200.
  {
    std::string big = "GET /metrics HTTP/1.1\r\nHost: x\r\n";
    for (int i = 0; i < 100; ++i)
      absl::StrAppend(&big, "X-Header-", i, ": ", std::string(66, 'v'), "\r\n");
    big += "\r\n";
    ASSERT_GT(big.size(), 8000u);
    const int fd = ConnectLoopback(port);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    for (size_t at = 0; at < big.size(); at += 100) {
      SendAll(fd, absl::string_view(big).substr(at, 100));
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    std::string reply = ReadResponse(fd, 2000);
    EXPECT_TRUE(absl::StartsWith(reply, "HTTP/1.1 200 OK")) << reply;
    close(fd);
  }
  // Limits of libmicrohttpd 0.9.75 (docs/design.md), asserted as they are: a one-word request
  // line is closed at once with no status line; a request line that begins with a NUL is taken
  // for an empty line, and the connection waits for the request deadline (1 s here).
  EXPECT_EQ(timed("garbage\r\n\r\n", &ms), "");
  EXPECT_LT(ms, 500);
  constexpr char kNulFirst[] =
      "\0GET /metrics HTTP/1.1\r\n\r\n";  // its length by sizeof, not by hand
  EXPECT_EQ(timed(std::string(kNulFirst, sizeof(kNulFirst) - 1), &ms), "");
  EXPECT_GE(ms, 900);
  EXPECT_LT(ms, 1500);
  // Well-formed variants stay accepted: empty and padded values, HTTP/1.0, a query.
  for (std::string good :
       {"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Empty:\r\nX-Pad: \t a b \t\r\n\r\n",
        "GET /metrics?x=%20y HTTP/1.0\r\n\r\n", "\r\nGET /metrics HTTP/1.1\r\n\r\n"}) {
    std::string reply = Exchange(port, good);
    EXPECT_TRUE(absl::StartsWith(reply, "HTTP/1.1 200 OK")) << good << ": " << reply;
  }
}

TEST(HttpServerTest, KeepsTheConnectionAliveForTheNextRequest) {
  auto server = HttpServer::Start(At("127.0.0.1:0"), [] { return std::string("custody_up 1\n"); });
  ASSERT_TRUE(server.ok()) << server.status();
  int fd = ConnectLoopback((*server)->port());
  ASSERT_GE(fd, 0);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(SendAll(fd, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"));
    std::string reply = ReadResponse(fd, 2000);
    EXPECT_TRUE(absl::StartsWith(reply, "HTTP/1.1 200 OK")) << i << ": " << reply;
    EXPECT_TRUE(absl::EndsWith(reply, "custody_up 1\n")) << i;
  }
  close(fd);
  EXPECT_EQ((*server)->requests(), 3u);
}

// The deadline covers the whole request: a client trickling a byte every 100 ms (each read
// succeeds, so a per-read timeout never fires) is cut off once the deadline passes, as are an
// idle connection, an idle keep-alive connection and a client that never reads its reply.
TEST(HttpServerTest, CutsOffEachSlowClientAtTheRequestDeadline) {
  HttpServer::Options options = At("127.0.0.1:0");
  options.request_deadline = absl::Milliseconds(800);
  auto server = HttpServer::Start(options, [] { return std::string(1 << 22, 'x'); });
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed_ms = [&] {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  };
  int trickler = ConnectLoopback(port);
  int idle = ConnectLoopback(port);
  int keep_alive = ConnectLoopback(port);
  int non_reader = ConnectLoopback(port);
  ASSERT_TRUE(trickler >= 0 && idle >= 0 && keep_alive >= 0 && non_reader >= 0);
  int buffer = 4096;
  setsockopt(non_reader, SOL_SOCKET, SO_RCVBUF, &buffer, sizeof(buffer));
  ASSERT_TRUE(SendAll(keep_alive, "GET /x HTTP/1.1\r\n\r\n"));        // 404, then idles
  ASSERT_TRUE(SendAll(non_reader, "GET /metrics HTTP/1.1\r\n\r\n"));  // 4 MiB, never read
  // A header line that never ends, one byte at a time.
  const std::string trickle = "GET /metrics HTTP/1.1\r\nX-Slow: " + std::string(100, 'a');
  size_t sent = 0;
  while (elapsed_ms() < 3000 && sent < trickle.size() &&
         send(trickler, &trickle[sent], 1, MSG_NOSIGNAL) == 1) {
    ++sent;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  const double trickler_cut = elapsed_ms();
  EXPECT_LT(trickler_cut, 800 + 400) << "bytes sent: " << sent;
  EXPECT_GE(trickler_cut, 700);
  for (int fd : {idle, keep_alive, non_reader}) {
    EXPECT_TRUE(ClosedByPeer(fd, 1200 - static_cast<int>(elapsed_ms())))
        << (fd == idle         ? "idle"
            : fd == keep_alive ? "keep-alive"
                               : "non-reader")
        << " at " << elapsed_ms() << " ms";
  }
  EXPECT_LT(elapsed_ms(), 1300);
  for (int fd : {trickler, idle, keep_alive, non_reader}) close(fd);
  EXPECT_GE((*server)->deadline_cutoffs(), 4u);
}

// Past max_connections a connection is accepted and closed at once, not queued; a slot that
// frees up is used again.
TEST(HttpServerTest, RefusesConnectionsPastTheCap) {
  HttpServer::Options options = At("127.0.0.1:0");
  options.max_connections = 8;
  options.threads = 1;
  auto server = HttpServer::Start(options, [] { return std::string("custody_up 1\n"); });
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  std::vector<int> held;
  for (int i = 0; i < 8; ++i) held.push_back(ConnectLoopback(port));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ((*server)->open_connections(), 8u);
  int excess = ConnectLoopback(port);
  ASSERT_GE(excess, 0);  // the kernel completes the handshake; the server then closes it
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(ClosedByPeer(excess, 1000));
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(500));
  close(excess);
  close(held.back());
  held.pop_back();
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_TRUE(
      absl::StartsWith(Exchange(port, "GET /metrics HTTP/1.1\r\n\r\n", 2000), "HTTP/1.1 200 OK"));
  for (int fd : held) close(fd);
}

// 200 clients that sent half a request hold nothing: a scrape meanwhile is answered at once
// (the old one-connection server held it for as long as they hung), on two threads.
TEST(HttpServerTest, AnswersAtOnceWhileManyClientsHang) {
  auto server = HttpServer::Start(At("127.0.0.1:0"), [] { return std::string("custody_up 1\n"); });
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  std::vector<int> hanging;
  for (int i = 0; i < 200; ++i) {
    int fd = ConnectLoopback(port);
    ASSERT_GE(fd, 0);
    SendAll(fd, "GET /metrics HTTP/1.1\r\nHo");
    hanging.push_back(fd);
  }
  std::vector<double> ms;
  for (int i = 0; i < 50; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    std::string reply = Exchange(port, "GET /metrics HTTP/1.1\r\n\r\n", 2000);
    ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    EXPECT_TRUE(absl::StartsWith(reply, "HTTP/1.1 200 OK"));
  }
  std::sort(ms.begin(), ms.end());
  EXPECT_LT(P99(ms), 100) << "max " << ms.back() << " ms";
  EXPECT_GE((*server)->open_connections(), 200u);
  for (int fd : hanging) close(fd);
}

TEST(HttpServerTest, RefusesBadAddresses) {
  EXPECT_EQ(HttpServer::Start(At("nonsense"), [] { return std::string(); }).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(HttpServer::Start(At("127.0.0.1:99999"), [] { return std::string(); }).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto first = HttpServer::Start(At("127.0.0.1:0"), [] { return std::string(); });
  ASSERT_TRUE(first.ok());
  auto second = HttpServer::Start(At(absl::StrCat("127.0.0.1:", (*first)->port())),
                                  [] { return std::string(); });
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
}

// A self-signed EC certificate for `cn` (IP SAN 127.0.0.1) as DIR/NAME.pem and DIR/NAME.key.
void MakeCertificate(const std::string& dir, const std::string& name, const std::string& cn) {
  const std::string make = absl::StrCat(
      "cd ", dir,
      " && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ", name,
      ".key -out ", name, ".pem -days 1 -subj /CN=", cn,
      " -addext subjectAltName=IP:127.0.0.1 2>/dev/null");
  ASSERT_EQ(std::system(make.c_str()), 0);
}

// GET /metrics over TLS, trusting `ca` (and presenting the client certificate when given); the
// reply, and in *peer_cn the server certificate's CN.
std::string TlsExchange(int port, const std::string& ca, const std::string& request,
                        const std::string& client_cert = "", const std::string& client_key = "",
                        std::string* peer_cn = nullptr) {
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  SSL_CTX_load_verify_locations(ctx, ca.c_str(), nullptr);
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
  if (!client_cert.empty()) {
    SSL_CTX_use_certificate_file(ctx, client_cert.c_str(), SSL_FILETYPE_PEM);
    SSL_CTX_use_PrivateKey_file(ctx, client_key.c_str(), SSL_FILETYPE_PEM);
  }
  int fd = ConnectLoopback(port);
  std::string reply;
  if (fd >= 0) {
    // As any HTTP client does (curl, Go's net/http): else the request record waits on Nagle.
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    SSL* ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) == 1) {
      if (peer_cn != nullptr) {
        X509* peer = SSL_get1_peer_certificate(ssl);
        char cn[256] = {};
        X509_NAME_get_text_by_NID(X509_get_subject_name(peer), NID_commonName, cn, sizeof(cn));
        *peer_cn = cn;
        X509_free(peer);
      }
      size_t wrote = 0;
      SSL_write_ex(ssl, request.data(), request.size(), &wrote);
      char buf[4096];
      size_t got = 0;
      while (SSL_read_ex(ssl, buf, sizeof(buf), &got) == 1) reply.append(buf, got);
    }
    SSL_free(ssl);
    close(fd);
  }
  SSL_CTX_free(ctx);
  return reply;
}

std::string TlsFetch(int port, const std::string& ca, const std::string& client_cert = "",
                     const std::string& client_key = "", std::string* peer_cn = nullptr) {
  return TlsExchange(port, ca, "GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n", client_cert,
                     client_key, peer_cn);
}

class HttpServerTlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::filesystem::create_directories(dir_);
    MakeCertificate(dir_, "server", "127.0.0.1");
    MakeCertificate(dir_, "client", "scraper");  // its own CA here
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  const std::string dir_ =
      (std::filesystem::temp_directory_path() / absl::StrCat("metrics_tls_", getpid())).string();
};

TEST_F(HttpServerTlsTest, ServesOverTlsWithAClientCertificate) {
  HttpServer::Options options;
  options.address = "127.0.0.1:0";
  options.tls_cert = dir_ + "/server.pem";
  options.tls_key = dir_ + "/server.key";
  options.client_ca = dir_ + "/client.pem";
  auto server = HttpServer::Start(options, [] { return std::string("custody_up 1\n"); });
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  std::string with = TlsFetch(port, options.tls_cert, dir_ + "/client.pem", dir_ + "/client.key");
  EXPECT_TRUE(absl::StartsWith(with, "HTTP/1.1 200 OK")) << with;
  EXPECT_TRUE(absl::EndsWith(with, "custody_up 1\n"));
  // Without a client certificate, or with one the CA did not issue: 403, no metrics.
  std::string without = TlsFetch(port, options.tls_cert);
  EXPECT_TRUE(absl::StartsWith(without, "HTTP/1.1 403")) << without;
  EXPECT_FALSE(absl::StrContains(without, "custody_up"));
  std::string other = TlsFetch(port, options.tls_cert, options.tls_cert, options.tls_key);
  EXPECT_FALSE(absl::StrContains(other, "custody_up")) << other;
  // A key that is not the certificate's, a missing file: refused at startup.
  options.tls_key = dir_ + "/client.key";
  EXPECT_EQ(HttpServer::Start(options, [] { return std::string(); }).status().code(),
            absl::StatusCode::kFailedPrecondition);
  options.tls_key = dir_ + "/missing.key";
  EXPECT_EQ(HttpServer::Start(options, [] { return std::string(); }).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

// Over TLS, the same malformed requests get the same prompt 400 and the connection is closed.
TEST_F(HttpServerTlsTest, AnswersMalformedRequestsWith400) {
  HttpServer::Options options;
  options.address = "127.0.0.1:0";
  options.tls_cert = dir_ + "/server.pem";
  options.tls_key = dir_ + "/server.key";
  auto server = HttpServer::Start(options, [] { return std::string("custody_up 1\n"); });
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  for (const testing::MalformedRequest& bad : testing::MalformedRequests("/metrics")) {
    const auto t0 = std::chrono::steady_clock::now();
    // TlsExchange reads until the server closes: a reply without the close would take 5 s.
    std::string reply = TlsExchange(port, options.tls_cert, bad.bytes);
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_TRUE(absl::StartsWith(reply, "HTTP/1.1 400")) << bad.what << ": " << reply;
    EXPECT_TRUE(absl::StrContains(reply, "\r\nConnection: close\r\n")) << bad.what;
    EXPECT_LT(ms, 500) << bad.what;
  }
  EXPECT_TRUE(absl::EndsWith(TlsFetch(port, options.tls_cert), "custody_up 1\n"));
}

// 100 clients that open a TLS connection and never finish the handshake (nothing sent, or half
// a ClientHello) hold no thread: a scrape meanwhile completes its handshake and answers at once,
// and each stalled one is cut off at the request deadline. A rotated certificate is served from
// the next connection on.
TEST_F(HttpServerTlsTest, StalledHandshakesHoldNothingAndARotatedCertificateIsServed) {
  HttpServer::Options options;
  options.address = "127.0.0.1:0";
  options.tls_cert = dir_ + "/server.pem";
  options.tls_key = dir_ + "/server.key";
  options.request_deadline = absl::Seconds(3);
  auto server = HttpServer::Start(options, [] { return std::string("custody_up 1\n"); });
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  // A scrape's own cost on this build (an ASan build's TLS handshake takes ~50 ms, not ~2): the
  // bound below is 100 ms or three times this, whichever is larger.
  std::vector<double> alone;
  for (int i = 0; i < 10; ++i) {
    auto t = std::chrono::steady_clock::now();
    EXPECT_TRUE(absl::EndsWith(TlsFetch(port, options.tls_cert), "custody_up 1\n"));
    alone.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count());
  }
  std::sort(alone.begin(), alone.end());
  const double bound_ms = std::max(100.0, 3 * alone.back());
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<int> stalled;
  for (int i = 0; i < 100; ++i) {
    int fd = ConnectLoopback(port);
    ASSERT_GE(fd, 0);
    // A TLS record header announcing a 512-byte ClientHello, and 5 of its bytes.
    if (i % 2 == 0) SendAll(fd, std::string("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03", 10));
    stalled.push_back(fd);
  }
  // Scrapes while the stalled ones are still open (they are cut at 3 s): up to 100, for 2.5 s.
  std::vector<double> ms;
  while (ms.size() < 100 &&
         std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(2500)) {
    auto t = std::chrono::steady_clock::now();
    std::string cn;
    EXPECT_TRUE(absl::EndsWith(TlsFetch(port, options.tls_cert, "", "", &cn), "custody_up 1\n"));
    ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count());
    EXPECT_EQ(cn, "127.0.0.1");
  }
  ASSERT_GE(ms.size(), 5u) << "too few scrapes while the handshakes stalled";
  std::sort(ms.begin(), ms.end());
  EXPECT_LT(P99(ms), bound_ms) << ms.size() << " scrapes, max " << ms.back() << " ms, min "
                               << ms.front() << "; alone at most " << alone.back() << " ms";
  for (int fd : stalled) {
    const int left = 3500 - static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                                 std::chrono::steady_clock::now() - t0)
                                                 .count());
    EXPECT_TRUE(ClosedByPeer(fd, std::max(left, 0)));
    close(fd);
  }
  EXPECT_GE((*server)->deadline_cutoffs(), 100u);

  // The certificate rotates on disk (a new pair written, then renamed into place).
  MakeCertificate(dir_, "rotated", "rotated.example");
  std::filesystem::rename(dir_ + "/rotated.key", dir_ + "/server.key");
  std::filesystem::rename(dir_ + "/rotated.pem", dir_ + "/server.pem");
  std::string cn;
  EXPECT_TRUE(absl::EndsWith(TlsFetch(port, dir_ + "/server.pem", "", "", &cn), "custody_up 1\n"));
  EXPECT_EQ(cn, "rotated.example");
}

// A reload that fails (a file that is not PEM, a missing file, a key that is not the new
// certificate's) is reported once per version of the files and the previous pair keeps being
// served; ReloadTls says the same; a good pair is served from the next connection on.
TEST_F(HttpServerTlsTest, AFailedCertificateReloadIsReportedAndTheOldOneKeepsServing) {
  absl::Mutex mu;
  std::vector<absl::Status> reports;
  HttpServer::Options options;
  options.address = "127.0.0.1:0";
  options.tls_cert = dir_ + "/server.pem";
  options.tls_key = dir_ + "/server.key";
  options.on_tls_reload = [&](const absl::Status& s) {
    absl::MutexLock lock(&mu);
    reports.push_back(s);
  };
  auto server = HttpServer::Start(options, [] { return std::string("custody_up 1\n"); });
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE((*server)->serves_tls());
  const int port = (*server)->port();
  const std::string original = dir_ + "/original.pem";
  std::filesystem::copy_file(options.tls_cert, original);
  auto served_cn = [&] {
    std::string cn;
    const std::string reply = TlsFetch(port, original, "", "", &cn);
    return absl::EndsWith(reply, "custody_up 1\n") ? cn : "no reply";
  };
  auto last_report = [&] {
    absl::MutexLock lock(&mu);
    return reports.empty() ? absl::OkStatus() : reports.back();
  };
  auto report_count = [&] {
    absl::MutexLock lock(&mu);
    return reports.size();
  };
  EXPECT_EQ(served_cn(), "127.0.0.1");
  EXPECT_EQ(report_count(), 0u);  // the load at startup is Start's result, not a reload

  // The certificate file replaced by something that is not PEM.
  {
    std::ofstream(dir_ + "/garbage.pem") << "not a certificate\n";
    std::filesystem::rename(dir_ + "/garbage.pem", options.tls_cert);
  }
  EXPECT_EQ(served_cn(), "127.0.0.1");
  EXPECT_EQ(served_cn(), "127.0.0.1");
  ASSERT_EQ(report_count(), 1u);  // once for this version of the files, not per handshake
  EXPECT_EQ(last_report().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(last_report().message(), "certificate chain")) << last_report();
  absl::Status again = (*server)->ReloadTls();
  EXPECT_EQ(again.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(again.message(), "certificate chain")) << again;
  EXPECT_EQ(served_cn(), "127.0.0.1");

  // Missing.
  std::filesystem::remove(options.tls_cert);
  EXPECT_EQ(served_cn(), "127.0.0.1");
  ASSERT_EQ(report_count(), 2u);
  EXPECT_TRUE(absl::StrContains(last_report().message(), "cannot read")) << last_report();

  // A new certificate beside the old key (a rotation half done).
  MakeCertificate(dir_, "rotated", "rotated.example");
  std::filesystem::copy_file(dir_ + "/rotated.pem", options.tls_cert);
  EXPECT_EQ(served_cn(), "127.0.0.1");
  ASSERT_EQ(report_count(), 3u);
  EXPECT_TRUE(absl::StrContains(last_report().message(), "is not the key of the certificate"))
      << last_report();

  // The rotation completed, and asked for: served from the next connection on.
  std::filesystem::rename(dir_ + "/rotated.key", options.tls_key);
  EXPECT_TRUE((*server)->ReloadTls().ok());
  EXPECT_TRUE((*server)->ReloadTls().ok());  // unchanged: nothing to do
  std::string cn;
  EXPECT_TRUE(absl::EndsWith(TlsFetch(port, options.tls_cert, "", "", &cn), "custody_up 1\n"));
  EXPECT_EQ(cn, "rotated.example");
  EXPECT_EQ(report_count(), 3u);

  // A server without TLS has nothing to reload.
  auto clear = HttpServer::Start(At("127.0.0.1:0"), [] { return std::string(); });
  ASSERT_TRUE(clear.ok());
  EXPECT_FALSE((*clear)->serves_tls());
  EXPECT_EQ((*clear)->ReloadTls().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace custody::metrics
