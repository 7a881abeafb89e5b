#include "metrics/http_server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "metrics/exposition.h"
#include "openssl/err.h"
#include "openssl/ssl.h"

namespace custody::metrics {
namespace {

constexpr size_t kMaxRequestBytes = 8192;
constexpr int kIoTimeoutSeconds = 5;

struct SslCtxDeleter {
  void operator()(SSL_CTX* c) const { SSL_CTX_free(c); }
};
struct SslDeleter {
  void operator()(SSL* s) const { SSL_free(s); }
};
using SslCtxPtr = std::unique_ptr<SSL_CTX, SslCtxDeleter>;
using SslPtr = std::unique_ptr<SSL, SslDeleter>;

std::string SslError() {
  unsigned long e = ERR_get_error();
  char buf[256];
  ERR_error_string_n(e, buf, sizeof(buf));
  ERR_clear_error();
  return buf;
}

absl::StatusOr<SslCtxPtr> MakeTlsContext(const HttpServer::Options& o) {
  SslCtxPtr ctx(SSL_CTX_new(TLS_server_method()));
  if (ctx == nullptr) return absl::InternalError("SSL_CTX_new failed");
  SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION);
  if (SSL_CTX_use_certificate_chain_file(ctx.get(), o.tls_cert.c_str()) != 1 ||
      SSL_CTX_use_PrivateKey_file(ctx.get(), o.tls_key.c_str(), SSL_FILETYPE_PEM) != 1 ||
      SSL_CTX_check_private_key(ctx.get()) != 1) {
    return absl::FailedPreconditionError(absl::StrCat("metrics TLS: cannot load '", o.tls_cert,
                                                      "' / '", o.tls_key, "': ", SslError()));
  }
  if (!o.client_ca.empty()) {
    if (SSL_CTX_load_verify_locations(ctx.get(), o.client_ca.c_str(), nullptr) != 1) {
      return absl::FailedPreconditionError(
          absl::StrCat("metrics TLS: cannot load client CA '", o.client_ca, "': ", SslError()));
    }
    SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  }
  return ctx;
}

// One connection's byte stream, in clear or through TLS.
class Stream {
 public:
  Stream(int fd, SSL* ssl) : fd_(fd), ssl_(ssl) {}
  // Bytes read (0 at end of stream or on error/timeout).
  size_t Read(char* buf, size_t n) {
    if (ssl_ != nullptr) {
      size_t got = 0;
      return SSL_read_ex(ssl_, buf, n, &got) == 1 ? got : 0;
    }
    ssize_t got = read(fd_, buf, n);
    return got > 0 ? static_cast<size_t>(got) : 0;
  }
  bool WriteAll(const std::string& data) {
    size_t off = 0;
    while (off < data.size()) {
      size_t wrote = 0;
      if (ssl_ != nullptr) {
        if (SSL_write_ex(ssl_, data.data() + off, data.size() - off, &wrote) != 1) return false;
      } else {
        ssize_t w = send(fd_, data.data() + off, data.size() - off, MSG_NOSIGNAL);
        if (w <= 0) return false;
        wrote = static_cast<size_t>(w);
      }
      off += wrote;
    }
    return true;
  }

 private:
  int fd_;
  SSL* ssl_;
};

std::string Response(int code, absl::string_view reason, absl::string_view content_type,
                     absl::string_view body) {
  return absl::StrCat("HTTP/1.1 ", code, " ", reason, "\r\nContent-Type: ", content_type,
                      "\r\nContent-Length: ", body.size(), "\r\nConnection: close\r\n\r\n", body);
}

absl::StatusOr<std::pair<std::string, std::string>> SplitHostPort(const std::string& address) {
  size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError(absl::StrCat("'", address, "' is not HOST:PORT"));
  }
  std::string host = address.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  int port = -1;
  if (!absl::SimpleAtoi(address.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("'", address, "' has no valid port"));
  }
  return std::make_pair(host, address.substr(colon + 1));
}

}  // namespace

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(Options options, Render render) {
  if (!options.tls_cert.empty() || !options.tls_key.empty()) {
    if (options.tls_cert.empty() || options.tls_key.empty()) {
      return absl::InvalidArgumentError("metrics TLS needs both a certificate and a key");
    }
    auto ctx = MakeTlsContext(options);  // fail at startup, not at the first scrape
    if (!ctx.ok()) return ctx.status();
  }
  auto host_port = SplitHostPort(options.address);
  if (!host_port.ok()) return host_port.status();
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  if (int rc = getaddrinfo(host_port->first.c_str(), host_port->second.c_str(), &hints, &found);
      rc != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot resolve '", options.address, "': ", gai_strerror(rc)));
  }
  int fd = -1;
  std::string why = "no address";
  for (addrinfo* a = found; a != nullptr && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 || listen(fd, 16) != 0) {
      why = std::strerror(errno);
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(found);
  if (fd < 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on '", options.address, "': ", why));
  }
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
  const int port =
      ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                        : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  std::unique_ptr<HttpServer> server(
      new HttpServer(std::move(options), std::move(render), fd, port));
  if (pipe2(server->wake_, O_CLOEXEC) != 0) {
    return absl::InternalError(absl::StrCat("pipe2: ", std::strerror(errno)));
  }
  server->thread_ = std::thread([s = server.get()] { s->Loop(); });
  return server;
}

HttpServer::HttpServer(Options options, Render render, int fd, int port)
    : options_(std::move(options)), render_(std::move(render)), listen_fd_(fd), port_(port) {}

HttpServer::~HttpServer() {
  Stop();
  for (int fd : {listen_fd_, wake_[0], wake_[1]}) {
    if (fd >= 0) close(fd);
  }
}

void HttpServer::Stop() {
  if (!thread_.joinable()) return;
  char c = 0;
  (void)!write(wake_[1], &c, 1);
  thread_.join();
  // Closed here, not in the destructor, so that nothing can connect to a server that no
  // longer answers.
  close(listen_fd_);
  listen_fd_ = -1;
}

void HttpServer::Loop() {
  for (;;) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_[0], POLLIN, 0}};
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (fds[1].revents != 0) return;
    if ((fds[0].revents & POLLIN) == 0) continue;
    int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    timeval timeout{kIoTimeoutSeconds, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
    Serve(fd);
    close(fd);
  }
}

void HttpServer::Serve(int fd) {
  SslCtxPtr ctx;
  SslPtr ssl;
  if (!options_.tls_cert.empty()) {
    auto made = MakeTlsContext(options_);
    if (!made.ok()) return;  // the files went away; the scrape fails, the next may work
    ctx = *std::move(made);
    ssl.reset(SSL_new(ctx.get()));
    if (ssl == nullptr || SSL_set_fd(ssl.get(), fd) != 1 || SSL_accept(ssl.get()) != 1) {
      ERR_clear_error();
      return;
    }
  }
  Stream stream(fd, ssl.get());
  std::string request;
  char buf[2048];
  while (request.find("\r\n\r\n") == std::string::npos) {
    if (request.size() > kMaxRequestBytes) break;
    size_t n = stream.Read(buf, sizeof(buf));
    if (n == 0) break;
    request.append(buf, n);
  }
  requests_.fetch_add(1, std::memory_order_relaxed);
  std::string reply;
  const size_t end = request.find("\r\n");
  std::vector<std::string> parts =
      absl::StrSplit(request.substr(0, end == std::string::npos ? 0 : end), ' ');
  if (request.find("\r\n\r\n") == std::string::npos || parts.size() != 3 ||
      !absl::StartsWith(parts[2], "HTTP/1.")) {
    reply = Response(400, "Bad Request", "text/plain", "bad request\n");
  } else if (parts[0] != "GET" && parts[0] != "HEAD") {
    reply = Response(405, "Method Not Allowed", "text/plain", "only GET\n");
  } else if (const std::string path = parts[1].substr(0, parts[1].find('?')); path != "/metrics") {
    reply = Response(404, "Not Found", "text/plain", "metrics are at /metrics\n");
  } else {
    std::string body = render_();
    reply = Response(200, "OK", kExpositionContentType, parts[0] == "HEAD" ? "" : body);
    if (parts[0] == "HEAD") {
      // Same headers as GET (Content-Length of the body it would send), no body.
      reply = absl::StrCat("HTTP/1.1 200 OK\r\nContent-Type: ", kExpositionContentType,
                           "\r\nContent-Length: ", body.size(), "\r\nConnection: close\r\n\r\n");
    }
  }
  stream.WriteAll(reply);
  if (ssl != nullptr) SSL_shutdown(ssl.get());
}

}  // namespace custody::metrics
