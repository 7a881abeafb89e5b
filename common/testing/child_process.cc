#include "common/testing/child_process.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

extern char** environ;

namespace custody::testing {
namespace {

// The exit code of a waitpid status: the code, or 128 + the signal.
int ExitCode(int status) {
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// NAME of "NAME=VALUE".
std::string_view VariableName(std::string_view entry) { return entry.substr(0, entry.find('=')); }

// This process's environment with `overrides` set (replacing variables of the same name).
std::vector<std::string> ChildEnvironment(const std::vector<std::string>& overrides) {
  std::vector<std::string> env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const std::string_view name = VariableName(*e);
    bool replaced = false;
    for (const std::string& o : overrides) replaced |= VariableName(o) == name;
    if (!replaced) env.emplace_back(*e);
  }
  env.insert(env.end(), overrides.begin(), overrides.end());
  return env;
}

// The NULL-terminated char* array exec wants, pointing into `strings`.
std::vector<char*> CArray(std::vector<std::string>& strings) {
  std::vector<char*> out;
  out.reserve(strings.size() + 1);
  for (std::string& s : strings) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

// posix_spawn's file actions and attributes, released whatever happens.
class SpawnSetup {
 public:
  SpawnSetup() {
    posix_spawn_file_actions_init(&actions_);
    posix_spawnattr_init(&attr_);
  }
  ~SpawnSetup() {
    posix_spawn_file_actions_destroy(&actions_);
    posix_spawnattr_destroy(&attr_);
  }
  SpawnSetup(const SpawnSetup&) = delete;
  SpawnSetup& operator=(const SpawnSetup&) = delete;
  posix_spawn_file_actions_t* actions() { return &actions_; }
  posix_spawnattr_t* attr() { return &attr_; }

 private:
  posix_spawn_file_actions_t actions_;
  posix_spawnattr_t attr_;
};

std::string ReadSmallFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  std::string s = out.str();
  while (!s.empty() && (s.back() == '\n' || s.back() == '\0')) s.pop_back();
  return s;
}

}  // namespace

absl::StatusOr<ChildProcess> ChildProcess::Start(const ChildOptions& options) {
  if (options.argv.empty()) return absl::InvalidArgumentError("no program to start");
  // Everything the child needs is built here, in the parent: posix_spawn runs no code of ours in
  // the child.
  std::vector<std::string> argv = options.argv;
  std::vector<std::string> env = ChildEnvironment(options.env);
  std::vector<char*> c_argv = CArray(argv);
  std::vector<char*> c_env = CArray(env);

  SpawnSetup setup;
  const int write_flags = O_WRONLY | O_CREAT | (options.append ? O_APPEND : O_TRUNC);
  posix_spawn_file_actions_addopen(setup.actions(), 0, options.stdin_path.c_str(), O_RDONLY, 0);
  if (options.stdout_fd >= 0) {
    posix_spawn_file_actions_adddup2(setup.actions(), options.stdout_fd, 1);
  } else if (!options.stdout_path.empty()) {
    posix_spawn_file_actions_addopen(setup.actions(), 1, options.stdout_path.c_str(), write_flags,
                                     0600);
  }
  if (!options.stderr_path.empty()) {
    if (options.stdout_fd < 0 && options.stderr_path == options.stdout_path) {
      posix_spawn_file_actions_adddup2(setup.actions(), 1, 2);
    } else {
      posix_spawn_file_actions_addopen(setup.actions(), 2, options.stderr_path.c_str(), write_flags,
                                       0600);
    }
  }
  // The child starts with no blocked signal and every signal at its default action, whatever the
  // spawning thread blocked or ignored (custodyd blocks its shutdown signals itself).
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  sigdelset(&all, SIGKILL);
  sigdelset(&all, SIGSTOP);
  posix_spawnattr_setsigmask(setup.attr(), &none);
  posix_spawnattr_setsigdefault(setup.attr(), &all);
  short flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF;
  if (options.new_process_group) {
    flags |= POSIX_SPAWN_SETPGROUP;
    posix_spawnattr_setpgroup(setup.attr(), 0);
  }
  posix_spawnattr_setflags(setup.attr(), flags);

  pid_t pid = -1;
  const bool search_path = argv[0].find('/') == std::string::npos;
  const int rc = search_path ? posix_spawnp(&pid, c_argv[0], setup.actions(), setup.attr(),
                                            c_argv.data(), c_env.data())
                             : posix_spawn(&pid, c_argv[0], setup.actions(), setup.attr(),
                                           c_argv.data(), c_env.data());
  if (rc != 0) {
    return absl::InternalError(
        absl::StrCat("cannot start '", absl::StrJoin(options.argv, " "), "': ", std::strerror(rc)));
  }
  return ChildProcess(pid);
}

ChildProcess::ChildProcess(ChildProcess&& other) noexcept
    : pid_(other.pid_), exit_code_(other.exit_code_) {
  other.pid_ = -1;
}

ChildProcess& ChildProcess::operator=(ChildProcess&& other) noexcept {
  if (this != &other) {
    if (pid_ > 0) Stop();
    pid_ = other.pid_;
    exit_code_ = other.exit_code_;
    other.pid_ = -1;
  }
  return *this;
}

ChildProcess::~ChildProcess() {
  if (pid_ > 0) Stop();
}

void ChildProcess::Reaped(int status) {
  exit_code_ = ExitCode(status);
  pid_ = -1;
}

bool ChildProcess::Running() {
  if (pid_ <= 0) return false;
  int status = 0;
  const pid_t r = waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    Reaped(status);
    return false;
  }
  return r == 0;
}

void ChildProcess::Signal(int sig) const {
  if (pid_ > 0) kill(pid_, sig);
}

int ChildProcess::Wait() {
  if (pid_ <= 0) return exit_code_.value_or(-1);
  int status = 0;
  pid_t r;
  do {
    r = waitpid(pid_, &status, 0);
  } while (r < 0 && errno == EINTR);
  if (r != pid_) {
    pid_ = -1;
    return -1;
  }
  Reaped(status);
  return *exit_code_;
}

std::optional<int> ChildProcess::WaitFor(std::chrono::milliseconds timeout) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  while (Running()) {
    if (std::chrono::steady_clock::now() >= until) return std::nullopt;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return exit_code_;
}

int ChildProcess::Stop(std::chrono::milliseconds grace) {
  if (pid_ <= 0) return exit_code_.value_or(-1);
  Signal(SIGTERM);
  if (std::optional<int> code = WaitFor(grace)) return *code;
  return Kill();
}

int ChildProcess::Kill() {
  Signal(SIGKILL);
  return Wait();
}

pid_t ChildProcess::Release() {
  const pid_t pid = pid_;
  pid_ = -1;
  return pid;
}

int RunChild(const ChildOptions& options) {
  absl::StatusOr<ChildProcess> child = ChildProcess::Start(options);
  if (!child.ok()) {
    std::cerr << child.status().message() << "\n";
    return -1;
  }
  return child->Wait();
}

std::string DescribeProcess(pid_t pid) {
  const std::string proc = absl::StrCat("/proc/", pid);
  if (!std::filesystem::exists(proc)) return absl::StrCat("pid ", pid, ": no such process");
  std::string state;
  std::istringstream status(ReadSmallFile(proc + "/status"));
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("State:", 0) == 0 || line.rfind("Threads:", 0) == 0) {
      absl::StrAppend(&state, state.empty() ? "" : ", ", line);
    }
  }
  std::string out = absl::StrCat("pid ", pid, " comm=", ReadSmallFile(proc + "/comm"), " (", state,
                                 ") wchan=", ReadSmallFile(proc + "/wchan"));
  std::error_code ec;
  for (const auto& task : std::filesystem::directory_iterator(proc + "/task", ec)) {
    const std::string t = task.path().string();
    absl::StrAppend(&out, "\n  task ", task.path().filename().string(), " ",
                    ReadSmallFile(t + "/comm"), " wchan=", ReadSmallFile(t + "/wchan"));
    const std::string stack = ReadSmallFile(t + "/stack");
    if (!stack.empty()) absl::StrAppend(&out, "\n", stack);
  }
  return out;
}

}  // namespace custody::testing
