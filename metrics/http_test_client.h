// For tests only: raw HTTP/1.1 over loopback sockets, byte by byte if need be, so that tests can
// act as the slow, broken or ordinary clients a server meets (metrics_test, the slow-client
// integration test). Header-only; plain POSIX sockets.
#ifndef CUSTODY_METRICS_HTTP_TEST_CLIENT_H_
#define CUSTODY_METRICS_HTTP_TEST_CLIENT_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

namespace custody::metrics::testing {

// A connected socket to 127.0.0.1:port, or -1.
inline int ConnectLoopback(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

inline bool SendAll(int fd, absl::string_view data) {
  while (!data.empty()) {
    ssize_t n = send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n <= 0) return false;
    data.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

// True when `reply` holds one whole response (headers, and Content-Length bytes of body unless
// `head`).
inline bool ResponseComplete(const std::string& reply, bool head = false) {
  size_t end = reply.find("\r\n\r\n");
  if (end == std::string::npos) return false;
  if (head) return true;
  size_t length = 0;
  for (absl::string_view line : absl::StrSplit(reply.substr(0, end), "\r\n")) {
    std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(line, ':');
    if (absl::EqualsIgnoreCase(kv.first, "content-length")) {
      (void)absl::SimpleAtoi(absl::StripAsciiWhitespace(kv.second), &length);
    }
  }
  return reply.size() >= end + 4 + length;
}

// Reads one response (or until the peer closes, or `timeout_ms` pass). Returns what arrived.
inline std::string ReadResponse(int fd, int timeout_ms = 10000, bool head = false) {
  std::string reply;
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (!ResponseComplete(reply, head)) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                          until - std::chrono::steady_clock::now())
                          .count();
    if (left <= 0) break;
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left)) <= 0) break;
    char buf[8192];
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n <= 0) break;
    reply.append(buf, static_cast<size_t>(n));
  }
  return reply;
}

// Waits for the peer to close: true when it did (end of stream or reset) within `timeout_ms`.
inline bool ClosedByPeer(int fd, int timeout_ms) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                          until - std::chrono::steady_clock::now())
                          .count();
    if (left <= 0) return false;
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left)) <= 0) return false;
    char buf[4096];
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n <= 0) return true;
  }
}

// One request on a fresh connection; "connect failed" when nothing listens.
inline std::string Exchange(int port, const std::string& request, int timeout_ms = 10000) {
  int fd = ConnectLoopback(port);
  if (fd < 0) return "connect failed";
  SendAll(fd, request);
  std::string reply = ReadResponse(fd, timeout_ms, request.rfind("HEAD ", 0) == 0);
  close(fd);
  return reply;
}

// Requests libmicrohttpd 0.9.75 parses leniently and custody answers 400 (and closes): bare LF
// line ends, a NUL or bare CR, extra spaces, whitespace before a field's colon, a folded field.
// Each asks for `path`, so that an accepted one would get a 200.
struct MalformedRequest {
  const char* what;
  std::string bytes;
};
inline std::vector<MalformedRequest> MalformedRequests(const std::string& path) {
  using namespace std::string_literals;
  const std::string get = "GET " + path + " HTTP/1.1";
  return {
      {"LF-only line ends", get + "\nHost: x\n\n"},
      {"LF-only, no field", get + "\n\n"},
      {"CRLF, then a bare LF", get + "\r\nHost: x\n\r\n"},
      {"a bare LF ending the head", get + "\r\nHost: x\r\n\n"},
      {"an empty field value, then a bare LF", get + "\r\nX:\nHost: x\r\n\r\n"},
      {"a NUL in the target", "GET " + path + "\0x HTTP/1.1\r\n\r\n"s},
      {"a NUL in the method", "G\0ET "s + path + " HTTP/1.1\r\n\r\n"},
      {"a NUL in a field value", get + "\r\nX: a\0b\r\n\r\n"s},
      {"a NUL line among the fields", get + "\r\n\0\r\n\r\n"s},
      {"a bare CR in a field value", get + "\r\nX: a\rb\r\n\r\n"},
      {"two spaces after the method", "GET  " + path + " HTTP/1.1\r\n\r\n"},
      {"a space in the target", "GET " + path + " x HTTP/1.1\r\n\r\n"},
      {"a space before a colon", get + "\r\nHost : x\r\n\r\n"},
      {"a folded field", get + "\r\nX: a\r\n b\r\n\r\n"},
  };
}

// The 99th percentile (nearest rank: the smallest value at least 99% of `v` do not exceed).
inline double P99(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[(v.size() * 99 + 99) / 100 - 1];
}

}  // namespace custody::metrics::testing

#endif  // CUSTODY_METRICS_HTTP_TEST_CLIENT_H_
