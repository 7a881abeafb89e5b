#include "rotation/lifecycle.h"

#include <algorithm>

namespace custody::rotation {
namespace {

void Wake(Plan& plan, int64_t at) {
  if (plan.next_due_ms == 0 || at < plan.next_due_ms) plan.next_due_ms = at;
}

}  // namespace

Plan PlanRing(const RingRecord& ring, const std::vector<VersionRecord>& versions, int64_t now_ms) {
  Plan plan;
  const VersionRecord* active = nullptr;
  const VersionRecord* pending = nullptr;  // the newest PENDING version
  bool creating = false;
  for (const VersionRecord& v : versions) {
    switch (v.state) {
      case VersionState::kActive:
        active = &v;
        break;
      case VersionState::kPending:
        if (pending == nullptr || v.version > pending->version) pending = &v;
        break;
      case VersionState::kCreating:
        creating = true;
        break;
      case VersionState::kRetired: {
        int64_t at = v.retire_time + ring.policy.retain_ms;
        if (now_ms >= at) {
          plan.due.push_back({ActionKind::kScheduleDestruction, v.version, 0});
        } else {
          Wake(plan, at);
        }
        break;
      }
      case VersionState::kDestroyScheduled:
        if (now_ms >= v.destroy_after) {
          plan.due.push_back({ActionKind::kDestroy, v.version, 0});
        } else {
          Wake(plan, v.destroy_after);
        }
        break;
      case VersionState::kDestroying:
        plan.due.push_back({ActionKind::kDestroy, v.version, 0});
        break;
      case VersionState::kDisabled:
      case VersionState::kDestroyed:
        break;
    }
  }
  const int64_t period = ring.policy.rotation_period_ms;
  if (pending == nullptr && !creating && (ring.policy_explicit || period > 0)) {
    plan.due.push_back({ActionKind::kCreatePending, 0, 0});
  }
  if (period > 0 && active != nullptr && pending != nullptr) {
    int64_t at =
        std::max(active->activate_time + period, pending->publish_time + ring.policy.prepublish_ms);
    if (now_ms >= at) {
      plan.due.push_back(
          {ActionKind::kRotate, pending->version, (now_ms - active->activate_time) / period});
    } else {
      Wake(plan, at);
    }
  }
  return plan;
}

}  // namespace custody::rotation
