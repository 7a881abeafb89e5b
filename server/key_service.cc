#include "server/key_service.h"

#include <set>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "common/sha256.h"
#include "jose/base64url.h"
#include "jose/json.h"
#include "jose/jwe.h"
#include "jose/jwk.h"
#include "jose/private_key.h"
#include "openssl/core_names.h"
#include "openssl/rand.h"
#include "server/certificates.h"
#include "server/raw_signature.h"

namespace custody::server {
namespace {

using rotation::VersionRecord;
using rotation::VersionState;

int64_t NowMs() { return absl::ToUnixMillis(absl::Now()); }

// With a shared store, a CREATING version younger than this may be another replica's creation
// in flight: startup reconciliation leaves it alone (an older one was abandoned by a crash).
constexpr int64_t kInFlightCreationMs = 10 * 60 * 1000;

absl::StatusOr<std::string> NewObjectId() {
  unsigned char id[16];
  if (RAND_bytes(id, sizeof(id)) != 1) return absl::InternalError("RAND_bytes failed");
  return absl::BytesToHexString(absl::string_view(reinterpret_cast<char*>(id), sizeof(id)));
}

std::string ObjectLabel(const std::string& ring, uint32_t version) {
  return absl::StrCat(rotation::kObjectLabelPrefix, ring, "/v", version);
}

v1::KeyVersionState ToProtoState(VersionState s) {
  switch (s) {
    case VersionState::kCreating:
      return v1::CREATING;
    case VersionState::kPending:
      return v1::PENDING;
    case VersionState::kActive:
      return v1::ACTIVE;
    case VersionState::kRetired:
      return v1::RETIRED;
    case VersionState::kDisabled:
      return v1::DISABLED;
    case VersionState::kDestroyScheduled:
      return v1::DESTROY_SCHEDULED;
    case VersionState::kDestroyed:
      return v1::DESTROYED;
    case VersionState::kDestroying:
      return v1::DESTROYING;
  }
  return v1::KEY_VERSION_STATE_UNSPECIFIED;
}

v1::RotationPolicy PolicyToProto(const rotation::RotationPolicy& p) {
  v1::RotationPolicy out;
  out.set_prepublish_ms(p.prepublish_ms);
  out.set_rotation_period_ms(p.rotation_period_ms);
  out.set_retain_ms(p.retain_ms);
  out.set_destroy_delay_ms(p.destroy_delay_ms);
  return out;
}

std::string GroupName(const EVP_PKEY* pkey) {
  char name[64] = {0};
  size_t len = 0;
  if (EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, name, sizeof(name), &len) !=
      1) {
    return "";
  }
  return std::string(name, len);
}

// The JWK curve name of an EC key ("P-256"), or "" for other keys and curves.
std::string JwkCurve(const EVP_PKEY* pkey) {
  if (!EVP_PKEY_is_a(pkey, "EC")) return "";
  std::string group = GroupName(pkey);
  if (group == "prime256v1" || group == "P-256") return "P-256";
  if (group == "secp384r1" || group == "P-384") return "P-384";
  if (group == "secp521r1" || group == "P-521") return "P-521";
  return "";
}

struct ImportedKey {
  jose::PkeyPtr pkey;
  // The JWK's own "kid", kept so that senders and verifiers holding the key under its old kid
  // keep working after a migration into custody; empty means the RFC 7638 thumbprint.
  std::string kid;
};

absl::StatusOr<ImportedKey> ParseKeyMaterial(const v1::PrivateKeyMaterial& material) {
  ImportedKey out;
  switch (material.key_case()) {
    case v1::PrivateKeyMaterial::kPrivateJwk: {
      auto json = jose::ParseJson(material.private_jwk());
      if (!json.ok()) {
        return absl::InvalidArgumentError("private_jwk is not valid JSON");  // no key echo
      }
      auto pkey = jose::PrivateKeyFromJwk(*json);
      if (!pkey.ok()) return pkey.status();
      out.pkey = *std::move(pkey);
      if (const jose::Json* kid = json->Find("kid"); kid != nullptr) {
        if (!kid->is_string() || kid->as_string().empty() || kid->as_string().size() > 128) {
          return absl::InvalidArgumentError(
              "private_jwk: \"kid\" must be a 1..128 character string");
        }
        for (char c : kid->as_string()) {
          if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
            return absl::InvalidArgumentError("private_jwk: \"kid\" contains control characters");
          }
        }
        out.kid = kid->as_string();
      }
      return out;
    }
    case v1::PrivateKeyMaterial::kPkcs8Pem: {
      auto pkey = jose::PrivateKeyFromPem(material.pkcs8_pem());
      if (!pkey.ok()) return pkey.status();
      out.pkey = *std::move(pkey);
      return out;
    }
    default:
      return absl::InvalidArgumentError("key material is required: private_jwk or pkcs8_pem");
  }
}

// The key types each profile accepts for import.
absl::Status CheckKeyFitsRing(const EVP_PKEY* pkey, const rotation::RingRecord& ring,
                              const pkcs11::KeySpec& spec) {
  bool fits = false;
  switch (spec.type) {
    case pkcs11::KeyType::kRsa: {
      int bits = EVP_PKEY_get_bits(pkey);
      fits = EVP_PKEY_is_a(pkey, "RSA") && (bits == 2048 || bits == 3072 || bits == 4096);
      break;
    }
    case pkcs11::KeyType::kEd25519:
      fits = EVP_PKEY_is_a(pkey, "ED25519");
      break;
    case pkcs11::KeyType::kEcP256:
      fits = JwkCurve(pkey) == "P-256";
      break;
    case pkcs11::KeyType::kEcP384:
      fits = JwkCurve(pkey) == "P-384";
      break;
    case pkcs11::KeyType::kEcP521:
      fits = JwkCurve(pkey) == "P-521";
      break;
  }
  if (!fits) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the imported key does not fit ring '", ring.name, "' (alg ", ring.alg,
        ring.curve.empty() ? "" : ", curve " + ring.curve,
        "): RSA 2048/3072/4096 for RSA algs, the ring's curve for EC, Ed25519 for EdDSA"));
  }
  return absl::OkStatus();
}

// The uncompressed point (04||X||Y) of a validated ephemeral key, as the token's ECDH takes it.
absl::StatusOr<std::string> EncodedPoint(const EVP_PKEY* pkey) {
  unsigned char buf[256];
  size_t len = 0;
  if (EVP_PKEY_get_octet_string_param(pkey, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, buf, sizeof(buf),
                                      &len) != 1) {
    return absl::InternalError("cannot encode the epk point");
  }
  return std::string(reinterpret_cast<char*>(buf), len);
}

}  // namespace

absl::StatusOr<std::unique_ptr<KeyService>> KeyService::Create(pkcs11::Token* token,
                                                               rotation::MetadataStore* store,
                                                               Options options) {
  auto service = std::unique_ptr<KeyService>(new KeyService(token, store, options));
  if (absl::Status s = service->Load(); !s.ok()) return s;
  if (options.run_scheduler) {
    KeyService* raw = service.get();
    service->scheduler_ = std::thread([raw] { raw->SchedulerLoop(); });
  }
  if (options.shared_store) {
    KeyService* raw = service.get();
    service->follower_ = std::thread([raw] { raw->FollowLoop(); });
  }
  return service;
}

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
  {
    absl::MutexLock lock(&scheduler_mu_);
    scheduler_stop_ = true;
    scheduler_wake_.SignalAll();
  }
  if (scheduler_.joinable()) scheduler_.join();
  if (follower_.joinable()) follower_.join();
}

absl::StatusOr<VersionRecord> KeyService::CompleteVersion(VersionRecord record,
                                                          const pkcs11::KeyPair& key) const {
  auto pkey = token_->PublicKey(key);
  if (!pkey.ok()) return pkey.status();
  auto jwk = jose::PublicJwkFromPkey(pkey->get());
  if (!jwk.ok()) return jwk.status();
  if (record.kid.empty()) {  // a kid kept from an imported JWK stays
    auto kid = jose::Rfc7638Thumbprint(*jwk);
    if (!kid.ok()) return kid.status();
    record.kid = *kid;
  }
  record.public_jwk = jwk->Serialize();
  return record;
}

absl::Status KeyService::Load() {
  const int64_t loaded_from_ms = NowMs();  // staleness counts from the read's start
  auto ring_records = store_->LoadRings();
  if (!ring_records.ok()) return ring_records.status();
  auto version_records = store_->LoadVersions();
  if (!version_records.ok()) return version_records.status();
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
  for (rotation::RingRecord& r : *ring_records) {
    Ring ring;
    ring.record = std::move(r);
    if (absl::Status s = ResolveProfile(ring); !s.ok()) {
      return absl::DataLossError(
          absl::StrCat("metadata for ring '", ring.record.name, "' is invalid: ", s.message()));
    }
    std::string name = ring.record.name;
    rings.emplace(name, std::move(ring));
  }

  std::set<std::string> known_ids;
  for (VersionRecord& v : *version_records) {
    known_ids.insert(v.object_id);
    auto it = rings.find(v.ring);
    if (it == rings.end()) {
      return absl::DataLossError(
          absl::StrCat("metadata: version ", v.version, " names unknown ring '", v.ring, "'"));
    }
    Ring& ring = it->second;
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
  absl::MutexLock lock(&mu_);
  for (auto& [name, ring] : rings) {
    if (ring.versions.empty()) continue;  // rolled back entirely
    ring.Reindex();
    rings_[name] = std::make_shared<const Ring>(std::move(ring));
  }
  orphans_ = std::move(orphans);
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

absl::StatusOr<KeyService::Version> KeyService::MaterializeVersion(const Ring& ring,
                                                                   VersionRecord record,
                                                                   const EVP_PKEY* import) {
  const bool decrypt = ring.record.purpose == rotation::Purpose::kDecrypt;
  const pkcs11::KeySpec& spec = decrypt ? ring.decryption.key : ring.profile.key;
  std::string id = absl::HexStringToBytes(record.object_id);
  auto key = import != nullptr ? token_->ImportKeyPair(import, id, record.object_label, decrypt)
                               : token_->GenerateKeyPair(spec, id, record.object_label, decrypt);
  if (!key.ok()) return key.status();
  auto completed = CompleteVersion(std::move(record), **key);
  if (!completed.ok()) return completed.status();
  return Version{*std::move(completed), *std::move(key), false};
}

void KeyService::RollBackVersion(const VersionRecord& record) {
  absl::Status destroyed = token_->DestroyKeyPair(absl::HexStringToBytes(record.object_id));
  absl::Status deleted = destroyed;
  if (destroyed.ok() && options_.shared_store) {
    // Another replica may have numbered a version after this one meanwhile: the number stays,
    // as a version DESTROYED before it was ever used, so that numbers remain contiguous.
    VersionRecord abandoned = record;
    abandoned.state = VersionState::kDestroyed;
    abandoned.destroy_time = NowMs();
    deleted = store_->UpdateVersion(abandoned);
  } else if (destroyed.ok()) {
    deleted = store_->DeleteVersion(record.ring, record.version);
  }
  Log(LogLevel::kWarning, "version.creation_abandoned",
      {{"ring", record.ring}, {"version", absl::StrCat(record.version)}});
  if (!deleted.ok()) {
    Log(LogLevel::kError, "version.rollback_failed",
        {{"ring", record.ring},
         {"version", absl::StrCat(record.version)},
         {"error", std::string(deleted.message())},
         {"action", "left CREATING; the next start reconciles it"}});
  }
}

absl::StatusOr<v1::KeyRing> KeyService::CreateKeyRing(const v1::CreateKeyRingRequest& request) {
  if (absl::Status s = rotation::ValidateRingName(request.name()); !s.ok()) return s;
  Ring ring;
  ring.record.name = request.name();
  switch (request.purpose()) {
    case v1::SIGN:
      ring.record.purpose = rotation::Purpose::kSign;
      break;
    case v1::DECRYPT:
      ring.record.purpose = rotation::Purpose::kDecrypt;
      break;
    default:
      return absl::InvalidArgumentError("purpose is required: SIGN or DECRYPT");
  }
  ring.record.alg = request.alg();
  ring.record.rsa_bits = static_cast<int>(request.rsa_bits());
  ring.record.allow_non_fapi = request.allow_non_fapi();
  ring.record.curve = request.curve();
  ring.record.zip_max_bytes = request.zip_max_bytes();
  if (request.require_certificate() && ring.record.purpose != rotation::Purpose::kSign) {
    return absl::InvalidArgumentError("require_certificate applies to SIGN rings only");
  }
  ring.record.require_certificate = request.require_certificate();
  if (request.has_policy()) {
    ring.record.policy = {request.policy().prepublish_ms(), request.policy().rotation_period_ms(),
                          request.policy().retain_ms(), request.policy().destroy_delay_ms()};
    if (absl::Status s = rotation::ValidatePolicy(ring.record.policy); !s.ok()) return s;
    ring.record.policy_explicit = true;
  }
  if (absl::Status s = ResolveProfile(ring); !s.ok()) return s;
  if (absl::Status s = token_support_.CheckServes(ring.record.alg); !s.ok()) return s;
  const pkcs11::KeySpec& spec =
      ring.record.purpose == rotation::Purpose::kSign ? ring.profile.key : ring.decryption.key;
  // Normalized: the defaults chosen by the profile are what the metadata records.
  ring.record.rsa_bits = spec.type == pkcs11::KeyType::kRsa ? spec.rsa_bits : 0;
  if (ring.record.purpose == rotation::Purpose::kDecrypt) ring.record.curve = ring.decryption.curve;

  ImportedKey import;
  if (request.has_import_key()) {
    auto parsed = ParseKeyMaterial(request.import_key());
    if (!parsed.ok()) return parsed.status();
    import = *std::move(parsed);
    if (absl::Status s = CheckKeyFitsRing(import.pkey.get(), ring.record, spec); !s.ok()) return s;
    if (spec.type == pkcs11::KeyType::kRsa) {
      ring.record.rsa_bits = EVP_PKEY_get_bits(import.pkey.get());
    }
  }

  absl::MutexLock admin(&admin_mu_);
  if (absl::Status s = SyncShared(); !s.ok()) return s;
  {
    absl::MutexLock lock(&mu_);
    if (rings_.count(request.name()) > 0) {
      return absl::AlreadyExistsError(absl::StrCat("ring '", request.name(), "' already exists"));
    }
  }
  ring.record.create_time = NowMs();
  auto object_id = NewObjectId();
  if (!object_id.ok()) return object_id.status();
  VersionRecord version;
  version.ring = request.name();
  version.version = 1;
  version.object_id = *object_id;
  version.object_label = ObjectLabel(request.name(), 1);
  version.state = VersionState::kCreating;
  version.create_time = ring.record.create_time;
  version.kid = import.kid;  // recorded with the intent so that a crash does not lose it

  // 1. Durable intent: the ring and a CREATING version. A crash after this point is completed
  //    or rolled back at the next start; the store's primary key settles concurrent creates.
  if (absl::Status s = store_->InsertRingWithVersion(ring.record, version); !s.ok()) return s;
  // 2. The key in the token (generated, or imported), sensitive and non-extractable.
  auto created = MaterializeVersion(ring, version, import.pkey.get());
  if (!created.ok()) {
    RollBackVersion(version);
    return created.status();
  }
  // 3. Durable activation, then publication in memory.
  created->record.state = VersionState::kActive;
  created->record.activate_time = NowMs();
  created->record.publish_time = created->record.activate_time;
  if (absl::Status s = store_->UpdateVersion(created->record); !s.ok()) {
    RollBackVersion(version);
    return s;
  }
  ring.versions.push_back(*std::move(created));
  ring.active = 0;
  if (options_.shared_store) ring.record.generation = 2;  // the intent and the activation
  auto snapshot = std::make_shared<const Ring>(std::move(ring));
  Publish(snapshot);
  Log(LogLevel::kInfo, "ring.created",
      {{"ring", request.name()},
       {"purpose", std::string(rotation::PurposeName(snapshot->record.purpose))},
       {"alg", request.alg()},
       {"kid", snapshot->versions[0].record.kid},
       {"key", import.pkey ? "imported" : "generated in the token"}});
  // An explicit policy pre-publishes the next key from the start.
  if (snapshot->record.policy_explicit) {
    if (auto added = AddVersion(request.name(), Activation::kPending); !added.ok()) {
      Log(LogLevel::kError, "ring.pending_failed",
          {{"ring", request.name()},
           {"error", std::string(added.status().message())},
           {"action", "the scheduler retries"}});
    }
    auto latest = FindRing(request.name());
    if (latest.ok()) return ToProto(**latest);
  }
  return ToProto(*snapshot);
}

absl::StatusOr<v1::KeyRing> KeyService::ImportKeyVersion(
    const v1::ImportKeyVersionRequest& request) {
  auto found = FindRing(request.ring());
  if (!found.ok()) return found.status();
  auto imported = ParseKeyMaterial(request.key());
  if (!imported.ok()) return imported.status();

  absl::MutexLock admin(&admin_mu_);
  if (absl::Status s = SyncShared(); !s.ok()) return s;
  // Re-read under the admin lock: the snapshot we extend must be the latest.
  auto current = FindRing(request.ring());
  if (!current.ok()) return current.status();
  const Ring& base = **current;
  const pkcs11::KeySpec& spec =
      base.record.purpose == rotation::Purpose::kSign ? base.profile.key : base.decryption.key;
  if (absl::Status s = CheckKeyFitsRing(imported->pkey.get(), base.record, spec); !s.ok()) {
    return s;
  }
  uint32_t next = 1;
  for (const Version& v : base.versions) {
    next = std::max(next, v.record.version + 1);
    if (!imported->kid.empty() && v.record.kid == imported->kid) {
      return absl::AlreadyExistsError(absl::StrCat(
          "ring '", base.record.name, "' already has a version with kid '", imported->kid, "'"));
    }
  }
  auto object_id = NewObjectId();
  if (!object_id.ok()) return object_id.status();
  VersionRecord version;
  version.ring = base.record.name;
  version.version = next;
  version.object_id = *object_id;
  version.object_label = ObjectLabel(base.record.name, next);
  version.state = VersionState::kCreating;
  version.create_time = NowMs();
  version.kid = imported->kid;
  if (absl::Status s = store_->InsertVersion(version); !s.ok()) return s;
  auto created = MaterializeVersion(base, version, imported->pkey.get());
  if (!created.ok()) {
    RollBackVersion(version);
    return created.status();
  }
  created->record.state = VersionState::kPending;
  created->record.publish_time = NowMs();
  if (absl::Status s = store_->UpdateVersion(created->record); !s.ok()) {
    RollBackVersion(version);
    return s;
  }
  Ring ring = base;
  ring.versions.push_back(*std::move(created));
  if (options_.shared_store) ring.record.generation += 2;  // the intent and the completion
  auto snapshot = std::make_shared<const Ring>(std::move(ring));
  Publish(snapshot);
  Log(LogLevel::kInfo, "version.imported",
      {{"ring", base.record.name},
       {"version", absl::StrCat(next)},
       {"kid", snapshot->versions.back().record.kid}});
  return ToProto(*snapshot);
}

absl::StatusOr<std::shared_ptr<const KeyService::Ring>> KeyService::FindRing(
    const std::string& name) const {
  if (absl::Status s = rotation::ValidateRingName(name); !s.ok()) return s;
  absl::ReaderMutexLock lock(&mu_);
  auto it = rings_.find(name);
  if (it == rings_.end()) {
    return absl::NotFoundError(absl::StrCat("ring '", name, "' not found"));
  }
  return it->second;
}

absl::StatusOr<const KeyService::Version*> KeyService::VersionOrActive(const Ring& ring,
                                                                       uint32_t version) const {
  if (version == 0) return ActiveVersion(ring);
  const Version* v = ring.Find(version);
  if (v == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("ring '", ring.record.name, "' has no version ", version));
  }
  return v;
}

absl::StatusOr<const KeyService::Version*> KeyService::ActiveVersion(const Ring& ring) const {
  if (ring.active < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("ring '", ring.record.name, "' has no active version"));
  }
  const Version& v = ring.versions[static_cast<size_t>(ring.active)];
  if (v.key == nullptr) {
    return absl::UnavailableError(absl::StrCat("the token object of ring '", ring.record.name,
                                               "' version ", v.record.version,
                                               " is missing from the token"));
  }
  return &v;
}

v1::KeyRing KeyService::ToProto(const Ring& ring) const {
  v1::KeyRing out;
  out.set_name(ring.record.name);
  out.set_purpose(ring.record.purpose == rotation::Purpose::kSign ? v1::SIGN : v1::DECRYPT);
  out.set_alg(ring.record.alg);
  out.set_rsa_bits(static_cast<uint32_t>(ring.record.rsa_bits));
  out.set_allow_non_fapi(ring.record.allow_non_fapi);
  out.set_create_time_ms(ring.record.create_time);
  *out.mutable_policy() = PolicyToProto(ring.record.policy);
  out.set_policy_explicit(ring.record.policy_explicit);
  if (ring.record.policy.rotation_period_ms > 0 && ring.active >= 0) {
    out.set_next_rotation_ms(ring.versions[static_cast<size_t>(ring.active)].record.activate_time +
                             ring.record.policy.rotation_period_ms);
  }
  out.set_curve(ring.record.curve);
  out.set_zip_max_bytes(static_cast<uint32_t>(ring.record.zip_max_bytes));
  if (ring.record.purpose == rotation::Purpose::kDecrypt) {
    out.set_decryption_mechanism(DecryptionMechanismDescription(ring.decryption, oaep_path_));
  }
  if (ring.active >= 0) {
    out.set_active_version(ring.versions[static_cast<size_t>(ring.active)].record.version);
  }
  for (const Version& v : ring.versions) {
    v1::KeyVersion* pv = out.add_versions();
    pv->set_version(v.record.version);
    pv->set_kid(v.record.kid);
    pv->set_state(ToProtoState(v.record.state));
    pv->set_create_time_ms(v.record.create_time);
    pv->set_activate_time_ms(v.record.activate_time);
    pv->set_publish_time_ms(v.record.publish_time);
    pv->set_retire_time_ms(v.record.retire_time);
    pv->set_destroy_after_ms(v.record.destroy_after);
    pv->set_destroy_time_ms(v.record.destroy_time);
    if (v.record.state == VersionState::kDisabled ||
        v.record.state == VersionState::kDestroyScheduled) {
      pv->set_previous_state(ToProtoState(v.record.previous_state));
    }
    pv->set_compromised(v.record.compromised);
    pv->set_token_object_label(v.record.object_label);
    pv->set_token_object_id(v.record.object_id);
    pv->set_public_jwk(v.record.public_jwk);
    pv->set_object_missing(v.object_missing);
    if (!v.record.certificate_chain.empty()) {
      DescribeCertificate(v.record.certificate_chain, ring.record.policy.prepublish_ms,
                          pv->mutable_certificate());
    }
  }
  out.set_require_certificate(ring.record.require_certificate);
  for (const std::string& m : token_support_.Missing(ring.record.alg))
    out.add_missing_mechanisms(m);
  return out;
}

absl::StatusOr<v1::KeyRing> KeyService::GetKeyRing(const std::string& name) const {
  auto ring = FindRing(name);
  if (!ring.ok()) return ring.status();
  return ToProto(**ring);
}

absl::StatusOr<v1::ListKeyRingsResponse> KeyService::ListKeyRings(const std::string& prefix) const {
  v1::ListKeyRingsResponse out;
  absl::ReaderMutexLock lock(&mu_);
  for (const auto& [name, ring] : rings_) {
    if (absl::StartsWith(name, prefix)) *out.add_rings() = ToProto(*ring);
  }
  for (const v1::OrphanedObject& o : orphans_) *out.add_orphaned_objects() = o;
  return out;
}

std::vector<std::string> KeyService::RingNames() const {
  std::vector<std::string> names;
  absl::ReaderMutexLock lock(&mu_);
  for (const auto& [name, ring] : rings_) names.push_back(name);
  return names;
}

absl::StatusOr<v1::SignJwsResponse> KeyService::SignJws(const v1::SignJwsRequest& request) const {
  if (absl::Status s = CheckMetadataFresh(); !s.ok()) return s;
  if (request.payload().size() > options_.max_payload_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("payload is ", request.payload().size(),
                                                   " bytes; the limit is ",
                                                   options_.max_payload_bytes));
  }
  auto ring = FindRing(request.ring());
  if (!ring.ok()) return ring.status();
  if ((*ring)->record.purpose != rotation::Purpose::kSign) {
    return absl::FailedPreconditionError(
        absl::StrCat("ring '", request.ring(), "' is a DECRYPT ring; it does not sign"));
  }
  auto version = ActiveVersion(**ring);
  if (!version.ok()) return version.status();

  jose::JwsHeaderParams params;
  params.alg = (*ring)->profile.alg;
  params.kid = (*version)->record.kid;
  params.typ = request.typ();
  params.cty = request.cty();
  if (request.embed_jwk()) {
    auto jwk = jose::ParseJson((*version)->record.public_jwk);
    if (!jwk.ok() || !jwk->is_object()) {
      return absl::DataLossError(
          absl::StrCat("stored public JWK of ring '", request.ring(), "' is invalid"));
    }
    params.jwk = *std::move(jwk);
  }
  if (!request.extra_header_json().empty()) {
    if (request.extra_header_json().size() > options_.max_extra_header_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("extra_header_json is larger than ",
                                                     options_.max_extra_header_bytes, " bytes"));
    }
    auto extra = jose::ParseJson(request.extra_header_json());
    if (!extra.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("extra_header_json: ", extra.status().message()));
    }
    if (!extra->is_object()) {
      return absl::InvalidArgumentError("extra_header_json must be a JSON object");
    }
    params.extra = *std::move(extra);
  }
  auto header = jose::BuildProtectedHeader(params);
  if (!header.ok()) return header.status();
  std::string signing_input = jose::JwsSigningInput(*header, request.payload());
  auto input = TokenSignInput((*ring)->profile, signing_input);
  if (!input.ok()) return input.status();
  auto signature = token_->Sign(*(*version)->key, (*ring)->profile.scheme, *input);
  if (!signature.ok()) return signature.status();
  (*version)->NoteSignature();

  v1::SignJwsResponse out;
  out.set_jws(jose::AssembleCompactJws(signing_input, *signature));
  out.set_kid((*version)->record.kid);
  out.set_version((*version)->record.version);
  out.set_alg(std::string(jose::JwsAlgName((*ring)->profile.alg)));
  return out;
}

absl::StatusOr<v1::SignResponse> KeyService::Sign(const v1::SignRequest& request) const {
  if (absl::Status s = CheckMetadataFresh(); !s.ok()) return s;
  auto ring = FindRing(request.ring());
  if (!ring.ok()) return ring.status();
  if ((*ring)->record.purpose != rotation::Purpose::kSign) {
    return absl::FailedPreconditionError(
        absl::StrCat("ring '", request.ring(), "' is a DECRYPT ring; it does not sign"));
  }
  auto version = ActiveVersion(**ring);
  if (!version.ok()) return version.status();
  if (request.version() != 0 && request.version() != (*version)->record.version) {
    return absl::FailedPreconditionError(
        absl::StrCat("version ", request.version(), " of ring '", request.ring(),
                     "' does not sign: only the ACTIVE version (", (*version)->record.version,
                     ") does; reload the key (and its certificate)"));
  }
  auto plan = PlanRawSign((*ring)->profile, request, options_.max_payload_bytes);
  if (!plan.ok()) return plan.status();
  auto signature = token_->Sign(*(*version)->key, plan->scheme, plan->token_input);
  if (!signature.ok()) return signature.status();
  (*version)->NoteSignature();
  if (plan->der) {
    signature = EcdsaJoseToDer(*signature);
    if (!signature.ok()) return signature.status();
  }
  v1::SignResponse out;
  out.set_signature(*signature);
  out.set_kid((*version)->record.kid);
  out.set_version((*version)->record.version);
  out.set_alg(std::string(jose::JwsAlgName((*ring)->profile.alg)));
  return out;
}

absl::StatusOr<v1::PublicKey> KeyService::GetPublicKey(
    const v1::GetPublicKeyRequest& request) const {
  auto ring = FindRing(request.ring());
  if (!ring.ok()) return ring.status();
  auto found = VersionOrActive(**ring, request.version());
  if (!found.ok()) return found.status();
  const Version* v = *found;
  const VersionState st = v->record.state;
  if (st != VersionState::kPending && st != VersionState::kActive && st != VersionState::kRetired) {
    return absl::FailedPreconditionError(absl::StrCat(
        "version ", request.version(), " of ring '", request.ring(), "' is ",
        rotation::VersionStateName(st), ": only PENDING, ACTIVE and RETIRED keys are published"));
  }
  v1::PublicKey out;
  out.set_ring(request.ring());
  out.set_version(v->record.version);
  out.set_kid(v->record.kid);
  out.set_alg((*ring)->record.alg);
  out.set_state(ToProtoState(v->record.state));
  out.set_public_jwk(v->record.public_jwk);
  out.set_purpose((*ring)->record.purpose == rotation::Purpose::kSign ? v1::SIGN : v1::DECRYPT);
  return out;
}

absl::StatusOr<v1::CertificateRequest> KeyService::CreateCertificateRequest(
    const v1::CreateCertificateRequestRequest& request) const {
  auto ring = FindRing(request.ring());
  if (!ring.ok()) return ring.status();
  if ((*ring)->record.purpose != rotation::Purpose::kSign) {
    return absl::FailedPreconditionError(absl::StrCat(
        "ring '", request.ring(), "' is a DECRYPT ring; certificates are for signing keys"));
  }
  auto found = VersionOrActive(**ring, request.version());
  if (!found.ok()) return found.status();
  const Version* v = *found;
  if (v->record.state != VersionState::kPending && v->record.state != VersionState::kActive) {
    return absl::FailedPreconditionError(
        absl::StrCat("version ", request.version(), " of ring '", request.ring(), "' is ",
                     rotation::VersionStateName(v->record.state),
                     ": certificate requests are made for PENDING or ACTIVE versions"));
  }
  if (v->key == nullptr) {
    return absl::UnavailableError(absl::StrCat("the token object of ring '", request.ring(),
                                               "' version ", v->record.version, " is missing"));
  }
  auto jwk = jose::ParseJson(v->record.public_jwk);
  if (!jwk.ok()) return absl::DataLossError("stored public JWK is invalid");
  auto pub = jose::PkeyFromPublicJwk(*jwk);
  if (!pub.ok()) return pub.status();
  const std::vector<std::string> sans(request.sans().begin(), request.sans().end());
  auto pem = BuildCertificateRequest(pub->get(), (*ring)->profile, request.subject(), sans,
                                     [&](const RawSignPlan& plan) {
                                       return token_->Sign(*v->key, plan.scheme, plan.token_input);
                                     });
  if (!pem.ok()) return pem.status();
  v1::CertificateRequest out;
  out.set_pem(*std::move(pem));
  out.set_version(v->record.version);
  out.set_kid(v->record.kid);
  return out;
}

absl::StatusOr<KeyService::Jwks> KeyService::GetJwks(const std::vector<std::string>& names) const {
  std::vector<std::shared_ptr<const Ring>> rings;
  Jwks out;
  {
    absl::ReaderMutexLock lock(&mu_);
    out.generation = jwks_generation_;
    if (names.empty()) {
      for (const auto& [name, ring] : rings_) rings.push_back(ring);
    }
  }
  for (const std::string& name : names) {
    auto ring = FindRing(name);
    if (!ring.ok()) return ring.status();
    rings.push_back(*std::move(ring));
  }
  int64_t min_prepublish = rotation::RotationPolicy{}.prepublish_ms;
  for (size_t i = 0; i < rings.size(); ++i) {
    if (i == 0 || rings[i]->record.policy.prepublish_ms < min_prepublish) {
      min_prepublish = rings[i]->record.policy.prepublish_ms;
    }
  }
  // A verifier honouring max-age has refreshed at least twice while a new key is pre-published.
  out.max_age_seconds = min_prepublish / 2 / 1000;

  const std::string cache_key = absl::StrJoin(names, "\n");
  {
    absl::MutexLock lock(&jwks_cache_mu_);
    if (jwks_cache_generation_ == out.generation) {
      auto it = jwks_cache_.find(cache_key);
      if (it != jwks_cache_.end()) {
        out.json = it->second.json;
        out.etag = it->second.etag;
        return out;
      }
    }
  }
  // Each stored public JWK is a serialized object of key members only (CompleteVersion): kid, use
  // and alg are spliced in before its closing brace rather than parsed and re-serialized.
  out.json = "{\"keys\":[";
  bool first = true;
  for (const auto& ring : rings) {
    const char* use = ring->record.purpose == rotation::Purpose::kSign ? "sig" : "enc";
    for (const Version* v : ring->Published()) {
      const std::string& jwk = v->record.public_jwk;
      if (jwk.size() < 2 || jwk.front() != '{' || jwk.back() != '}') {
        return absl::DataLossError(absl::StrCat("stored public JWK of ring '", ring->record.name,
                                                "' version ", v->record.version, " is invalid"));
      }
      if (!first) out.json += ',';
      first = false;
      out.json.append(jwk, 0, jwk.size() - 1);
      out.json += jwk.size() > 2 ? ",\"kid\":" : "\"kid\":";
      AppendJsonString(out.json, v->record.kid);
      absl::StrAppend(&out.json, ",\"use\":\"", use, "\",\"alg\":");
      AppendJsonString(out.json, ring->record.alg);
      if (!v->record.certificate_chain.empty()) {
        // Checked when it was set; a chain that no longer parses is left out, not fatal.
        auto chain = ParseCertificateChain(v->record.certificate_chain);
        if (chain.ok()) out.json += JwkCertificateMembers(*chain);
      }
      out.json += '}';
    }
  }
  out.json += "]}";
  const std::string digest = Sha256(out.json);
  if (digest.empty()) return absl::InternalError("SHA-256 failed");
  out.etag = jose::Base64UrlEncode(digest.substr(0, 16));
  {
    absl::MutexLock lock(&jwks_cache_mu_);
    if (jwks_cache_generation_ < out.generation) {
      jwks_cache_.clear();
      jwks_cache_generation_ = out.generation;
    }
    // Callers ask for a handful of ring sets; anything beyond that is served uncached.
    if (jwks_cache_generation_ == out.generation && jwks_cache_.size() < 256) {
      jwks_cache_[cache_key] = CachedJwks{out.json, out.etag};
    }
  }
  return out;
}

uint64_t KeyService::WaitForJwksChange(uint64_t generation, absl::Time deadline) const {
  absl::MutexLock lock(&mu_);
  while (jwks_generation_ == generation && !draining_) {
    if (jwks_changed_.WaitWithDeadline(&mu_, deadline)) break;
  }
  return jwks_generation_;
}

absl::StatusOr<v1::DecryptJweResponse> KeyService::DecryptJwe(
    const v1::DecryptJweRequest& request) const {
  if (absl::Status s = CheckMetadataFresh(); !s.ok()) return s;
  auto ring = FindRing(request.ring());
  if (!ring.ok()) return ring.status();
  const Ring& r = **ring;
  if (r.record.purpose != rotation::Purpose::kDecrypt) {
    return absl::FailedPreconditionError(
        absl::StrCat("ring '", request.ring(), "' is a SIGN ring; it does not decrypt"));
  }
  jose::JweLimits limits;
  limits.allow_zip = r.record.zip_max_bytes > 0;
  if (limits.allow_zip) limits.max_decompressed_bytes = static_cast<size_t>(r.record.zip_max_bytes);
  auto jwe = jose::ParseCompactJwe(request.jwe(), limits);
  if (!jwe.ok()) return jwe.status();
  if (jwe->alg != r.decryption.alg) {
    return absl::InvalidArgumentError(
        absl::StrCat("JWE alg '", std::string(jose::JweAlgName(jwe->alg)),
                     "' is not the alg of ring '", r.record.name, "' (", r.record.alg, ")"));
  }
  // Invalid-curve defence: the ephemeral key is checked before the token sees it.
  std::string epk_point;
  if (jose::IsEcdh(jwe->alg)) {
    auto epk = jose::ValidateEpk(*jwe->epk, r.decryption.curve);
    if (!epk.ok()) return epk.status();
    auto point = EncodedPoint(epk->get());
    if (!point.ok()) return point.status();
    epk_point = *std::move(point);
  }

  // The decrypting versions are exactly the published ones (PENDING, ACTIVE, RETIRED).
  for (const Version* v : r.Published()) {
    if (!jwe->kid.empty() && jwe->kid != v->record.kid) continue;
    auto cek = RecoverCek(*token_, *v->key, r.decryption, oaep_path_, *jwe, epk_point);
    if (!cek.ok()) {
      if (absl::IsInvalidArgument(cek.status())) continue;  // this key does not open it
      return cek.status();                                  // token trouble, no secret in it
    }
    auto plaintext = jose::DecryptContent(*jwe, *cek, limits);
    if (!plaintext.ok()) continue;
    v1::DecryptJweResponse out;
    out.set_plaintext(std::string(plaintext->view()));
    auto header = jose::Base64UrlDecode(jwe->protected_b64);
    if (header.ok()) out.set_protected_header(*std::move(header));
    out.set_kid(v->record.kid);
    out.set_version(v->record.version);
    return out;
  }
  return absl::InvalidArgumentError("decryption failed");
}

}  // namespace custody::server
