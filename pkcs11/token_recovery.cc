// The recovery state machine behind every Token call (TokenState): one attempt on a pooled
// session under the module gate, the repair a failure calls for (a fresh session and login,
// stale handles found again by CKA_ID, or a module re-initialization with its backoff), the one
// retry, reconciliation after a failed creation, health, and the error and latency counters.
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "pkcs11/token_internal.h"

namespace custody::pkcs11::internal {
namespace {

// `to` with every payload of `from` (the CK_RV a CkError carries, see CkrOf).
void CopyPayloads(const absl::Status& from, absl::Status& to) {
  from.ForEachPayload(
      [&](absl::string_view type, const absl::Cord& value) { to.SetPayload(type, value); });
}

}  // namespace

absl::Status TokenState::Run(const KeyPair* key, const Op& op) {
  Attempt first = Try(op, /*fresh=*/false);
  if (first.status.ok()) return Succeeded();
  const Damage damage = DamageOfStatus(first.status);
  if (damage == Damage::kNone) return first.status;
  if (absl::Status recovered = Recover(damage, first.generation, key); !recovered.ok()) {
    return RecoveryFailed(first.status, recovered);
  }
  retries.fetch_add(1, std::memory_order_relaxed);
  const bool fresh = damage != Damage::kHandles;
  Attempt retry = Try(op, fresh);
  if (fresh && retry.acquired) recoveries.fetch_add(1, std::memory_order_relaxed);
  return Finish(retry);
}

absl::Status TokenState::RunOnKey(const KeyPair& key, CK_OBJECT_CLASS cls, const KeyOp& op) {
  return Run(&key, [&](SessionPool::Lease& lease) {
    return WithHandle(lease, key, cls, [&](CK_OBJECT_HANDLE handle) { return op(lease, handle); });
  });
}

absl::Status TokenState::RunCreating(const Op& op, const bool& started, std::string_view id,
                                     std::shared_ptr<KeyPair>& pair) {
  for (int round = 0;; ++round) {
    Attempt attempt = Try(op, /*fresh=*/round > 0);
    if (round > 0 && attempt.acquired) recoveries.fetch_add(1, std::memory_order_relaxed);
    if (attempt.status.ok()) return Succeeded();
    const Damage damage = DamageOfStatus(attempt.status);
    if (damage == Damage::kNone) return round > 0 ? Finish(attempt) : attempt.status;
    if (round > 0 && !started) return Finish(attempt);  // failed twice: give up
    if (absl::Status recovered = Recover(damage, attempt.generation, nullptr); !recovered.ok()) {
      return RecoveryFailed(attempt.status, recovered);
    }
    if (started) return Reconcile(attempt.status, id, pair);
    retries.fetch_add(1, std::memory_order_relaxed);
  }
}

absl::Status TokenState::WithHandle(SessionPool::Lease& lease, const KeyPair& key,
                                    CK_OBJECT_CLASS cls,
                                    const std::function<absl::Status(CK_OBJECT_HANDLE)>& op) {
  std::atomic<uint64_t>& cached = cls == CKO_PRIVATE_KEY ? key.private_handle : key.public_handle;
  const uint64_t generation = module->generation();
  if (key.handle_generation.load(std::memory_order_acquire) != generation) {
    CUSTODY_RETURN_IF_ERROR(ResolveHandles(lease, key, cls, generation));
  } else if (cached.load(std::memory_order_acquire) == CK_INVALID_HANDLE) {
    CUSTODY_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE found, FindOne(fn, lease, cls, key.id));
    cached.store(found, std::memory_order_release);
  }
  return op(cached.load(std::memory_order_acquire));
}

void TokenState::RecordLatency(Timed what, absl::Duration elapsed) {
  const auto micros = static_cast<uint64_t>(absl::ToInt64Microseconds(elapsed));
  absl::MutexLock lock(&metrics_mu);
  Token::Latency& latency_of = latency[static_cast<int>(what)];
  ++latency_of.count;
  latency_of.total_micros += micros;
  latency_of.max_micros = std::max(latency_of.max_micros, micros);
  const auto& bounds = Token::kLatencyBoundsMicros;
  ++latency_of.buckets[static_cast<size_t>(std::lower_bound(bounds.begin(), bounds.end(), micros) -
                                           bounds.begin())];
}

Damage TokenState::DamageOfStatus(const absl::Status& status) {
  std::optional<CK_RV> rv = CkrOf(status);
  return rv.has_value() ? DamageOf(*rv) : Damage::kNone;
}

TokenState::Attempt TokenState::Try(const Op& op, bool fresh) {
  absl::ReaderMutexLock gate(&module->gate());
  Attempt attempt;
  attempt.generation = module->generation();
  absl::StatusOr<SessionPool::Lease> lease = pool->Acquire(fresh);
  if (!lease.ok()) {
    attempt.status = lease.status();
  } else {
    attempt.acquired = true;
    attempt.status = op(*lease);
    // Whatever failed in a session-damaging way, the session does not go back to the pool
    // (Lease::Check already decided between closing and forgetting it for most calls).
    if (const Damage damage = DamageOfStatus(attempt.status);
        damage == Damage::kSession || damage == Damage::kModule) {
      lease->Discard();
    }
  }
  CountError(attempt.status);
  return attempt;
}

absl::Status TokenState::Recover(Damage damage, uint64_t generation, const KeyPair* key) {
  switch (damage) {
    case Damage::kNone:
      return absl::OkStatus();
    case Damage::kSession:
    case Damage::kHandles:
      // Session damage too: modules may void object handles when the application's last
      // session closes (SoftHSM2 does), and dropping the broken session may have been that.
      if (key != nullptr) key->handle_generation.store(kStaleHandles, std::memory_order_release);
      return absl::OkStatus();
    case Damage::kModule:
      break;
  }
  // When the module is still the one the attempt failed on, this recovery would cycle it:
  // only once the backoff allows. (Past that generation, someone else already did, and
  // Reinitialize only follows the token.)
  if (module->generation() == generation) {
    absl::MutexLock lock(&backoff_mu);
    const absl::Time now = absl::Now();
    if (now < reinit_not_before) {
      reinit_backoffs.fetch_add(1, std::memory_order_relaxed);
      return absl::UnavailableError(absl::StrCat(
          "module re-initialization backing off for another ",
          absl::FormatDuration(absl::Ceil(reinit_not_before - now, absl::Milliseconds(1)))));
    }
    reinit_not_before = now + reinit_backoff;
    reinit_backoff = std::min(reinit_backoff * 2, reinit_backoff_max);
    reinit_backoff_armed.store(true, std::memory_order_relaxed);
  }
  absl::StatusOr<bool> reinitialized = module->Reinitialize(generation);
  if (absl::IsFailedPrecondition(reinitialized.status())) {
    // Someone else's module: not ours to finalize. A new session is all we can try.
    Log(LogLevel::kWarning, "pkcs11.reinitialize_skipped",
        {{"status", reinitialized.status().ToString()}});
    return absl::OkStatus();
  }
  if (!reinitialized.ok()) {
    CountError(reinitialized.status());
    return reinitialized.status();
  }
  if (*reinitialized) {
    reinitializations.fetch_add(1, std::memory_order_relaxed);
    Log(LogLevel::kWarning, "pkcs11.module_reinitialized", {{"module", info.module_path}});
  }
  return FollowToken();
}

absl::Status TokenState::FollowToken() {
  absl::ReaderMutexLock gate(&module->gate());
  absl::StatusOr<std::vector<SlotToken>> tokens = ListTokens(fn);
  if (!tokens.ok()) {
    CountError(tokens.status());
    return tokens.status();
  }
  for (const SlotToken& token : *tokens) {
    if (token.initialized && token.serial == info.serial && token.label == info.label) {
      pool->SetSlot(token.slot);
      return absl::OkStatus();
    }
  }
  return absl::UnavailableError(absl::StrCat("token '", info.label, "' (serial ", info.serial,
                                             ") is not present after re-initializing '",
                                             info.module_path, "'"));
}

absl::Status TokenState::Succeeded() {
  healthy.store(true, std::memory_order_relaxed);
  if (reinit_backoff_armed.load(std::memory_order_relaxed)) {
    absl::MutexLock lock(&backoff_mu);
    reinit_not_before = absl::InfinitePast();
    reinit_backoff = reinit_backoff_initial;
    reinit_backoff_armed.store(false, std::memory_order_relaxed);
  }
  return absl::OkStatus();
}

absl::Status TokenState::Unhealthy(absl::Status status) {
  healthy.store(false, std::memory_order_relaxed);
  return WithCode(status, absl::StatusCode::kUnavailable);
}

absl::Status TokenState::RecoveryFailed(const absl::Status& failure, const absl::Status& recovery) {
  Log(LogLevel::kError, "pkcs11.recovery_failed",
      {{"failure", failure.ToString()}, {"recovery", recovery.ToString()}});
  absl::Status status(absl::StatusCode::kUnavailable,
                      absl::StrCat(failure.message(), "; recovery failed: ", recovery.message()));
  CopyPayloads(failure, status);
  return Unhealthy(status);
}

absl::Status TokenState::Finish(const Attempt& retry) {
  if (retry.status.ok()) return Succeeded();
  const bool token_failure = CkrOf(retry.status).has_value();
  // No session could be opened or logged in (re-login impossible), or the operation failed
  // again in a way a recovery was meant to repair.
  if ((token_failure && !retry.acquired) || DamageOfStatus(retry.status) != Damage::kNone) {
    Log(LogLevel::kError, "pkcs11.retry_failed", {{"status", retry.status.ToString()}});
    return Unhealthy(retry.status);
  }
  return retry.status;
}

absl::Status TokenState::Reconcile(const absl::Status& cause, std::string_view id,
                                   std::shared_ptr<KeyPair>& pair) {
  absl::Status verdict;
  Attempt attempt = Try(
      [&](SessionPool::Lease& lease) -> absl::Status {
        CUSTODY_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> private_keys,
                                 FindKeyObjects(fn, lease, CKO_PRIVATE_KEY, id));
        CUSTODY_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> public_keys,
                                 FindKeyObjects(fn, lease, CKO_PUBLIC_KEY, id));
        if (private_keys.size() == 1 && public_keys.size() == 1) {
          // The token did the work; only its answer was lost.
          CUSTODY_ASSIGN_OR_RETURN(KeySpec spec, ReadKeySpec(fn, lease, private_keys.front()));
          CUSTODY_ASSIGN_OR_RETURN(std::string label,
                                   GetBytes(fn, lease, private_keys.front(), CKA_LABEL));
          pair = MakeKeyPair(id, std::move(label), spec, private_keys.front(), public_keys.front(),
                             module->generation());
          Log(LogLevel::kWarning, "pkcs11.reconciled_complete_pair",
              {{"id", PrintableId(id)}, {"cause", cause.ToString()}});
          verdict = absl::OkStatus();
          return absl::OkStatus();
        }
        CUSTODY_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> leftovers,
                                 FindObjects(fn, lease, {Attr(CKA_ID, id)}));
        CUSTODY_RETURN_IF_ERROR(DestroyObjects(fn, lease, leftovers));
        verdict = absl::Status(
            absl::StatusCode::kUnavailable,
            absl::StrCat(cause.message(), "; ",
                         leftovers.empty() ? absl::StrCat("no object with CKA_ID ", PrintableId(id),
                                                          " was created")
                                           : absl::StrCat("the partial key pair with CKA_ID ",
                                                          PrintableId(id), " was destroyed")));
        CopyPayloads(cause, verdict);
        Log(LogLevel::kWarning, "pkcs11.reconciled", {{"status", verdict.ToString()}});
        return absl::OkStatus();
      },
      /*fresh=*/true);
  if (attempt.acquired) recoveries.fetch_add(1, std::memory_order_relaxed);
  if (!attempt.status.ok()) {
    // Could not even look: the caller's metadata intent and startup reconciliation decide.
    return RecoveryFailed(cause, attempt.status);
  }
  healthy.store(true, std::memory_order_relaxed);  // the token answered every question
  return verdict;
}

absl::Status TokenState::ResolveHandles(SessionPool::Lease& lease, const KeyPair& key,
                                        CK_OBJECT_CLASS needed, uint64_t generation) {
  for (CK_OBJECT_CLASS cls : {CKO_PRIVATE_KEY, CKO_PUBLIC_KEY}) {
    std::atomic<uint64_t>& cached = cls == CKO_PRIVATE_KEY ? key.private_handle : key.public_handle;
    absl::StatusOr<CK_OBJECT_HANDLE> found = FindOne(fn, lease, cls, key.id);
    if (found.ok()) {
      cached.store(*found, std::memory_order_release);
    } else if (cls != needed && absl::IsNotFound(found.status()) &&
               !CkrOf(found.status()).has_value()) {
      cached.store(CK_INVALID_HANDLE, std::memory_order_release);  // PublicKey reports it
    } else {
      return found.status();
    }
  }
  key.handle_generation.store(generation, std::memory_order_release);
  return absl::OkStatus();
}

void TokenState::CountError(const absl::Status& status) {
  std::optional<CK_RV> rv = CkrOf(status);
  if (!rv.has_value()) return;
  std::string function = CkFunctionOf(status);
  std::pair<std::string, std::string> key(function.empty() ? "unknown" : std::move(function),
                                          CkrName(*rv));
  absl::MutexLock lock(&metrics_mu);
  ++errors[std::move(key)];
}

}  // namespace custody::pkcs11::internal
