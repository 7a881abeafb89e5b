#include "metrics/http_server.h"

#include <arpa/inet.h>
#include <gnutls/abstract.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <map>
#include <optional>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/regular_file.h"
#include "metrics/exposition.h"
#include "metrics/http_request_head.h"

namespace custody::metrics {
namespace {

// Request line and headers; more is refused with 431 (or 414 for the URI) at once.
constexpr size_t kConnectionMemoryBytes = 16 * 1024;

// A certificate chain and its key, as GnuTLS hands them to a handshake.
class TlsCredentials {
 public:
  static absl::StatusOr<std::unique_ptr<TlsCredentials>> Load(const std::string& cert_path,
                                                              const std::string& key_path) {
    auto cert = ReadWholeFile(cert_path);
    if (!cert.ok()) return cert.status();
    auto key = ReadWholeFile(key_path);
    if (!key.ok()) return key.status();
    auto fail = [&](absl::string_view what, int rc) {
      return absl::FailedPreconditionError(absl::StrCat("TLS: cannot load '", cert_path, "' / '",
                                                        key_path, "': ", what, ": ",
                                                        gnutls_strerror(rc)));
    };
    std::unique_ptr<TlsCredentials> c(new TlsCredentials);
    unsigned count = kMaxChain;
    gnutls_datum_t cert_pem{reinterpret_cast<unsigned char*>(cert->data()),
                            static_cast<unsigned>(cert->size())};
    if (int rc =
            gnutls_pcert_list_import_x509_raw(c->chain_, &count, &cert_pem, GNUTLS_X509_FMT_PEM, 0);
        rc < 0) {
      return fail("certificate chain", rc);
    }
    c->chain_length_ = count;
    if (count == 0) return fail("certificate chain", GNUTLS_E_NO_CERTIFICATE_FOUND);
    gnutls_datum_t key_pem{reinterpret_cast<unsigned char*>(key->data()),
                           static_cast<unsigned>(key->size())};
    if (int rc = gnutls_privkey_init(&c->key_); rc < 0) return fail("key", rc);
    if (int rc = gnutls_privkey_import_x509_raw(c->key_, &key_pem, GNUTLS_X509_FMT_PEM, nullptr, 0);
        rc < 0) {
      return fail("key", rc);
    }
    if (!c->KeyMatchesCertificate()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "TLS: the key '", key_path, "' is not the key of the certificate '", cert_path, "'"));
    }
    return c;
  }
  ~TlsCredentials() {
    for (unsigned i = 0; i < chain_length_; ++i) gnutls_pcert_deinit(&chain_[i]);
    if (key_ != nullptr) gnutls_privkey_deinit(key_);
  }
  void Hand(gnutls_pcert_st** chain, unsigned* length, gnutls_privkey_t* key) {
    *chain = chain_;
    *length = chain_length_;
    *key = key_;
  }

 private:
  static constexpr unsigned kMaxChain = 16;
  TlsCredentials() = default;
  bool KeyMatchesCertificate() const {
    gnutls_pubkey_t pub = nullptr;
    if (gnutls_pubkey_init(&pub) < 0) return false;
    gnutls_datum_t a{}, b{};
    bool same = gnutls_pubkey_import_privkey(pub, key_, 0, 0) >= 0 &&
                gnutls_pubkey_export2(pub, GNUTLS_X509_FMT_DER, &a) >= 0 &&
                gnutls_pubkey_export2(chain_[0].pubkey, GNUTLS_X509_FMT_DER, &b) >= 0 &&
                a.size == b.size && std::memcmp(a.data, b.data, a.size) == 0;
    gnutls_free(a.data);
    gnutls_free(b.data);
    gnutls_pubkey_deinit(pub);
    return same;
  }
  gnutls_pcert_st chain_[kMaxChain];
  unsigned chain_length_ = 0;
  gnutls_privkey_t key_ = nullptr;
};

// What identifies a version of a file: a rotated certificate changes at least one of these.
std::string FileStamp(const std::string& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) return "";
  return absl::StrCat(st.st_dev, ":", st.st_ino, ":", st.st_size, ":", st.st_mtim.tv_sec, ".",
                      st.st_mtim.tv_nsec);
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

// A listening socket on `address` (libmicrohttpd is handed the socket, so that IPv4, IPv6 and
// names resolve the same way for every listener).
absl::StatusOr<int> Listen(const std::string& address) {
  auto host_port = SplitHostPort(address);
  if (!host_port.ok()) return host_port.status();
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  if (int rc = getaddrinfo(host_port->first.c_str(), host_port->second.c_str(), &hints, &found);
      rc != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot resolve '", address, "': ", gai_strerror(rc)));
  }
  int fd = -1;
  std::string why = "no address";
  for (addrinfo* a = found; a != nullptr && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) continue;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 || listen(fd, SOMAXCONN) != 0) {
      why = std::strerror(errno);
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(found);
  if (fd < 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on '", address, "': ", why));
  }
  return fd;
}

int BoundPort(int fd) {
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
  return ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                           : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
}

}  // namespace

struct HttpServer::State {
  HttpServer::Options options;
  HttpServer::Handler handler;
  std::string client_ca_pem;  // kept alive for libmicrohttpd
  MHD_Daemon* daemon = nullptr;
  std::atomic<uint64_t> requests{0};

  // TLS: every generation loaded stays alive until the server stops, since a handshake in
  // flight may still use the one it was handed (rotations are rare; each is a few KB).
  absl::Mutex tls_mu;
  std::vector<std::unique_ptr<TlsCredentials>> tls_generations ABSL_GUARDED_BY(tls_mu);
  std::string tls_stamp ABSL_GUARDED_BY(tls_mu);         // of the pair served
  std::string tls_failed_stamp ABSL_GUARDED_BY(tls_mu);  // of the last pair that did not load

  // The request deadline: each open connection and when its current request began.
  struct Connection {
    int fd;
    std::chrono::steady_clock::time_point since;
    bool cut = false;
  };
  mutable absl::Mutex mu;
  absl::CondVar wake;
  bool stopping ABSL_GUARDED_BY(mu) = false;
  std::map<MHD_Connection*, Connection> open ABSL_GUARDED_BY(mu);
  uint64_t cutoffs ABSL_GUARDED_BY(mu) = 0;
  uint64_t refused ABSL_GUARDED_BY(mu) = 0;
  std::thread reaper;

  std::string TlsStamp() const {
    return absl::StrCat(FileStamp(options.tls_cert), "|", FileStamp(options.tls_key));
  }

  // Loads the files (whose version is `stamp`) as the pair served from now on, or says why not.
  absl::Status LoadTls(const std::string& stamp) ABSL_EXCLUSIVE_LOCKS_REQUIRED(tls_mu) {
    auto loaded = TlsCredentials::Load(options.tls_cert, options.tls_key);
    if (!loaded.ok()) {
      tls_failed_stamp = stamp;
      return loaded.status();
    }
    tls_generations.push_back(*std::move(loaded));
    tls_stamp = stamp;
    tls_failed_stamp.clear();
    return absl::OkStatus();
  }

  // The current credentials, re-read first when the files changed. Null when none load.
  TlsCredentials* CurrentTls() {
    std::optional<absl::Status> reloaded;
    TlsCredentials* current = nullptr;
    {
      absl::MutexLock lock(&tls_mu);
      const std::string stamp = TlsStamp();
      // A half-written rotation (new certificate, old key) fails to load: the last good pair
      // is kept, and the files are tried again once they change again.
      if (stamp != tls_stamp && stamp != tls_failed_stamp) {
        const bool first = tls_generations.empty();
        absl::Status s = LoadTls(stamp);
        if (!first) reloaded = std::move(s);
      }
      if (!tls_generations.empty()) current = tls_generations.back().get();
    }
    if (reloaded.has_value() && options.on_tls_reload) options.on_tls_reload(*reloaded);
    return current;
  }

  void Reap() {
    const auto deadline = absl::ToChronoMilliseconds(options.request_deadline);
    const absl::Duration tick =
        std::clamp(options.request_deadline / 20, absl::Milliseconds(5), absl::Milliseconds(100));
    absl::MutexLock lock(&mu);
    while (!stopping) {
      wake.WaitWithTimeout(&mu, tick);
      const auto now = std::chrono::steady_clock::now();
      for (auto& [connection, c] : open) {
        if (!c.cut && now - c.since > deadline) {
          // libmicrohttpd sees the end of the stream and closes the connection itself; the fd
          // stays ours to touch until its CLOSED notification, which takes `mu`. Closed with a
          // reset: a reply the client was not reading is dropped, not left to drain.
          linger reset{1, 0};
          setsockopt(c.fd, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
          shutdown(c.fd, SHUT_RDWR);
          c.cut = true;
          ++cutoffs;
        }
      }
    }
  }
};

namespace {

// The TLS certificate callback of libmicrohttpd carries no closure: connections are found by
// their socket, registered when they open.
absl::Mutex registry_mu(absl::kConstInit);
std::map<int, HttpServer::State*>& Registry() {
  static auto* registry = new std::map<int, HttpServer::State*>;
  return *registry;
}

int RetrieveCertificate(gnutls_session_t session, const gnutls_datum_t*, int,
                        const gnutls_pk_algorithm_t*, int, gnutls_pcert_st** chain,
                        unsigned int* length, gnutls_privkey_t* key) {
  HttpServer::State* state = nullptr;
  {
    absl::MutexLock lock(&registry_mu);
    auto it = Registry().find(gnutls_transport_get_int(session));
    if (it != Registry().end()) state = it->second;
  }
  TlsCredentials* credentials = state == nullptr ? nullptr : state->CurrentTls();
  if (credentials == nullptr) return -1;
  credentials->Hand(chain, length, key);
  return 0;
}

void OnConnection(void* cls, MHD_Connection* connection, void**,
                  enum MHD_ConnectionNotificationCode code) {
  auto* state = static_cast<HttpServer::State*>(cls);
  const MHD_ConnectionInfo* info =
      MHD_get_connection_info(connection, MHD_CONNECTION_INFO_CONNECTION_FD);
  const int fd = info == nullptr ? -1 : info->connect_fd;
  if (code == MHD_CONNECTION_NOTIFY_STARTED) {
    // A reply goes out as a few writes (TLS records: headers, then body); with Nagle the last
    // waits for the client's delayed ACK, 40 ms on Linux.
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    {
      absl::MutexLock lock(&state->mu);
      state->open[connection] = {fd, std::chrono::steady_clock::now()};
    }
    absl::MutexLock lock(&registry_mu);
    Registry()[fd] = state;
  } else {
    {
      absl::MutexLock lock(&registry_mu);
      Registry().erase(fd);
    }
    absl::MutexLock lock(&state->mu);
    state->open.erase(connection);
  }
}

// A reply sent: with keep-alive, the next request's deadline runs from here.
void OnCompleted(void* cls, MHD_Connection* connection, void**, enum MHD_RequestTerminationCode) {
  auto* state = static_cast<HttpServer::State*>(cls);
  absl::MutexLock lock(&state->mu);
  if (auto it = state->open.find(connection); it != state->open.end()) {
    it->second.since = std::chrono::steady_clock::now();
  }
}

// With a client CA, the client certificate libmicrohttpd asked for must chain to it.
bool ClientCertificateVerifies(MHD_Connection* connection) {
  const MHD_ConnectionInfo* info =
      MHD_get_connection_info(connection, MHD_CONNECTION_INFO_GNUTLS_SESSION);
  if (info == nullptr) return false;
  auto session = static_cast<gnutls_session_t>(info->tls_session);
  unsigned int status = 0;
  return gnutls_certificate_type_get(session) == GNUTLS_CRT_X509 &&
         gnutls_certificate_verify_peers2(session, &status) == GNUTLS_E_SUCCESS && status == 0;
}

// Past max_connections a new connection is closed as soon as it is accepted (libmicrohttpd's
// own limit, set higher, would instead stop accepting and leave it queued in the kernel).
MHD_Result Admit(void* cls, const sockaddr*, socklen_t) {
  auto* state = static_cast<HttpServer::State*>(cls);
  absl::MutexLock lock(&state->mu);
  if (state->open.size() < static_cast<size_t>(state->options.max_connections)) return MHD_YES;
  ++state->refused;
  return MHD_NO;
}

// A request's state (libmicrohttpd's per-request pointer) once its head was checked: the body
// is being discarded. Before, it is what CheckRequestTarget returned (http_request_head.h).
char head_checked;

MHD_Result Queue(MHD_Connection* connection, const HttpResponse& reply) {
  MHD_Response* response = MHD_create_response_from_buffer(
      reply.body.size(), const_cast<char*>(reply.body.data()), MHD_RESPMEM_MUST_COPY);
  if (response == nullptr) return MHD_NO;
  MHD_add_response_header(response, "Content-Type", reply.content_type.c_str());
  for (const auto& [name, value] : reply.headers) {
    MHD_add_response_header(response, name.c_str(), value.c_str());
  }
  MHD_Result queued = MHD_queue_response(connection, static_cast<unsigned>(reply.status), response);
  MHD_destroy_response(response);
  return queued;
}

MHD_Result Answer(void* cls, MHD_Connection* connection, const char* url, const char* method,
                  const char* version, const char*, size_t* upload_size, void** request_state) {
  auto* state = static_cast<HttpServer::State*>(cls);
  // The first call has the headers; a reply queued there would end keep-alive, so it is sent
  // from the call after the (discarded) body. A malformed head is answered there, and the
  // connection closed: where it ends is unknown.
  if (*request_state != &head_checked) {
    if (!HeadIsWellFormed(connection, url, method, version, *request_state)) {
      HttpResponse reply = HttpResponse::Text(
          400,
          "malformed request: HTTP/1.1 wants CRLF line ends, no NUL or bare CR, and "
          "METHOD SP TARGET SP HTTP/1.1\n");
      reply.headers.emplace_back("Connection", "close");
      return Queue(connection, reply);
    }
    *request_state = &head_checked;
    return MHD_YES;
  }
  if (*upload_size != 0) {
    *upload_size = 0;  // bodies are not read: every answer here is for GET and HEAD
    return MHD_YES;
  }
  HttpResponse reply;
  if (!state->client_ca_pem.empty() && !ClientCertificateVerifies(connection)) {
    reply =
        HttpResponse::Text(403, "a client certificate issued by the configured CA is required\n");
  } else {
    HttpRequest request;
    request.method = method;
    request.path = url;
    if (const char* etag =
            MHD_lookup_connection_value(connection, MHD_HEADER_KIND, "If-None-Match")) {
      request.if_none_match = etag;
    }
    reply = state->handler(request);
  }
  state->requests.fetch_add(1, std::memory_order_relaxed);
  return Queue(connection, reply);
}

}  // namespace

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(Options options, Handler handler) {
  const bool tls = !options.tls_cert.empty() || !options.tls_key.empty();
  if (tls && (options.tls_cert.empty() || options.tls_key.empty())) {
    return absl::InvalidArgumentError("TLS needs both a certificate and a key");
  }
  if (options.request_deadline < absl::Milliseconds(10) || options.max_connections < 1 ||
      options.threads < 1) {
    return absl::InvalidArgumentError(
        "the request deadline must be at least 10 ms, connections and threads at least 1");
  }
  auto state = std::make_unique<State>();
  state->options = std::move(options);
  state->handler = std::move(handler);
  const Options& o = state->options;
  if (tls) {
    // Fail at startup, not at the first scrape.
    if (state->CurrentTls() == nullptr) {
      return TlsCredentials::Load(o.tls_cert, o.tls_key).status();
    }
    if (!o.client_ca.empty()) {
      auto ca = ReadWholeFile(o.client_ca);
      if (!ca.ok()) return ca.status();
      gnutls_x509_crt_t* certs = nullptr;
      unsigned count = 0;
      gnutls_datum_t pem{reinterpret_cast<unsigned char*>(ca->data()),
                         static_cast<unsigned>(ca->size())};
      if (gnutls_x509_crt_list_import2(&certs, &count, &pem, GNUTLS_X509_FMT_PEM, 0) < 0 ||
          count == 0) {
        return absl::FailedPreconditionError(
            absl::StrCat("TLS: no certificate in the client CA bundle '", o.client_ca, "'"));
      }
      for (unsigned i = 0; i < count; ++i) gnutls_x509_crt_deinit(certs[i]);
      gnutls_free(certs);
      state->client_ca_pem = *std::move(ca);
    }
  }
  auto fd = Listen(o.address);
  if (!fd.ok()) return fd.status();
  const int port = BoundPort(*fd);

  unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_USE_ITC;
  if (tls) flags |= MHD_USE_TLS;
  // libmicrohttpd's own inactivity timeout (whole seconds) is only the net under the deadline.
  const unsigned idle_seconds =
      static_cast<unsigned>(std::ceil(absl::ToDoubleSeconds(o.request_deadline))) + 1;
  const unsigned threads = static_cast<unsigned>(o.threads);
  // Room above the cap for connections Admit is about to refuse.
  const unsigned limit = static_cast<unsigned>(o.max_connections) + 64;
  const size_t memory = kConnectionMemoryBytes;
  auto* on_connection = &OnConnection;
  auto* on_completed = &OnCompleted;
  auto* check_target = &CheckRequestTarget;
#define CUSTODY_MHD_COMMON_OPTIONS                                                             \
  MHD_OPTION_LISTEN_SOCKET, *fd, MHD_OPTION_THREAD_POOL_SIZE, threads,                         \
      MHD_OPTION_CONNECTION_LIMIT, limit, MHD_OPTION_CONNECTION_TIMEOUT, idle_seconds,         \
      MHD_OPTION_CONNECTION_MEMORY_LIMIT, memory, MHD_OPTION_NOTIFY_CONNECTION, on_connection, \
      state.get(), MHD_OPTION_NOTIFY_COMPLETED, on_completed, state.get(),                     \
      MHD_OPTION_URI_LOG_CALLBACK, check_target, nullptr
  if (!tls) {
    state->daemon = MHD_start_daemon(flags, 0, &Admit, state.get(), &Answer, state.get(),
                                     CUSTODY_MHD_COMMON_OPTIONS, MHD_OPTION_END);
  } else {
    const char* priorities = "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2";
    gnutls_certificate_retrieve_function2* retrieve = &RetrieveCertificate;
    // Without a client CA the priorities are given twice rather than the trust store once.
    const bool ca = !state->client_ca_pem.empty();
    state->daemon = MHD_start_daemon(
        flags, 0, &Admit, state.get(), &Answer, state.get(), CUSTODY_MHD_COMMON_OPTIONS,
        MHD_OPTION_HTTPS_CERT_CALLBACK, retrieve, MHD_OPTION_HTTPS_PRIORITIES, priorities,
        ca ? MHD_OPTION_HTTPS_MEM_TRUST : MHD_OPTION_HTTPS_PRIORITIES,
        ca ? state->client_ca_pem.c_str() : priorities, MHD_OPTION_END);
  }
#undef CUSTODY_MHD_COMMON_OPTIONS
  if (state->daemon == nullptr) {
    close(*fd);
    return absl::InternalError(absl::StrCat("cannot start the HTTP server on '", o.address, "'"));
  }
  state->reaper = std::thread([s = state.get()] { s->Reap(); });
  return std::unique_ptr<HttpServer>(new HttpServer(port, std::move(state)));
}

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(Options options, Render render) {
  return Start(std::move(options), [render = std::move(render)](const HttpRequest& request) {
    if (request.method != "GET" && request.method != "HEAD") {
      return HttpResponse::Text(405, "only GET\n");
    }
    if (request.path != "/metrics") {
      return HttpResponse::Text(404, "metrics are at /metrics\n");
    }
    return HttpResponse::Text(200, render(), std::string(kExpositionContentType));
  });
}

HttpServer::HttpServer(int port, std::unique_ptr<State> state)
    : port_(port), state_(std::move(state)) {}

HttpServer::~HttpServer() { Stop(); }

void HttpServer::Stop() {
  if (state_->daemon == nullptr) return;
  // Closes the listening socket and every connection (their CLOSED notifications run here).
  MHD_stop_daemon(state_->daemon);
  state_->daemon = nullptr;
  {
    absl::MutexLock lock(&state_->mu);
    state_->stopping = true;
  }
  state_->wake.SignalAll();
  state_->reaper.join();
}

bool HttpServer::serves_tls() const { return !state_->options.tls_cert.empty(); }
const std::string& HttpServer::tls_cert() const { return state_->options.tls_cert; }
const std::string& HttpServer::tls_key() const { return state_->options.tls_key; }

absl::Status HttpServer::ReloadTls() {
  if (!serves_tls()) return absl::FailedPreconditionError("this listener does not serve TLS");
  absl::MutexLock lock(&state_->tls_mu);
  const std::string stamp = state_->TlsStamp();
  if (stamp == state_->tls_stamp) return absl::OkStatus();  // the files served, unchanged
  return state_->LoadTls(stamp);
}

uint64_t HttpServer::requests() const { return state_->requests.load(std::memory_order_relaxed); }

uint64_t HttpServer::deadline_cutoffs() const {
  absl::MutexLock lock(&state_->mu);
  return state_->cutoffs;
}

uint64_t HttpServer::refused_connections() const {
  absl::MutexLock lock(&state_->mu);
  return state_->refused;
}

size_t HttpServer::open_connections() const {
  absl::MutexLock lock(&state_->mu);
  return state_->open.size();
}

}  // namespace custody::metrics
