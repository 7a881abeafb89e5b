// custody's HTTP side (/metrics, the public JWKS) on GNU libmicrohttpd: an event-driven server
// (epoll, a pool of `threads` threads), so that connections are served concurrently and a slow
// client holds neither a thread nor anyone else's request. Why libmicrohttpd rather than
// CivetWeb is in docs/design.md.
//
// What a client gets:
// - a deadline for the whole request: from the connection's opening (or the end of its previous
//   reply, with keep-alive) until its reply is sent, `request_deadline`, headers and TLS
//   handshake included; past it the connection is shut down, however slowly it trickles;
// - at most `max_connections` open connections; the excess is accepted and closed at once
//   (refused, not queued);
// - HTTP/1.1 keep-alive; HEAD answered as GET without the body; a malformed request 400 with
//   `Connection: close` (CRLF line ends only, no NUL or bare CR, single spaces in the request
//   line; see docs/design.md for the two cases libmicrohttpd closes without a reply), an
//   oversized one 431 or 414, without waiting for more bytes.
//
// TLS (optional, GnuTLS inside libmicrohttpd): certificate chain and key as PEM files, checked
// again at every handshake and re-read when they change (a rotated certificate is served from
// the next connection on), or when ReloadTls asks. A pair that fails to load (half written, a
// key that is not the certificate's, a missing file) is reported once per version of the files
// (`on_tls_reload`) and the last good pair keeps being served. With a client CA, a request whose
// client certificate does not chain to it gets 403. TLS 1.2 or newer.
//
// Whether an address may be used in clear is the caller's policy (custodyd allows loopback
// only). Thread-safe: handlers run concurrently on the server's threads; Stop may be called from
// any thread; the destructor stops.
#ifndef CUSTODY_METRICS_HTTP_SERVER_H_
#define CUSTODY_METRICS_HTTP_SERVER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace custody::metrics {

struct HttpRequest {
  std::string method;         // "GET", "HEAD", ...
  std::string path;           // without the query
  std::string if_none_match;  // the If-None-Match header, when present
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "text/plain";
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;  // extra headers

  static HttpResponse Text(int status, std::string body, std::string content_type = "text/plain") {
    HttpResponse r;
    r.status = status;
    r.body = std::move(body);
    r.content_type = std::move(content_type);
    return r;
  }
};

class HttpServer {
 public:
  struct Options {
    std::string address;    // HOST:PORT ("127.0.0.1:9464", "[::1]:9464", "0.0.0.0:9464"); port 0
                            // picks a free one (see port())
    std::string tls_cert;   // PEM chain; TLS when set (tls_key required)
    std::string tls_key;    // PEM private key
    std::string client_ca;  // PEM CA bundle; when set, clients must present a certificate
    absl::Duration request_deadline = absl::Seconds(5);
    int max_connections = 512;
    int threads = 2;
    // Called after the TLS files changed and were re-read at a handshake (on a server thread):
    // OK when the new pair is served from now on, else why it was not (the previous pair still
    // is). Not called for the load at Start, nor for ReloadTls, which returns the same.
    std::function<void(const absl::Status&)> on_tls_reload;
  };
  using Handler = std::function<HttpResponse(const HttpRequest&)>;
  using Render = std::function<std::string()>;

  // Binds and starts serving. INVALID_ARGUMENT for a malformed address or option, UNAVAILABLE
  // when it cannot bind, FAILED_PRECONDITION when the TLS files cannot be loaded.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(Options options, Handler handler);
  // The Prometheus endpoint: GET/HEAD /metrics answers the text `render` returns (Content-Type
  // of the 0.0.4 exposition format), other paths 404, other methods 405.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(Options options, Render render);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // The bound port.
  int port() const { return port_; }
  bool serves_tls() const;
  const std::string& tls_cert() const;
  const std::string& tls_key() const;
  // Re-reads the TLS files now, when they differ from the pair being served (e.g. on SIGHUP): OK
  // when the new pair (or the unchanged one) is served from the next connection on;
  // FAILED_PRECONDITION saying why not when it does not load (the previous pair keeps being
  // served), or when the server has no TLS.
  absl::Status ReloadTls();
  // Stops accepting, closes every connection and joins the server's threads.
  void Stop();
  // Requests answered by the handler so far (any status).
  uint64_t requests() const;
  // Connections shut down because they passed the request deadline.
  uint64_t deadline_cutoffs() const;
  // Connections closed at once because max_connections were open.
  uint64_t refused_connections() const;
  // Connections open now.
  size_t open_connections() const;

  struct State;  // libmicrohttpd's daemon and what its callbacks share (http_server.cc)

 private:
  HttpServer(int port, std::unique_ptr<State> state);

  int port_;
  std::unique_ptr<State> state_;
};

}  // namespace custody::metrics

#endif  // CUSTODY_METRICS_HTTP_SERVER_H_
