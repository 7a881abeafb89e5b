// KeyService, a ring's snapshot and its swap: the version index of a Ring (Find, NewestPending,
// Reindex, the Published set), the ring-policy floors applied to it, and MutateRing, which
// commits a change durably (retried against other replicas' commits on a shared store) before
// Publish swaps the new immutable snapshot in and moves the JWKS generation.
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "rotation/lifecycle.h"
#include "server/keys/key_service.h"

namespace custody::server {

using rotation::VersionState;

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
  scheduler_.Poke();  // the next due time may have moved
  return snapshot;
}

}  // namespace custody::server
