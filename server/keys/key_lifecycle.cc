// KeyService, the key lifecycle's transitions: a new version (AddVersion), promotion and
// rotation, disable/enable, scheduled destruction and its cancellation, compromise, and the
// destruction of a token object. Each goes through MutateRing (key_ring_snapshot.cc); the
// scheduler that performs due transitions is in key_scheduler.cc.
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
#include "common/status_macros.h"
#include "openssl/rand.h"
#include "rotation/lifecycle.h"
#include "server/keys/certificates.h"
#include "server/keys/key_service.h"

namespace custody::server {
namespace {

using rotation::VersionRecord;
using rotation::VersionState;

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

absl::StatusOr<v1::KeyRing> KeyService::ChangeVersion(
    const v1::KeyVersionRequest& request, LogLevel level, absl::string_view event,
    const std::function<absl::Status(Ring&, Version&, std::vector<LogField>&)>& change) {
  absl::MutexLock admin(&admin_mu_);
  CUSTODY_RETURN_IF_ERROR(SyncShared());
  std::vector<LogField> fields;
  auto ring = MutateRing(request.ring(), [&](Ring& r, rotation::Mutation& m) -> absl::Status {
    Version* v = r.Find(request.version());
    if (v == nullptr) return VersionNotFound(request.ring(), request.version());
    // MutateRing applies this again after another replica's change: the fields start anew.
    fields = {{"ring", request.ring()}, {"version", absl::StrCat(request.version())}};
    CUSTODY_RETURN_IF_ERROR(change(r, *v, fields));
    m.update_versions.push_back(v->record);
    return absl::OkStatus();
  });
  if (!ring.ok()) return ring.status();
  Log(level, event, fields);
  return ToProto(**ring);
}

absl::StatusOr<v1::KeyRing> KeyService::DisableKeyVersion(const v1::KeyVersionRequest& request) {
  return ChangeVersion(
      request, LogLevel::kInfo, "version.disabled",
      [&](Ring&, Version& v, std::vector<LogField>&) -> absl::Status {
        CUSTODY_RETURN_IF_ERROR(RefuseCompromised(request.ring(), v.record, "disabled"));
        if (v.record.state == VersionState::kActive) {
          return WrongState(request.ring(), request.version(), v.record.state,
                            "the ACTIVE version cannot be disabled; rotate first");
        }
        if (v.record.state != VersionState::kPending && v.record.state != VersionState::kRetired) {
          return WrongState(request.ring(), request.version(), v.record.state,
                            "only PENDING or RETIRED versions can be disabled");
        }
        v.record.previous_state = v.record.state;
        v.record.state = VersionState::kDisabled;
        return absl::OkStatus();
      });
}

absl::StatusOr<v1::KeyRing> KeyService::EnableKeyVersion(const v1::KeyVersionRequest& request) {
  return ChangeVersion(
      request, LogLevel::kInfo, "version.enabled",
      [&](Ring& r, Version& v, std::vector<LogField>&) -> absl::Status {
        CUSTODY_RETURN_IF_ERROR(RefuseCompromised(request.ring(), v.record, "enabled"));
        if (v.record.state != VersionState::kDisabled) {
          return WrongState(request.ring(), request.version(), v.record.state,
                            "only DISABLED versions can be enabled");
        }
        if (v.key == nullptr) {
          return WrongState(request.ring(), request.version(), v.record.state,
                            "its token object is missing");
        }
        // Back to PENDING only if it was PENDING and no other version is pre-published; a RETIRED
        // version's retain period restarts, so verifiers see it for the full retain again.
        bool pending =
            v.record.previous_state == VersionState::kPending && r.NewestPending() == nullptr;
        v.record.state = pending ? VersionState::kPending : VersionState::kRetired;
        if (!pending) v.record.retire_time = NowMs();
        v.record.previous_state = VersionState::kCreating;
        return absl::OkStatus();
      });
}

absl::StatusOr<v1::KeyRing> KeyService::ScheduleKeyVersionDestruction(
    const v1::KeyVersionRequest& request) {
  return ChangeVersion(
      request, LogLevel::kWarning, "version.destroy_scheduled",
      [&](Ring& r, Version& v, std::vector<LogField>& log) -> absl::Status {
        if (v.record.state == VersionState::kActive) {
          return WrongState(request.ring(), request.version(), v.record.state,
                            "the ACTIVE version cannot be destroyed; rotate first");
        }
        if (v.record.state != VersionState::kPending && v.record.state != VersionState::kRetired &&
            v.record.state != VersionState::kDisabled) {
          return WrongState(request.ring(), request.version(), v.record.state,
                            "only PENDING, RETIRED or DISABLED versions can be scheduled");
        }
        v.record.previous_state =
            v.record.state == VersionState::kDisabled ? v.record.previous_state : v.record.state;
        v.record.state = VersionState::kDestroyScheduled;
        v.record.destroy_after = NowMs() + r.record.policy.destroy_delay_ms;
        log.emplace_back("destroy_after", FormatMs(v.record.destroy_after));
        return absl::OkStatus();
      });
}

absl::StatusOr<v1::KeyRing> KeyService::CancelKeyVersionDestruction(
    const v1::KeyVersionRequest& request) {
  return ChangeVersion(request, LogLevel::kInfo, "version.destroy_cancelled",
                       [&](Ring&, Version& v, std::vector<LogField>&) -> absl::Status {
                         CUSTODY_RETURN_IF_ERROR(RefuseCompromised(
                             request.ring(), v.record, "returned to service (cancel-destroy)"));
                         if (v.record.state != VersionState::kDestroyScheduled) {
                           return WrongState(request.ring(), request.version(), v.record.state,
                                             "only a DESTROY_SCHEDULED version can be cancelled");
                         }
                         // As Cloud KMS restores: DISABLED, and enable to republish.
                         v.record.state = VersionState::kDisabled;
                         v.record.destroy_after = 0;
                         return absl::OkStatus();
                       });
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

}  // namespace custody::server
