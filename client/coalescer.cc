#include "client/coalescer.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "grpcpp/grpcpp.h"

namespace custody::client {

template <typename Batching>
struct Coalescer<Batching>::Pending {
  const Request* request = nullptr;
  absl::Time deadline;
  bool done = false;      // result (or fallback) is set
  bool fallback = false;  // a batch item the caller re-sends as a plain call
  bool retry = false;     // a plain call the caller retries outside the slot
  absl::StatusOr<Response> result = absl::UnknownError("not sent");
};

template <typename Batching>
Coalescer<Batching>::Coalescer(v1::Signer::Stub* stub, const Options& options, Plain plain)
    : stub_(stub), options_(options), plain_(std::move(plain)) {}

template <typename Batching>
absl::StatusOr<typename Batching::Response> Coalescer<Batching>::Call(const Request& request,
                                                                      absl::Time deadline) {
  Pending me;
  me.request = &request;
  me.deadline = deadline;
  std::vector<Pending*> batch;
  mu_.Lock();
  queue_.push_back(&me);
  for (;;) {
    // Wake for our result, or to send when a slot is free and we are first in the queue (the
    // others stay asleep: absl::Mutex evaluates each waiter's condition and wakes only those
    // whose condition holds).
    auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return me.done ||
             (in_flight_ < options_.max_in_flight && !queue_.empty() && queue_.front() == &me);
    };
    mu_.Await(absl::Condition(&ready));
    if (me.done) break;
    // Sender: take the head of the queue (us first).
    const size_t max_items = batch_supported_.load(std::memory_order_relaxed)
                                 ? static_cast<size_t>(std::max(options_.max_items, 1))
                                 : 1;
    batch.clear();
    size_t bytes = 0;
    while (!queue_.empty() && batch.size() < max_items) {
      Pending* next = queue_.front();
      bytes += Batching::Bytes(*next->request);
      if (!batch.empty() && bytes > options_.max_bytes) break;
      queue_.pop_front();
      batch.push_back(next);
    }
    ++in_flight_;
    mu_.Unlock();
    if (batch.size() == 1) {
      plain_calls_.fetch_add(1, std::memory_order_relaxed);
      SendOne(&me);
    } else {
      SendBatch(batch.data(), batch.size());
    }
    mu_.Lock();
    --in_flight_;
    for (Pending* p : batch) p->done = true;
  }
  mu_.Unlock();
  if (me.fallback) {
    fallbacks_.fetch_add(1, std::memory_order_relaxed);
    return plain_(request, deadline);
  }
  if (me.retry) return plain_(request, deadline);
  return std::move(me.result);
}

// One attempt while holding the slot; an UNAVAILABLE answer is retried with backoff after the
// slot is released (as a batch's UNAVAILABLE items are), so that a sustained outage cannot hold
// the slot for a whole deadline while the callers queued behind it wait past theirs.
template <typename Batching>
void Coalescer<Batching>::SendOne(Pending* me) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(me->deadline));
  Response response;
  const grpc::Status status = Batching::SendOne(stub_, &ctx, *me->request, &response);
  if (status.ok()) {
    me->result = std::move(response);
  } else if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
    me->retry = true;
  } else {
    me->result =
        absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
  }
}

template <typename Batching>
void Coalescer<Batching>::SendBatch(Pending* const* batch, size_t n) {
  typename Batching::BatchRequest request;
  absl::Time deadline = absl::InfiniteFuture();
  for (size_t i = 0; i < n; ++i) {
    *request.add_requests() = *batch[i]->request;
    deadline = std::min(deadline, batch[i]->deadline);
  }
  batches_.fetch_add(1, std::memory_order_relaxed);
  batched_items_.fetch_add(n, std::memory_order_relaxed);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(deadline));
  typename Batching::BatchResponse response;
  grpc::Status status = Batching::Send(stub_, &ctx, request, &response);
  if (!status.ok() || response.results_size() != static_cast<int>(n)) {
    // The batch as a whole failed (transport, deadline, an older custodyd): every item goes
    // again on its own, with the retry policy and its own deadline. A custodyd without the RPC
    // (UNIMPLEMENTED) or with a smaller --max_batch_items (INVALID_ARGUMENT) gets plain calls
    // from now on.
    if (status.error_code() == grpc::StatusCode::UNIMPLEMENTED ||
        status.error_code() == grpc::StatusCode::INVALID_ARGUMENT) {
      batch_supported_.store(false);
    }
    for (size_t i = 0; i < n; ++i) batch[i]->fallback = true;
    return;
  }
  for (size_t i = 0; i < n; ++i) {
    auto* result = response.mutable_results(static_cast<int>(i));
    const auto code = static_cast<absl::StatusCode>(result->code());
    if (code == absl::StatusCode::kOk) {
      batch[i]->result = std::move(*result->mutable_response());
    } else if (code == absl::StatusCode::kUnavailable) {
      batch[i]->fallback = true;  // retried like a plain call's UNAVAILABLE
    } else {
      batch[i]->result = absl::Status(code, result->message());
    }
  }
}

template <typename Batching>
CoalescingStats Coalescer<Batching>::stats() const {
  return Stats{plain_calls_.load(), batches_.load(), batched_items_.load(), fallbacks_.load()};
}

template class Coalescer<SignJwsBatching>;
template class Coalescer<DecryptJweBatching>;

}  // namespace custody::client
