// Child processes for tests and custody-bench, started the one safe way.
//
// A test binary has many threads (gRPC's, the test's own workers) when it starts a program. After
// fork() only async-signal-safe calls are allowed in the child: an allocation there can block
// forever on a lock another thread held at the moment of fork (a custodyd that never starts and
// never logs). So nothing here forks by hand: every child is made by posix_spawn, with argv, envp
// and the standard-stream redirections prepared in the parent and applied by the C library.
#ifndef CUSTODY_COMMON_TESTING_CHILD_PROCESS_H_
#define CUSTODY_COMMON_TESTING_CHILD_PROCESS_H_

#include <sys/types.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace custody::testing {

struct ChildOptions {
  // argv[0] is a path, or a name looked up in PATH when it has no '/'.
  std::vector<std::string> argv = {};
  // "NAME=VALUE" entries set in the child's environment, replacing the parent's value of NAME.
  std::vector<std::string> env = {};
  // stdin from this file ("/dev/null" by default).
  std::string stdin_path = "/dev/null";
  // stdout and stderr to these files ("" = inherited from the parent). The same path for both
  // shares one open file. Created 0600; truncated unless `append`.
  std::string stdout_path = "";
  std::string stderr_path = "";
  bool append = false;
  // When >= 0, this descriptor becomes the child's stdout (e.g. a pipe's write end), overriding
  // stdout_path. The caller keeps (and closes) its own copy.
  int stdout_fd = -1;
  // The child leads a process group of its own (so a signal can reach its whole tree).
  bool new_process_group = false;
};

// A started child; Stop()s it on destruction if still running. Move-only.
class ChildProcess {
 public:
  // INTERNAL naming the program when posix_spawn fails (the program missing included).
  static absl::StatusOr<ChildProcess> Start(const ChildOptions& options);

  ChildProcess() = default;
  ChildProcess(ChildProcess&& other) noexcept;
  ChildProcess& operator=(ChildProcess&& other) noexcept;
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ~ChildProcess();

  pid_t pid() const { return pid_; }
  // True while the child has not exited (an exited child is reaped here).
  bool Running();
  // The exit code (128 + signal for a signal), once reaped.
  std::optional<int> exit_code() const { return exit_code_; }
  void Signal(int sig) const;
  // Waits for exit; the exit code (128 + signal), -1 if there is no child.
  int Wait();
  // Waits up to `timeout`; the exit code, or nullopt if it is still running.
  std::optional<int> WaitFor(std::chrono::milliseconds timeout);
  // SIGTERM, up to `grace` for it to exit, then SIGKILL; the exit code.
  int Stop(std::chrono::milliseconds grace = std::chrono::seconds(5));
  // SIGKILL and wait; the exit code.
  int Kill();
  // Forgets the child without stopping it (the caller now owns the pid and must reap it).
  pid_t Release();

 private:
  explicit ChildProcess(pid_t pid) : pid_(pid) {}
  void Reaped(int status);

  pid_t pid_ = -1;
  std::optional<int> exit_code_;
};

// Starts `options` and waits for it: the exit code (128 + signal), or -1 if it could not start
// (the reason written to stderr).
int RunChild(const ChildOptions& options);

// What /proc says about a process that should have done something by now: its command name (the
// test binary's name means it never reached exec), state, kernel wait channel and, where
// readable, its kernel stack. For a test's failure message.
std::string DescribeProcess(pid_t pid);

}  // namespace custody::testing

#endif  // CUSTODY_COMMON_TESTING_CHILD_PROCESS_H_
