// Process plumbing for custody-bench: temporary directories, child processes without a shell
// (common/testing/child_process.h: posix_spawn, never a hand-written fork), and what /proc says
// about a process (CPU seconds, VmHWM/VmRSS).
#ifndef CUSTODY_BENCH_PROC_UTIL_H_
#define CUSTODY_BENCH_PROC_UTIL_H_

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace custody::bench {

// A fresh private (0700) directory under $TMPDIR or /tmp, removed with its contents on
// destruction unless CUSTODY_BENCH_KEEP_TMP is set.
class TempDir {
 public:
  static absl::StatusOr<TempDir> Create(std::string_view prefix);
  TempDir(TempDir&& other) noexcept : path_(std::move(other.path_)) { other.path_.clear(); }
  TempDir& operator=(TempDir&&) = delete;
  TempDir(const TempDir&) = delete;
  ~TempDir();
  const std::string& path() const { return path_; }

 private:
  explicit TempDir(std::string path) : path_(std::move(path)) {}
  std::string path_;
};

// Starts argv[0] (looked up in PATH unless it contains '/') with `argv`, no shell, stdin from
// /dev/null and stdout and stderr appended to `log_path`; the child's pid.
absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv, const std::string& log_path);

// Spawn, then wait. INTERNAL naming the command and the log's tail unless it exits 0.
absl::Status RunCommand(const std::vector<std::string>& argv, const std::string& log_path);

// Like RunCommand but returns stdout (stderr goes to /dev/null); the exit status is ignored.
absl::StatusOr<std::string> CaptureCommandOutput(const std::vector<std::string>& argv);

absl::StatusOr<std::string> ReadFile(const std::string& path);
// Writes `content` to `path` (created or truncated) with `mode`.
absl::Status WriteFile(const std::string& path, std::string_view content, mode_t mode);

// utime+stime of `pid` from /proc/PID/stat in seconds (clock-tick resolution); -1 on error.
double ProcessCpuSeconds(pid_t pid);
// A "kB" field of /proc/PID/status ("VmHWM", "VmRSS"); -1 on error.
int64_t ProcessStatusKb(pid_t pid, std::string_view field);
// Context switches (voluntary + involuntary) of every thread of `pid`, summed over
// /proc/PID/task/*/status; -1 on error. Threads that exited are not counted, so read it around a
// window in which the process keeps its threads (a row of load).
int64_t ProcessContextSwitches(pid_t pid);
// The p50, in microseconds, of `n` durable small appends (300 bytes, then fdatasync) to a fresh
// file in `dir`: what one audit line's flush costs on that file system at this moment.
absl::StatusOr<double> FdatasyncP50Us(const std::string& dir, int n);
// CPU (user+system) the calling thread has used, from getrusage(RUSAGE_THREAD), in seconds.
double ThreadCpuSeconds();

// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then closed).
absl::StatusOr<int> PickFreeLoopbackPort();

// The directory of /proc/self/exe.
std::string SelfExeDir();

}  // namespace custody::bench

#endif  // CUSTODY_BENCH_PROC_UTIL_H_
