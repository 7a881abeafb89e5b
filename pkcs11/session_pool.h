// Internal to pkcs11/: a bounded pool of logged-in R/W sessions on one slot.
//
// PKCS#11 sessions are not safe for concurrent use, so each thread borrows one for a whole call
// sequence (C_SignInit + C_Sign, C_FindObjectsInit..Final) and returns it. Sessions are opened
// lazily up to `max_sessions`; each newly opened session calls C_Login, because login state is
// per application and is lost when the last session closes (CKR_USER_ALREADY_LOGGED_IN is the
// normal answer once one session is logged in).
//
// Thread-safety: thread-safe. Every Lease must be destroyed before the pool.
#ifndef CUSTODY_PKCS11_SESSION_POOL_H_
#define CUSTODY_PKCS11_SESSION_POOL_H_

#include <cstddef>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/secret.h"
#include "p11-kit/pkcs11.h"

namespace custody::pkcs11 {

class SessionPool {
 public:
  // A borrowed session, returned to the pool on destruction (or closed if Discard()ed).
  class Lease {
   public:
    Lease(Lease&& other) noexcept;
    Lease& operator=(Lease&& other) noexcept;
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease();

    CK_SESSION_HANDLE get() const { return session_; }
    // The session is unusable (see IsSessionBroken): close it instead of returning it.
    void Discard() { broken_ = true; }
    // OK for CKR_OK; otherwise the CkError status, discarding the session when `rv` says the
    // session itself is broken.
    absl::Status Check(std::string_view function, CK_RV rv);

   private:
    friend class SessionPool;
    Lease(SessionPool* pool, CK_SESSION_HANDLE session) : pool_(pool), session_(session) {}
    void Release();
    SessionPool* pool_ = nullptr;
    CK_SESSION_HANDLE session_ = CK_INVALID_HANDLE;
    bool broken_ = false;
  };

  SessionPool(CK_FUNCTION_LIST* fn, CK_SLOT_ID slot, Secret pin, size_t max_sessions,
              absl::Duration wait);
  ~SessionPool();  // closes the idle sessions
  SessionPool(const SessionPool&) = delete;
  SessionPool& operator=(const SessionPool&) = delete;

  // Borrows an idle session, opens and logs in a new one if fewer than max_sessions exist, or
  // waits up to `wait` for one to be returned: RESOURCE_EXHAUSTED "no HSM session free within
  // 2s" then. C_OpenSession/C_Login failures are returned as CkError statuses (a wrong PIN is
  // PERMISSION_DENIED).
  absl::StatusOr<Lease> Acquire();

 private:
  void Return(CK_SESSION_HANDLE session, bool broken);
  absl::StatusOr<CK_SESSION_HANDLE> OpenLoggedIn();

  CK_FUNCTION_LIST* const fn_;
  const CK_SLOT_ID slot_;
  const Secret pin_;
  const size_t max_sessions_;
  const absl::Duration wait_;

  absl::Mutex mu_;
  absl::CondVar available_;
  std::vector<CK_SESSION_HANDLE> idle_ ABSL_GUARDED_BY(mu_);
  size_t open_ ABSL_GUARDED_BY(mu_) = 0;  // idle + leased + being opened
};

}  // namespace custody::pkcs11

#endif  // CUSTODY_PKCS11_SESSION_POOL_H_
