// Rotation of a TLS ring with certificates (issue 16, test 4): a real TLS 1.3 server
// (tests/tools/tls_rotation_server: libssl, the custody provider loaded into its own library
// context, key and certificate from custody:ring=... through custody::tls::RotatingCredentials)
// answers concurrent handshakes from this process while the ring rotates against the real
// custodyd on SoftHSM2. New
// handshakes after the rotation get the new key and certificate; a handshake that chose the old
// pair before the rotation (held in the certificate callback across it) still completes;
// a key pinned to the old version signs for --retired_sign_grace and is refused after it.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "openssl/err.h"
#include "openssl/evp.h"
#include "openssl/pem.h"
#include "openssl/ssl.h"
#include "tests/testing/harness.h"

namespace custody::testing {
namespace {

// The server loads custody.so; sanitized builds skip like provider_integration_test (a
// sanitized module in an uninstrumented openssl CLI cannot load; the grace test uses the CLI).
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

constexpr auto kRefresh = std::chrono::milliseconds(200);
constexpr int kGraceMs = 4000;

using Clock = std::chrono::steady_clock;

std::string Hex(const unsigned char* p, size_t n) {
  static const char* kDigits = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < n; ++i) {
    out.push_back(kDigits[p[i] >> 4]);
    out.push_back(kDigits[p[i] & 15]);
  }
  return out;
}

std::string Thumbprint(const X509* cert) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (X509_digest(cert, EVP_sha256(), md, &len) != 1) return "";
  return Hex(md, len);
}

std::string FileThumbprint(const std::string& path) {
  FILE* f = fopen(path.c_str(), "r");
  if (f == nullptr) return "";
  X509* cert = PEM_read_X509(f, nullptr, nullptr, nullptr);
  fclose(f);
  std::string out = cert == nullptr ? "" : Thumbprint(cert);
  X509_free(cert);
  return out;
}

std::string DrainErrors() {  // the client side's
  std::string out;
  while (unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    out += std::string(buf) + "\n";
  }
  return out;
}

struct Handshake {
  bool ok = false;
  std::string thumbprint;  // of the server certificate the client verified
  std::string error;
  Clock::time_point start, end;
};

// A TLS 1.3 client (default library context, no custody) that verifies the server's chain to
// the test CA and the name "localhost", and reads the server's "ok".
Handshake Connect(SSL_CTX* ctx, int port) {
  Handshake h;
  h.start = Clock::now();
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  SSL* ssl = nullptr;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    h.error = "connect failed";
  } else {
    ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    SSL_set1_host(ssl, "localhost");
    char buf[2];
    if (SSL_connect(ssl) == 1 && SSL_read(ssl, buf, 2) == 2) {
      X509* peer = SSL_get1_peer_certificate(ssl);
      h.ok = peer != nullptr && SSL_get_verify_result(ssl) == X509_V_OK;
      if (peer != nullptr) h.thumbprint = Thumbprint(peer);
      X509_free(peer);
    } else {
      h.error = DrainErrors();
    }
  }
  SSL_free(ssl);
  close(fd);
  h.end = Clock::now();
  return h;
}

class ProviderRotationTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (kSanitized) return;
    dir_ = new TempDir();
    daemon_ = new Custodyd(
        Path("state"),
        WithLowPolicyFloors({"--retired_sign_grace=" + std::to_string(kGraceMs) + "ms"}));
    ASSERT_TRUE(daemon_->started()) << daemon_->log();
    CommandResult r =
        RunCommand({"openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", Path("ca.key"), "-subj",
                    "/CN=custody rotation test CA", "-days", "1", "-out", Path("ca.crt")});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  static void TearDownTestSuite() {
    delete daemon_;
    delete dir_;
    daemon_ = nullptr;
    dir_ = nullptr;
  }
  void SetUp() override {
    if (kSanitized) GTEST_SKIP() << "provider tests do not run under ASan";
  }

  static std::string Path(const std::string& name) { return dir_->path() + "/" + name; }
  static CommandResult Ctl(std::vector<std::string> args) {
    args.insert(args.begin(), "--addr=" + daemon_->address());
    args.insert(args.begin(), BinDir() + "/custodyctl");
    return RunCommand(args);
  }
  // CSR from custodyd for `version`, signed by the test CA (SAN dns:localhost), set on the
  // version; returns the certificate's path.
  static std::string Certify(const std::string& ring, int version) {
    const std::string base =
        Path(std::filesystem::path(ring).filename().string() + "-v" + std::to_string(version));
    CommandResult r = Ctl({"csr", ring, "--version=" + std::to_string(version),
                           "--subject=/CN=localhost", "--san=dns:localhost"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    WriteFileOrDie(base + ".csr", r.out);
    r = RunCommand({"openssl", "x509", "-req", "-in", base + ".csr", "-CA", Path("ca.crt"),
                    "-CAkey", Path("ca.key"), "-CAcreateserial", "-copy_extensions", "copy",
                    "-days", "1", "-out", base + ".crt"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    r = Ctl({"certificate", "set", ring, std::to_string(version), "--chain_file=" + base + ".crt"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return base + ".crt";
  }

  // Successful sign audit lines of `ring` with `version`.
  static size_t SignLines(const std::string& ring, int version) {
    size_t n = 0;
    const std::string needle = "\"operation\":\"sign\",\"ring\":\"" + ring + "\"";
    const std::string v = "\"version\":" + std::to_string(version) + ",";
    for (const auto& e : std::filesystem::directory_iterator(Path("state/audit"))) {
      const std::string log = ReadFileOrDie(e.path().string());
      for (size_t p = log.find(needle); p != std::string::npos; p = log.find(needle, p + 1)) {
        const std::string line = log.substr(p, log.find('\n', p) - p);
        if (line.find("\"result\":\"OK\"") != std::string::npos &&
            line.find(v) != std::string::npos) {
          ++n;
        }
      }
    }
    return n;
  }

  static std::vector<std::string> ProviderEnv() {
    return {"OPENSSL_MODULES=" + BinDir() + "/../lib/ossl-modules",
            "CUSTODY_ADDR=" + daemon_->address()};
  }

  // tls_rotation_server on `uri`, controlled through files in its own directory.
  class Server {
   public:
    Server(const std::string& uri, const std::string& name) : dir_(Path(name)) {
      std::filesystem::create_directories(dir_);
      thread_ = std::thread([this, uri] {
        result_ = RunCommand({"timeout", "120", BinDir() + "/tls_rotation_server", uri, dir_,
                              std::to_string(kRefresh.count())},
                             "", ProviderEnv());
        exited_ = true;
      });
      for (int i = 0; i < 300 && !exited_ && !std::filesystem::exists(dir_ + "/port"); ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
      if (std::filesystem::exists(dir_ + "/port")) port_ = std::stoi(ReadFileOrDie(dir_ + "/port"));
    }
    ~Server() { Stop(); }
    int port() const { return port_; }
    void Touch(const std::string& file) { WriteFileOrDie(dir_ + "/" + file, "\n"); }
    bool Wait(const std::string& file, std::chrono::seconds timeout) {
      const auto until = Clock::now() + timeout;
      while (Clock::now() < until) {
        if (std::filesystem::exists(dir_ + "/" + file)) return true;
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
      return false;
    }
    // Stops the server and returns its exit code and output.
    const CommandResult& Stop() {
      if (thread_.joinable()) {
        Touch("stop");
        thread_.join();
      }
      return result_;
    }

   private:
    std::string dir_;
    std::thread thread_;
    std::atomic<bool> exited_{false};
    int port_ = 0;
    CommandResult result_;
  };

  static TempDir* dir_;
  static Custodyd* daemon_;
};

TempDir* ProviderRotationTest::dir_ = nullptr;
Custodyd* ProviderRotationTest::daemon_ = nullptr;

TEST_F(ProviderRotationTest, TheStoreHandsOutTheVersionsCertificateWithItsKey) {
  ASSERT_EQ(Ctl({"ring", "create", "tls/store", "--purpose=sign", "--alg=ES256", "--prepublish=0",
                 "--retain=1h"})
                .exit_code,
            0);
  // `openssl x509 -in custody:...` (as `-cert custody:...` in s_server): SHA-256 fingerprint.
  auto fingerprint = [](const std::string& uri) -> std::string {
    CommandResult r = RunCommand({"openssl", "x509", "-provider", "custody", "-provider", "default",
                                  "-in", uri, "-noout", "-fingerprint", "-sha256"},
                                 "", ProviderEnv());
    if (r.exit_code != 0) return "error: " + r.err;
    std::string out;
    for (char c : r.out.substr(r.out.find('=') + 1)) {
      if (std::isxdigit(static_cast<unsigned char>(c))) {
        out.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(c))));
      }
    }
    return out;
  };
  // Without a certificate the URI holds the key only, and the server refuses to start.
  EXPECT_EQ(fingerprint("custody:ring=tls/store").rfind("error: ", 0), 0u);
  {
    Server server("custody:ring=tls/store", "store-server");
    const CommandResult& r = server.Stop();
    EXPECT_EQ(r.exit_code, 2);
    EXPECT_NE(r.err.find("custody:ring=tls/store has no certificate"), std::string::npos) << r.err;
  }
  const std::string v1 = Certify("tls/store", 1), v2 = Certify("tls/store", 2);
  EXPECT_EQ(fingerprint("custody:ring=tls/store"), FileThumbprint(v1));
  EXPECT_EQ(fingerprint("custody:ring=tls/store;version=1"), FileThumbprint(v1));
  EXPECT_EQ(fingerprint("custody:ring=tls/store;version=2"), FileThumbprint(v2));
  // The key handed out with it is the certificate's (the CLI's key/certificate check).
  CommandResult r = RunCommand({"openssl", "x509", "-provider", "custody", "-provider", "default",
                                "-in", "custody:ring=tls/store", "-noout", "-pubkey"},
                               "", ProviderEnv());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  CommandResult key = RunCommand({"openssl", "pkey", "-provider", "custody", "-provider", "default",
                                  "-in", "custody:ring=tls/store", "-pubout"},
                                 "", ProviderEnv());
  ASSERT_EQ(key.exit_code, 0) << key.err;
  EXPECT_EQ(r.out, key.out);
}

TEST_F(ProviderRotationTest, NewHandshakesGetTheNewKeyAndCertificateAndHandshakesInFlightFinish) {
  ASSERT_EQ(Ctl({"ring", "create", "tls/rot", "--purpose=sign", "--alg=ES256",
                 "--require_certificate", "--prepublish=0", "--retain=1h"})
                .exit_code,
            0);
  const std::string v1 = FileThumbprint(Certify("tls/rot", 1));
  const std::string v2 = FileThumbprint(Certify("tls/rot", 2));
  ASSERT_FALSE(v1.empty());
  ASSERT_NE(v1, v2);

  Server server("custody:ring=tls/rot", "rot-server");
  ASSERT_NE(server.port(), 0) << server.Stop().err;

  SSL_CTX* client = SSL_CTX_new(TLS_client_method());
  SSL_CTX_set_min_proto_version(client, TLS1_3_VERSION);
  SSL_CTX_set_verify(client, SSL_VERIFY_PEER, nullptr);
  ASSERT_EQ(SSL_CTX_load_verify_locations(client, Path("ca.crt").c_str(), nullptr), 1);

  // Concurrent clients for the whole test.
  std::atomic<bool> stop{false};
  std::mutex results_mu;
  std::vector<Handshake> results;
  std::vector<std::thread> clients;
  for (int i = 0; i < 3; ++i) {
    clients.emplace_back([&] {
      while (!stop) {
        Handshake h = Connect(client, server.port());
        std::lock_guard<std::mutex> lock(results_mu);
        results.push_back(std::move(h));
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::seconds(1));

  // A handshake that takes the v1 pair and is held in the certificate callback while the ring
  // rotates: it signs with v1 after the rotation.
  server.Touch("hold");
  Handshake held;
  std::thread held_client([&] {
    // The next handshake may be one of the load clients'; the test only needs one to be held.
    held = Connect(client, server.port());
  });
  ASSERT_TRUE(server.Wait("held", std::chrono::seconds(20)));
  const size_t v1_signatures_before = SignLines("tls/rot", 1);
  CommandResult r = Ctl({"ring", "rotate", "tls/rot"});
  const Clock::time_point rotated = Clock::now();
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_NE(r.out.find("\"rotated\": true"), std::string::npos) << r.out;
  server.Touch("release");
  held_client.join();

  // Load continues past the refresh interval.
  std::this_thread::sleep_for(kRefresh + std::chrono::milliseconds(1500));
  stop = true;
  for (std::thread& t : clients) t.join();
  const CommandResult& stats = server.Stop();
  SSL_CTX_free(client);

  EXPECT_TRUE(held.ok) << held.error;
  EXPECT_EQ(held.thumbprint, v1);
  EXPECT_EQ(stats.exit_code, 0) << stats.err;
  EXPECT_NE(stats.out.find(" failures 0\n"), std::string::npos) << stats.out;
  EXPECT_EQ(stats.out.find("last reload error"), std::string::npos) << stats.out;
  // v1 signed after the rotation (the held handshake, and any others in flight).
  EXPECT_GT(SignLines("tls/rot", 1), v1_signatures_before);
  size_t before = 0, after_refresh = 0, new_key = 0, failed = 0;
  std::string failure;
  for (const Handshake& h : results) {
    if (!h.ok) {
      ++failed;
      failure = h.error;
      continue;
    }
    EXPECT_TRUE(h.thumbprint == v1 || h.thumbprint == v2);
    if (h.thumbprint == v2) ++new_key;
    if (h.end < rotated) {
      ++before;
      EXPECT_EQ(h.thumbprint, v1);
    }
    // A handshake started a refresh interval (plus a slow reload's margin) after the rotation
    // gets the new pair.
    if (h.start > rotated + kRefresh + std::chrono::milliseconds(500)) {
      ++after_refresh;
      EXPECT_EQ(h.thumbprint, v2);
    }
  }
  EXPECT_EQ(failed, 0u) << failure;
  EXPECT_GT(before, 0u);
  EXPECT_GT(after_refresh, 0u);
  EXPECT_GT(new_key, 0u);
  EXPECT_GT(SignLines("tls/rot", 2), 0u);
}

TEST_F(ProviderRotationTest, AKeyPinnedToTheOldVersionSignsWithinTheGraceAndNotAfter) {
  ASSERT_EQ(Ctl({"ring", "create", "tls/grace", "--purpose=sign", "--alg=ES256"}).exit_code, 0);
  WriteFileOrDie(Path("grace.data"), "signed by a key loaded before the rotation\n");
  CommandResult pub =
      RunCommand({"openssl", "pkey", "-provider", "custody", "-provider", "default", "-in",
                  "custody:ring=tls/grace", "-pubout", "-out", Path("grace-v1.pub")},
                 "", ProviderEnv());
  ASSERT_EQ(pub.exit_code, 0) << pub.err;
  // The provider's key objects are pinned to the version they were loaded for; the URI with
  // version=1 is what a server that loaded the ACTIVE key before the rotation holds.
  auto sign = [&](std::string* error) -> bool {
    CommandResult r =
        RunCommand({"openssl", "dgst", "-provider", "custody", "-provider", "default", "-propquery",
                    "?provider=default", "-sha256", "-sign", "custody:ring=tls/grace;version=1",
                    "-out", Path("grace.sig"), Path("grace.data")},
                   "", ProviderEnv());
    *error = r.err;
    if (r.exit_code != 0) return false;
    CommandResult v = RunCommand({"openssl", "dgst", "-sha256", "-verify", Path("grace-v1.pub"),
                                  "-signature", Path("grace.sig"), Path("grace.data")});
    *error = v.out + v.err;
    return v.exit_code == 0;
  };
  std::string error;
  ASSERT_TRUE(sign(&error)) << error;
  ASSERT_EQ(Ctl({"ring", "rotate", "tls/grace", "--force"}).exit_code, 0);
  const Clock::time_point rotated = Clock::now();
  EXPECT_TRUE(sign(&error)) << error;  // within the grace: still version 1, still verifies
  EXPECT_EQ(SignLines("tls/grace", 1), 2u);
  std::this_thread::sleep_until(rotated + std::chrono::milliseconds(kGraceMs + 700));
  EXPECT_FALSE(sign(&error));
  EXPECT_NE(error.find("custody: FAILED_PRECONDITION: version 1 of ring 'tls/grace' does not "
                       "sign: only the ACTIVE version (2) does, and a RETIRED one only for " +
                       std::to_string(kGraceMs) + " ms after its rotation"),
            std::string::npos)
      << error;
  EXPECT_EQ(SignLines("tls/grace", 1), 2u);
}

}  // namespace
}  // namespace custody::testing
