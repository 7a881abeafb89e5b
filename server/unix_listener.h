// custodyd's Unix-socket listener. gRPC 1.51 accepts Unix connections itself but tells a handler
// nothing about the peer but "unix:PATH", so every local caller would look alike. custodyd
// accepts the connections instead and hands each connected socket to the gRPC server
// (grpc::AddInsecureChannelFromFd); a handler then sees the peer "fd:N" and reads the kernel's
// credentials of that socket (SO_PEERCRED: the uid that connected), which is the caller's
// identity "uid:N" (see request_guard.h).
#ifndef CUSTODY_SERVER_UNIX_LISTENER_H_
#define CUSTODY_SERVER_UNIX_LISTENER_H_

#include <sys/types.h>

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grpcpp/server.h"

namespace custody::server {

class UnixListener {
 public:
  // Binds and listens on `path` (ReplaceStaleSocket first: a live server's socket or any other
  // file there is refused), mode `mode` (0660: the owner and its group may connect; policy
  // decides the rest). The socket's st_dev/st_ino are recorded for Stop.
  static absl::StatusOr<std::unique_ptr<UnixListener>> Listen(const std::string& path, mode_t mode);
  ~UnixListener();
  UnixListener(const UnixListener&) = delete;
  UnixListener& operator=(const UnixListener&) = delete;

  // Starts the accept thread: every connection becomes a channel of `server`.
  void Serve(grpc::Server* server);
  // Stops accepting (the thread ends and the socket file is removed if it is still the one
  // this listener bound: same st_dev/st_ino; else left and logged); established connections
  // belong to the gRPC server from then on. Call before grpc::Server::Shutdown.
  void Stop();

  const std::string& path() const { return path_; }
  uint64_t accepted() const { return accepted_.load(); }

 private:
  UnixListener(std::string path, int listen_fd, int wake_read, int wake_write);
  void AcceptLoop(grpc::Server* server);

  std::string path_;
  int listen_fd_;
  int wake_read_;  // a pipe that wakes the accept loop's poll() to stop it
  int wake_write_;
  std::thread thread_;
  std::atomic<uint64_t> accepted_{0};
  dev_t dev_ = 0;  // of the socket file bound by Listen
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

#endif  // CUSTODY_SERVER_UNIX_LISTENER_H_
