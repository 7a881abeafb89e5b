// KeyService, reading the published snapshots: ring and version lookups, the KeyRing views of
// GetKeyRing and ListKeyRings, and the JWKS, built from the snapshots of one key-set generation
// and cached per requested ring list until the generation moves (WaitForJwksChange).
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/log.h"
#include "common/sha256.h"
#include "jose/base64url.h"
#include "jose/json.h"
#include "server/keys/certificates.h"
#include "server/keys/key_service.h"

namespace custody::server {

using rotation::VersionRecord;
using rotation::VersionState;

v1::KeyVersionState KeyService::ToProtoState(VersionState s) {
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

namespace {

v1::RotationPolicy PolicyToProto(const rotation::RotationPolicy& p) {
  v1::RotationPolicy out;
  out.set_prepublish_ms(p.prepublish_ms);
  out.set_rotation_period_ms(p.rotation_period_ms);
  out.set_retain_ms(p.retain_ms);
  out.set_destroy_delay_ms(p.destroy_delay_ms);
  return out;
}

}  // namespace

absl::StatusOr<std::shared_ptr<const KeyService::Ring>> KeyService::FindRing(
    const std::string& name) const {
  if (absl::Status s = rotation::ValidateRingName(name); !s.ok()) return s;
  absl::ReaderMutexLock lock(&mu_);
  auto it = rings_.find(name);
  if (it == rings_.end()) {
    if (untrusted_rings_.count(name) > 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("ring '", name,
                       "' is not served: its metadata record's tag does not verify (the record "
                       "was changed outside custody; metadata.tag_mismatch in custodyd's log)"));
    }
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
    for (const Version& v : ring.versions) {
      if (v.tag_mismatch && v.record.state == VersionState::kActive) {
        return absl::FailedPreconditionError(absl::StrCat(
            "ring '", ring.record.name, "' has no active version custody can trust: version ",
            v.record.version,
            "'s metadata record's tag does not verify (the row was changed outside custody; "
            "metadata.tag_mismatch in custodyd's log)"));
      }
    }
    return absl::FailedPreconditionError(
        absl::StrCat("ring '", ring.record.name, "' has no active version"));
  }
  const Version& v = ring.versions[static_cast<size_t>(ring.active)];
  if (v.record.compromised) {  // never so by construction; a tampered store must not sign
    return absl::FailedPreconditionError(absl::StrCat("version ", v.record.version, " of ring '",
                                                      ring.record.name,
                                                      "' is compromised: it never signs"));
  }
  if (v.key_mismatch || v.tag_mismatch) {
    return absl::FailedPreconditionError(absl::StrCat(
        "ring '", ring.record.name, "' version ", v.record.version,
        " is out of service: its metadata does not match its token object (see the log's "
        "reconcile.public_key_mismatch); rotate the ring"));
  }
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
    const Version* pending = ring.NewestPending();
    out.set_rotation_waiting(RotationWaiting(ring.record, out.next_rotation_ms(),
                                             pending == nullptr ? nullptr : &pending->record,
                                             NowMs()));
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
    pv->set_public_key_mismatch(v.key_mismatch);
    pv->set_metadata_tag_mismatch(v.tag_mismatch);
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
  for (const std::string& name : untrusted_rings_) {
    if (absl::StartsWith(name, prefix)) out.add_untrusted_rings(name);
  }
  return out;
}

std::vector<std::string> KeyService::RingNames() const {
  std::vector<std::string> names;
  absl::ReaderMutexLock lock(&mu_);
  for (const auto& [name, ring] : rings_) names.push_back(name);
  return names;
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
  // Each stored public JWK is an object of key members only (CompleteVersion); kid, use, alg and
  // the certificate members follow them, in that order.
  jose::Json keys = jose::Json::MakeArray();
  for (const auto& ring : rings) {
    const char* use = ring->record.purpose == rotation::Purpose::kSign ? "sig" : "enc";
    for (const Version* v : ring->Published()) {
      absl::StatusOr<jose::Json> jwk = jose::ParseJson(v->record.public_jwk);
      if (!jwk.ok() || !jwk->is_object()) {
        return absl::DataLossError(absl::StrCat("stored public JWK of ring '", ring->record.name,
                                                "' version ", v->record.version, " is invalid"));
      }
      jwk->Set("kid", jose::Json::String(v->record.kid));
      jwk->Set("use", jose::Json::String(use));
      jwk->Set("alg", jose::Json::String(ring->record.alg));
      if (!v->record.certificate_chain.empty()) {
        // Checked when it was set; a chain that no longer parses is left out, not fatal.
        auto chain = ParseCertificateChain(v->record.certificate_chain);
        if (chain.ok()) SetJwkCertificateMembers(*chain, *jwk);
      }
      keys.Append(*std::move(jwk));
    }
  }
  std::string json = jose::Json::MakeObject({{"keys", std::move(keys)}}).Serialize();
  const std::string digest = Sha256(json);
  if (digest.empty()) return absl::InternalError("SHA-256 failed");
  out.etag = jose::Base64UrlEncode(digest.substr(0, 16));
  out.json = std::make_shared<const std::string>(std::move(json));
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

uint64_t KeyService::JwksGeneration() const {
  absl::ReaderMutexLock lock(&mu_);
  return jwks_generation_;
}

uint64_t KeyService::WaitForJwksChange(uint64_t generation, absl::Time deadline) const {
  absl::MutexLock lock(&mu_);
  while (jwks_generation_ == generation && !draining_) {
    if (jwks_changed_.WaitWithDeadline(&mu_, deadline)) break;
  }
  return jwks_generation_;
}
}  // namespace custody::server
