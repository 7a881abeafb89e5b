// custody-grpc-floor: what gRPC 1.51 alone costs per unary SignJws on this machine, the floor
// under custodyd's per-call CPU (issue 26). It serves custody.v1.Signer/SignJws with the callback
// API, as custodyd does, and answers every call with a fixed reply of custodyd's size (a JWS of
// --reply_bytes, the kid and alg given): no token, no audit, no policy, no custody code.
//   --handoff_threads=0  the callback answers at once on gRPC's own thread (gRPC alone);
//   --handoff_threads=N  the callback hands the call to N threads of its own, which Finish it:
//                        the shape a server whose work blocks (a token, a flush) must have.
// custody-bench starts it and drives it with the same stub callers as a custodyd row (--floor).
// A benchmark tool, not a server: it listens only on the Unix socket it is given.
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "custody/v1/custody.grpc.pb.h"
#include "grpcpp/grpcpp.h"

ABSL_FLAG(std::string, socket, "", "the Unix socket to listen on (required)");
ABSL_FLAG(int, reply_bytes, 200, "length of the fixed JWS in each reply");
ABSL_FLAG(std::string, kid, "floor", "kid in each reply");
ABSL_FLAG(std::string, alg, "ES256", "alg in each reply");
ABSL_FLAG(int, handoff_threads, 0, "0: answer on gRPC's callback thread; N: on N own threads");

namespace {

// Calls waiting to be finished by the hand-off threads.
class Handoff {
 public:
  explicit Handoff(int threads) {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Work(); });
  }
  ~Handoff() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : threads_) t.join();
  }
  void Push(grpc::ServerUnaryReactor* reactor) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(reactor);
    }
    cv_.notify_one();
  }

 private:
  void Work() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      grpc::ServerUnaryReactor* reactor = queue_.front();
      queue_.pop_front();
      lock.unlock();
      reactor->Finish(grpc::Status::OK);
      lock.lock();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<grpc::ServerUnaryReactor*> queue_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

class FloorSigner final : public custody::v1::Signer::CallbackService {
 public:
  FloorSigner(std::string jws, std::string kid, std::string alg, Handoff* handoff)
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
      handoff_->Push(reactor);
    } else {
      reactor->Finish(grpc::Status::OK);
    }
    return reactor;
  }

 private:
  const std::string jws_, kid_, alg_;
  Handoff* const handoff_;
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

  std::unique_ptr<Handoff> handoff;
  if (absl::GetFlag(FLAGS_handoff_threads) > 0) {
    handoff = std::make_unique<Handoff>(absl::GetFlag(FLAGS_handoff_threads));
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
