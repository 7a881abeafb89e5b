// A minimal HTTP/1.1 server for Prometheus scrapes: GET /metrics answers 200 with the text a
// callback renders (Content-Type: the 0.0.4 exposition format); other paths 404, other methods
// 405, a malformed or oversized request 400. One connection at a time on one thread, each
// closed after its reply (Connection: close), with 5 s read/write timeouts, so a stuck client
// delays the next scrape by at most that. Enough for a scraper or two; not a web server.
//
// TLS (optional): certificate chain and key as PEM files, re-read for every connection (a
// rotated certificate is served from the next scrape on); with a client CA every client must
// present a certificate chaining to it (mTLS). TLS 1.2 or newer.
//
// Whether an address may be used in clear is the caller's policy (custodyd allows loopback
// only). Thread-safe: Stop may be called from any thread; the destructor stops.
#ifndef CUSTODY_METRICS_HTTP_SERVER_H_
#define CUSTODY_METRICS_HTTP_SERVER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace custody::metrics {

class HttpServer {
 public:
  struct Options {
    std::string address;    // HOST:PORT ("127.0.0.1:9464", "[::1]:9464", "0.0.0.0:9464"); port 0
                            // picks a free one (see port())
    std::string tls_cert;   // PEM chain; TLS when set (tls_key required)
    std::string tls_key;    // PEM private key
    std::string client_ca;  // PEM CA bundle; when set, clients must present a certificate
  };
  using Render = std::function<std::string()>;

  // Binds and starts serving. INVALID_ARGUMENT for a malformed address, UNAVAILABLE when it
  // cannot bind, FAILED_PRECONDITION when the TLS files cannot be loaded.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(Options options, Render render);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // The bound port.
  int port() const { return port_; }
  // Stops accepting and joins the serving thread (a connection in progress is finished first).
  void Stop();
  // Requests answered so far (any status).
  uint64_t requests() const { return requests_.load(std::memory_order_relaxed); }

 private:
  HttpServer(Options options, Render render, int fd, int port);
  void Loop();
  void Serve(int fd);

  const Options options_;
  const Render render_;
  int listen_fd_;
  int wake_[2] = {-1, -1};
  int port_;
  std::atomic<uint64_t> requests_{0};
  std::thread thread_;
};

}  // namespace custody::metrics

#endif  // CUSTODY_METRICS_HTTP_SERVER_H_
