#include "bench/proc_util.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "common/testing/child_process.h"

namespace custody::bench {
namespace {

int WaitExitCode(pid_t pid) {
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return -1;
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return 128 + WTERMSIG(status);
}

}  // namespace

absl::StatusOr<TempDir> TempDir::Create(std::string_view prefix) {
  const char* tmp = std::getenv("TMPDIR");
  std::string tmpl = absl::StrCat(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp", "/",
                                  absl::string_view(prefix.data(), prefix.size()), "-XXXXXX");
  if (mkdtemp(tmpl.data()) == nullptr) {
    return absl::InternalError(absl::StrCat("mkdtemp ", tmpl, ": ", std::strerror(errno)));
  }
  return TempDir(tmpl);
}

TempDir::~TempDir() {
  if (path_.empty() || std::getenv("CUSTODY_BENCH_KEEP_TMP") != nullptr) return;
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv, const std::string& log_path) {
  absl::StatusOr<testing::ChildProcess> child = testing::ChildProcess::Start(
      {.argv = argv, .stdout_path = log_path, .stderr_path = log_path, .append = true});
  if (!child.ok()) return child.status();
  return child->Release();  // the caller reaps it
}

absl::Status RunCommand(const std::vector<std::string>& argv, const std::string& log_path) {
  absl::StatusOr<pid_t> pid = Spawn(argv, log_path);
  if (!pid.ok()) return pid.status();
  int code = WaitExitCode(*pid);
  if (code == 0) return absl::OkStatus();
  std::string tail;
  if (auto text = ReadFile(log_path); text.ok()) {
    tail = text->size() > 600 ? text->substr(text->size() - 600) : *text;
  }
  return absl::InternalError(absl::StrCat("'", absl::StrJoin(argv, " "), "' exited with ", code,
                                          " (", log_path, "): ", tail));
}

absl::StatusOr<std::string> CaptureCommandOutput(const std::vector<std::string>& argv) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    return absl::InternalError(absl::StrCat("pipe: ", std::strerror(errno)));
  }
  absl::StatusOr<testing::ChildProcess> child =
      testing::ChildProcess::Start({.argv = argv, .stderr_path = "/dev/null", .stdout_fd = fds[1]});
  close(fds[1]);
  if (!child.ok()) {
    close(fds[0]);
    return child.status();
  }
  std::string out;
  char buf[4096];
  for (;;) {
    ssize_t n = read(fds[0], buf, sizeof(buf));
    if (n > 0) {
      out.append(buf, static_cast<size_t>(n));
    } else if (n == 0 || errno != EINTR) {
      break;
    }
  }
  close(fds[0]);
  child->Wait();
  return out;
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    return absl::NotFoundError(absl::StrCat("cannot read '", path, "': ", std::strerror(errno)));
  }
  std::string out;
  char buf[8192];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) out.append(buf, n);
  std::fclose(f);
  return out;
}

absl::Status WriteFile(const std::string& path, std::string_view content, mode_t mode) {
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat("cannot write '", path, "': ", std::strerror(errno)));
  }
  size_t done = 0;
  while (done < content.size()) {
    ssize_t n = write(fd, content.data() + done, content.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      close(fd);
      return absl::InternalError(absl::StrCat("write '", path, "': ", std::strerror(errno)));
    }
    done += static_cast<size_t>(n);
  }
  fchmod(fd, mode);
  close(fd);
  return absl::OkStatus();
}

double ProcessCpuSeconds(pid_t pid) {
  auto stat = ReadFile(absl::StrCat("/proc/", pid, "/stat"));
  if (!stat.ok()) return -1;
  // The command name (field 2) may contain spaces: fields are counted after the last ')'.
  size_t paren = stat->rfind(')');
  if (paren == std::string::npos) return -1;
  std::vector<absl::string_view> fields =
      absl::StrSplit(absl::string_view(*stat).substr(paren + 1), ' ', absl::SkipEmpty());
  // fields[0] is field 3 (state); utime is field 14, stime field 15.
  if (fields.size() < 13) return -1;
  uint64_t utime = 0, stime = 0;
  if (!absl::SimpleAtoi(fields[11], &utime) || !absl::SimpleAtoi(fields[12], &stime)) return -1;
  return static_cast<double>(utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

int64_t ProcessStatusKb(pid_t pid, std::string_view field) {
  auto status = ReadFile(absl::StrCat("/proc/", pid, "/status"));
  if (!status.ok()) return -1;
  for (absl::string_view line : absl::StrSplit(*status, '\n')) {
    if (line.size() <= field.size() ||
        line.substr(0, field.size()) != absl::string_view(field.data(), field.size()) ||
        line[field.size()] != ':') {
      continue;
    }
    absl::string_view rest = line.substr(field.size() + 1);
    std::vector<absl::string_view> parts = absl::StrSplit(rest, ' ', absl::SkipWhitespace());
    int64_t kb = 0;
    if (!parts.empty() && absl::SimpleAtoi(parts[0], &kb)) return kb;
    return -1;
  }
  return -1;
}

int64_t ProcessContextSwitches(pid_t pid) {
  std::error_code ec;
  std::filesystem::directory_iterator it(absl::StrCat("/proc/", pid, "/task"), ec);
  if (ec) return -1;
  int64_t total = 0;
  for (const auto& task : it) {
    auto status = ReadFile(task.path().string() + "/status");
    if (!status.ok()) continue;  // the thread exited meanwhile
    for (absl::string_view line : absl::StrSplit(*status, '\n')) {
      if (!absl::StartsWith(line, "voluntary_ctxt_switches:") &&
          !absl::StartsWith(line, "nonvoluntary_ctxt_switches:")) {
        continue;
      }
      int64_t n = 0;
      if (absl::SimpleAtoi(absl::StripAsciiWhitespace(line.substr(line.find(':') + 1)), &n)) {
        total += n;
      }
    }
  }
  return total;
}

absl::StatusOr<double> FdatasyncP50Us(const std::string& dir, int n) {
  const std::string path = dir + "/.custody-bench-fdatasync";
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat("open '", path, "': ", std::strerror(errno)));
  }
  const std::string line = std::string(299, 'x') + "\n";
  std::vector<double> us;
  us.reserve(static_cast<size_t>(n));
  absl::Status status;
  for (int i = 0; i < n && status.ok(); ++i) {
    const auto start = std::chrono::steady_clock::now();
    if (write(fd, line.data(), line.size()) != static_cast<ssize_t>(line.size()) ||
        fdatasync(fd) != 0) {
      status = absl::InternalError(
          absl::StrCat("append+fdatasync '", path, "': ", std::strerror(errno)));
    }
    us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
                     .count());
  }
  close(fd);
  unlink(path.c_str());
  if (!status.ok()) return status;
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

double ThreadCpuSeconds() {
  struct rusage usage {};
  if (getrusage(RUSAGE_THREAD, &usage) != 0) return 0;
  auto secs = [](const timeval& tv) {
    return static_cast<double>(tv.tv_sec) + static_cast<double>(tv.tv_usec) * 1e-6;
  };
  return secs(usage.ru_utime) + secs(usage.ru_stime);
}

absl::StatusOr<int> PickFreeLoopbackPort() {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    int err = errno;
    close(fd);
    return absl::InternalError(absl::StrCat("bind 127.0.0.1:0: ", std::strerror(err)));
  }
  close(fd);
  return static_cast<int>(ntohs(addr.sin_port));
}

std::string SelfExeDir() {
  std::error_code ec;
  std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return ".";
  return exe.parent_path().string();
}

}  // namespace custody::bench
