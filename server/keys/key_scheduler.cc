// KeyService, the scheduler's step: the transitions that fall due by the clock (rotation,
// retirement past retain, destruction past destroy_delay), planned by rotation/lifecycle from
// each ring's records and the last signature of each retired version. The thread that runs the
// step, and the leader election on a shared store, are server/keys/lifecycle_scheduler.h's.
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "rotation/lifecycle.h"
#include "server/keys/certificates.h"
#include "server/keys/key_service.h"

namespace custody::server {
namespace {

using rotation::VersionRecord;
using rotation::VersionState;

// The wall time of an event at `wall_at` as the wall clock would say now had it not been stepped
// since this process saw it at `seen_wall` (monotonic `seen_monotonic`): the real time since, from
// now. A step forward moves it later, so an interval counted from it is never shorter than real
// time; a step back is ignored (`wall_at` is the floor).
int64_t InRealTime(int64_t wall_at, int64_t seen_wall, int64_t seen_monotonic, int64_t now,
                   int64_t monotonic_now) {
  return std::max(wall_at, now - (monotonic_now - seen_monotonic) - (seen_wall - wall_at));
}

// A rotation waiting for a certificate is re-checked this often.
constexpr int64_t kAwaitingCertificateRecheckMs = 60 * 1000;

}  // namespace

void KeyService::Version::NoteSignature(const Clock& clock) const {
  // Each moves only forward, whichever of several concurrent signers stores last.
  auto raise = [](std::atomic<int64_t>& at, int64_t now) {
    int64_t seen = at.load(std::memory_order_relaxed);
    while (seen < now && !at.compare_exchange_weak(seen, now, std::memory_order_relaxed)) {
    }
  };
  raise(last_signed->wall_ms, clock.NowMs());
  raise(last_signed->monotonic_ms, clock.MonotonicMs());
}

std::vector<VersionRecord> KeyService::PlanningRecords(const Ring& ring) const {
  // Other replicas: one that missed the retirement's notification keeps signing with the version
  // until its next re-read, and one that lost the store until its staleness bound, which counts
  // from the start of its last good read (which did not see the retirement, so began before
  // retire_time). Every replica is assumed to run with the same --max_metadata_staleness.
  const int64_t other_replicas_ms =
      options_.shared_store ? absl::ToInt64Milliseconds(options_.max_staleness) : 0;
  const int64_t now = NowMs();
  const int64_t monotonic_now = options_.clock->MonotonicMs();
  std::vector<VersionRecord> records;
  for (const Version& v : ring.versions) {
    if (v.tag_mismatch) continue;  // nothing is planned for a version custody cannot trust
    records.push_back(v.record);
    if (v.record.state == VersionState::kRetired) {
      // The retirement, from this process's first sight of it (the wall time from retire_time to
      // then added), and this process's last signature with the version.
      int64_t retired = v.record.retire_time;
      {
        Version::RetiredSeen& seen = *v.retired_seen;
        absl::MutexLock lock(&seen.mu);
        if (seen.retire_time != v.record.retire_time || seen.monotonic_ms == 0) {
          seen.retire_time = v.record.retire_time;
          seen.wall_ms = now;
          seen.monotonic_ms = monotonic_now;
        }
        retired =
            InRealTime(v.record.retire_time, seen.wall_ms, seen.monotonic_ms, now, monotonic_now);
      }
      const int64_t signed_wall = v.last_signed->wall_ms.load(std::memory_order_relaxed);
      const int64_t signed_monotonic = v.last_signed->monotonic_ms.load(std::memory_order_relaxed);
      const int64_t last_signed =
          signed_monotonic == 0
              ? signed_wall
              : InRealTime(signed_wall, signed_wall, signed_monotonic, now, monotonic_now);
      records.back().retire_time = std::max(retired + other_replicas_ms, last_signed);
    }
  }
  return records;
}

int64_t KeyService::RunDueTransitions() {
  if (options_.shared_store) {
    absl::MutexLock admin(&admin_mu_);
    if (absl::Status s = SyncShared(); !s.ok()) return NowMs() + 5000;
  }
  std::vector<std::string> names;
  {
    absl::ReaderMutexLock lock(&mu_);
    for (const auto& [name, ring] : rings_) names.push_back(name);
  }
  int64_t next_due = 0;
  for (const std::string& name : names) {
    if (scheduler_.stopping()) return 0;
    absl::MutexLock admin(&admin_mu_);
    auto ring = FindRing(name);
    if (!ring.ok()) continue;
    rotation::Plan plan = rotation::PlanRing((*ring)->record, PlanningRecords(**ring), NowMs());
    bool failed = false;
    bool awaiting_certificate = false;
    for (const rotation::Action& action : plan.due) {
      absl::Status s;
      switch (action.kind) {
        case rotation::ActionKind::kCreatePending:
          s = AddVersion(name, Activation::kPending).status();
          break;
        case rotation::ActionKind::kRotate:
          if (action.missed_periods >= 2) {
            Log(LogLevel::kWarning, "rotation.catch_up",
                {{"ring", name},
                 {"missed_periods", absl::StrCat(action.missed_periods)},
                 {"action", "rotating once, not once per missed period"}});
          }
          if (const Version* next = (*ring)->Find(action.version); next != nullptr) {
            // --require_certificate holds for the scheduler too: the PENDING version waits for
            // its certificate (logged once per version; GetKeyRing's rotation_waiting says why;
            // setting the certificate wakes the scheduler).
            if (absl::Status gate = RotationCertificateGate((*ring)->record, next->record);
                !gate.ok()) {
              awaiting_certificate = true;
              if (awaiting_certificate_logged_.insert(absl::StrCat(name, "#", action.version))
                      .second) {
                Log(LogLevel::kWarning, "rotation.awaiting_certificate",
                    {{"ring", name},
                     {"version", absl::StrCat(action.version)},
                     {"reason", std::string(gate.message())}});
              }
              break;
            }
          }
          s = Promote(name, action.version, false, nullptr);
          break;
        case rotation::ActionKind::kScheduleDestruction:
          s = MutateRing(name, [&](Ring& r, rotation::Mutation& m) -> absl::Status {
                Version* v = r.Find(action.version);
                if (v == nullptr || v->record.state != VersionState::kRetired) {
                  return absl::OkStatus();
                }
                v->record.previous_state = VersionState::kRetired;
                v->record.state = VersionState::kDestroyScheduled;
                v->record.destroy_after = NowMs() + r.record.policy.destroy_delay_ms;
                m.update_versions.push_back(v->record);
                return absl::OkStatus();
              }).status();
          if (s.ok()) {
            Log(LogLevel::kInfo, "version.retain_expired",
                {{"ring", name}, {"version", absl::StrCat(action.version)}});
          }
          break;
        case rotation::ActionKind::kDestroy:
          s = DestroyVersion(name, action.version);
          break;
      }
      if (!s.ok()) {
        failed = true;
        Log(LogLevel::kError, "scheduler.transition_failed",
            {{"ring", name},
             {"version", absl::StrCat(action.version)},
             {"error", std::string(s.message())}});
      }
    }
    // Re-plan after acting: what was done moved the ring's next due time.
    auto after = FindRing(name);
    if (after.ok()) {
      rotation::Plan replan =
          rotation::PlanRing((*after)->record, PlanningRecords(**after), NowMs());
      int64_t due = replan.due.empty() ? replan.next_due_ms : NowMs();
      if (failed) due = NowMs() + 5000;  // back off after an error instead of spinning
      // A rotation waiting for a certificate stays "due": look again in a minute (or when a
      // certificate is set, which pokes the scheduler) instead of spinning.
      if (awaiting_certificate) due = NowMs() + kAwaitingCertificateRecheckMs;
      if (due != 0 && (next_due == 0 || due < next_due)) next_due = due;
    }
  }
  return next_due;
}

}  // namespace custody::server
