#include "server/key_service.h"

#include <set>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "jose/json.h"
#include "jose/jwk.h"
#include "openssl/rand.h"

namespace custody::server {
namespace {

using rotation::VersionRecord;
using rotation::VersionState;

int64_t NowSeconds() { return absl::ToUnixSeconds(absl::Now()); }

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
  }
  return v1::KEY_VERSION_STATE_UNSPECIFIED;
}

bool IsPublished(VersionState s) {
  return s == VersionState::kPending || s == VersionState::kActive || s == VersionState::kRetired;
}

}  // namespace

absl::StatusOr<std::unique_ptr<KeyService>> KeyService::Create(pkcs11::Token* token,
                                                               rotation::MetadataStore* store,
                                                               Options options) {
  auto service = std::unique_ptr<KeyService>(new KeyService(token, store, options));
  if (absl::Status s = service->Load(); !s.ok()) return s;
  return service;
}

absl::StatusOr<VersionRecord> KeyService::CompleteVersion(VersionRecord record,
                                                          const pkcs11::KeyPair& key) const {
  auto pkey = token_->PublicKey(key);
  if (!pkey.ok()) return pkey.status();
  auto jwk = jose::PublicJwkFromPkey(pkey->get());
  if (!jwk.ok()) return jwk.status();
  auto kid = jose::Rfc7638Thumbprint(*jwk);
  if (!kid.ok()) return kid.status();
  record.kid = *kid;
  record.public_jwk = jwk->Serialize();
  return record;
}

absl::Status KeyService::Load() {
  auto ring_records = store_->LoadRings();
  if (!ring_records.ok()) return ring_records.status();
  auto version_records = store_->LoadVersions();
  if (!version_records.ok()) return version_records.status();
  auto objects = token_->ListKeyObjects();
  if (!objects.ok()) return objects.status();

  std::set<std::string> private_ids;  // hex CKA_IDs of private keys present in the token
  for (const pkcs11::ObjectInfo& o : *objects) {
    if (o.is_private_key) private_ids.insert(absl::BytesToHexString(o.id));
  }

  std::map<std::string, Ring> rings;
  for (rotation::RingRecord& r : *ring_records) {
    auto profile = ResolveSigningProfile(r.alg, r.rsa_bits, r.allow_non_fapi);
    if (!profile.ok()) {
      return absl::DataLossError(absl::StrCat("metadata for ring '", r.name,
                                              "' is invalid: ", profile.status().message()));
    }
    Ring ring;
    ring.profile = *profile;
    ring.record = std::move(r);
    rings.emplace(ring.record.name, std::move(ring));
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

    if (v.state == VersionState::kCreating) {
      // Crash between the metadata intent and the end of key generation.
      if (!present) {
        if (absl::Status s = store_->DeleteVersion(v.ring, v.version); !s.ok()) return s;
        Log(LogLevel::kWarning, "reconcile.rolled_back_creation",
            {{"ring", v.ring},
             {"version", absl::StrCat(v.version)},
             {"reason", "no token object: key generation never completed"}});
        continue;
      }
      auto key = token_->FindKeyPair(raw_id);
      if (!key.ok()) return key.status();
      auto completed = CompleteVersion(v, **key);
      if (!completed.ok()) return completed.status();
      completed->state = VersionState::kActive;
      completed->activate_time = NowSeconds();
      if (absl::Status s = store_->UpdateVersion(*completed); !s.ok()) return s;
      Log(LogLevel::kWarning, "reconcile.completed_creation",
          {{"ring", v.ring}, {"version", absl::StrCat(v.version)}, {"kid", completed->kid}});
      ring.versions.push_back(Version{std::move(*completed), *std::move(key), false});
      continue;
    }
    Version version{std::move(v), nullptr, false};
    if (version.record.state != VersionState::kDestroyed) {
      auto key =
          present ? token_->FindKeyPair(raw_id)
                  : absl::StatusOr<std::shared_ptr<pkcs11::KeyPair>>(absl::NotFoundError("absent"));
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
  for (const pkcs11::ObjectInfo& o : *objects) {
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

  absl::MutexLock lock(&mu_);
  for (auto& [name, ring] : rings) {
    if (ring.versions.empty()) continue;  // rolled back entirely
    for (size_t i = 0; i < ring.versions.size(); ++i) {
      if (ring.versions[i].record.state == VersionState::kActive) ring.active = static_cast<int>(i);
    }
    rings_[name] = std::make_shared<const Ring>(std::move(ring));
  }
  orphans_ = std::move(orphans);
  Log(LogLevel::kInfo, "reconcile.done",
      {{"rings", absl::StrCat(rings_.size())},
       {"versions", absl::StrCat(version_records->size())},
       {"orphaned_objects", absl::StrCat(orphans_.size())}});
  return absl::OkStatus();
}

absl::StatusOr<v1::KeyRing> KeyService::CreateKeyRing(const v1::CreateKeyRingRequest& request) {
  if (absl::Status s = rotation::ValidateRingName(request.name()); !s.ok()) return s;
  if (request.purpose() == v1::DECRYPT) {
    return absl::UnimplementedError(
        "purpose DECRYPT is not available yet: decryption rings arrive with JWE support");
  }
  if (request.purpose() != v1::SIGN) {
    return absl::InvalidArgumentError("purpose is required: SIGN");
  }
  auto profile = ResolveSigningProfile(request.alg(), static_cast<int>(request.rsa_bits()),
                                       request.allow_non_fapi());
  if (!profile.ok()) return profile.status();
  {
    absl::MutexLock lock(&mu_);
    if (rings_.count(request.name()) > 0) {
      return absl::AlreadyExistsError(absl::StrCat("ring '", request.name(), "' already exists"));
    }
  }

  Ring ring;
  ring.profile = *profile;
  ring.record.name = request.name();
  ring.record.purpose = rotation::Purpose::kSign;
  ring.record.alg = request.alg();
  ring.record.rsa_bits = profile->key.type == pkcs11::KeyType::kRsa ? profile->key.rsa_bits : 0;
  ring.record.allow_non_fapi = request.allow_non_fapi();
  ring.record.create_time = NowSeconds();

  auto object_id = NewObjectId();
  if (!object_id.ok()) return object_id.status();
  VersionRecord version;
  version.ring = request.name();
  version.version = 1;
  version.object_id = *object_id;
  version.object_label = ObjectLabel(request.name(), 1);
  version.state = VersionState::kCreating;
  version.create_time = ring.record.create_time;

  // 1. Durable intent: the ring and a CREATING version. A crash after this point is completed
  //    or rolled back at the next start; the store's primary key settles concurrent creates.
  if (absl::Status s = store_->InsertRingWithVersion(ring.record, version); !s.ok()) return s;

  auto rollback = [&](absl::Status cause) {
    absl::Status destroyed = token_->DestroyKeyPair(absl::HexStringToBytes(version.object_id));
    absl::Status deleted =
        destroyed.ok() ? store_->DeleteVersion(version.ring, version.version) : destroyed;
    if (!deleted.ok()) {
      // Left CREATING on purpose: the next start reconciles it.
      Log(LogLevel::kError, "create_ring.rollback_failed",
          {{"ring", version.ring}, {"error", std::string(deleted.message())}});
    }
    return cause;
  };

  // 2. The key, generated in the token, sensitive and non-extractable.
  auto key = token_->GenerateKeyPair(profile->key, absl::HexStringToBytes(version.object_id),
                                     version.object_label);
  if (!key.ok()) return rollback(key.status());
  auto completed = CompleteVersion(version, **key);
  if (!completed.ok()) return rollback(completed.status());

  // 3. Durable activation, then publication in memory.
  completed->state = VersionState::kActive;
  completed->activate_time = NowSeconds();
  if (absl::Status s = store_->UpdateVersion(*completed); !s.ok()) return rollback(s);

  ring.versions.push_back(Version{*std::move(completed), *std::move(key), false});
  ring.active = 0;
  auto snapshot = std::make_shared<const Ring>(std::move(ring));
  {
    absl::MutexLock lock(&mu_);
    rings_[request.name()] = snapshot;
  }
  Log(LogLevel::kInfo, "ring.created",
      {{"ring", request.name()},
       {"alg", request.alg()},
       {"kid", snapshot->versions[0].record.kid}});
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

v1::KeyRing KeyService::ToProto(const Ring& ring) {
  v1::KeyRing out;
  out.set_name(ring.record.name);
  out.set_purpose(ring.record.purpose == rotation::Purpose::kSign ? v1::SIGN : v1::DECRYPT);
  out.set_alg(ring.record.alg);
  out.set_rsa_bits(static_cast<uint32_t>(ring.record.rsa_bits));
  out.set_allow_non_fapi(ring.record.allow_non_fapi);
  out.set_create_time(ring.record.create_time);
  if (ring.active >= 0) {
    out.set_active_version(ring.versions[static_cast<size_t>(ring.active)].record.version);
  }
  for (const Version& v : ring.versions) {
    v1::KeyVersion* pv = out.add_versions();
    pv->set_version(v.record.version);
    pv->set_kid(v.record.kid);
    pv->set_state(ToProtoState(v.record.state));
    pv->set_create_time(v.record.create_time);
    pv->set_activate_time(v.record.activate_time);
    pv->set_token_object_label(v.record.object_label);
    pv->set_token_object_id(v.record.object_id);
    pv->set_public_jwk(v.record.public_jwk);
    pv->set_object_missing(v.object_missing);
  }
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

absl::StatusOr<v1::SignJwsResponse> KeyService::SignJws(const v1::SignJwsRequest& request) const {
  if (request.payload().size() > options_.max_payload_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("payload is ", request.payload().size(),
                                                   " bytes; the limit is ",
                                                   options_.max_payload_bytes));
  }
  auto ring = FindRing(request.ring());
  if (!ring.ok()) return ring.status();
  auto version = ActiveVersion(**ring);
  if (!version.ok()) return version.status();

  jose::JwsHeaderParams params;
  params.alg = (*ring)->profile.alg;
  params.kid = (*version)->record.kid;
  params.typ = request.typ();
  params.cty = request.cty();
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

  v1::SignJwsResponse out;
  out.set_jws(jose::AssembleCompactJws(signing_input, *signature));
  out.set_kid((*version)->record.kid);
  out.set_version((*version)->record.version);
  out.set_alg(std::string(jose::JwsAlgName((*ring)->profile.alg)));
  return out;
}

absl::StatusOr<v1::SignResponse> KeyService::Sign(const v1::SignRequest& request) const {
  auto ring = FindRing(request.ring());
  if (!ring.ok()) return ring.status();
  auto version = ActiveVersion(**ring);
  if (!version.ok()) return version.status();
  absl::StatusOr<std::string> input;
  switch (request.input_case()) {
    case v1::SignRequest::kDigest:
      input = TokenSignInputFromDigest((*ring)->profile, request.digest());
      break;
    case v1::SignRequest::kData:
      if (request.data().size() > options_.max_payload_bytes) {
        return absl::InvalidArgumentError(absl::StrCat("data is ", request.data().size(),
                                                       " bytes; the limit is ",
                                                       options_.max_payload_bytes));
      }
      input = TokenSignInput((*ring)->profile, request.data());
      break;
    default:
      return absl::InvalidArgumentError("one of 'digest' or 'data' is required");
  }
  if (!input.ok()) return input.status();
  auto signature = token_->Sign(*(*version)->key, (*ring)->profile.scheme, *input);
  if (!signature.ok()) return signature.status();
  v1::SignResponse out;
  out.set_signature(*signature);
  out.set_kid((*version)->record.kid);
  out.set_version((*version)->record.version);
  out.set_alg(std::string(jose::JwsAlgName((*ring)->profile.alg)));
  return out;
}

absl::StatusOr<std::string> KeyService::GetJwks(const std::vector<std::string>& names) const {
  std::vector<std::shared_ptr<const Ring>> rings;
  if (names.empty()) {
    absl::ReaderMutexLock lock(&mu_);
    for (const auto& [name, ring] : rings_) rings.push_back(ring);
  } else {
    for (const std::string& name : names) {
      auto ring = FindRing(name);
      if (!ring.ok()) return ring.status();
      rings.push_back(*std::move(ring));
    }
  }
  jose::Json keys = jose::Json::MakeArray();
  for (const auto& ring : rings) {
    for (const Version& v : ring->versions) {
      if (!IsPublished(v.record.state)) continue;
      auto jwk = jose::ParseJson(v.record.public_jwk);
      if (!jwk.ok() || !jwk->is_object()) {
        return absl::DataLossError(absl::StrCat("stored public JWK of ring '", ring->record.name,
                                                "' version ", v.record.version, " is invalid"));
      }
      jwk->Set("kid", jose::Json::String(v.record.kid));
      jwk->Set("use", jose::Json::String(ring->record.purpose == rotation::Purpose::kSign ? "sig"
                                                                                          : "enc"));
      jwk->Set("alg", jose::Json::String(ring->record.alg));
      keys.Append(*std::move(jwk));
    }
  }
  jose::Json jwks = jose::Json::MakeObject();
  jwks.Set("keys", std::move(keys));
  return jwks.Serialize();
}

}  // namespace custody::server
