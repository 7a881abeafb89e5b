#include "bench/custodyd_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "bench/proc_util.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace custody::bench {
namespace {

std::string LogTail(const std::string& path) {
  auto text = ReadFile(path);
  if (!text.ok()) return "";
  return text->size() > 1500 ? text->substr(text->size() - 1500) : *text;
}

bool IsServing(const client::ChannelOptions& channel_options) {
  auto channel = client::CreateChannel(channel_options);
  if (!channel.ok()) return false;
  auto health = grpc::health::v1::Health::NewStub(*channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
  grpc::health::v1::HealthCheckRequest req;
  grpc::health::v1::HealthCheckResponse resp;
  return health->Check(&ctx, req, &resp).ok() &&
         resp.status() == grpc::health::v1::HealthCheckResponse::SERVING;
}

}  // namespace

absl::StatusOr<std::unique_ptr<CustodydProcess>> CustodydProcess::Start(
    const CustodydOptions& options) {
  std::unique_ptr<CustodydProcess> p(new CustodydProcess(options));
  std::vector<std::string> argv = {options.binary, "--state_dir=" + options.state_dir,
                                   "--listen=" + options.listen};
  argv.insert(argv.end(), options.extra_flags.begin(), options.extra_flags.end());
  const absl::Time start = absl::Now();
  absl::StatusOr<pid_t> pid = Spawn(argv, options.log_path);
  if (!pid.ok()) return pid.status();
  p->pid_ = *pid;

  const bool unix_socket = absl::StartsWith(options.listen, "unix:");
  const std::string socket_path = unix_socket ? options.listen.substr(5) : "";
  const absl::Time deadline = start + options.startup_timeout;
  while (absl::Now() < deadline) {
    int status = 0;
    if (waitpid(*pid, &status, WNOHANG) == *pid) {
      p->pid_ = -1;
      return absl::FailedPreconditionError(absl::StrCat("custodyd exited during startup (status ",
                                                        status, "); log ", options.log_path, ":\n",
                                                        LogTail(options.log_path)));
    }
    if ((!unix_socket || access(socket_path.c_str(), F_OK) == 0) && IsServing(options.channel)) {
      p->startup_time_ = absl::Now() - start;
      return p;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return absl::FailedPreconditionError(
      absl::StrCat("custodyd not SERVING after ", absl::FormatDuration(options.startup_timeout),
                   "; log ", options.log_path, ":\n", LogTail(options.log_path)));
}

CustodydProcess::~CustodydProcess() {
  if (pid_ <= 0) return;
  kill(pid_, SIGKILL);
  int status = 0;
  waitpid(pid_, &status, 0);
}

absl::Status CustodydProcess::Stop() {
  if (pid_ <= 0) return absl::OkStatus();
  kill(pid_, SIGTERM);
  int status = 0;
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  for (;;) {
    pid_t r = waitpid(pid_, &status, WNOHANG);
    if (r == pid_) break;
    if (r < 0 && errno != EINTR) break;
    if (absl::Now() > deadline) {
      kill(pid_, SIGKILL);
      waitpid(pid_, &status, 0);
      pid_ = -1;
      return absl::InternalError("custodyd did not exit within 20 s of SIGTERM (killed)");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  pid_ = -1;
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return absl::InternalError(
        absl::StrCat("custodyd did not exit cleanly on SIGTERM (status ", status, ")"));
  }
  return absl::OkStatus();
}

}  // namespace custody::bench
