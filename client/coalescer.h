// Coalescer: turns concurrent SignJws (DecryptJwe) calls on one Client into SignJwsBatch
// (DecryptJweBatch) RPCs.
//
// gRPC's cost per unary call (HTTP/2 framing, completion-queue hops, thread wake-ups on both
// sides) is several times custody's own work per signature, and on a busy authorization server
// it is paid for every token. The coalescer keeps at most `max_in_flight` RPCs outstanding per
// Client; a call that arrives while they are all busy waits in a queue, and the next free slot
// sends everything queued (up to `max_items` / `max_bytes`) as one SignJwsBatch. There is no
// timer: a lone caller, or callers fewer than the slots, each send a plain SignJws at once, so
// coalescing adds no latency; it only appears when calls would otherwise queue behind gRPC.
// A slot is held for one attempt only: a plain call that comes back UNAVAILABLE is retried
// (with backoff, until its deadline) after its slot is released, so that during an outage the
// callers queued behind it are not kept waiting past their own deadlines.
//
// Each item keeps SignJws' semantics: its own authorization, audit line and status. Items that
// come back UNAVAILABLE, and every item of a batch RPC that failed as a whole, are re-sent by
// their own caller as plain SignJws calls with the client's retry policy and their original
// deadline; a custodyd without SignJwsBatch (UNIMPLEMENTED) or with a smaller batch limit
// (INVALID_ARGUMENT) switches coalescing off for good.
// Thread-safe.
#ifndef CUSTODY_CLIENT_COALESCER_H_
#define CUSTODY_CLIENT_COALESCER_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "custody/v1/custody.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace custody::client {

// How a Client's calls were sent (all zero when coalescing is off).
struct CoalescingStats {
  uint64_t plain_calls = 0;  // plain RPCs sent for a batch of one
  uint64_t batches = 0;      // batch RPCs sent
  uint64_t batched_items = 0;
  uint64_t fallbacks = 0;  // items re-sent as plain calls (UNAVAILABLE, batch failure)
};

// An RPC pair that can be coalesced: the plain call's messages, the batch RPC and its messages
// (whose results carry code, message and response), and the field whose size counts against
// max_bytes.
template <typename Req, typename Resp, typename BatchReq, typename BatchResp,
          grpc::Status (v1::Signer::Stub::*kSendBatch)(grpc::ClientContext*, const BatchReq&,
                                                       BatchResp*),
          grpc::Status (v1::Signer::Stub::*kSendOne)(grpc::ClientContext*, const Req&, Resp*),
          const std::string& (Req::*kBody)() const>
struct RpcBatching {
  using Request = Req;
  using Response = Resp;
  using BatchRequest = BatchReq;
  using BatchResponse = BatchResp;
  static grpc::Status Send(v1::Signer::Stub* stub, grpc::ClientContext* ctx,
                           const BatchRequest& request, BatchResponse* response) {
    return (stub->*kSendBatch)(ctx, request, response);
  }
  static grpc::Status SendOne(v1::Signer::Stub* stub, grpc::ClientContext* ctx,
                              const Request& request, Response* response) {
    return (stub->*kSendOne)(ctx, request, response);
  }
  static size_t Bytes(const Request& request) { return (request.*kBody)().size(); }
};
using SignJwsBatching =
    RpcBatching<v1::SignJwsRequest, v1::SignJwsResponse, v1::SignJwsBatchRequest,
                v1::SignJwsBatchResponse, &v1::Signer::Stub::SignJwsBatch,
                &v1::Signer::Stub::SignJws, &v1::SignJwsRequest::payload>;
using DecryptJweBatching =
    RpcBatching<v1::DecryptJweRequest, v1::DecryptJweResponse, v1::DecryptJweBatchRequest,
                v1::DecryptJweBatchResponse, &v1::Signer::Stub::DecryptJweBatch,
                &v1::Signer::Stub::DecryptJwe, &v1::DecryptJweRequest::jwe>;

template <typename Batching>
class Coalescer {
 public:
  using Request = typename Batching::Request;
  using Response = typename Batching::Response;
  using Stats = CoalescingStats;
  struct Options {
    int max_in_flight = 2;           // outstanding RPCs (plain or batch) per Client, >= 1
    int max_items = 32;              // requests per batch (custodyd accepts 64)
    size_t max_bytes = 1024 * 1024;  // request bytes per batch (custodyd receives <= 4 MiB)
  };
  // A plain call with retries, bounded by the call's deadline.
  using Plain = std::function<absl::StatusOr<Response>(const Request&, absl::Time deadline)>;

  // `stub` must outlive the coalescer.
  Coalescer(v1::Signer::Stub* stub, const Options& options, Plain plain);

  absl::StatusOr<Response> Call(const Request& request, absl::Time deadline);

  Stats stats() const;

 private:
  struct Pending;
  // A batch of one: one attempt of the plain RPC (UNAVAILABLE: retried by the caller after the
  // slot is released).
  void SendOne(Pending* me);
  // Sends `batch` (>= 2 items) as one batch RPC and stores each item's outcome.
  void SendBatch(Pending* const* batch, size_t n);

  v1::Signer::Stub* const stub_;
  const Options options_;
  const Plain plain_;

  absl::Mutex mu_;
  std::deque<Pending*> queue_ ABSL_GUARDED_BY(mu_);
  int in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  std::atomic<bool> batch_supported_{true};
  std::atomic<uint64_t> plain_calls_{0}, batches_{0}, batched_items_{0}, fallbacks_{0};
};

using SignJwsCoalescer = Coalescer<SignJwsBatching>;
using DecryptJweCoalescer = Coalescer<DecryptJweBatching>;
extern template class Coalescer<SignJwsBatching>;
extern template class Coalescer<DecryptJweBatching>;

}  // namespace custody::client

#endif  // CUSTODY_CLIENT_COALESCER_H_
