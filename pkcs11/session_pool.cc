#include "pkcs11/session_pool.h"

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "pkcs11/cryptoki.h"

namespace custody::pkcs11 {

SessionPool::Lease::Lease(Lease&& other) noexcept
    : pool_(std::exchange(other.pool_, nullptr)),
      session_(std::exchange(other.session_, CK_INVALID_HANDLE)),
      broken_(other.broken_) {}

SessionPool::Lease& SessionPool::Lease::operator=(Lease&& other) noexcept {
  if (this != &other) {
    Release();
    pool_ = std::exchange(other.pool_, nullptr);
    session_ = std::exchange(other.session_, CK_INVALID_HANDLE);
    broken_ = other.broken_;
  }
  return *this;
}

SessionPool::Lease::~Lease() { Release(); }

void SessionPool::Lease::Release() {
  if (pool_ != nullptr) pool_->Return(session_, broken_);
  pool_ = nullptr;
}

absl::Status SessionPool::Lease::Check(std::string_view function, CK_RV rv) {
  if (rv == CKR_OK) return absl::OkStatus();
  if (IsSessionBroken(rv)) Discard();
  return CkError(function, rv);
}

SessionPool::SessionPool(CK_FUNCTION_LIST* fn, CK_SLOT_ID slot, Secret pin, size_t max_sessions,
                         absl::Duration wait)
    : fn_(fn),
      slot_(slot),
      pin_(std::move(pin)),
      max_sessions_(max_sessions == 0 ? 1 : max_sessions),
      wait_(wait) {}

SessionPool::~SessionPool() {
  absl::MutexLock lock(&mu_);
  // C_CloseSession one by one, never C_CloseAllSessions: another Token in this process may
  // hold sessions on the same slot.
  for (CK_SESSION_HANDLE session : idle_) fn_->C_CloseSession(session);
  idle_.clear();
}

absl::StatusOr<SessionPool::Lease> SessionPool::Acquire() {
  {
    absl::MutexLock lock(&mu_);
    const absl::Time deadline = absl::Now() + wait_;
    while (idle_.empty() && open_ >= max_sessions_) {
      if (available_.WaitWithDeadline(&mu_, deadline) && idle_.empty() && open_ >= max_sessions_) {
        return absl::ResourceExhaustedError(
            absl::StrCat("no HSM session free within ", absl::FormatDuration(wait_)));
      }
    }
    if (!idle_.empty()) {
      CK_SESSION_HANDLE session = idle_.back();
      idle_.pop_back();
      return Lease(this, session);
    }
    ++open_;  // reserve the slot; the token calls below run without the lock
  }
  absl::StatusOr<CK_SESSION_HANDLE> session = OpenLoggedIn();
  if (!session.ok()) {
    absl::MutexLock lock(&mu_);
    --open_;
    available_.Signal();
    return session.status();
  }
  return Lease(this, *session);
}

absl::StatusOr<CK_SESSION_HANDLE> SessionPool::OpenLoggedIn() {
  CK_SESSION_HANDLE session = CK_INVALID_HANDLE;
  CK_RV rv =
      fn_->C_OpenSession(slot_, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &session);
  if (rv != CKR_OK) return CkError("C_OpenSession", rv);
  // C_Login takes a non-const pointer but does not write through it.
  auto* pin = reinterpret_cast<CK_UTF8CHAR*>(const_cast<char*>(pin_.view().data()));
  rv = fn_->C_Login(session, CKU_USER, pin, pin_.size());
  if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
    fn_->C_CloseSession(session);
    return CkError("C_Login", rv);
  }
  return session;
}

void SessionPool::Return(CK_SESSION_HANDLE session, bool broken) {
  if (broken) fn_->C_CloseSession(session);  // outside the lock: it is a token call
  absl::MutexLock lock(&mu_);
  if (broken) {
    --open_;
  } else {
    idle_.push_back(session);
  }
  available_.Signal();
}

}  // namespace custody::pkcs11
