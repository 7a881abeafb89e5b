// custodyd's Unix-socket listener. gRPC 1.51 accepts Unix connections itself but tells a handler
// nothing about the peer but "unix:PATH", so every local caller would look alike. custodyd
// accepts the connections instead and hands each connected socket to the gRPC server
// (grpc::AddInsecureChannelFromFd); a handler then sees the peer "fd:N" and reads the kernel's
// credentials of that socket (SO_PEERCRED: the uid that connected), which is the caller's
// identity "uid:N" (see request_guard.h).
#ifndef CUSTODY_SERVER_GRPC_UNIX_LISTENER_H_
#define CUSTODY_SERVER_GRPC_UNIX_LISTENER_H_

#include <sys/types.h>

#include <atomic>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grpcpp/server.h"

namespace custody::server {

// Connections open at once: beyond either cap a new connection is accepted and closed at once
// (logged, counted), so that the backlog never holds the callers who are within their share.
struct UnixListenerLimits {
  int max_connections = 1024;
  int max_connections_per_uid = 128;
};

class UnixListener {
 public:
  using Limits = UnixListenerLimits;

  // Binds and listens on `path` (ReplaceStaleSocket first: a live server's socket or any other
  // file there is refused), mode `mode` (0660: the owner and its group may connect; policy
  // decides the rest). The socket's st_dev/st_ino are recorded for Stop.
  static absl::StatusOr<std::unique_ptr<UnixListener>> Listen(const std::string& path, mode_t mode);
  ~UnixListener();
  UnixListener(const UnixListener&) = delete;
  UnixListener& operator=(const UnixListener&) = delete;

  // Starts the accept thread: every connection within `limits` becomes a channel of `server`.
  void Serve(grpc::Server* server, Limits limits = Limits{});
  // Stops accepting (the thread ends and the socket file is removed if it is still the one
  // this listener bound: same st_dev/st_ino; else left and logged); established connections
  // belong to the gRPC server from then on. Call before grpc::Server::Shutdown.
  void Stop();

  const std::string& path() const { return path_; }
  uint64_t accepted() const { return accepted_.load(); }
  uint64_t refused() const { return refused_.load(); }
  // Connections open at the accept thread's last look.
  int open_connections() const { return open_.load(); }

 private:
  // A connection handed to gRPC. gRPC closes the descriptor when the connection ends without
  // telling us, so a connection counts as open while its descriptor still names the same socket
  // (device and inode: a reused descriptor number names another).
  struct Connection {
    int fd;
    dev_t dev;
    ino_t ino;
    uid_t uid;
  };
  UnixListener(std::string path, int listen_fd, int wake_read, int wake_write);
  void AcceptLoop(grpc::Server* server, Limits limits);
  // Drops the connections gRPC has closed since the last look.
  void Prune();
  // Whether `uid` may open one more connection (pruning first when a cap looks reached).
  bool WithinLimits(uid_t uid, const Limits& limits);

  std::string path_;
  int listen_fd_;
  int wake_read_;  // a pipe that wakes the accept loop's poll() to stop it
  int wake_write_;
  std::thread thread_;
  std::atomic<uint64_t> accepted_{0};
  std::atomic<uint64_t> refused_{0};
  std::atomic<int> open_{0};
  std::vector<Connection> connections_;  // the accept thread's alone
  std::map<uid_t, int> per_uid_;         // the accept thread's alone
  dev_t dev_ = 0;                        // of the socket file bound by Listen
  ino_t ino_ = 0;
};

// Prepares `path` for a new listening socket: nothing there is fine; a socket nobody listens on
// (connect() refused: left by a killed run) is unlinked; a socket a live server answers on is
// FAILED_PRECONDITION "another custodyd is listening on PATH"; any other file is refused.
absl::Status ReplaceStaleSocket(const std::string& path);

// The uid that connected the socket behind a gRPC peer string "fd:N" made by UnixListener;
// nullopt for any other peer, or when the descriptor is not a Unix socket.
std::optional<uid_t> UnixPeerUid(absl::string_view peer);

}  // namespace custody::server

#endif  // CUSTODY_SERVER_GRPC_UNIX_LISTENER_H_
