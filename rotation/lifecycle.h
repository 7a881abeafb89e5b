// The rotation planner: given a ring's policy, its versions and the time, which lifecycle
// transitions are due now and when the next one will be. Pure (no I/O, no clock): the
// scheduler in custodyd runs the plan; tests drive it with chosen times.
#ifndef CUSTODY_ROTATION_LIFECYCLE_H_
#define CUSTODY_ROTATION_LIFECYCLE_H_

#include <cstdint>
#include <vector>

#include "rotation/key_ring.h"

namespace custody::rotation {

enum class ActionKind {
  kCreatePending,        // the ring must pre-publish a next version and has none
  kRotate,               // promote the PENDING version; the ACTIVE one retires
  kScheduleDestruction,  // a RETIRED version outlived `retain`: unpublish, schedule destruction
  kDestroy,              // destroy_after passed (or a destruction was interrupted): delete it
};

struct Action {
  ActionKind kind;
  uint32_t version = 0;        // the version concerned (kRotate: the PENDING one)
  int64_t missed_periods = 0;  // kRotate: whole rotation periods elapsed since activation
};

struct Plan {
  std::vector<Action> due;
  int64_t next_due_ms = 0;  // the earliest future transition; 0 when nothing is scheduled
};

// Rules: a ring with an explicit policy always has a PENDING (or CREATING) version. Automatic
// rotation is due at max(active.activate_time + rotation_period, pending.publish_time +
// prepublish) and rotates once however many periods were missed. A RETIRED version is
// unpublished (destruction scheduled) at retire_time + retain; a DESTROY_SCHEDULED one is
// destroyed at destroy_after; a DESTROYING one at once (resumption after a crash).
Plan PlanRing(const RingRecord& ring, const std::vector<VersionRecord>& versions, int64_t now_ms);

}  // namespace custody::rotation

#endif  // CUSTODY_ROTATION_LIFECYCLE_H_
