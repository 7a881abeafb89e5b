// custodyd's HTTP side, as an operator and the clients in front of it use it:
// - the public JWKS listener (--jwks_listen, --jwks_publish, --jwks_alias) checked with curl:
//   200 with the ETag and key set GetJwks gives, 304 on If-None-Match, Cache-Control max-age and
//   CORS, 404 for a ring that is not published, a rotation served from the next request on, and
//   bad requests (huge headers, garbage, LF-only lines, NULs) answered at once with a 4xx;
// - 200 slow clients (half requests, trickled bytes, idle connections) on /metrics and on the
//   JWKS listener at once: a scrape and a JWKS GET meanwhile answer within 100 ms (p99), every
//   slow client is cut off by the 5 s request deadline, custodyd's threads and descriptors stay
//   bounded, and a real Prometheus scraping every second misses no scrape;
// - the operator's mistakes: an alias to an unpublished ring, publishing without a listener, a
//   non-loopback address in clear, a host name that only starts with "127.", a bad
//   --http_request_deadline or --http_max_connections (which both listeners then take);
// - TLS on both listeners: malformed requests get their 400 over TLS too, and a certificate
//   renewal that fails (SIGHUP with a file not PEM, missing, or a certificate beside the old key)
//   is logged and the old certificate keeps being served.
#include <dirent.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "metrics/http_test_client.h"
#include "tests/testing/harness.h"
#include "tests/testing/prometheus_testing.h"
#include "tests/testing/rpc_helpers.h"

namespace custody::testing {
namespace {

namespace v1 = custody::v1;
using metrics::testing::ClosedByPeer;
using metrics::testing::ConnectLoopback;
using metrics::testing::Exchange;
using metrics::testing::P99;
using metrics::testing::SendAll;
using Clock = std::chrono::steady_clock;

void CreateRing(Custodyd& d, const std::string& name, v1::Purpose purpose, const std::string& alg) {
  v1::CreateKeyRingRequest req;
  req.set_name(name);
  req.set_purpose(purpose);
  req.set_alg(alg);
  grpc::Status s = custody::testing::CreateRing(d, req);
  ASSERT_TRUE(s.ok()) << name << ": " << s.error_message();
}

struct CurlReply {
  int status = 0;
  std::string headers;  // as sent
  std::string body;
};

// curl -i, split into status, headers and body.
CurlReply Curl(const std::vector<std::string>& args) {
  std::vector<std::string> argv = {"curl", "-sS", "-i", "--max-time", "5"};
  argv.insert(argv.end(), args.begin(), args.end());
  CommandResult r = RunCommand(argv);
  CurlReply out;
  EXPECT_EQ(r.exit_code, 0) << r.err;
  const size_t end = r.out.find("\r\n\r\n");
  if (end == std::string::npos) return out;
  out.headers = r.out.substr(0, end + 2);
  out.body = r.out.substr(end + 4);
  std::vector<std::string> first = absl::StrSplit(r.out.substr(0, r.out.find("\r\n")), ' ');
  if (first.size() >= 2) (void)absl::SimpleAtoi(first[1], &out.status);
  return out;
}

// The value of header `name` (any case), "" when absent.
std::string Header(const CurlReply& r, absl::string_view name) {
  for (absl::string_view line : absl::StrSplit(r.headers, "\r\n")) {
    const size_t colon = line.find(':');
    if (colon != absl::string_view::npos && absl::EqualsIgnoreCase(line.substr(0, colon), name)) {
      return std::string(absl::StripAsciiWhitespace(line.substr(colon + 1)));
    }
  }
  return "";
}

class HttpListenersTest : public ::testing::Test {
 protected:
  TempDir dir_;
};

TEST_F(HttpListenersTest, JwksListenerServesPublishedRingsWithEtagsAndNothingElse) {
  const int port = FreePort();
  Custodyd d(dir_.path() + "/state",
             {absl::StrCat("--jwks_listen=127.0.0.1:", port), "--jwks_publish=pub/sign,pub/enc",
              "--jwks_alias=/.well-known/jwks.json=pub/sign"});
  ASSERT_TRUE(d.started()) << d.log();
  // pub/enc is published before it exists: logged, and 404 until it is created.
  EXPECT_TRUE(absl::StrContains(d.log(), "jwks.unknown_ring")) << d.log();
  const std::string base = absl::StrCat("http://127.0.0.1:", port);
  EXPECT_EQ(Curl({base + "/rings/pub/enc/jwks.json"}).status, 404);
  CreateRing(d, "pub/sign", v1::SIGN, "ES256");
  CreateRing(d, "pub/enc", v1::DECRYPT, "ECDH-ES+A256KW");
  CreateRing(d, "hidden/sign", v1::SIGN, "PS256");

  for (std::string path : {"/rings/pub/sign/jwks.json", "/.well-known/jwks.json"}) {
    const v1::GetJwksResponse expected = GetJwks(d, {"pub/sign"});
    CurlReply r = Curl({base + path});
    EXPECT_EQ(r.status, 200) << path;
    EXPECT_EQ(r.body, expected.jwks()) << path;
    EXPECT_EQ(Header(r, "etag"), absl::StrCat("\"", expected.etag(), "\"")) << r.headers;
    EXPECT_EQ(Header(r, "cache-control"),
              absl::StrCat("public, max-age=", expected.max_age_seconds()));
    EXPECT_EQ(Header(r, "content-type"), "application/jwk-set+json");
    EXPECT_EQ(Header(r, "access-control-allow-origin"), "*");
    // The client revalidates: 304 with the same etag, no body.
    CurlReply again =
        Curl({"-H", absl::StrCat("If-None-Match: \"", expected.etag(), "\""), base + path});
    EXPECT_EQ(again.status, 304) << again.headers;
    EXPECT_EQ(again.body, "");
    EXPECT_EQ(Header(again, "etag"), Header(r, "etag"));
    EXPECT_EQ(Curl({"-H", "If-None-Match: \"stale\"", base + path}).status, 200);
  }
  EXPECT_EQ(Curl({base + "/rings/pub/enc/jwks.json"}).body, GetJwks(d, {"pub/enc"}).jwks());
  EXPECT_TRUE(absl::StrContains(Curl({base + "/rings/pub/enc/jwks.json"}).body, "\"use\":\"enc\""));
  // Nothing else is reachable: an unpublished ring, its alias-like paths, other paths.
  for (std::string path :
       {"/rings/hidden/sign/jwks.json", "/rings/pub/jwks.json", "/rings/pub/sign/jwks.json/",
        "/jwks.json", "/", "/metrics", "/rings/hidden%2Fsign/jwks.json"}) {
    CurlReply r = Curl({base + path});
    EXPECT_EQ(r.status, 404) << path;
    EXPECT_FALSE(absl::StrContains(r.body, "\"keys\"")) << path;
  }
  EXPECT_EQ(Curl({"-X", "POST", base + "/rings/pub/sign/jwks.json"}).status, 405);
  EXPECT_EQ(Curl({"-I", base + "/rings/pub/sign/jwks.json"}).status, 200);

  // A rotation is served from the next request on; the old etag no longer matches.
  const std::string before = GetJwks(d, {"pub/sign"}).etag();
  {
    v1::RotateKeyRingRequest req;
    req.set_ring("pub/sign");
    req.set_force(true);
    v1::RotateKeyRingResponse resp;
    grpc::ClientContext ctx;
    ASSERT_TRUE(d.admin().RotateKeyRing(&ctx, req, &resp).ok());
  }
  const v1::GetJwksResponse after = GetJwks(d, {"pub/sign"});
  ASSERT_NE(after.etag(), before);
  CurlReply rotated = Curl(
      {"-H", absl::StrCat("If-None-Match: \"", before, "\""), base + "/.well-known/jwks.json"});
  EXPECT_EQ(rotated.status, 200);
  EXPECT_EQ(rotated.body, after.jwks());
  EXPECT_EQ(Header(rotated, "etag"), absl::StrCat("\"", after.etag(), "\""));

  // Bad requests are answered at once: huge headers (curl), garbage and LF-only lines (raw).
  auto t0 = Clock::now();
  CurlReply huge =
      Curl({"-H", "X-Big: " + std::string(20000, 'a'), base + "/rings/pub/sign/jwks.json"});
  EXPECT_EQ(huge.status, 431);
  EXPECT_TRUE(absl::StartsWith(Exchange(port, "garbage garbage\r\n\r\n", 3000), "HTTP/1.1 400"));
  // A one-word line: libmicrohttpd 0.9.75 closes at once without a status line (docs/design.md).
  EXPECT_EQ(Exchange(port, "garbage\r\n\r\n", 3000), "");
  for (const metrics::testing::MalformedRequest& bad :
       metrics::testing::MalformedRequests("/rings/pub/sign/jwks.json")) {
    const std::string reply = Exchange(port, bad.bytes, 3000);
    EXPECT_TRUE(absl::StartsWith(reply, "HTTP/1.1 400")) << bad.what << ": " << reply;
    EXPECT_TRUE(absl::StrContains(reply, "\r\nConnection: close\r\n")) << bad.what;
    EXPECT_FALSE(absl::StrContains(reply, "\"keys\"")) << bad.what;
  }
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(2));
}

// The authorization server's jwks_uri behind a reverse proxy, as docs/deploy.md shows it: nginx
// terminates the public side and forwards one path to custodyd on loopback; ETag, Cache-Control,
// CORS and 304s pass through, and the proxy reaches nothing else of custodyd.
TEST_F(HttpListenersTest, JwksBehindNginxAsTheAuthorizationServersJwksUri) {
  if (access("/usr/sbin/nginx", X_OK) != 0) GTEST_SKIP() << "nginx is not installed";
  const int jwks_port = FreePort();
  Custodyd d(dir_.path() + "/state",
             {absl::StrCat("--jwks_listen=127.0.0.1:", jwks_port), "--jwks_publish=op/id-token",
              "--jwks_alias=/.well-known/jwks.json=op/id-token"});
  ASSERT_TRUE(d.started()) << d.log();
  CreateRing(d, "op/id-token", v1::SIGN, "PS256");
  const std::string dir = dir_.path() + "/nginx";
  std::filesystem::create_directories(dir + "/tmp");
  const int port = FreePort();
  // One process (no master/worker split, so no user switch): the test's own user.
  WriteFileOrDie(
      dir + "/nginx.conf",
      absl::StrCat("daemon off;\nmaster_process off;\npid ", dir, "/nginx.pid;\nerror_log ", dir,
                   "/error.log info;\nevents { worker_connections 64; }\nhttp {\n  access_log ",
                   dir, "/access.log;\n  client_body_temp_path ", dir, "/tmp/body;\n",
                   "  proxy_temp_path ", dir, "/tmp/proxy;\n  fastcgi_temp_path ", dir,
                   "/tmp/fastcgi;\n  uwsgi_temp_path ", dir, "/tmp/uwsgi;\n  scgi_temp_path ", dir,
                   "/tmp/scgi;\n  server {\n    listen 127.0.0.1:", port, ";\n",
                   "    location = /.well-known/jwks.json {\n      proxy_pass http://127.0.0.1:",
                   jwks_port, ";\n      proxy_set_header Host $host;\n    }\n  }\n}\n"));
  BackgroundProcess nginx(
      {"/usr/sbin/nginx", "-p", dir, "-c", dir + "/nginx.conf", "-e", dir + "/error.log"},
      dir + "/nginx.out");
  const std::string url = absl::StrCat("http://127.0.0.1:", port, "/.well-known/jwks.json");
  CurlReply r;
  for (auto until = Clock::now() + std::chrono::seconds(10); Clock::now() < until;) {
    CommandResult probe = RunCommand({"curl", "-s", "-o", "/dev/null", url});
    if (probe.exit_code == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  r = Curl({url});
  const v1::GetJwksResponse expected = GetJwks(d, {"op/id-token"});
  ASSERT_EQ(r.status, 200) << r.headers << ReadFileOrDie(dir + "/error.log");
  EXPECT_EQ(r.body, expected.jwks());
  EXPECT_EQ(Header(r, "etag"), absl::StrCat("\"", expected.etag(), "\""));
  EXPECT_EQ(Header(r, "cache-control"),
            absl::StrCat("public, max-age=", expected.max_age_seconds()));
  EXPECT_EQ(Header(r, "access-control-allow-origin"), "*");
  CurlReply again = Curl({"-H", absl::StrCat("If-None-Match: \"", expected.etag(), "\""), url});
  EXPECT_EQ(again.status, 304) << again.headers;
  EXPECT_EQ(Curl({absl::StrCat("http://127.0.0.1:", port, "/rings/op/id-token/jwks.json")}).status,
            404);
}

TEST_F(HttpListenersTest, OperatorMistakesAreRefusedWithWhatToDo) {
  struct Case {
    std::vector<std::string> flags;
    std::string says;
  };
  const std::string port = absl::StrCat(FreePort());
  for (const Case& c : std::vector<Case>{
           {{"--jwks_publish=op/id", "--jwks_listen=127.0.0.1:" + port,
             "--jwks_alias=/.well-known/jwks.json=op/other"},
            "which --jwks_publish does not list"},
           {{"--jwks_publish=op/id"}, "--jwks_publish without --jwks_listen"},
           {{"--jwks_tls_cert=/etc/custody/jwks.pem"}, "without --jwks_listen"},
           {{"--jwks_listen=0.0.0.0:" + port, "--jwks_tls_cert=/nonexistent.pem"},
            "TLS needs both a certificate and a key"},
           {{"--jwks_listen=0.0.0.0:" + port, "--jwks_tls_cert=/nonexistent.pem",
             "--jwks_tls_key=/nonexistent.key"},
            "cannot read '/nonexistent.pem'"},
           {{"--jwks_listen=0.0.0.0:" + port}, "--jwks_listen: refusing to listen on"},
           {{"--jwks_listen=127.example.com:" + port}, "--jwks_listen: refusing to listen on"},
           {{"--metrics_listen=127.evil.example:" + port}, "--metrics_listen: refusing"},
           {{"--jwks_listen=127.0.0.1:" + port, "--jwks_publish=Not A Ring"}, "not a ring name"},
           {{"--jwks_listen=127.0.0.1:" + port, "--jwks_publish=a/b",
             "--jwks_alias=/rings/x/jwks.json=a/b"},
            "under /rings/"},
           {{"--metrics_listen=127.0.0.1:" + port, "--http_request_deadline=0s"},
            "--http_request_deadline=0: give 100ms to 5m"},
           {{"--http_request_deadline=-5s"}, "--http_request_deadline=-5s: give 100ms to 5m"},
           {{"--http_request_deadline=5000h"}, "give 100ms to 5m"},
           {{"--http_request_deadline=5"},
            "--http_request_deadline=5: a duration needs its unit, e.g. "
            "--http_request_deadline=5s"},
           {{"--drain_grace", "2"}, "--drain_grace=2: a duration needs its unit"},
           {{"--jwks_listen=127.0.0.1:" + port, "--http_max_connections=0"},
            "--http_max_connections=0: give 1 to"},
           {{"--http_max_connections=-1"}, "raise LimitNOFILE"},
           {{"--http_max_connections=100000000"}, "--http_max_connections=100000000: give 1 to"},
       }) {
    std::vector<std::string> argv = {BinDir() + "/custodyd", "--state_dir=" + dir_.path() + "/s",
                                     "--listen=unix:" + dir_.path() + "/s.sock"};
    argv.insert(argv.end(), c.flags.begin(), c.flags.end());
    CommandResult r = RunCommand(argv);
    EXPECT_NE(r.exit_code, 0) << absl::StrJoin(c.flags, " ");
    EXPECT_TRUE(absl::StrContains(r.err, c.says)) << absl::StrJoin(c.flags, " ") << ": " << r.err;
  }
}

// A number field of /proc/PID/status ("Threads", "VmRSS" in kB).
int StatusField(pid_t pid, const std::string& field) {
  std::string status = ReadFileOrDie(absl::StrCat("/proc/", pid, "/status"));
  size_t at = status.find(field + ":");
  int n = 0;
  if (at != std::string::npos) {
    at += field.size() + 1;
    std::string value(absl::StripAsciiWhitespace(status.substr(at, status.find('\n', at) - at)));
    (void)absl::SimpleAtoi(value.substr(0, value.find(' ')), &n);
  }
  return n;
}
int CountThreads(pid_t pid) { return StatusField(pid, "Threads"); }

int CountFds(pid_t pid) {
  int n = 0;
  DIR* dir = opendir(absl::StrCat("/proc/", pid, "/fd").c_str());
  if (dir == nullptr) return -1;
  while (readdir(dir) != nullptr) ++n;
  closedir(dir);
  return n - 2;
}

// One GET on a fresh connection: milliseconds, or -1 when the reply is not a 200.
double TimedGet(int port, const std::string& path) {
  const auto t0 = Clock::now();
  std::string reply =
      Exchange(port, absl::StrCat("GET ", path, " HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"), 5000);
  const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  return absl::StartsWith(reply, "HTTP/1.1 200") ? ms : -1;
}

// custodyd's /metrics answers the same malformed requests with a prompt 400 as the JWKS listener.
TEST_F(HttpListenersTest, MetricsListenerAnswersMalformedRequestsWith400) {
  const int port = FreePort();
  Custodyd d(dir_.path() + "/state", {absl::StrCat("--metrics_listen=127.0.0.1:", port)});
  ASSERT_TRUE(d.started()) << d.log();
  for (const metrics::testing::MalformedRequest& bad :
       metrics::testing::MalformedRequests("/metrics")) {
    const auto t0 = Clock::now();
    const std::string reply = Exchange(port, bad.bytes, 3000);
    EXPECT_TRUE(absl::StartsWith(reply, "HTTP/1.1 400")) << bad.what << ": " << reply;
    EXPECT_TRUE(absl::StrContains(reply, "\r\nConnection: close\r\n")) << bad.what;
    EXPECT_FALSE(absl::StrContains(reply, "custody_")) << bad.what;
    EXPECT_LT(Clock::now() - t0, std::chrono::milliseconds(500)) << bad.what;
  }
  EXPECT_GE(TimedGet(port, "/metrics"), 0);
}

// A self-signed P-256 certificate for 127.0.0.1 (NAME.pem, NAME.key in dir), with the OpenSSL CLI.
void MakeCertificate(const std::string& dir, const std::string& name, const std::string& cn) {
  CommandResult r =
      RunCommand({"openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                  "-nodes", "-keyout", dir + "/" + name + ".key", "-out", dir + "/" + name + ".pem",
                  "-days", "1", "-subj", "/CN=" + cn, "-addext", "subjectAltName=IP:127.0.0.1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
}

// The log lines of `event`, in order.
std::vector<std::string> LogLines(const Custodyd& d, const std::string& event) {
  std::vector<std::string> lines;
  for (absl::string_view line : absl::StrSplit(d.log(), '\n')) {
    if (absl::StrContains(line, absl::StrCat("\"event\":\"", event, "\""))) {
      lines.emplace_back(line);
    }
  }
  return lines;
}

// LogLines of `event` once there are at least `n` (or after 5 s).
std::vector<std::string> AwaitLogLines(const Custodyd& d, const std::string& event, size_t n) {
  std::vector<std::string> lines;
  for (auto until = Clock::now() + std::chrono::seconds(5);
       (lines = LogLines(d, event)).size() < n && Clock::now() < until;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return lines;
}

// Sends SIGHUP and returns the `n`th line of `event` (counting from 1) once it is logged.
std::string SighupAndAwait(Custodyd& d, const std::string& event, size_t n) {
  d.Signal(SIGHUP);
  const std::vector<std::string> lines = AwaitLogLines(d, event, n);
  EXPECT_EQ(lines.size(), n) << d.log();
  return lines.size() >= n ? lines[n - 1] : "";
}

// Each malformed request for `path`, sent over TLS with the OpenSSL CLI (trusting `ca`): 400 at
// once with Connection: close, and the connection closed (s_client ends then).
void ExpectMalformedRequestsRefusedOverTls(int port, const std::string& ca,
                                           const std::string& path) {
  for (const metrics::testing::MalformedRequest& bad : metrics::testing::MalformedRequests(path)) {
    const auto t0 = Clock::now();
    CommandResult r = RunCommand({"timeout", "5", "openssl", "s_client", "-quiet", "-connect",
                                  absl::StrCat("127.0.0.1:", port), "-CAfile", ca},
                                 bad.bytes);
    EXPECT_TRUE(absl::StartsWith(r.out, "HTTP/1.1 400")) << bad.what << ": " << r.out << r.err;
    EXPECT_TRUE(absl::StrContains(r.out, "\r\nConnection: close\r\n")) << bad.what;
    EXPECT_FALSE(absl::StrContains(r.out, "custody_")) << bad.what;
    EXPECT_FALSE(absl::StrContains(r.out, "\"keys\"")) << bad.what;
    EXPECT_LT(Clock::now() - t0, std::chrono::milliseconds(1500)) << bad.what;
  }
}

// The JWKS listener over TLS, as docs/deploy.md runs it for a client's jwks_uri: a malformed
// request gets its 400 over TLS too; a certificate reload that fails (SIGHUP with the file not
// PEM, or missing; or the files changing to a broken pair) is logged as a `jwks.tls_reload`
// error naming the file and the previous certificate keeps being served; a good one is served
// after SIGHUP.
TEST_F(HttpListenersTest, JwksOverTlsKeepsItsCertificateWhenAReloadFails) {
  const std::string tls = dir_.path() + "/tls";
  std::filesystem::create_directories(tls);
  MakeCertificate(tls, "jwks", "first.example");
  std::filesystem::copy_file(tls + "/jwks.pem", tls + "/first.pem");
  const int port = FreePort();
  Custodyd d(dir_.path() + "/state",
             {absl::StrCat("--jwks_listen=127.0.0.1:", port), "--jwks_publish=op/id-token",
              "--jwks_tls_cert=" + tls + "/jwks.pem", "--jwks_tls_key=" + tls + "/jwks.key"});
  ASSERT_TRUE(d.started()) << d.log();
  CreateRing(d, "op/id-token", v1::SIGN, "ES256");
  const std::string url = absl::StrCat("https://127.0.0.1:", port, "/rings/op/id-token/jwks.json");
  // The certificate served is the one `ca` names (curl verifies the chain against it alone).
  auto served_by = [&](const std::string& ca) { return Curl({"--cacert", ca, url}).status; };
  ASSERT_EQ(served_by(tls + "/first.pem"), 200);

  ExpectMalformedRequestsRefusedOverTls(port, tls + "/first.pem", "/rings/op/id-token/jwks.json");

  // SIGHUP with the certificate file not PEM.
  WriteFileOrDie(tls + "/new.pem", "not a certificate\n");
  std::filesystem::rename(tls + "/new.pem", tls + "/jwks.pem");
  std::string line = SighupAndAwait(d, "jwks.tls_reload", 1);
  EXPECT_TRUE(absl::StrContains(line, "\"level\":\"error\"")) << line;
  EXPECT_TRUE(absl::StrContains(line, "\"trigger\":\"SIGHUP\"")) << line;
  EXPECT_TRUE(absl::StrContains(line, "certificate chain")) << line;
  EXPECT_TRUE(absl::StrContains(line, "the previous certificate is still served"));
  EXPECT_EQ(served_by(tls + "/first.pem"), 200);
  EXPECT_EQ(served_by(tls + "/first.pem"), 200);
  // Both connections saw the same broken files: no line of their own.
  EXPECT_EQ(LogLines(d, "jwks.tls_reload").size(), 1u) << d.log();

  // Missing, then SIGHUP.
  std::filesystem::remove(tls + "/jwks.pem");
  line = SighupAndAwait(d, "jwks.tls_reload", 2);
  EXPECT_TRUE(absl::StrContains(line, "\"level\":\"error\"")) << line;
  EXPECT_TRUE(absl::StrContains(line, "cannot read '" + tls + "/jwks.pem'")) << line;
  EXPECT_EQ(served_by(tls + "/first.pem"), 200);

  // Without SIGHUP: a new certificate beside the old key, seen by the next connection.
  MakeCertificate(tls, "second", "second.example");
  std::filesystem::copy_file(tls + "/second.pem", tls + "/jwks.pem");
  EXPECT_EQ(served_by(tls + "/first.pem"), 200);
  const std::vector<std::string> reloads = LogLines(d, "jwks.tls_reload");
  ASSERT_EQ(reloads.size(), 3u) << d.log();
  EXPECT_TRUE(absl::StrContains(reloads[2], "\"trigger\":\"files changed\"")) << reloads[2];
  EXPECT_TRUE(absl::StrContains(reloads[2], "is not the key of the certificate")) << reloads[2];

  // The rotation completed, then SIGHUP: the new certificate is served, and said so.
  std::filesystem::rename(tls + "/second.key", tls + "/jwks.key");
  line = SighupAndAwait(d, "jwks.tls_reload", 4);
  EXPECT_TRUE(absl::StrContains(line, "\"level\":\"info\"")) << line;
  EXPECT_TRUE(absl::StrContains(line, "\"result\":\"ok\"")) << line;
  EXPECT_EQ(served_by(tls + "/second.pem"), 200);
  EXPECT_NE(RunCommand({"curl", "-sS", "-o", "/dev/null", "--max-time", "5", "--cacert",
                        tls + "/first.pem", url})
                .exit_code,
            0);
}

// The CN of the certificate the TLS listener on `port` serves (verified against `ca`), or "".
std::string ServedCommonName(int port, const std::string& ca) {
  CommandResult r = RunCommand({"curl", "-sS", "-v", "-o", "/dev/null", "--max-time", "5",
                                "--cacert", ca, absl::StrCat("https://127.0.0.1:", port, "/")});
  const size_t at = r.err.find("subject: CN=");
  if (r.exit_code != 0 || at == std::string::npos) return "";
  return r.err.substr(at + 12, r.err.find_first_of("\r\n;,", at) - at - 12);
}

// /metrics over TLS with custodyd's own certificate (--tls_cert/--tls_key), as in the Kubernetes
// setup: a malformed request gets its 400 over TLS; a renewal that leaves the new certificate
// beside the old key fails on SIGHUP as `metrics.tls_reload` and the old certificate keeps being
// served; the completed renewal is served after the next SIGHUP.
TEST_F(HttpListenersTest, MetricsOverTlsKeepsItsCertificateWhenAReloadFails) {
  const std::string pki = dir_.path() + "/pki";
  std::filesystem::create_directories(pki);
  CommandResult made =
      RunCommand({"/usr/bin/python3", SourceDir() + "/tests/tools/make_certs.py", pki});
  ASSERT_EQ(made.exit_code, 0) << made.err;
  std::filesystem::copy_file(pki + "/server.pem", pki + "/tls.pem");
  std::filesystem::copy_file(pki + "/server.key", pki + "/tls.key");
  client::ChannelOptions grpc_tls;
  grpc_tls.address = absl::StrCat("127.0.0.1:", FreePort());
  grpc_tls.ca_file = pki + "/ca.pem";
  const int port = FreePort();
  Custodyd d(dir_.path() + "/state",
             {"--tls_cert=" + pki + "/tls.pem", "--tls_key=" + pki + "/tls.key",
              absl::StrCat("--metrics_listen=127.0.0.1:", port)},
             grpc_tls);
  ASSERT_TRUE(d.started()) << d.log();
  EXPECT_EQ(ServedCommonName(port, pki + "/ca.pem"), "custodyd");
  ExpectMalformedRequestsRefusedOverTls(port, pki + "/ca.pem", "/metrics");

  // Half a renewal: the new certificate, the old key.
  std::filesystem::copy_file(pki + "/server-rotated.pem", pki + "/new.pem");
  std::filesystem::rename(pki + "/new.pem", pki + "/tls.pem");
  std::string line = SighupAndAwait(d, "metrics.tls_reload", 1);
  EXPECT_TRUE(absl::StrContains(line, "\"level\":\"error\"")) << line;
  EXPECT_TRUE(absl::StrContains(line, "is not the key of the certificate")) << line;
  EXPECT_EQ(ServedCommonName(port, pki + "/ca.pem"), "custodyd");
  EXPECT_EQ(
      Curl({"--cacert", pki + "/ca.pem", absl::StrCat("https://127.0.0.1:", port, "/metrics")})
          .status,
      200);

  // Completed.
  std::filesystem::copy_file(pki + "/server-rotated.key", pki + "/new.key");
  std::filesystem::rename(pki + "/new.key", pki + "/tls.key");
  line = SighupAndAwait(d, "metrics.tls_reload", 2);
  EXPECT_TRUE(absl::StrContains(line, "\"result\":\"ok\"")) << line;
  EXPECT_EQ(ServedCommonName(port, pki + "/ca.pem"), "custodyd-rotated");
}

// --http_request_deadline and --http_max_connections apply to both listeners: a half request
// is cut at the deadline (3 s here, not the default 5 s), and past the cap (3) the next connection
// is closed long before that deadline, while a connection's slot, once freed, serves again. The
// margins are wide on purpose (CI runs this beside other tests on two cores): what is shown is
// "refused, not queued until the deadline" and "cut at 3 s, not 5 s".
TEST_F(HttpListenersTest, DeadlineAndConnectionCapFlagsApplyToBothListeners) {
  const int metrics_port = FreePort();
  const int jwks_port = FreePort();
  Custodyd d(dir_.path() + "/state",
             {absl::StrCat("--metrics_listen=127.0.0.1:", metrics_port),
              absl::StrCat("--jwks_listen=127.0.0.1:", jwks_port), "--jwks_publish=op/id-token",
              "--http_request_deadline=3s", "--http_max_connections=3"});
  ASSERT_TRUE(d.started()) << d.log();
  EXPECT_TRUE(absl::StrContains(d.log(), "\"request_deadline\":\"3s\",\"max_connections\":\"3\""))
      << d.log();
  CreateRing(d, "op/id-token", v1::SIGN, "ES256");
  for (int port : {metrics_port, jwks_port}) {
    const std::string path = port == metrics_port ? "/metrics" : "/rings/op/id-token/jwks.json";
    const auto t0 = Clock::now();
    std::vector<int> held;
    for (int i = 0; i < 3; ++i) {
      held.push_back(ConnectLoopback(port));
      SendAll(held.back(), absl::StrCat("GET ", path, " HTTP/1.1\r\nX-Half: "));
    }
    // The fourth is past the cap: closed without a reply, long before the held ones' deadline.
    // (After the three are registered: they are counted when libmicrohttpd reports them started.)
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    const int over = ConnectLoopback(port);
    const auto t_over = Clock::now();
    EXPECT_TRUE(ClosedByPeer(over, 1500)) << port;
    EXPECT_LT(Clock::now() - t_over, std::chrono::milliseconds(1500)) << port;
    close(over);
    // The held ones are cut at the 3 s deadline.
    for (int fd : held) {
      EXPECT_TRUE(ClosedByPeer(fd, 6000)) << port;
      close(fd);
    }
    const double cut_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    EXPECT_GE(cut_ms, 2900) << port;
    EXPECT_LT(cut_ms, 4800) << port << ": the default deadline (5 s), not the flag's 3 s?";
    // Their slots are free again, once libmicrohttpd has cleaned the cut connections up (its
    // thread does that after the close; under load it can take a moment).
    double served_ms = -1;
    for (const auto until = Clock::now() + std::chrono::seconds(3);
         served_ms < 0 && Clock::now() < until;) {
      served_ms = TimedGet(port, path);
      if (served_ms < 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    EXPECT_GE(served_ms, 0) << port << ": no slot freed 3 s after the held connections were cut";
  }
}

TEST_F(HttpListenersTest, SlowClientsHoldNeitherMetricsNorJwks) {
  if (access("/usr/bin/prometheus", X_OK) != 0) {
    GTEST_SKIP() << "Debian's prometheus is not installed (scripts/deps.sh installs it)";
  }
  const int metrics_port = FreePort();
  const int jwks_port = FreePort();
  Custodyd d(dir_.path() + "/state",
             {absl::StrCat("--metrics_listen=127.0.0.1:", metrics_port),
              absl::StrCat("--jwks_listen=127.0.0.1:", jwks_port), "--jwks_publish=op/id-token"});
  ASSERT_TRUE(d.started()) << d.log();
  CreateRing(d, "op/id-token", v1::SIGN, "ES256");
  Prometheus prometheus(dir_.path(), {metrics_port});
  ASSERT_EQ(prometheus.QueryUntil("up{job=\"custody\"}", "1"), "1") << prometheus.log();
  const int threads_before = CountThreads(d.pid());
  const int fds_before = CountFds(d.pid());
  const int rss_before_kb = StatusField(d.pid(), "VmRSS");

  // 200 slow clients, 100 per listener: half requests, tricklers (a byte every 500 ms of a
  // header line that never ends) and idle connections.
  struct Slow {
    int fd;
    int kind;  // 0 half request, 1 trickler, 2 idle
    Clock::time_point opened;
    double cut_ms = -1;
  };
  std::vector<Slow> slow;
  for (int i = 0; i < 200; ++i) {
    const int port = i % 2 == 0 ? metrics_port : jwks_port;
    Slow s{ConnectLoopback(port), i % 3, Clock::now()};
    ASSERT_GE(s.fd, 0) << i;
    if (s.kind == 0) SendAll(s.fd, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: ");
    if (s.kind == 1) SendAll(s.fd, "GET /rings/op/id-token/jwks.json HTTP/1.1\r\nX-Slow: ");
    slow.push_back(s);
  }
  const auto start = Clock::now();
  std::atomic<bool> done{false};
  std::thread trickle([&] {
    while (!done) {
      for (Slow& s : slow) {
        if (s.kind == 1 && s.cut_ms < 0) send(s.fd, "a", 1, MSG_NOSIGNAL | MSG_DONTWAIT);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
    }
  });
  // Watches every slow client for the server's close.
  std::thread watch([&] {
    size_t left = slow.size();
    while (left > 0 && Clock::now() - start < std::chrono::seconds(15)) {
      std::vector<pollfd> fds;
      for (const Slow& s : slow)
        fds.push_back({s.fd, static_cast<short>(s.cut_ms < 0 ? POLLIN : 0), 0});
      if (poll(fds.data(), fds.size(), 50) <= 0) continue;
      for (size_t i = 0; i < fds.size(); ++i) {
        if (slow[i].cut_ms >= 0 || fds[i].revents == 0) continue;
        char buf[256];
        if (recv(slow[i].fd, buf, sizeof(buf), MSG_DONTWAIT) <= 0) {
          slow[i].cut_ms =
              std::chrono::duration<double, std::milli>(Clock::now() - slow[i].opened).count();
          --left;
        }
      }
    }
  });
  // Meanwhile: a scrape and a JWKS GET every 50 ms, each on a new connection.
  std::vector<double> scrape_ms, jwks_ms;
  int threads_during = 0, fds_during = 0, rss_during_kb = 0;
  while (Clock::now() - start < std::chrono::milliseconds(4500)) {
    scrape_ms.push_back(TimedGet(metrics_port, "/metrics"));
    jwks_ms.push_back(TimedGet(jwks_port, "/rings/op/id-token/jwks.json"));
    threads_during = std::max(threads_during, CountThreads(d.pid()));
    fds_during = std::max(fds_during, CountFds(d.pid()));
    rss_during_kb = std::max(rss_during_kb, StatusField(d.pid(), "VmRSS"));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  watch.join();
  done = true;
  trickle.join();
  const int fds_after = CountFds(d.pid());
  for (const Slow& s : slow) close(s.fd);

  EXPECT_EQ(std::count(scrape_ms.begin(), scrape_ms.end(), -1.0), 0);
  EXPECT_EQ(std::count(jwks_ms.begin(), jwks_ms.end(), -1.0), 0);
  EXPECT_LT(P99(scrape_ms), 100) << scrape_ms.size() << " scrapes";
  EXPECT_LT(P99(jwks_ms), 100) << jwks_ms.size() << " JWKS GETs";
  double latest_cut = 0;
  for (const Slow& s : slow) {
    EXPECT_GE(s.cut_ms, 0) << "kind " << s.kind << " never cut off";
    // The request deadline (5 s) and the reaper's 100 ms tick.
    EXPECT_GE(s.cut_ms, 4900) << "kind " << s.kind;
    EXPECT_LT(s.cut_ms, 5750) << "kind " << s.kind;
    latest_cut = std::max(latest_cut, s.cut_ms);
  }
  // libmicrohttpd's two threads per listener: no thread per connection.
  EXPECT_EQ(threads_during, threads_before);
  EXPECT_LE(fds_during, fds_before + 200 + 10);
  EXPECT_LE(fds_after, fds_before + 5);
  // A hanging connection costs its buffers (16 KiB at most), not a thread's stack. Not under
  // ASan: its quarantine keeps freed memory resident, so RSS there measures the sanitizer.
#if !defined(__SANITIZE_ADDRESS__)
  EXPECT_LE(rss_during_kb, rss_before_kb + 200 * 16 + 4096);
#endif
  std::printf(
      "slow clients: 200; scrape p99 %.1f ms (max %.1f, n=%zu), JWKS GET p99 %.1f ms (max %.1f, "
      "n=%zu); cut off after %.0f ms at the latest; custodyd threads %d -> %d, fds %d -> %d -> "
      "%d, RSS %d -> %d kB\n",
      P99(scrape_ms), *std::max_element(scrape_ms.begin(), scrape_ms.end()), scrape_ms.size(),
      P99(jwks_ms), *std::max_element(jwks_ms.begin(), jwks_ms.end()), jwks_ms.size(), latest_cut,
      threads_before, threads_during, fds_before, fds_during, fds_after, rss_before_kb,
      rss_during_kb);

  // Prometheus, scraping every second, saw every scrape of the last 10 s succeed.
  EXPECT_EQ(prometheus.QueryUntil("min_over_time(up{job=\"custody\"}[10s])", "1", 5000), "1");
  const std::string samples =
      prometheus.QueryUntil("count_over_time(up{job=\"custody\"}[10s])", "10", 5000);
  int n = 0;
  EXPECT_TRUE(absl::SimpleAtoi(samples, &n) && n >= 9) << samples;  // scraped all along
}

}  // namespace
}  // namespace custody::testing
