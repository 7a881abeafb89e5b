#include "tests/testing/harness.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include "absl/time/time.h"
#include "common/testing/child_process.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"

namespace custody::testing {

TempDir::TempDir() {
  char tmpl[] = "/tmp/custody-test-XXXXXX";
  char* p = mkdtemp(tmpl);
  if (p == nullptr) std::abort();
  path_ = p;
}

TempDir::~TempDir() {
  std::error_code ec;
  if (std::getenv("CUSTODY_KEEP_TMP") == nullptr) std::filesystem::remove_all(path_, ec);
}

std::string ReadFileOrDie(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

void WriteFileOrDie(const std::string& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << content;
  if (!out) std::abort();
}

std::string BinDir() { return CUSTODY_BIN_DIR; }
std::string SourceDir() { return CUSTODY_SOURCE_DIR; }

CommandResult RunCommand(const std::vector<std::string>& argv, const std::string& input,
                         const std::vector<std::string>& env) {
  TempDir io;
  ChildOptions options;
  options.argv = argv;
  options.env = env;
  options.stdin_path = io.path() + "/in";
  options.stdout_path = io.path() + "/out";
  options.stderr_path = io.path() + "/err";
  WriteFileOrDie(options.stdin_path, input);
  CommandResult r;
  r.exit_code = RunChild(options);
  r.out = ReadFileOrDie(options.stdout_path);
  r.err = ReadFileOrDie(options.stderr_path);
  if (r.exit_code < 0) r.exit_code = 127;  // could not start, as a shell would say
  return r;
}

int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  close(fd);
  return port;
}

Custodyd::Custodyd(std::string state_dir, std::vector<std::string> extra)
    : state_dir_(std::move(state_dir)) {
  Start(std::move(extra));
}

Custodyd::Custodyd(std::string state_dir, std::vector<std::string> extra,
                   client::ChannelOptions tls)
    : state_dir_(std::move(state_dir)), tls_(std::move(tls)) {
  Start(std::move(extra));
}

Custodyd::Custodyd(std::string state_dir, std::vector<std::string> extra, Environment environment)
    : state_dir_(std::move(state_dir)), environment_(std::move(environment.variables)) {
  Start(std::move(extra));
}

void Custodyd::Signal(int sig) {
  if (pid_ > 0) kill(pid_, sig);
}

void Custodyd::Start(std::vector<std::string> extra) {
  std::filesystem::create_directories(state_dir_);
  std::filesystem::permissions(state_dir_, std::filesystem::perms::owner_all);
  std::string log_path = state_dir_ + "/custodyd.log";
  ChildOptions options;
  options.argv = {BinDir() + "/custodyd", "--state_dir=" + state_dir_, "--listen=" + address()};
  options.argv.insert(options.argv.end(), extra.begin(), extra.end());
  options.env = environment_;
  options.stdout_path = options.stderr_path = log_path;
  options.append = true;
  absl::StatusOr<ChildProcess> child = ChildProcess::Start(options);
  if (!child.ok()) {
    std::cerr << child.status().message() << "\n";
    return;
  }
  pid_ = child->Release();  // reaped by Stop/Kill/the destructor, as before
  // Probe with a fresh channel each time, and only once the socket exists: a channel that
  // failed to connect waits out gRPC's reconnect backoff, which would time the test, not custodyd.
  std::string socket_path = state_dir_ + "/custodyd.sock";
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  // Each probe's own deadline grows (0.5 s, 1 s, 2 s, then 4 s): an mTLS handshake with a
  // sanitized custodyd on a loaded machine can take longer than 0.5 s every time, and a fixed
  // 0.5 s then never succeeds (ASan run, 2 cores shared with two compilers: 30 s of timeouts).
  int probe_ms = 500;
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return;  // exited during startup: started() stays false, the log says why
    }
    if (!tls_.address.empty() || access(socket_path.c_str(), F_OK) == 0) {
      std::shared_ptr<grpc::Channel> channel;
      if (tls_.address.empty()) {
        channel = grpc::CreateChannel(address(), grpc::InsecureChannelCredentials());
      } else {
        auto made = client::CreateChannel(tls_);
        if (!made.ok()) return;
        channel = *made;
      }
      auto health = grpc::health::v1::Health::NewStub(channel);
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(probe_ms));
      grpc::health::v1::HealthCheckRequest req;
      grpc::health::v1::HealthCheckResponse resp;
      const grpc::Status probed = health->Check(&ctx, req, &resp);
      if (probed.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
        probe_ms = std::min(probe_ms * 2, 4000);
      }
      if (probed.ok() && resp.status() == grpc::health::v1::HealthCheckResponse::SERVING) {
        channel_ = channel;
        signer_ = custody::v1::Signer::NewStub(channel_);
        admin_ = custody::v1::KeyAdmin::NewStub(channel_);
        started_ = true;
        return;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  // Still not serving: say where the process is (a test binary's name means it never reached
  // exec; a wait channel names the wait), for the test's failure message.
  std::cerr << "custodyd did not answer health within 30 s: " << DescribeProcess(pid_) << "\n";
}

Custodyd::~Custodyd() {
  if (pid_ > 0) Kill();
}

void Custodyd::Stop() {
  if (pid_ <= 0) return;
  kill(pid_, SIGTERM);
  int status = 0;
  waitpid(pid_, &status, 0);
  pid_ = -1;
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "custodyd did not exit cleanly on SIGTERM: " << status;
}

void Custodyd::Kill() {
  if (pid_ <= 0) return;
  kill(pid_, SIGKILL);
  int status = 0;
  waitpid(pid_, &status, 0);
  pid_ = -1;
}

std::string VerifyWithJwcrypto(const std::string& jwks, const std::string& jws,
                               const std::string& alg, std::string* payload,
                               std::string* header_json) {
  TempDir dir;
  WriteFileOrDie(dir.path() + "/jwks.json", jwks);
  WriteFileOrDie(dir.path() + "/jws", jws);
  CommandResult r = RunCommand({"/usr/bin/python3", SourceDir() + "/tests/tools/jwcrypto_verify.py",
                                dir.path() + "/jwks.json", dir.path() + "/jws", alg});
  if (r.exit_code != 0) return "jwcrypto: " + r.err;
  size_t nl = r.out.find('\n');
  if (header_json != nullptr) *header_json = r.out.substr(0, nl);
  if (payload != nullptr) {
    std::string p = r.out.substr(nl + 1);
    if (!p.empty() && p.back() == '\n') p.pop_back();
    *payload = p;
  }
  return "";
}

std::string VerifyWithOpenSsl(const std::string& jwks, const std::string& jws) {
  TempDir dir;
  const std::string& d = dir.path();
  WriteFileOrDie(d + "/jwks.json", jwks);
  WriteFileOrDie(d + "/jws", jws);
  CommandResult prep =
      RunCommand({"/usr/bin/python3", SourceDir() + "/tests/tools/openssl_inputs.py",
                  d + "/jwks.json", d + "/jws", d});
  if (prep.exit_code != 0) return "openssl_inputs.py: " + prep.err;
  std::string alg = prep.out.substr(0, prep.out.find('\n'));
  std::vector<std::string> cmd;
  if (alg == "ES256") {
    cmd = {"openssl",      "dgst",       "-sha256",      "-verify",
           d + "/pub.pem", "-signature", d + "/sig.der", d + "/input"};
  } else if (alg == "RS256") {
    cmd = {"openssl",      "dgst",       "-sha256",  "-verify",
           d + "/pub.pem", "-signature", d + "/sig", d + "/input"};
  } else if (alg == "PS256") {
    cmd = {"openssl",
           "dgst",
           "-sha256",
           "-sigopt",
           "rsa_padding_mode:pss",
           "-sigopt",
           "rsa_pss_saltlen:32",
           "-sigopt",
           "rsa_mgf1_md:sha256",
           "-verify",
           d + "/pub.pem",
           "-signature",
           d + "/sig",
           d + "/input"};
  } else if (alg == "EdDSA") {
    cmd = {"openssl", "pkeyutl", "-verify",    "-pubin",   "-inkey",  d + "/pub.pem",
           "-rawin",  "-in",     d + "/input", "-sigfile", d + "/sig"};
  } else {
    return "no OpenSSL command for alg " + alg;
  }
  CommandResult r = RunCommand(cmd);
  if (r.exit_code != 0) return "openssl " + alg + ": " + r.out + r.err;
  return "";
}

std::vector<std::string> WithLowPolicyFloors(std::vector<std::string> flags) {
  for (const char* floor : {"--min_destroy_delay=0", "--min_retain=0", "--min_rotation_period=0"}) {
    flags.push_back(floor);
  }
  return flags;
}

int64_t NotRotatedUntilMs(const grpc::Status& status) {
  const std::string& message = status.error_message();
  const std::string marker = "can be promoted from ";
  size_t at = message.find(marker);
  if (status.error_code() != grpc::StatusCode::FAILED_PRECONDITION ||
      message.find("was not rotated") == std::string::npos || at == std::string::npos) {
    return -1;
  }
  absl::Time time;
  std::string error;
  if (!absl::ParseTime("%Y-%m-%dT%H:%M:%E*SZ", message.substr(at + marker.size(), 24), &time,
                       &error)) {
    return -1;
  }
  return absl::ToUnixMillis(time);
}

}  // namespace custody::testing
