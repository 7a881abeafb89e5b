// KeyService, part two: the key lifecycle. Rotation, disable/enable, scheduled destruction,
// compromise, and the scheduler that performs due transitions from wall-clock time.
//
// Crash safety: every transition is one durable metadata commit (rotation.Mutation), ordered
// against token operations so that a kill -9 at any instant leaves a state the next start
// completes or rolls back: a new key is recorded as CREATING before it is generated; a swap of
// the ACTIVE version happens in one transaction (there is always exactly one ACTIVE); a token
// object is deleted only after the metadata says DESTROYING, and DESTROYING resumes at start.
#include <algorithm>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "openssl/rand.h"
#include "rotation/lifecycle.h"
#include "server/certificates.h"
#include "server/key_service.h"

namespace custody::server {
namespace {

using rotation::VersionRecord;
using rotation::VersionState;

int64_t NowMs() { return absl::ToUnixMillis(absl::Now()); }

constexpr int64_t kAwaitingCertificateRecheckMs = 60 * 1000;

std::string FormatMs(int64_t ms) {
  return absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::FromUnixMillis(ms), absl::UTCTimeZone());
}

absl::Status VersionNotFound(const std::string& ring, uint32_t version) {
  return absl::NotFoundError(absl::StrCat("ring '", ring, "' has no version ", version));
}

absl::Status WrongState(const std::string& ring, uint32_t version, VersionState state,
                        absl::string_view what) {
  return absl::FailedPreconditionError(absl::StrCat("version ", version, " of ring '", ring,
                                                    "' is ", VersionStateName(state), ": ", what));
}

// A compromised version never returns to service: it may only be destroyed.
absl::Status RefuseCompromised(const std::string& ring, const VersionRecord& v,
                               absl::string_view operation) {
  if (!v.compromised) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("version ", v.version, " of ring '", ring, "' is compromised: it cannot be ",
                   operation, "; a compromised version may only be destroyed"));
}

}  // namespace

void KeyService::ApplyFloors(Ring& ring, bool log) const {
  bool raised = false;
  rotation::RotationPolicy effective =
      rotation::RaiseToFloors(ring.record.policy, options_.floors, &raised);
  if (!raised) return;
  if (log) {
    const rotation::RotationPolicy& stored = ring.record.policy;
    Log(LogLevel::kWarning, "ring.policy_below_floor",
        {{"ring", ring.record.name},
         {"stored",
          absl::StrCat("retain=", rotation::FormatDurationMs(stored.retain_ms),
                       " destroy_delay=", rotation::FormatDurationMs(stored.destroy_delay_ms),
                       " rotation_period=", rotation::FormatDurationMs(stored.rotation_period_ms))},
         {"effective",
          absl::StrCat(
              "retain=", rotation::FormatDurationMs(effective.retain_ms),
              " destroy_delay=", rotation::FormatDurationMs(effective.destroy_delay_ms),
              " rotation_period=", rotation::FormatDurationMs(effective.rotation_period_ms))},
         {"action", "running with the floors; set-policy stores a policy that meets them"}});
  }
  ring.record.policy = effective;
}

KeyService::Version* KeyService::Ring::Find(uint32_t version) {
  for (Version& v : versions) {
    if (v.record.version == version) return &v;
  }
  return nullptr;
}

const KeyService::Version* KeyService::Ring::Find(uint32_t version) const {
  for (const Version& v : versions) {
    if (v.record.version == version) return &v;
  }
  return nullptr;
}

const KeyService::Version* KeyService::Ring::NewestPending() const {
  const Version* newest = nullptr;
  for (const Version& v : versions) {
    if (v.record.state == VersionState::kPending && v.key != nullptr &&
        (newest == nullptr || v.record.version > newest->record.version)) {
      newest = &v;
    }
  }
  return newest;
}

void KeyService::Ring::Reindex() {
  active = -1;
  for (size_t i = 0; i < versions.size(); ++i) {
    // A version whose tag does not verify is never the ring's ACTIVE one, whatever its row says.
    if (versions[i].record.state == VersionState::kActive && !versions[i].tag_mismatch) {
      active = static_cast<int>(i);
    }
  }
}

std::vector<const KeyService::Version*> KeyService::Ring::Published() const {
  std::vector<const Version*> out;
  if (active >= 0 && versions[static_cast<size_t>(active)].key != nullptr &&
      !versions[static_cast<size_t>(active)].record.compromised) {
    out.push_back(&versions[static_cast<size_t>(active)]);
  }
  for (const Version& v : versions) {
    if (v.record.state != VersionState::kActive && rotation::IsPublishedState(v.record.state) &&
        v.key != nullptr && !v.record.compromised) {
      out.push_back(&v);
    }
  }
  return out;
}

void KeyService::Publish(std::shared_ptr<const Ring> ring) {
  auto published_kids = [](const Ring* r) {
    std::string kids;
    if (r == nullptr) return kids;
    // A certificate attached to a published version changes its JWK (x5c) too.
    for (const Version* v : r->Published()) {
      absl::StrAppend(&kids, v->record.kid, ":", v->record.certificate_chain.size(), ",");
    }
    return kids;
  };
  absl::MutexLock lock(&mu_);
  auto it = rings_.find(ring->record.name);
  bool changed =
      it == rings_.end() || published_kids(it->second.get()) != published_kids(ring.get());
  rings_[ring->record.name] = std::move(ring);
  if (changed) {
    ++jwks_generation_;
    jwks_changed_.SignalAll();
  }
}

absl::StatusOr<std::shared_ptr<const KeyService::Ring>> KeyService::MutateRing(
    const std::string& name,
    const std::function<absl::Status(Ring&, rotation::Mutation&)>& change) {
  Ring ring;
  // With a shared store the commit is conditional on the ring's generation; when another
  // replica changed the ring meanwhile, re-read it and apply `change` again (it re-checks its
  // preconditions on the new state).
  for (int attempt = 0;; ++attempt) {
    auto current = FindRing(name);
    if (!current.ok()) return current.status();
    ring = **current;
    rotation::Mutation mutation;
    if (absl::Status s = change(ring, mutation); !s.ok()) return s;
    if (absl::Status s = RefuseUntrustedChange(**current, mutation); !s.ok()) return s;
    if (options_.shared_store)
      mutation.expect_generations.emplace_back(name, ring.record.generation);
    absl::Status s = store_->Commit(mutation);
    if (s.ok()) break;
    if (!options_.shared_store || !absl::IsAborted(s) || attempt == 7) return s;
    Log(LogLevel::kInfo, "replica.retry", {{"ring", name}, {"reason", std::string(s.message())}});
    if (absl::Status r = RefreshLocked(); !r.ok()) return r;
  }
  if (options_.shared_store) ++ring.record.generation;
  ring.Reindex();
  auto snapshot = std::make_shared<const Ring>(std::move(ring));
  Publish(snapshot);
  {
    absl::MutexLock lock(&scheduler_mu_);  // the next due time may have moved
    scheduler_poke_ = true;
    scheduler_wake_.SignalAll();
  }
  return snapshot;
}

absl::StatusOr<uint32_t> KeyService::AddVersion(const std::string& name, Activation activation) {
  auto base = FindRing(name);
  if (!base.ok()) return base.status();
  // A token without the ring's mechanisms (a replica on a lesser token than the ring's creator)
  // would refuse the generation only after the intent took a version number: refuse first.
  if (absl::Status s = token_support_.CheckServes((*base)->record.alg); !s.ok()) return s;
  uint32_t next = 1;
  for (const Version& v : (*base)->versions) next = std::max(next, v.record.version + 1);
  unsigned char raw_id[16];
  if (RAND_bytes(raw_id, sizeof(raw_id)) != 1) return absl::InternalError("RAND_bytes failed");
  VersionRecord record;
  record.ring = name;
  record.version = next;
  record.object_id =
      absl::BytesToHexString(absl::string_view(reinterpret_cast<char*>(raw_id), sizeof(raw_id)));
  record.object_label = absl::StrCat(rotation::kObjectLabelPrefix, name, "/v", next);
  record.state = VersionState::kCreating;
  record.create_time = NowMs();
  // 1. Durable intent; 2. the key in the token; 3. one commit that publishes (and activates).
  for (int attempt = 0;; ++attempt) {
    rotation::Mutation intent;
    intent.insert_versions.push_back(record);
    if (options_.shared_store) {
      intent.expect_generations.emplace_back(name, (*base)->record.generation);
    }
    absl::Status s = store_->Commit(intent);
    if (s.ok()) break;
    // ABORTED: another replica changed the ring; ALREADY_EXISTS: it is creating this number
    // (its CREATING intent is not in the snapshot). Take the next number.
    const bool raced = absl::IsAborted(s) || absl::IsAlreadyExists(s);
    if (!options_.shared_store || !raced) return s;
    if (attempt == 9) {
      return absl::AbortedError(
          absl::StrCat("ring '", name, "' keeps being changed by other replicas; retry"));
    }
    if (absl::Status r = RefreshLocked(); !r.ok()) return r;
    base = FindRing(name);
    if (!base.ok()) return base.status();
    next = absl::IsAlreadyExists(s) ? record.version + 1 : 1;
    for (const Version& v : (*base)->versions) next = std::max(next, v.record.version + 1);
    record.version = next;
    record.object_label = absl::StrCat(rotation::kObjectLabelPrefix, name, "/v", next);
  }
  BumpGeneration(name, 1);
  auto created = MaterializeVersion(**base, record, nullptr);
  if (!created.ok()) {
    RollBackVersion(record);
    return created.status();
  }
  auto result = MutateRing(name, [&](Ring& ring, rotation::Mutation& m) -> absl::Status {
    Version v = *created;
    const int64_t now = NowMs();
    v.record.state = VersionState::kPending;
    v.record.publish_time = now;
    if (activation != Activation::kPending && ring.active >= 0) {
      VersionRecord& old = ring.versions[static_cast<size_t>(ring.active)].record;
      if (activation == Activation::kReplaceActive) {
        old.state = VersionState::kRetired;
        old.retire_time = now;
      } else {
        old.previous_state = VersionState::kActive;
        old.state = VersionState::kDestroyScheduled;
        old.compromised = true;
        old.retire_time = now;
        old.destroy_after = now + ring.record.policy.destroy_delay_ms;
      }
      m.update_versions.push_back(old);
    }
    if (activation != Activation::kPending) {
      v.record.state = VersionState::kActive;
      v.record.activate_time = now;
    }
    m.update_versions.push_back(v.record);
    ring.versions.push_back(std::move(v));
    return absl::OkStatus();
  });
  if (!result.ok()) {
    Log(LogLevel::kError, "version.creation_failed",
        {{"ring", name},
         {"version", absl::StrCat(record.version)},
         {"error", std::string(result.status().message())}});
    RollBackVersion(record);
    return result.status();
  }
  Log(LogLevel::kInfo, "version.created",
      {{"ring", name},
       {"version", absl::StrCat(next)},
       {"kid", created->record.kid},
       {"state", activation == Activation::kPending ? "PENDING" : "ACTIVE"}});
  return next;
}

absl::Status KeyService::Promote(const std::string& name, uint32_t version, bool compromise_active,
                                 std::string* pending_error) {
  uint32_t old_version = 0;
  auto result = MutateRing(name, [&](Ring& ring, rotation::Mutation& m) -> absl::Status {
    Version* pending = ring.Find(version);
    if (pending == nullptr || pending->record.state != VersionState::kPending) {
      return absl::FailedPreconditionError(
          absl::StrCat("version ", version, " of ring '", name, "' is not PENDING"));
    }
    const int64_t now = NowMs();
    if (ring.active >= 0) {
      VersionRecord& old = ring.versions[static_cast<size_t>(ring.active)].record;
      old_version = old.version;
      old.retire_time = now;
      if (compromise_active) {
        old.previous_state = VersionState::kActive;
        old.state = VersionState::kDestroyScheduled;
        old.compromised = true;
        old.destroy_after = now + ring.record.policy.destroy_delay_ms;
      } else {
        old.state = VersionState::kRetired;
      }
      m.update_versions.push_back(old);
    }
    pending->record.state = VersionState::kActive;
    pending->record.activate_time = now;
    m.update_versions.push_back(pending->record);
    return absl::OkStatus();
  });
  if (!result.ok()) return result.status();
  Log(LogLevel::kInfo, "ring.rotated",
      {{"ring", name},
       {"active_version", absl::StrCat(version)},
       {"previous_version", absl::StrCat(old_version)},
       {"previous_state", compromise_active ? "DESTROY_SCHEDULED (compromised)" : "RETIRED"}});
  // The next key is pre-published at once, so that it has aged by the next rotation. Its failure
  // does not undo the committed promotion: it is reported (and the scheduler retries).
  AddPendingAfter(name, pending_error);
  return absl::OkStatus();
}

void KeyService::AddPendingAfter(const std::string& name, std::string* pending_error) {
  auto added = AddVersion(name, Activation::kPending);
  if (added.ok()) return;
  Log(LogLevel::kError, "ring.pending_failed",
      {{"ring", name},
       {"error", std::string(added.status().message())},
       {"action", "the scheduler retries"}});
  if (pending_error != nullptr) {
    *pending_error =
        absl::StrCat("creating the next PENDING version failed (the scheduler retries): ",
                     added.status().message());
  }
}

absl::Status KeyService::DestroyVersion(const std::string& name, uint32_t version) {
  std::string object_id;
  auto marked = MutateRing(name, [&](Ring& ring, rotation::Mutation& m) -> absl::Status {
    Version* v = ring.Find(version);
    if (v == nullptr) return VersionNotFound(name, version);
    if (v->record.state != VersionState::kDestroyScheduled &&
        v->record.state != VersionState::kDestroying) {
      return WrongState(name, version, v->record.state, "only scheduled destructions run");
    }
    object_id = v->record.object_id;
    if (v->record.state == VersionState::kDestroying) return absl::OkStatus();  // resuming
    v->record.state = VersionState::kDestroying;
    m.update_versions.push_back(v->record);
    return absl::OkStatus();
  });
  if (!marked.ok()) return marked.status();
  // The metadata says DESTROYING before the object goes; deletion is idempotent, so a crash
  // between here and the final commit is finished at the next start.
  if (absl::Status s = token_->DestroyKeyPair(absl::HexStringToBytes(object_id)); !s.ok()) {
    return s;
  }
  auto done = MutateRing(name, [&](Ring& ring, rotation::Mutation& m) -> absl::Status {
    Version* v = ring.Find(version);
    if (v == nullptr) return VersionNotFound(name, version);
    v->record.state = VersionState::kDestroyed;
    v->record.destroy_time = NowMs();
    v->key = nullptr;
    m.update_versions.push_back(v->record);
    return absl::OkStatus();
  });
  if (!done.ok()) return done.status();
  Log(LogLevel::kInfo, "version.destroyed", {{"ring", name}, {"version", absl::StrCat(version)}});
  return absl::OkStatus();
}

absl::StatusOr<v1::KeyRing> KeyService::UpdateRotationPolicy(
    const v1::UpdateRotationPolicyRequest& request) {
  rotation::RotationPolicy policy{
      request.policy().prepublish_ms(), request.policy().rotation_period_ms(),
      request.policy().retain_ms(), request.policy().destroy_delay_ms()};
  if (absl::Status s = rotation::ValidatePolicy(policy); !s.ok()) return s;
  if (absl::Status s = rotation::CheckPolicyFloors(policy, options_.floors); !s.ok()) return s;
  absl::MutexLock admin(&admin_mu_);
  if (absl::Status s = SyncShared(); !s.ok()) return s;
  auto updated = MutateRing(request.ring(), [&](Ring& ring, rotation::Mutation& m) {
    ring.record.policy = policy;
    ring.record.policy_explicit = true;
    m.update_rings.push_back(ring.record);
    return absl::OkStatus();
  });
  if (!updated.ok()) return updated.status();
  Log(LogLevel::kInfo, "ring.policy_updated",
      {{"ring", request.ring()},
       {"prepublish_ms", absl::StrCat(policy.prepublish_ms)},
       {"rotation_period_ms", absl::StrCat(policy.rotation_period_ms)},
       {"retain_ms", absl::StrCat(policy.retain_ms)},
       {"destroy_delay_ms", absl::StrCat(policy.destroy_delay_ms)}});
  // The policy is committed: a failure to pre-publish the next key does not undo it (the ring
  // shows no PENDING version; the failure is logged and the scheduler retries).
  if ((*updated)->NewestPending() == nullptr) AddPendingAfter(request.ring(), nullptr);
  auto latest = FindRing(request.ring());
  if (!latest.ok()) return latest.status();
  return ToProto(**latest);
}

absl::StatusOr<v1::RotateKeyRingResponse> KeyService::RotateLocked(const std::string& name,
                                                                   bool force) {
  auto ring = FindRing(name);
  if (!ring.ok()) return ring.status();
  v1::RotateKeyRingResponse out;
  std::string pending_error;
  const Version* pending = (*ring)->NewestPending();
  if (pending == nullptr) {
    if (force) {
      // No pre-published key: make a fresh one ACTIVE at once (verifiers may need a refresh).
      // A failure here changes nothing (AddVersion rolls back); a failure of the follow-up
      // PENDING version does not undo the committed rotation, so the answer is OK and says so.
      auto added = AddVersion(name, Activation::kReplaceActive);
      if (!added.ok()) return added.status();
      AddPendingAfter(name, &pending_error);
      out.set_message(
          absl::StrCat("forced: new version ", *added, " is ACTIVE without pre-publication"));
    } else {
      // Nothing to promote: pre-publish the next key now, and say that the ring did not rotate
      // (and what was created), so that a script does not take it for a rotation.
      auto added = AddVersion(name, Activation::kPending);
      if (!added.ok()) return added.status();
      auto latest = FindRing(name);
      if (!latest.ok()) return latest.status();
      const Version* v = (*latest)->Find(*added);
      const int64_t eligible = v->record.publish_time + (*latest)->record.policy.prepublish_ms;
      return absl::FailedPreconditionError(absl::StrCat(
          "ring '", name, "' was not rotated: it had no PENDING version, so version ", *added,
          " was created and published now; it can be promoted from ", FormatMs(eligible),
          " (prepublish ", rotation::FormatDurationMs((*latest)->record.policy.prepublish_ms),
          "); rotate again then, or with force"));
    }
  } else {
    const int64_t eligible = pending->record.publish_time + (*ring)->record.policy.prepublish_ms;
    if (!force) {
      if (absl::Status gate = RotationCertificateGate((*ring)->record, pending->record);
          !gate.ok()) {
        return gate;
      }
    }
    if (!force && NowMs() < eligible) {
      return absl::FailedPreconditionError(
          absl::StrCat("ring '", name, "' was not rotated: PENDING version ",
                       pending->record.version, " has not been published for prepublish (",
                       rotation::FormatDurationMs((*ring)->record.policy.prepublish_ms),
                       ") yet; it can be promoted from ", FormatMs(eligible),
                       "; rotate again then, or with force"));
    }
    uint32_t promoted = pending->record.version;
    if (absl::Status s = Promote(name, promoted, false, &pending_error); !s.ok()) return s;
    out.set_message(absl::StrCat("version ", promoted, " is ACTIVE"));
  }
  out.set_rotated(true);
  if (!pending_error.empty()) {
    out.set_pending_error(pending_error);
    absl::StrAppend(out.mutable_message(), "; ", pending_error);
  }
  if (force) {
    Log(LogLevel::kWarning, "ring.rotate_forced", {{"ring", name}, {"result", out.message()}});
  }
  auto latest = FindRing(name);
  if (!latest.ok()) return latest.status();
  *out.mutable_ring() = ToProto(**latest);
  out.set_active_version(out.ring().active_version());
  return out;
}

absl::StatusOr<v1::RotateKeyRingResponse> KeyService::RotateKeyRing(
    const v1::RotateKeyRingRequest& request) {
  absl::MutexLock admin(&admin_mu_);
  if (absl::Status s = SyncShared(); !s.ok()) return s;
  return RotateLocked(request.ring(), request.force());
}

absl::StatusOr<v1::KeyRing> KeyService::DisableKeyVersion(const v1::KeyVersionRequest& request) {
  absl::MutexLock admin(&admin_mu_);
  if (absl::Status s = SyncShared(); !s.ok()) return s;
  auto ring = MutateRing(request.ring(), [&](Ring& r, rotation::Mutation& m) -> absl::Status {
    Version* v = r.Find(request.version());
    if (v == nullptr) return VersionNotFound(request.ring(), request.version());
    if (absl::Status s = RefuseCompromised(request.ring(), v->record, "disabled"); !s.ok())
      return s;
    if (v->record.state == VersionState::kActive) {
      return WrongState(request.ring(), request.version(), v->record.state,
                        "the ACTIVE version cannot be disabled; rotate first");
    }
    if (v->record.state != VersionState::kPending && v->record.state != VersionState::kRetired) {
      return WrongState(request.ring(), request.version(), v->record.state,
                        "only PENDING or RETIRED versions can be disabled");
    }
    v->record.previous_state = v->record.state;
    v->record.state = VersionState::kDisabled;
    m.update_versions.push_back(v->record);
    return absl::OkStatus();
  });
  if (!ring.ok()) return ring.status();
  Log(LogLevel::kInfo, "version.disabled",
      {{"ring", request.ring()}, {"version", absl::StrCat(request.version())}});
  return ToProto(**ring);
}

absl::StatusOr<v1::KeyRing> KeyService::EnableKeyVersion(const v1::KeyVersionRequest& request) {
  absl::MutexLock admin(&admin_mu_);
  if (absl::Status s = SyncShared(); !s.ok()) return s;
  auto ring = MutateRing(request.ring(), [&](Ring& r, rotation::Mutation& m) -> absl::Status {
    Version* v = r.Find(request.version());
    if (v == nullptr) return VersionNotFound(request.ring(), request.version());
    if (absl::Status s = RefuseCompromised(request.ring(), v->record, "enabled"); !s.ok()) return s;
    if (v->record.state != VersionState::kDisabled) {
      return WrongState(request.ring(), request.version(), v->record.state,
                        "only DISABLED versions can be enabled");
    }
    if (v->key == nullptr) {
      return WrongState(request.ring(), request.version(), v->record.state,
                        "its token object is missing");
    }
    // Back to PENDING only if it was PENDING and no other version is pre-published; a RETIRED
    // version's retain period restarts, so verifiers see it for the full retain again.
    bool pending =
        v->record.previous_state == VersionState::kPending && r.NewestPending() == nullptr;
    v->record.state = pending ? VersionState::kPending : VersionState::kRetired;
    if (!pending) v->record.retire_time = NowMs();
    v->record.previous_state = VersionState::kCreating;
    m.update_versions.push_back(v->record);
    return absl::OkStatus();
  });
  if (!ring.ok()) return ring.status();
  Log(LogLevel::kInfo, "version.enabled",
      {{"ring", request.ring()}, {"version", absl::StrCat(request.version())}});
  return ToProto(**ring);
}

absl::StatusOr<v1::KeyRing> KeyService::ScheduleKeyVersionDestruction(
    const v1::KeyVersionRequest& request) {
  absl::MutexLock admin(&admin_mu_);
  if (absl::Status s = SyncShared(); !s.ok()) return s;
  int64_t destroy_after = 0;
  auto ring = MutateRing(request.ring(), [&](Ring& r, rotation::Mutation& m) -> absl::Status {
    Version* v = r.Find(request.version());
    if (v == nullptr) return VersionNotFound(request.ring(), request.version());
    if (v->record.state == VersionState::kActive) {
      return WrongState(request.ring(), request.version(), v->record.state,
                        "the ACTIVE version cannot be destroyed; rotate first");
    }
    if (v->record.state != VersionState::kPending && v->record.state != VersionState::kRetired &&
        v->record.state != VersionState::kDisabled) {
      return WrongState(request.ring(), request.version(), v->record.state,
                        "only PENDING, RETIRED or DISABLED versions can be scheduled");
    }
    v->record.previous_state =
        v->record.state == VersionState::kDisabled ? v->record.previous_state : v->record.state;
    v->record.state = VersionState::kDestroyScheduled;
    destroy_after = v->record.destroy_after = NowMs() + r.record.policy.destroy_delay_ms;
    m.update_versions.push_back(v->record);
    return absl::OkStatus();
  });
  if (!ring.ok()) return ring.status();
  Log(LogLevel::kWarning, "version.destroy_scheduled",
      {{"ring", request.ring()},
       {"version", absl::StrCat(request.version())},
       {"destroy_after", FormatMs(destroy_after)}});
  return ToProto(**ring);
}

absl::StatusOr<v1::KeyRing> KeyService::CancelKeyVersionDestruction(
    const v1::KeyVersionRequest& request) {
  absl::MutexLock admin(&admin_mu_);
  if (absl::Status s = SyncShared(); !s.ok()) return s;
  auto ring = MutateRing(request.ring(), [&](Ring& r, rotation::Mutation& m) -> absl::Status {
    Version* v = r.Find(request.version());
    if (v == nullptr) return VersionNotFound(request.ring(), request.version());
    if (absl::Status s =
            RefuseCompromised(request.ring(), v->record, "returned to service (cancel-destroy)");
        !s.ok()) {
      return s;
    }
    if (v->record.state != VersionState::kDestroyScheduled) {
      return WrongState(request.ring(), request.version(), v->record.state,
                        "only a DESTROY_SCHEDULED version can be cancelled");
    }
    v->record.state = VersionState::kDisabled;  // as Cloud KMS restores: enable to republish
    v->record.destroy_after = 0;
    m.update_versions.push_back(v->record);
    return absl::OkStatus();
  });
  if (!ring.ok()) return ring.status();
  Log(LogLevel::kInfo, "version.destroy_cancelled",
      {{"ring", request.ring()}, {"version", absl::StrCat(request.version())}});
  return ToProto(**ring);
}

absl::StatusOr<v1::KeyRing> KeyService::CompromiseKeyVersion(
    const v1::CompromiseKeyVersionRequest& request) {
  absl::MutexLock admin(&admin_mu_);
  if (absl::Status s = SyncShared(); !s.ok()) return s;
  auto ring = FindRing(request.ring());
  if (!ring.ok()) return ring.status();
  const Version* v = (*ring)->Find(request.version());
  if (v == nullptr) return VersionNotFound(request.ring(), request.version());
  Log(LogLevel::kWarning, "version.compromised",
      {{"ring", request.ring()},
       {"version", absl::StrCat(request.version())},
       {"kid", v->record.kid},
       {"state", std::string(VersionStateName(v->record.state))},
       {"reason", request.reason()}});
  if (v->record.state == VersionState::kDestroyed || v->record.state == VersionState::kDestroying) {
    return WrongState(request.ring(), request.version(), v->record.state, "already destroyed");
  }
  if (v->record.state == VersionState::kActive) {
    // Replace it now: the pre-published key if there is one (verifiers that fetched the JWKS
    // since it was published keep working), else a fresh key. The ring is never without an
    // ACTIVE version, so the old one signs until the single commit that swaps them.
    // A failure of the follow-up PENDING version does not undo the committed swap: the answer
    // is the ring as committed (compromised version unpublished, new ACTIVE), the failure logged.
    const Version* pending = (*ring)->NewestPending();
    absl::Status s = pending != nullptr
                         ? Promote(request.ring(), pending->record.version, true, nullptr)
                         : AddVersion(request.ring(), Activation::kReplaceCompromised).status();
    if (!s.ok()) return s;
    if (pending == nullptr) AddPendingAfter(request.ring(), nullptr);
  } else {
    auto updated = MutateRing(request.ring(), [&](Ring& r, rotation::Mutation& m) {
      Version* target = r.Find(request.version());
      const int64_t now = NowMs();
      if (target->record.state != VersionState::kDestroyScheduled) {
        target->record.previous_state = target->record.state;
        target->record.state = VersionState::kDestroyScheduled;
        target->record.destroy_after = now + r.record.policy.destroy_delay_ms;
      }
      target->record.compromised = true;
      m.update_versions.push_back(target->record);
      return absl::OkStatus();
    });
    if (!updated.ok()) return updated.status();
  }
  auto latest = FindRing(request.ring());
  if (!latest.ok()) return latest.status();
  return ToProto(**latest);
}

void KeyService::Version::NoteSignature() const {
  const int64_t now = NowMs();
  if (last_signed_ms->load(std::memory_order_relaxed) < now) {
    last_signed_ms->store(now, std::memory_order_relaxed);
  }
}

std::vector<VersionRecord> KeyService::PlanningRecords(const Ring& ring) const {
  // Other replicas: one that missed the retirement's notification keeps signing with the version
  // until its next re-read, and one that lost the store until its staleness bound, which counts
  // from the start of its last good read (which did not see the retirement, so began before
  // retire_time). Every replica is assumed to run with the same --max_metadata_staleness.
  const int64_t other_replicas_ms =
      options_.shared_store ? absl::ToInt64Milliseconds(options_.max_staleness) : 0;
  std::vector<VersionRecord> records;
  for (const Version& v : ring.versions) {
    if (v.tag_mismatch) continue;  // nothing is planned for a version custody cannot trust
    records.push_back(v.record);
    if (v.record.state == VersionState::kRetired) {
      records.back().retire_time = std::max(v.record.retire_time + other_replicas_ms,
                                            v.last_signed_ms->load(std::memory_order_relaxed));
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
    {
      absl::MutexLock lock(&scheduler_mu_);
      if (scheduler_stop_) return 0;
    }
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

void KeyService::SchedulerLoop() {
  bool leading = false;
  for (;;) {
    // With a shared store one replica, elected through the store, performs due transitions;
    // the others ask again every half second (the takeover delay after a leader dies). Even a
    // replica that wrongly believed it led changes nothing twice: every transition is a
    // conditional commit on the ring's generation.
    auto leader = store_->HoldLeadership();
    const bool now_leading = leader.ok() && *leader;
    scheduler_leader_.store(now_leading);
    if (now_leading != leading) {
      leading = now_leading;
      if (options_.shared_store) {
        Log(leading ? LogLevel::kInfo : LogLevel::kWarning, "scheduler.leader",
            {{"state", leading ? "acquired" : "lost"},
             {"error", leader.ok() ? "" : std::string(leader.status().message())}});
      }
    }
    int64_t next_due = leading ? RunDueTransitions() : 0;
    absl::MutexLock lock(&scheduler_mu_);
    if (scheduler_stop_) return;
    absl::Time deadline = absl::Now() + absl::Seconds(leading ? 60 : 0.5);
    if (options_.shared_store && leading) deadline = absl::Now() + absl::Seconds(1);
    if (next_due != 0) deadline = std::min(deadline, absl::FromUnixMillis(next_due));
    while (!scheduler_stop_ && !scheduler_poke_) {
      if (scheduler_wake_.WaitWithDeadline(&scheduler_mu_, deadline)) break;
    }
    scheduler_poke_ = false;
    if (scheduler_stop_) return;
  }
}

}  // namespace custody::server
