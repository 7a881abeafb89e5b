// A TLS 1.3 server for provider_rotation_test: libssl with the custody provider loaded into its
// own library context, the key and certificate of custody:ring=... chosen per handshake by
// custody::tls::RotatingCredentials, one thread per connection; it answers "ok" to each.
//
//   tls_rotation_server URI DIR REFRESH_MS
//
// Writes DIR/port once listening. Control files in DIR: "hold" (the next handshake stops right
// after its certificate callback chose its key and certificate, writes DIR/held and waits for
// DIR/release), "stop" (ends the server). At the end prints "handshakes N failures M" and the
// last failure's OpenSSL errors. Exit 2 if the first key and certificate cannot be loaded.
//
// A separate process because custody.so carries its own copy of custody's protobuf messages:
// a process that links them too (the test harness) cannot load the module (docs/provider.md).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "openssl/err.h"
#include "openssl/provider.h"
#include "openssl/ssl.h"
#include "provider/tls_credentials.h"

namespace {

std::string dir;
custody::tls::RotatingCredentials* credentials = nullptr;
std::atomic<int> handshakes{0}, failures{0};
std::mutex mu;
std::string last_failure;

bool Exists(const std::string& name) { return std::filesystem::exists(dir + "/" + name); }
void Touch(const std::string& name) { std::ofstream(dir + "/" + name) << "\n"; }

std::string Errors() {
  std::string out;
  while (unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    out += std::string(buf) + "\n";
  }
  return out;
}

int CertificateCallback(SSL* ssl, void*) {
  const int ok = custody::tls::RotatingCredentials::CertificateCallback(ssl, credentials);
  static std::mutex hold_mu;
  std::lock_guard<std::mutex> lock(hold_mu);  // one held handshake at a time
  if (Exists("hold")) {
    std::filesystem::remove(dir + "/hold");
    Touch("held");
    while (!Exists("release") && !Exists("stop")) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  return ok;
}

void Serve(SSL_CTX* ctx, int conn) {
  SSL* ssl = SSL_new(ctx);
  SSL_set_fd(ssl, conn);
  if (SSL_accept(ssl) == 1) {
    ++handshakes;
    SSL_write(ssl, "ok", 2);
    SSL_shutdown(ssl);
  } else {
    ++failures;
    std::string e = Errors();
    std::lock_guard<std::mutex> lock(mu);
    last_failure = e;
  }
  SSL_free(ssl);
  close(conn);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: tls_rotation_server URI DIR REFRESH_MS\n");
    return 1;
  }
  const std::string uri = argv[1];
  dir = argv[2];
  const auto refresh = std::chrono::milliseconds(std::atoi(argv[3]));
  OSSL_LIB_CTX* libctx = OSSL_LIB_CTX_new();
  if (OSSL_PROVIDER_load(libctx, "custody") == nullptr ||
      OSSL_PROVIDER_load(libctx, "default") == nullptr ||
      EVP_set_default_properties(libctx, "?provider=default") != 1) {
    std::fprintf(stderr, "cannot load the providers:\n%s", Errors().c_str());
    return 1;
  }
  std::string error;
  auto rotating =
      custody::tls::RotatingCredentials::Create(libctx, "?provider=default", uri, refresh, &error);
  if (rotating == nullptr) {
    std::fprintf(stderr, "%s\n%s", error.c_str(), Errors().c_str());
    return 2;
  }
  credentials = rotating.get();
  SSL_CTX* ctx = SSL_CTX_new_ex(libctx, "?provider=default", TLS_server_method());
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_cert_cb(ctx, &CertificateCallback, nullptr);

  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(fd, 64) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    std::perror("listen");
    return 1;
  }
  {
    std::ofstream port(dir + "/port.tmp");
    port << ntohs(addr.sin_port) << "\n";
  }
  std::filesystem::rename(dir + "/port.tmp", dir + "/port");

  std::vector<std::thread> connections;
  while (!Exists("stop")) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 50) <= 0) continue;
    const int conn = accept(fd, nullptr, nullptr);
    if (conn >= 0) connections.emplace_back(Serve, ctx, conn);
  }
  close(fd);
  for (std::thread& t : connections) t.join();
  SSL_CTX_free(ctx);
  std::printf("handshakes %d failures %d\n", handshakes.load(), failures.load());
  if (!rotating->last_error().empty()) {
    std::printf("last reload error: %s\n", rotating->last_error().c_str());
  }
  std::printf("%s", last_failure.c_str());
  return 0;
}
