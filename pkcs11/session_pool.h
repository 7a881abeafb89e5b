// Internal to pkcs11/: a bounded pool of logged-in R/W sessions on one slot.
//
// PKCS#11 sessions are not safe for concurrent use, so each thread borrows one for a whole call
// sequence (C_SignInit + C_Sign, C_FindObjectsInit..Final) and returns it. Sessions are opened
// lazily up to `max_sessions`; each newly opened session calls C_Login, because login state is
// per application and is lost when the last session closes (CKR_USER_ALREADY_LOGGED_IN is the
// normal answer once one session is logged in).
//
// Back-pressure: when every session is busy, up to `max_waiters` callers wait (at most `wait`)
// for one; further callers fail at once with RESOURCE_EXHAUSTED "HSM session pool saturated", so
// that a slow token cannot pile up threads.
//
// Dead sessions: a session handle the module no longer knows may be handed out again by the
// module to a new session, so a dead handle is forgotten, never closed (Lease::Check decides).
// Sessions opened before a module re-initialization (Module::generation()) are forgotten too,
// and a newly opened session whose handle value is still listed evicts the stale entry.
//
// Thread-safety: thread-safe. Every Lease must be destroyed before the pool.
#ifndef CUSTODY_PKCS11_SESSION_POOL_H_
#define CUSTODY_PKCS11_SESSION_POOL_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/secret.h"
#include "p11-kit/pkcs11.h"

namespace custody::pkcs11 {

class Module;

class SessionPool {
 public:
  // A borrowed session, returned to the pool on destruction (or closed if Discard()ed, or
  // dropped without a token call if Forget()ed).
  class Lease {
   public:
    Lease(Lease&& other) noexcept;
    Lease& operator=(Lease&& other) noexcept;
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease();

    CK_SESSION_HANDLE get() const { return session_; }
    CK_SLOT_ID slot() const { return slot_; }
    // The session is unusable (see IsSessionBroken): close it instead of returning it.
    void Discard() {
      if (fate_ == Fate::kReturn) fate_ = Fate::kClose;
    }
    // The module no longer knows the session (see IsSessionGone): drop it without closing.
    void Forget() { fate_ = Fate::kForget; }
    // OK for CKR_OK; otherwise the CkError status, forgetting or discarding the session when
    // `rv` says the session itself is gone or broken.
    absl::Status Check(std::string_view function, CK_RV rv);

   private:
    friend class SessionPool;
    enum class Fate { kReturn, kClose, kForget };
    Lease(SessionPool* pool, CK_SESSION_HANDLE session, CK_SLOT_ID slot, uint64_t id,
          uint64_t generation)
        : pool_(pool), session_(session), slot_(slot), id_(id), generation_(generation) {}
    void Release();
    SessionPool* pool_ = nullptr;
    CK_SESSION_HANDLE session_ = CK_INVALID_HANDLE;
    CK_SLOT_ID slot_ = 0;
    uint64_t id_ = 0;
    uint64_t generation_ = 0;
    Fate fate_ = Fate::kReturn;
  };

  // Counters since construction.
  struct Stats {
    uint64_t waits = 0;       // Acquire calls that had to wait for a session
    uint64_t rejections = 0;  // refused at once: max_waiters callers were already waiting
    uint64_t timeouts = 0;    // waited `wait` and got nothing
    // Gauges at the time of the call.
    uint64_t in_use = 0;   // sessions leased to callers
    uint64_t waiting = 0;  // callers waiting for a session
    uint64_t max_sessions = 0;
  };

  // `module` (may be null) supplies the generation sessions are tagged with; it must outlive
  // the pool. max_waiters defaults to 4 x max_sessions; 0 means never wait.
  SessionPool(CK_FUNCTION_LIST* fn, CK_SLOT_ID slot, Secret pin, size_t max_sessions,
              absl::Duration wait, std::optional<size_t> max_waiters = std::nullopt,
              const Module* module = nullptr);
  ~SessionPool();  // closes the idle sessions
  SessionPool(const SessionPool&) = delete;
  SessionPool& operator=(const SessionPool&) = delete;

  // Borrows an idle session, opens and logs in a new one if fewer than max_sessions exist, or
  // waits up to `wait` for one to be returned: RESOURCE_EXHAUSTED "no HSM session free within
  // 2s" then, or at once "HSM session pool saturated" when max_waiters callers already wait.
  // With `fresh`, never hands out an idle session: opens a new one (closing an idle one to
  // make room if needed), so that a recovery re-opens and re-logs in. C_OpenSession/C_Login
  // failures are returned as CkError statuses (a wrong PIN is PERMISSION_DENIED).
  absl::StatusOr<Lease> Acquire(bool fresh = false);

  // Where new sessions are opened from now on (the slot id may change when a module is
  // re-initialized).
  void SetSlot(CK_SLOT_ID slot);

  Stats stats() const;

 private:
  struct Idle {
    CK_SESSION_HANDLE session;
    uint64_t generation;
  };
  void Return(const Lease& lease);
  absl::StatusOr<CK_SESSION_HANDLE> OpenLoggedIn(CK_SLOT_ID slot);
  uint64_t Generation() const;
  // Drops idle sessions from an earlier module generation (no token call: they are void).
  void DropStaleIdle(uint64_t generation) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  CK_FUNCTION_LIST* const fn_;
  const Secret pin_;
  const size_t max_sessions_;
  const size_t max_waiters_;
  const absl::Duration wait_;
  const Module* const module_;

  mutable absl::Mutex mu_;
  absl::CondVar available_;
  CK_SLOT_ID slot_ ABSL_GUARDED_BY(mu_);
  std::vector<Idle> idle_ ABSL_GUARDED_BY(mu_);
  size_t open_ ABSL_GUARDED_BY(mu_) = 0;  // idle + leased + being opened
  size_t waiters_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_lease_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::map<CK_SESSION_HANDLE, uint64_t> leased_ ABSL_GUARDED_BY(mu_);  // handle -> lease id
  std::set<uint64_t> superseded_ ABSL_GUARDED_BY(mu_);  // leases whose handle was reissued
  Stats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace custody::pkcs11

#endif  // CUSTODY_PKCS11_SESSION_POOL_H_
