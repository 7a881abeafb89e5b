#include "common/stderr_capture.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <exception>
#include <string>
#include <thread>
#include <utility>

#include "common/log.h"

#if defined(__SANITIZE_ADDRESS__)
#define CUSTODY_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define CUSTODY_SANITIZED 1
#endif
#endif

namespace custody {
namespace {

std::atomic<bool> g_captured{false};
std::atomic<int> g_original_stderr{-1};
std::terminate_handler g_previous_terminate = nullptr;

// Longest line logged in one piece; longer output is logged in pieces of this size.
constexpr size_t kMaxLine = 4096;

void LogLine(const std::string& source, std::string line) {
  while (!line.empty() && (line.back() == '\r' || line.back() == '\n')) line.pop_back();
  if (line.empty()) return;
  Log(LogLevel::kWarning, "module.stderr", {{"module", source}, {"line", std::move(line)}});
}

[[maybe_unused]] void ReadLines(int fd, std::string source) {
  std::string pending;
  char buffer[4096];
  for (;;) {
    const ssize_t n = read(fd, buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    pending.append(buffer, static_cast<size_t>(n));
    size_t start = 0;
    for (size_t newline; (newline = pending.find('\n', start)) != std::string::npos;) {
      LogLine(source, pending.substr(start, newline - start));
      start = newline + 1;
    }
    pending.erase(0, start);
    while (pending.size() >= kMaxLine) {
      LogLine(source, pending.substr(0, kMaxLine));
      pending.erase(0, kMaxLine);
    }
  }
  LogLine(source, pending);
  close(fd);
}

[[noreturn, maybe_unused]] void RestoreStderrAndTerminate() {
  const int original = g_original_stderr.load();
  if (original >= 0) dup2(original, STDERR_FILENO);
  if (g_previous_terminate != nullptr) g_previous_terminate();
  std::abort();
}

}  // namespace

absl::Status CaptureStderr(std::string source) {
  if (g_captured.exchange(true)) {
    return absl::FailedPreconditionError("stderr is already captured");
  }
#ifdef CUSTODY_SANITIZED
  (void)source;
  return absl::OkStatus();
#else
  const int original = fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 3);
  int fds[2];
  if (original < 0) return absl::InternalError("cannot duplicate stderr");
  if (pipe2(fds, O_CLOEXEC) != 0) {
    close(original);
    return absl::InternalError("cannot make a pipe for stderr");
  }
  std::fflush(stderr);
  // Log writes to the original from now on; fd 2 becomes the pipe.
  SetLogFd(original);
  g_original_stderr.store(original);
  if (dup2(fds[1], STDERR_FILENO) < 0) {
    SetLogFd(STDERR_FILENO);
    close(fds[0]);
    close(fds[1]);
    return absl::InternalError("cannot redirect stderr");
  }
  close(fds[1]);
  g_previous_terminate = std::set_terminate(&RestoreStderrAndTerminate);
  std::thread(&ReadLines, fds[0], std::move(source)).detach();
  return absl::OkStatus();
#endif
}

}  // namespace custody
