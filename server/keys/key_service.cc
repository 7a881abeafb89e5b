// KeyService, its lifetime. Create loads every ring and version from the metadata
// store and reconciles them with the token (CREATING versions completed or rolled back, missing
// objects flagged, orphaned objects reported); StopScheduler ends the background threads. The
// operations live in key_creation.cc, key_requests.cc, key_snapshots.cc, key_lifecycle.cc,
// key_ring_snapshot.cc and key_scheduler.cc.
#include "server/keys/key_service.h"

#include <set>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/log.h"

namespace custody::server {
namespace {

using rotation::VersionRecord;
using rotation::VersionState;

// With a shared store, a CREATING version younger than this may be another replica's creation
// in flight: startup reconciliation leaves it alone (an older one was abandoned by a crash).
constexpr int64_t kInFlightCreationMs = 10 * 60 * 1000;

}  // namespace

absl::StatusOr<std::unique_ptr<KeyService>> KeyService::Create(pkcs11::KeyOperations* token,
                                                               rotation::MetadataStore* store,
                                                               Options options) {
  auto service = std::unique_ptr<KeyService>(new KeyService(token, store, options));
  if (absl::Status s = service->Load(); !s.ok()) return s;
  if (options.run_scheduler) service->scheduler_.Start();
  if (options.shared_store && options.run_follower) service->follower_.Start();
  return service;
}

KeyService::KeyService(pkcs11::KeyOperations* token, rotation::MetadataStore* store,
                       Options options)
    : token_(token),
      store_(store),
      options_(options),
      scheduler_(store, options.shared_store, [this] { return RunDueTransitions(); }),
      follower_(store, options.refresh_interval, [this] { return Refresh(); }) {}

KeyService::~KeyService() { StopScheduler(); }

bool KeyService::draining() const {
  absl::ReaderMutexLock lock(&mu_);
  return draining_;
}

void KeyService::StopScheduler() {
  {
    absl::MutexLock lock(&mu_);
    draining_ = true;
    jwks_changed_.SignalAll();  // wakes the watchers, which then see draining()
  }
  scheduler_.Stop();
  follower_.Stop();
}

absl::Status KeyService::Load() {
  const int64_t loaded_from_ms = NowMs();  // staleness counts from the read's start
  const int64_t loaded_from_monotonic_ms = options_.clock->MonotonicMs();
  auto ring_records = store_->LoadRings();
  if (!ring_records.ok()) return ring_records.status();
  auto version_records = store_->LoadVersions();
  if (!version_records.ok()) return version_records.status();
  if (options_.adopt_untagged_metadata) {
    if (absl::Status s = AdoptUntagged(*ring_records, *version_records); !s.ok()) return s;
  }
  // Every pair and every key object in one pass over the token: a search per version is
  // quadratic on SoftHSM2, and each attribute read re-reads an object's file there.
  std::vector<pkcs11::ObjectInfo> objects;
  auto pairs = token_->FindAllKeyPairs(&objects);
  if (!pairs.ok()) return pairs.status();

  std::set<std::string> private_ids;  // hex CKA_IDs of private keys present in the token
  std::set<std::string> public_ids;   // and of public keys
  for (const pkcs11::ObjectInfo& o : objects) {
    (o.is_private_key ? private_ids : public_ids).insert(absl::BytesToHexString(o.id));
  }

  oaep_path_.sha256_native = token_->OaepSupported(pkcs11::OaepHash::kSha256);
  Log(LogLevel::kInfo, "token.rsa_oaep_sha256",
      {{"path", oaep_path_.sha256_native
                    ? "native CKM_RSA_PKCS_OAEP"
                    : "fallback: CKM_RSA_X_509 in the token + constant-time OAEP decoding"}});
  token_support_ = TokenSupport::Of(*token_);
  for (const auto& [alg, missing] : token_support_.unserved()) {
    Log(LogLevel::kWarning, "token.alg_unavailable",
        {{"alg", alg}, {"missing_mechanisms", absl::StrJoin(missing, ", ")}});
  }

  std::map<std::string, Ring> rings;
  std::set<std::string> untrusted_rings;
  for (rotation::RingRecord& r : *ring_records) {
    if (!TagTrusted(r, /*log=*/true)) {
      untrusted_rings.insert(r.name);
      continue;
    }
    Ring ring;
    ring.record = std::move(r);
    if (absl::Status s = ResolveProfile(ring); !s.ok()) {
      return absl::DataLossError(
          absl::StrCat("metadata for ring '", ring.record.name, "' is invalid: ", s.message()));
    }
    ApplyFloors(ring, /*log=*/true);
    std::string name = ring.record.name;
    rings.emplace(name, std::move(ring));
  }

  std::set<std::string> known_ids;
  for (VersionRecord& v : *version_records) {
    known_ids.insert(v.object_id);
    if (untrusted_rings.count(v.ring) > 0) continue;  // its ring is not served
    auto it = rings.find(v.ring);
    if (it == rings.end()) {
      return absl::DataLossError(
          absl::StrCat("metadata: version ", v.version, " names unknown ring '", v.ring, "'"));
    }
    Ring& ring = it->second;
    if (!TagTrusted(v, /*log=*/true)) {
      // Before anything acts on its state: neither completed, rolled back nor destroyed.
      Version untrusted{std::move(v), nullptr, false};
      untrusted.tag_mismatch = true;
      ring.versions.push_back(std::move(untrusted));
      continue;
    }
    std::string raw_id = absl::HexStringToBytes(v.object_id);
    bool present = private_ids.count(v.object_id) > 0;

    if (v.state == VersionState::kCreating && options_.shared_store &&
        NowMs() - v.create_time < kInFlightCreationMs) {
      continue;  // another replica may be generating this key right now
    }
    if (v.state == VersionState::kCreating) {
      // Crash between the metadata intent and the end of key generation. A kill inside
      // C_GenerateKeyPair can leave half a pair (SoftHSM2 writes the two objects one after the
      // other): only a complete pair is adopted; anything less is destroyed, then rolled back.
      if (!present || public_ids.count(v.object_id) == 0) {
        if (absl::Status s = token_->DestroyKeyPair(raw_id); !s.ok()) return s;
        if (absl::Status s = store_->DeleteVersion(v.ring, v.version); !s.ok()) return s;
        Log(LogLevel::kWarning, "reconcile.rolled_back_creation",
            {{"ring", v.ring},
             {"version", absl::StrCat(v.version)},
             {"reason", present ? "half a key pair in the token (destroyed)"
                                : "no complete key pair: key generation never completed"}});
        continue;
      }
      auto key = token_->FindKeyPair(raw_id);
      absl::StatusOr<VersionRecord> completed =
          key.ok() ? CompleteVersion(v, **key) : absl::StatusOr<VersionRecord>(key.status());
      if (!completed.ok()) {
        // Token trouble stops the start; an object the kill left unreadable (attributes half
        // written) is destroyed and the creation rolled back.
        if (absl::IsUnavailable(completed.status())) return completed.status();
        if (absl::Status s = token_->DestroyKeyPair(raw_id); !s.ok()) return s;
        if (absl::Status s = store_->DeleteVersion(v.ring, v.version); !s.ok()) return s;
        Log(LogLevel::kWarning, "reconcile.rolled_back_creation",
            {{"ring", v.ring},
             {"version", absl::StrCat(v.version)},
             {"reason", absl::StrCat("unusable key pair in the token (destroyed): ",
                                     completed.status().message())}});
        continue;
      }
      // The first version of a ring becomes ACTIVE; a later one PENDING (published, and only
      // promoted by a rotation).
      bool has_active = false;
      for (const Version& other : ring.versions) {
        has_active |= other.record.state == VersionState::kActive;
      }
      completed->state = has_active ? VersionState::kPending : VersionState::kActive;
      completed->activate_time = has_active ? 0 : NowMs();
      completed->publish_time = NowMs();
      if (absl::Status s = store_->UpdateVersion(*completed); !s.ok()) return s;
      Log(LogLevel::kWarning, "reconcile.completed_creation",
          {{"ring", v.ring}, {"version", absl::StrCat(v.version)}, {"kid", completed->kid}});
      ring.versions.push_back(Version{std::move(*completed), *std::move(key), false});
      continue;
    }
    Version version{std::move(v), nullptr, false};
    // A DESTROYING version's object may already be gone: the scheduler finishes the job.
    if (version.record.state != VersionState::kDestroyed &&
        version.record.state != VersionState::kDestroying) {
      auto found = pairs->find(raw_id);
      absl::StatusOr<std::shared_ptr<pkcs11::KeyPair>> key =
          !present ? absl::StatusOr<std::shared_ptr<pkcs11::KeyPair>>(absl::NotFoundError("absent"))
          : found != pairs->end() ? absl::StatusOr<std::shared_ptr<pkcs11::KeyPair>>(found->second)
                                  : token_->FindKeyPair(raw_id);  // says what is wrong with it
      if (key.ok()) {
        version.key = *std::move(key);
        // The token vouches for the public key the metadata would publish, or the version is
        // out of service.
        if (absl::Status s = VouchForVersion(version, "reconcile.public_key_mismatch"); !s.ok()) {
          return s;
        }
      } else if (absl::IsNotFound(key.status())) {
        version.object_missing = true;
        Log(LogLevel::kError, "reconcile.object_missing",
            {{"ring", version.record.ring},
             {"version", absl::StrCat(version.record.version)},
             {"kid", version.record.kid},
             {"object_id", version.record.object_id}});
      } else {
        return key.status();
      }
    }
    ring.versions.push_back(std::move(version));
  }

  std::vector<v1::OrphanedObject> orphans;
  std::set<std::string> reported;
  for (const pkcs11::ObjectInfo& o : objects) {
    std::string hex = absl::BytesToHexString(o.id);
    if (!absl::StartsWith(o.label, rotation::kObjectLabelPrefix) || known_ids.count(hex) > 0 ||
        !reported.insert(hex).second) {
      continue;
    }
    v1::OrphanedObject orphan;
    orphan.set_token_object_id(hex);
    orphan.set_token_object_label(o.label);
    orphans.push_back(orphan);
    Log(LogLevel::kWarning, "reconcile.orphaned_object",
        {{"object_id", hex},
         {"label", o.label},
         {"action", "reported; custody never adopts or deletes an object it has no record of"}});
  }

  last_synced_ms_.store(loaded_from_ms);
  last_synced_monotonic_ms_.store(loaded_from_monotonic_ms);
  absl::MutexLock lock(&mu_);
  for (auto& [name, ring] : rings) {
    if (ring.versions.empty()) continue;  // rolled back entirely
    RefuseReplayedActive(ring, /*log=*/true);
    ring.Reindex();
    rings_[name] = std::make_shared<const Ring>(std::move(ring));
  }
  orphans_ = std::move(orphans);
  untrusted_rings_ = std::move(untrusted_rings);
  Log(LogLevel::kInfo, "reconcile.done",
      {{"rings", absl::StrCat(rings_.size())},
       {"versions", absl::StrCat(version_records->size())},
       {"orphaned_objects", absl::StrCat(orphans_.size())}});
  return absl::OkStatus();
}

absl::Status KeyService::ResolveProfile(Ring& ring) {
  const rotation::RingRecord& r = ring.record;
  if (r.purpose == rotation::Purpose::kSign) {
    if (!r.curve.empty() || r.zip_max_bytes != 0) {
      return absl::InvalidArgumentError("curve and zip_max_bytes apply to DECRYPT rings only");
    }
    auto profile = ResolveSigningProfile(r.alg, r.rsa_bits, r.allow_non_fapi);
    if (!profile.ok()) return profile.status();
    ring.profile = *profile;
    return absl::OkStatus();
  }
  if (r.allow_non_fapi) {
    return absl::InvalidArgumentError("allow_non_fapi applies to SIGN rings only");
  }
  if (r.zip_max_bytes < 0 || r.zip_max_bytes > 16 * 1024 * 1024) {
    return absl::InvalidArgumentError("zip_max_bytes must be between 0 and 16 MiB");
  }
  auto profile = ResolveDecryptionProfile(r.alg, r.rsa_bits, r.curve);
  if (!profile.ok()) return profile.status();
  ring.decryption = *profile;
  return absl::OkStatus();
}
}  // namespace custody::server
