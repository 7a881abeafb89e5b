// KeyService, the replica view: re-reading the changes other replicas commit to a shared metadata
// store. Signing and decryption never read the store; they read the snapshots this keeps up to
// date, so a change reaches the request path through the same snapshot swap a local change
// uses (JWKS generation, WatchJwks wake-up).
#include <algorithm>
#include <map>
#include <set>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "server/keys/key_service.h"

namespace custody::server {

using rotation::VersionRecord;
using rotation::VersionState;

void KeyService::Unpublish(const std::string& name) {
  absl::MutexLock lock(&mu_);
  if (rings_.erase(name) > 0) {
    ++jwks_generation_;
    jwks_changed_.SignalAll();
  }
}

absl::Status KeyService::Refresh() {
  absl::MutexLock admin(&admin_mu_);
  return RefreshLocked();
}

absl::Status KeyService::CheckMetadataFresh() const {
  if (!options_.shared_store) return absl::OkStatus();
  // On the monotonic clock: a wall clock stepped back must not stretch the bound.
  const int64_t stale_ms = options_.clock->MonotonicMs() - last_synced_monotonic_ms_.load();
  if (stale_ms <= absl::ToInt64Milliseconds(options_.max_staleness)) return absl::OkStatus();
  return absl::UnavailableError(
      absl::StrCat("metadata unreachable for ", stale_ms / 1000,
                   " s: this replica cannot know whether a key was disabled or compromised "
                   "(--max_metadata_staleness=",
                   absl::ToInt64Seconds(options_.max_staleness), "s)"));
}

KeyService::ReplicaStatus KeyService::GetReplicaStatus() const {
  ReplicaStatus out;
  out.shared_store = options_.shared_store;
  out.last_good_read_ms = last_synced_ms_.load();
  out.max_staleness = options_.max_staleness;
  out.scheduler_leader = scheduler_.leader();
  out.refreshes = follower_.refreshes();
  out.refresh_failures = follower_.refresh_failures();
  out.rings_refreshed = rings_refreshed_.load();
  absl::ReaderMutexLock lock(&mu_);
  out.jwks_generation = jwks_generation_;
  return out;
}

absl::Status KeyService::SyncShared() {
  if (!options_.shared_store) return absl::OkStatus();
  return RefreshLocked();
}

void KeyService::BumpGeneration(const std::string& name, uint64_t commits) {
  if (!options_.shared_store) return;
  auto current = FindRing(name);
  if (!current.ok()) return;
  Ring ring = **current;
  ring.record.generation += commits;
  Publish(std::make_shared<const Ring>(std::move(ring)));
}

absl::Status KeyService::RefreshLocked() {
  // The snapshot holds every commit made before the read began, so staleness counts from here
  // (not from the end of the read): the bound other replicas' retention relies on
  // (PlanningRecords).
  const int64_t read_start_ms = NowMs();
  const int64_t read_start_monotonic_ms = options_.clock->MonotonicMs();
  auto ring_records = store_->LoadRings();
  if (!ring_records.ok()) return ring_records.status();
  auto version_records = store_->LoadVersions();
  if (!version_records.ok()) return version_records.status();
  std::map<std::string, std::vector<VersionRecord>> versions_by_ring;
  for (VersionRecord& v : *version_records) versions_by_ring[v.ring].push_back(std::move(v));
  std::map<std::string, std::shared_ptr<const Ring>> current;
  {
    absl::ReaderMutexLock lock(&mu_);
    current = rings_;
  }
  bool changed = false;
  std::set<std::string> seen;
  std::set<std::string> untrusted_rings;
  {
    absl::ReaderMutexLock lock(&mu_);
    untrusted_rings = untrusted_rings_;
  }
  for (rotation::RingRecord& record : *ring_records) {
    seen.insert(record.name);
    auto it = current.find(record.name);
    const Ring* old = it == current.end() ? nullptr : it->second.get();
    // Every row's tag is checked on every read (the tag key remembers the ones it verified): a
    // row edited without moving the ring's generation is caught too.
    const bool was_untrusted = untrusted_rings.count(record.name) > 0;
    if (!TagTrusted(record, /*log=*/!was_untrusted)) {
      untrusted_rings.insert(record.name);
      if (old != nullptr) {
        Unpublish(record.name);
        changed = true;
      }
      continue;
    }
    untrusted_rings.erase(record.name);
    std::set<uint32_t> untrusted_now, untrusted_before;
    for (const VersionRecord& v : versions_by_ring[record.name]) {
      if (!TagTrusted(v, /*log=*/false)) untrusted_now.insert(v.version);
    }
    if (old != nullptr) {
      for (const Version& v : old->versions) {
        if (!TagTrusted(v.record, /*log=*/false)) untrusted_before.insert(v.record.version);
      }
    }
    if (old != nullptr && old->record.generation == record.generation &&
        untrusted_now == untrusted_before) {
      continue;
    }
    Ring ring;
    ring.record = std::move(record);
    if (absl::Status s = ResolveProfile(ring); !s.ok()) {
      Log(LogLevel::kError, "replica.invalid_ring",
          {{"ring", ring.record.name}, {"error", std::string(s.message())}});
      continue;
    }
    ApplyFloors(ring, /*log=*/false);
    bool complete = true;
    for (VersionRecord& v : versions_by_ring[ring.record.name]) {
      if (!TagTrusted(v, /*log=*/untrusted_before.count(v.version) == 0)) {
        Version untrusted{std::move(v), nullptr, false};
        untrusted.tag_mismatch = true;
        ring.versions.push_back(std::move(untrusted));
        continue;
      }
      if (v.state == VersionState::kCreating) continue;  // shown once it completes
      Version version{std::move(v), nullptr, false};
      if (version.record.state != VersionState::kDestroyed &&
          version.record.state != VersionState::kDestroying) {
        // The handle this replica already holds, else the object by its CKA_ID: a version
        // another replica created is found in the shared token on first sight.
        const Version* known = nullptr;
        if (old != nullptr) {
          for (const Version& o : old->versions) {
            if (o.record.object_id == version.record.object_id && o.key != nullptr) known = &o;
          }
        }
        if (known != nullptr) {
          version.key = known->key;
          version.last_signed = known->last_signed;  // this process's signatures
          version.retired_seen = known->retired_seen;
        }
        // A key already vouched for with the same public key and kid is not read again; a
        // changed row, or a version new to this replica, is checked against the token.
        const bool vouched = known != nullptr &&
                             known->record.public_jwk == version.record.public_jwk &&
                             known->record.kid == version.record.kid;
        if (known != nullptr && !vouched) {
          if (absl::Status s = VouchForVersion(version, "replica.public_key_mismatch"); !s.ok()) {
            version.key = nullptr;  // not vouched for: not used until the next try
            complete = false;
          }
        } else if (known == nullptr) {
          auto key = token_->FindKeyPair(absl::HexStringToBytes(version.record.object_id));
          if (key.ok()) {
            version.key = *std::move(key);
            if (absl::Status s = VouchForVersion(version, "replica.public_key_mismatch"); !s.ok()) {
              version.key = nullptr;  // not vouched for: not used until the next try
              complete = false;
            }
          } else if (absl::IsNotFound(key.status())) {
            version.object_missing = true;
            Log(LogLevel::kError, "replica.object_missing",
                {{"ring", version.record.ring},
                 {"version", absl::StrCat(version.record.version)},
                 {"object_id", version.record.object_id}});
          } else {
            // Token trouble: publish what is known and try this ring again next time.
            complete = false;
            Log(LogLevel::kError, "replica.object_unresolved",
                {{"ring", version.record.ring},
                 {"version", absl::StrCat(version.record.version)},
                 {"error", std::string(key.status().message())}});
          }
        }
      }
      ring.versions.push_back(std::move(version));
    }
    if (ring.versions.empty()) continue;  // its first version is still being created
    if (!complete) ring.record.generation = ~uint64_t{0};
    RefuseReplayedActive(ring, /*log=*/true);
    ring.Reindex();
    const std::string name = ring.record.name;
    const size_t count = ring.versions.size();
    Publish(std::make_shared<const Ring>(std::move(ring)));
    rings_refreshed_.fetch_add(1, std::memory_order_relaxed);
    changed = true;
    Log(LogLevel::kDebug, "replica.ring_refreshed",
        {{"ring", name}, {"versions", absl::StrCat(count)}});
  }
  {
    absl::MutexLock lock(&mu_);
    for (auto it = untrusted_rings.begin(); it != untrusted_rings.end();) {
      it = seen.count(*it) > 0 ? std::next(it) : untrusted_rings.erase(it);
    }
    untrusted_rings_ = std::move(untrusted_rings);
  }
  for (const auto& [name, ring] : current) {
    if (seen.count(name) == 0) {
      Unpublish(name);
      changed = true;
      Log(LogLevel::kInfo, "replica.ring_removed", {{"ring", name}});
    }
  }
  last_synced_ms_.store(read_start_ms);
  last_synced_monotonic_ms_.store(read_start_monotonic_ms);
  if (changed) scheduler_.Poke();  // due times may have moved
  return absl::OkStatus();
}

}  // namespace custody::server
