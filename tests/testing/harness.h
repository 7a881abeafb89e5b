// Test harness: runs the real custodyd binary on a temporary state directory and talks to it
// over real gRPC; runs independent tools (OpenSSL CLI, python3-jwcrypto, pkcs11-tool).
#ifndef CUSTODY_TESTS_TESTING_HARNESS_H_
#define CUSTODY_TESTS_TESTING_HARNESS_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "client/channel.h"
#include "common/testing/child_process.h"
#include "custody/v1/custody.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace custody::testing {

// A fresh private directory under /tmp, removed on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

struct CommandResult {
  int exit_code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

// Runs `argv` (no shell), feeding `input` on stdin. `env` entries ("K=V") are added.
CommandResult RunCommand(const std::vector<std::string>& argv, const std::string& input = "",
                         const std::vector<std::string>& env = {});

std::string ReadFileOrDie(const std::string& path);
void WriteFileOrDie(const std::string& path, const std::string& content);

// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
int FreePort();

std::string BinDir();     // build/bin
std::string SourceDir();  // the repository root

class Custodyd {
 public:
  // Starts custodyd --state_dir=state_dir --listen=unix:state_dir/custodyd.sock plus `extra`,
  // with stderr into state_dir/custodyd.log, and waits until the health service says SERVING.
  explicit Custodyd(std::string state_dir, std::vector<std::string> extra = {});
  // Listens on `tls.address` (HOST:PORT) instead, and reaches it with the TLS/mTLS credentials
  // in `tls` (ca_file, cert_file, key_file, server_name).
  Custodyd(std::string state_dir, std::vector<std::string> extra, client::ChannelOptions tls);
  // Variables ("K=V") added to custodyd's environment (e.g. SOFTHSM2_CONF for a token the test
  // made, or a test module's control file); otherwise as the first constructor.
  struct Environment {
    std::vector<std::string> variables;
  };
  Custodyd(std::string state_dir, std::vector<std::string> extra, Environment environment);
  ~Custodyd();

  bool started() const { return started_; }
  std::string address() const {
    return tls_.address.empty() ? "unix:" + state_dir_ + "/custodyd.sock" : tls_.address;
  }
  pid_t pid() const { return pid_; }
  void Signal(int sig);
  std::string log() const { return ReadFileOrDie(state_dir_ + "/custodyd.log"); }
  void Stop();  // SIGTERM, wait; fails the test if the exit is not clean
  void Kill();  // SIGKILL, wait

  custody::v1::Signer::Stub& signer() { return *signer_; }
  custody::v1::KeyAdmin::Stub& admin() { return *admin_; }
  std::shared_ptr<grpc::Channel> channel() { return channel_; }

 private:
  void Start(std::vector<std::string> extra);

  std::string state_dir_;
  client::ChannelOptions tls_;
  std::vector<std::string> environment_;
  pid_t pid_ = -1;
  bool started_ = false;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<custody::v1::Signer::Stub> signer_;
  std::unique_ptr<custody::v1::KeyAdmin::Stub> admin_;
};

// `flags` plus the custodyd flags that lower the policy floors (--min_destroy_delay,
// --min_retain, --min_rotation_period) to zero: for tests whose rings rotate, unpublish and
// destroy keys within seconds. Floors are only ever lowered by these flags, never by a switch.
std::vector<std::string> WithLowPolicyFloors(std::vector<std::string> flags = {});

// From RotateKeyRing's FAILED_PRECONDITION "ring 'R' was not rotated: ... it can be promoted
// from 2026-01-02T03:04:05.678Z ...": that time in Unix ms; -1 when `status` is not such an answer.
int64_t NotRotatedUntilMs(const grpc::Status& status);

// Verifies with python3-jwcrypto; returns "" on success, else the reason. On success *payload
// receives the payload jwcrypto extracted.
std::string VerifyWithJwcrypto(const std::string& jwks, const std::string& jws,
                               const std::string& alg, std::string* payload = nullptr,
                               std::string* header_json = nullptr);

// Verifies with the OpenSSL CLI (openssl dgst / pkeyutl); "" on success, else the reason.
std::string VerifyWithOpenSsl(const std::string& jwks, const std::string& jws);

}  // namespace custody::testing

#endif  // CUSTODY_TESTS_TESTING_HARNESS_H_
