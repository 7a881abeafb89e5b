#include "pkcs11/session_pool.h"

#include <algorithm>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "pkcs11/cryptoki.h"

namespace custody::pkcs11 {

SessionPool::Lease::Lease(Lease&& other) noexcept
    : pool_(std::exchange(other.pool_, nullptr)),
      session_(std::exchange(other.session_, CK_INVALID_HANDLE)),
      slot_(other.slot_),
      id_(other.id_),
      generation_(other.generation_),
      fate_(other.fate_) {}

SessionPool::Lease& SessionPool::Lease::operator=(Lease&& other) noexcept {
  if (this != &other) {
    Release();
    pool_ = std::exchange(other.pool_, nullptr);
    session_ = std::exchange(other.session_, CK_INVALID_HANDLE);
    slot_ = other.slot_;
    id_ = other.id_;
    generation_ = other.generation_;
    fate_ = other.fate_;
  }
  return *this;
}

SessionPool::Lease::~Lease() { Release(); }

void SessionPool::Lease::Release() {
  if (pool_ != nullptr) pool_->Return(*this);
  pool_ = nullptr;
}

absl::Status SessionPool::Lease::Check(std::string_view function, CK_RV rv) {
  if (rv == CKR_OK) return absl::OkStatus();
  if (IsSessionGone(rv)) {
    Forget();
  } else if (IsSessionBroken(rv)) {
    Discard();
  }
  return CkError(function, rv);
}

SessionPool::SessionPool(CK_FUNCTION_LIST* fn, CK_SLOT_ID slot, Secret pin, size_t max_sessions,
                         absl::Duration wait, std::optional<size_t> max_waiters,
                         const Module* module)
    : fn_(fn),
      pin_(std::move(pin)),
      max_sessions_(max_sessions == 0 ? 1 : max_sessions),
      max_waiters_(max_waiters.value_or(4 * max_sessions_)),
      wait_(wait),
      module_(module),
      slot_(slot) {}

SessionPool::~SessionPool() {
  absl::MutexLock lock(&mu_);
  const uint64_t generation = Generation();
  // C_CloseSession one by one, never C_CloseAllSessions: another Token in this process may
  // hold sessions on the same slot.
  for (const Idle& idle : idle_) {
    if (idle.generation == generation) fn_->C_CloseSession(idle.session);
  }
  idle_.clear();
}

uint64_t SessionPool::Generation() const { return module_ != nullptr ? module_->generation() : 0; }

void SessionPool::DropStaleIdle(uint64_t generation) {
  const auto stale = std::remove_if(
      idle_.begin(), idle_.end(), [&](const Idle& idle) { return idle.generation != generation; });
  open_ -= static_cast<size_t>(idle_.end() - stale);
  idle_.erase(stale, idle_.end());
}

absl::StatusOr<SessionPool::Lease> SessionPool::Acquire(bool fresh) {
  std::optional<CK_SESSION_HANDLE> evicted;  // an idle session closed to make room
  CK_SLOT_ID slot;
  {
    absl::MutexLock lock(&mu_);
    bool waited = false;
    absl::Time deadline;
    for (;;) {
      const uint64_t generation = Generation();
      DropStaleIdle(generation);
      if (!idle_.empty() && !fresh) {
        const Idle idle = idle_.back();
        idle_.pop_back();
        const uint64_t id = next_lease_id_++;
        leased_[idle.session] = id;
        return Lease(this, idle.session, slot_, id, generation);
      }
      if (open_ < max_sessions_) {
        ++open_;  // reserve the place; the token calls below run without the lock
        break;
      }
      if (fresh && !idle_.empty()) {
        evicted = idle_.back().session;  // its place goes to the new session
        idle_.pop_back();
        break;
      }
      if (!waited) {
        if (waiters_ >= max_waiters_) {
          ++stats_.rejections;
          return absl::ResourceExhaustedError("HSM session pool saturated");
        }
        ++stats_.waits;
        waited = true;
        deadline = absl::Now() + wait_;
      }
      ++waiters_;
      const bool timed_out = available_.WaitWithDeadline(&mu_, deadline);
      --waiters_;
      if (timed_out && idle_.empty() && open_ >= max_sessions_) {
        ++stats_.timeouts;
        return absl::ResourceExhaustedError(
            absl::StrCat("no HSM session free within ", absl::FormatDuration(wait_)));
      }
    }
    slot = slot_;
  }
  if (evicted.has_value()) fn_->C_CloseSession(*evicted);
  absl::StatusOr<CK_SESSION_HANDLE> session = OpenLoggedIn(slot);
  absl::MutexLock lock(&mu_);
  if (!session.ok()) {
    --open_;
    available_.Signal();
    return session.status();
  }
  // The module handed out a handle value we still hold: the session we knew under it is dead
  // (closed behind our back), and must never be used or closed again.
  const auto stale = std::remove_if(idle_.begin(), idle_.end(),
                                    [&](const Idle& idle) { return idle.session == *session; });
  open_ -= static_cast<size_t>(idle_.end() - stale);
  idle_.erase(stale, idle_.end());
  if (auto it = leased_.find(*session); it != leased_.end()) superseded_.insert(it->second);
  const uint64_t id = next_lease_id_++;
  leased_[*session] = id;
  return Lease(this, *session, slot, id, Generation());
}

void SessionPool::SetSlot(CK_SLOT_ID slot) {
  absl::MutexLock lock(&mu_);
  slot_ = slot;
}

SessionPool::Stats SessionPool::stats() const {
  absl::MutexLock lock(&mu_);
  Stats s = stats_;
  s.in_use = leased_.size();
  s.waiting = waiters_;
  s.max_sessions = max_sessions_;
  return s;
}

absl::StatusOr<CK_SESSION_HANDLE> SessionPool::OpenLoggedIn(CK_SLOT_ID slot) {
  CK_SESSION_HANDLE session = CK_INVALID_HANDLE;
  CK_RV rv =
      fn_->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &session);
  if (rv != CKR_OK) return CkError("C_OpenSession", rv);
  // C_Login takes a non-const pointer but does not write through it.
  auto* pin = reinterpret_cast<CK_UTF8CHAR*>(const_cast<char*>(pin_.view().data()));
  rv = fn_->C_Login(session, CKU_USER, pin, pin_.size());
  if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
    if (!IsSessionGone(rv)) fn_->C_CloseSession(session);
    return CkError("C_Login", rv);
  }
  return session;
}

void SessionPool::Return(const Lease& lease) {
  const CK_SESSION_HANDLE session = lease.session_;
  {
    absl::MutexLock lock(&mu_);
    if (auto it = leased_.find(session); it != leased_.end() && it->second == lease.id_) {
      leased_.erase(it);
    }
    const bool superseded = superseded_.erase(lease.id_) > 0;
    const bool void_handle =
        superseded || lease.fate_ == Lease::Fate::kForget || lease.generation_ != Generation();
    if (void_handle || lease.fate_ == Lease::Fate::kReturn) {
      if (void_handle) {
        --open_;
      } else {
        idle_.push_back(Idle{session, lease.generation_});
      }
      available_.Signal();
      return;
    }
  }
  fn_->C_CloseSession(session);  // outside the lock: it is a token call
  absl::MutexLock lock(&mu_);
  --open_;
  available_.Signal();
}

}  // namespace custody::pkcs11
