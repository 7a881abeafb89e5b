#include "server/grpc/unix_listener.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "grpcpp/server_posix.h"

namespace custody::server {
namespace {

absl::Status Errno(absl::string_view what, const std::string& path) {
  return absl::UnavailableError(absl::StrCat(what, " '", path, "': ", std::strerror(errno)));
}

}  // namespace

absl::StatusOr<std::unique_ptr<UnixListener>> UnixListener::Listen(const std::string& path,
                                                                   mode_t mode) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("Unix socket path '", path,
                                                   "' is empty or longer than ",
                                                   sizeof(addr.sun_path) - 1, " bytes"));
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  if (absl::Status s = ReplaceStaleSocket(path); !s.ok()) return s;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return Errno("socket() for", path);
  // The socket file is created with mode 0600 (umask) and widened to `mode` once bound, so that
  // no one outside `mode` can connect in between.
  mode_t old_umask = umask(0177);
  int rc = bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  umask(old_umask);
  if (rc != 0 || chmod(path.c_str(), mode) != 0 || listen(fd, SOMAXCONN) != 0) {
    absl::Status s = Errno("cannot listen on", path);
    close(fd);
    return s;
  }
  int pipe_fds[2];
  if (pipe2(pipe_fds, O_CLOEXEC | O_NONBLOCK) != 0) {
    absl::Status s = Errno("pipe() for", path);
    close(fd);
    unlink(path.c_str());
    return s;
  }
  auto listener =
      std::unique_ptr<UnixListener>(new UnixListener(path, fd, pipe_fds[0], pipe_fds[1]));
  struct stat bound {};
  if (stat(path.c_str(), &bound) == 0) {  // what Stop removes: this socket file, no other
    listener->dev_ = bound.st_dev;
    listener->ino_ = bound.st_ino;
  }
  return listener;
}

absl::Status ReplaceStaleSocket(const std::string& path) {
  struct stat st {};
  if (lstat(path.c_str(), &st) != 0) return absl::OkStatus();
  // Only a socket left by a killed run is replaced: never unlink a file someone else put there,
  // nor the socket of a server that is alive.
  if (!S_ISSOCK(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("'", path, "' exists and is not a socket; refusing to replace it"));
  }
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("Unix socket path '", path, "' is too long"));
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (probe < 0) return Errno("socket() for", path);
  int rc = connect(probe, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  int connect_errno = errno;
  close(probe);
  if (rc == 0 || connect_errno == EAGAIN) {  // EAGAIN: alive, its backlog full
    return absl::FailedPreconditionError(
        absl::StrCat("another custodyd is listening on ", path,
                     "; stop it first, or give this one another --listen (or --state_dir)"));
  }
  if (connect_errno != ECONNREFUSED) {
    errno = connect_errno;
    return Errno("cannot tell whether a server listens on", path);
  }
  // Refused: nothing listens; a socket left by a killed run.
  if (unlink(path.c_str()) != 0) return Errno("cannot remove stale socket", path);
  Log(LogLevel::kWarning, "unix_listener.stale_socket_replaced", {{"path", path}});
  return absl::OkStatus();
}

UnixListener::UnixListener(std::string path, int listen_fd, int wake_read, int wake_write)
    : path_(std::move(path)),
      listen_fd_(listen_fd),
      wake_read_(wake_read),
      wake_write_(wake_write) {}

UnixListener::~UnixListener() {
  Stop();
  close(wake_read_);
  close(wake_write_);
}

void UnixListener::Serve(grpc::Server* server, Limits limits) {
  thread_ = std::thread([this, server, limits] { AcceptLoop(server, limits); });
}

void UnixListener::Prune() {
  size_t kept = 0;
  for (const Connection& c : connections_) {
    struct stat st {};
    if (fstat(c.fd, &st) == 0 && st.st_dev == c.dev && st.st_ino == c.ino) {
      connections_[kept++] = c;
    } else if (--per_uid_[c.uid] <= 0) {
      per_uid_.erase(c.uid);
    }
  }
  connections_.resize(kept);
  open_.store(static_cast<int>(kept));
}

bool UnixListener::WithinLimits(uid_t uid, const Limits& limits) {
  auto within = [&] {
    auto it = per_uid_.find(uid);
    return connections_.size() < static_cast<size_t>(limits.max_connections) &&
           (it == per_uid_.end() || it->second < limits.max_connections_per_uid);
  };
  if (within()) return true;
  Prune();
  return within();
}

void UnixListener::Stop() {
  if (listen_fd_ < 0) return;
  char byte = 1;
  (void)!write(wake_write_, &byte, 1);
  if (thread_.joinable()) thread_.join();
  close(listen_fd_);
  listen_fd_ = -1;
  // Remove the socket file only if it is still ours: another server may have replaced it (after
  // this one was thought dead), and unlinking its socket would make it unreachable.
  struct stat st {};
  if (lstat(path_.c_str(), &st) == 0 && st.st_dev == dev_ && st.st_ino == ino_) {
    unlink(path_.c_str());
  } else {
    Log(LogLevel::kWarning, "unix_listener.socket_not_removed",
        {{"path", path_}, {"reason", "the file there is no longer this server's socket"}});
  }
}

void UnixListener::AcceptLoop(grpc::Server* server, Limits limits) {
  absl::Time last_refusal_log = absl::InfinitePast();
  uint64_t refused_since_log = 0;
  for (;;) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_read_, POLLIN, 0}};
    // Wakes every 5 s to forget the connections gRPC closed (for open_connections()).
    int ready = poll(fds, 2, 5000);
    if (ready < 0) {
      if (errno == EINTR) continue;
      Log(LogLevel::kError, "unix_listener.poll", {{"error", std::strerror(errno)}});
      return;
    }
    if (ready == 0) {
      Prune();
      continue;
    }
    if (fds[1].revents != 0) return;
    if (fds[0].revents == 0) continue;
    int conn = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (conn < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED) {
        continue;
      }
      // EMFILE/ENFILE/ENOBUFS: out of descriptors or memory. Back off rather than spin; the
      // connection waits in the backlog.
      Log(LogLevel::kError, "unix_listener.accept", {{"error", std::strerror(errno)}});
      pollfd wake{wake_read_, POLLIN, 0};
      if (poll(&wake, 1, 100) > 0) return;
      continue;
    }
    ucred cred{};
    socklen_t len = sizeof(cred);
    struct stat st {};
    if (getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || fstat(conn, &st) != 0) {
      close(conn);
      continue;
    }
    if (!WithinLimits(cred.uid, limits)) {
      // Closed at once: the caller sees the connection end and may retry; logged at most once
      // a second with the count, so a flood cannot flood the log.
      close(conn);
      refused_.fetch_add(1);
      ++refused_since_log;
      if (absl::Now() - last_refusal_log >= absl::Seconds(1)) {
        last_refusal_log = absl::Now();
        Log(LogLevel::kWarning, "unix_listener.refused",
            {{"uid", absl::StrCat(cred.uid)},
             {"refused", absl::StrCat(refused_since_log)},
             {"open", absl::StrCat(connections_.size())},
             {"max_connections", absl::StrCat(limits.max_connections)},
             {"max_connections_per_uid", absl::StrCat(limits.max_connections_per_uid)}});
        refused_since_log = 0;
      }
      continue;
    }
    connections_.push_back(Connection{conn, st.st_dev, st.st_ino, cred.uid});
    ++per_uid_[cred.uid];
    open_.store(static_cast<int>(connections_.size()));
    accepted_.fetch_add(1);
    // From here the descriptor is gRPC's: it closes it when the connection ends. It stays open
    // while any call on the connection is alive (the call holds the transport), so the peer
    // "fd:N" a handler sees always names this connection.
    grpc::AddInsecureChannelFromFd(server, conn);
  }
}

std::optional<uid_t> UnixPeerUid(absl::string_view peer) {
  if (!absl::ConsumePrefix(&peer, "fd:")) return std::nullopt;
  int fd = -1;
  if (!absl::SimpleAtoi(peer, &fd) || fd < 0) return std::nullopt;
  sockaddr_storage local{};
  socklen_t local_len = sizeof(local);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &local_len) != 0 ||
      local.ss_family != AF_UNIX) {
    return std::nullopt;
  }
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || len != sizeof(cred)) {
    return std::nullopt;
  }
  return cred.uid;
}

}  // namespace custody::server
