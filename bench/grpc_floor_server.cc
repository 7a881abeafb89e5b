// custody-grpc-floor: what gRPC 1.51 alone costs per unary SignJws on this machine, the floor
// under custodyd's per-call CPU (issue 26). It serves custody.v1.Signer/SignJws with the callback
// API, as custodyd does, and answers every call with a fixed reply of custodyd's size (a JWS of
// --reply_bytes, the kid and alg given): no token, no audit, no policy.
//   --handoff_threads=0  the callback answers at once on gRPC's own thread (gRPC alone);
//   --handoff_threads=N  the callback hands the call to custodyd's own UnaryPool (at most N
//                        threads), whose thread Finishes it: the shape a server whose work
//                        blocks (a token, a flush) must have, with custodyd's hand-off.
// custody-bench starts it (with 64 threads and 64 waiting, custodyd's --unary_threads and
// --unary_queue defaults) and drives it with the same stub callers as a custodyd row.
// A benchmark tool, not a server: it listens only on the Unix socket it is given.
#include <csignal>
#include <cstdio>
#include <memory>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "custody/v1/custody.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "server/grpc/unary_pool.h"

ABSL_FLAG(std::string, socket, "", "the Unix socket to listen on (required)");
ABSL_FLAG(int, reply_bytes, 200, "length of the fixed JWS in each reply");
ABSL_FLAG(std::string, kid, "floor", "kid in each reply");
ABSL_FLAG(std::string, alg, "ES256", "alg in each reply");
ABSL_FLAG(int, handoff_threads, 0,
          "0: answer on gRPC's callback thread; N: through custodyd's UnaryPool of at most N "
          "threads");

namespace {

class FloorSigner final : public custody::v1::Signer::CallbackService {
 public:
  FloorSigner(std::string jws, std::string kid, std::string alg,
              custody::server::UnaryPool* handoff)
      : jws_(std::move(jws)), kid_(std::move(kid)), alg_(std::move(alg)), handoff_(handoff) {}

  grpc::ServerUnaryReactor* SignJws(grpc::CallbackServerContext* context,
                                    const custody::v1::SignJwsRequest* /*request*/,
                                    custody::v1::SignJwsResponse* response) override {
    response->set_jws(jws_);
    response->set_kid(kid_);
    response->set_alg(alg_);
    response->set_version(1);
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    if (handoff_ != nullptr) {
      if (!handoff_->TrySubmit([reactor] { reactor->Finish(grpc::Status::OK); })) {
        reactor->Finish(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "floor: queue full"));
      }
    } else {
      reactor->Finish(grpc::Status::OK);
    }
    return reactor;
  }

 private:
  const std::string jws_, kid_, alg_;
  custody::server::UnaryPool* const handoff_;
};

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::string socket = absl::GetFlag(FLAGS_socket);
  if (socket.empty()) {
    std::fprintf(stderr, "custody-grpc-floor: --socket is required\n");
    return 2;
  }
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);  // before gRPC starts its threads

  std::unique_ptr<custody::server::UnaryPool> handoff;
  if (absl::GetFlag(FLAGS_handoff_threads) > 0) {
    handoff = std::make_unique<custody::server::UnaryPool>(absl::GetFlag(FLAGS_handoff_threads),
                                                           /*max_queued=*/64);
  }
  FloorSigner service(std::string(static_cast<size_t>(absl::GetFlag(FLAGS_reply_bytes)), 'x'),
                      absl::GetFlag(FLAGS_kid), absl::GetFlag(FLAGS_alg), handoff.get());
  grpc::ServerBuilder builder;
  builder.AddListeningPort("unix:" + socket, grpc::InsecureServerCredentials());
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr) {
    std::fprintf(stderr, "custody-grpc-floor: cannot listen on %s\n", socket.c_str());
    return 1;
  }
  std::fprintf(stderr, "custody-grpc-floor: serving on %s\n", socket.c_str());
  int signal = 0;
  sigwait(&stop_signals, &signal);
  server->Shutdown();
  return 0;
}
