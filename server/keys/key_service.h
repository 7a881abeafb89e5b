// The operations custodyd offers, independent of gRPC: ring creation, import, inspection and
// lifecycle (rotation, disable/enable, scheduled destruction, compromise), JWS and raw signing,
// JWE decryption, JWKS publication and its change feed, startup reconciliation of metadata
// against the token, and the scheduler that carries out due transitions.
//
// Request path (SignJws): ring snapshot lookup under a reader lock (no I/O) → protected header
// → digest → token Sign on a pooled session with the cached handle → compact JWS. No
// C_FindObjects, no login and no database access on that path.
//
// Thread-safety: thread-safe. Ring state is held in immutable snapshots
// (std::shared_ptr<const Ring>) swapped under a mutex; no lock is held across a token call.
#ifndef CUSTODY_SERVER_KEYS_KEY_SERVICE_H_
#define CUSTODY_SERVER_KEYS_KEY_SERVICE_H_

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "common/log.h"
#include "custody/v1/custody.pb.h"
#include "pkcs11/key_operations.h"
#include "rotation/metadata_store.h"
#include "server/keys/decryption_profile.h"
#include "server/keys/lifecycle_scheduler.h"
#include "server/keys/replica_follower.h"
#include "server/keys/signing_profile.h"
#include "server/keys/token_support.h"

namespace custody::server {

class KeyService {
 public:
  struct Options {
    size_t max_payload_bytes = 256 * 1024;
    size_t max_extra_header_bytes = 4 * 1024;
    bool run_scheduler = true;  // the thread that performs due lifecycle transitions
    // The store is shared with other replicas (PostgreSQL): a follower thread re-reads it on
    // each change notification and at least every `refresh_interval`, and startup leaves
    // young CREATING versions (another replica's creation in flight) alone.
    bool shared_store = false;
    // Shared stores: the follower thread (unit tests call Refresh themselves instead).
    bool run_follower = true;
    absl::Duration refresh_interval = absl::Seconds(5);
    // Shared stores: past this long without a successful re-read of the store, signing and
    // decryption are refused UNAVAILABLE (this replica could have missed a compromise).
    absl::Duration max_staleness = absl::Seconds(30);
    // Signer.Sign pinned to the version ACTIVE before a rotation still signs this long after
    // it (TLS handshakes in flight; PinnedVersionMaySign).
    absl::Duration retired_sign_grace = absl::Seconds(30);
    // Every policy a ring gets (CreateKeyRing, UpdateRotationPolicy) must reach these floors
    // (INVALID_ARGUMENT naming the field and the bound); a stored ring below them (from before
    // the floors, or from a replica with lower ones) is run with its policy raised to them.
    rotation::PolicyFloors floors;
    // Records without a tag (written before tags: the first start with a new tag key, or
    // --adopt_untagged_metadata) are tagged once at startup (metadata.tags_adopted) instead of
    // refused. Records whose tag does not verify are refused either way.
    bool adopt_untagged_metadata = false;
    // Every time the service reads (create, activate and retire times, due transitions,
    // staleness, rotation eligibility) comes from this clock; the scheduler and follower threads
    // still wait in real time. Must outlive the service. Tests move a FakeClock
    // (common/testing/fake_clock.h) and call RunDueTransitions themselves.
    const Clock* clock = &Clock::System();
  };

  // Loads rings from `store`, resolves every version's token object once, and reconciles:
  // CREATING versions are completed (object present) or rolled back (object absent); versions
  // whose object is missing are flagged and logged; custody-labelled objects with no metadata
  // are reported as orphans. Both pointers must outlive the service.
  // `token` is a pkcs11::Token in custodyd, a software implementation in unit tests
  // (server/keys/testing/software_key_operations.h).
  static absl::StatusOr<std::unique_ptr<KeyService>> Create(pkcs11::KeyOperations* token,
                                                            rotation::MetadataStore* store,
                                                            Options options);
  ~KeyService();  // stops the scheduler
  // Stops the scheduler (waiting for a transition in progress); no transition starts after.
  // custodyd calls it first on SIGTERM, so that a draining server changes no key.
  void StopScheduler();
  // True once StopScheduler ran: long-lived calls (WatchJwks) end so the server drains quickly.
  bool draining() const;
  KeyService(const KeyService&) = delete;
  KeyService& operator=(const KeyService&) = delete;

  // ALREADY_EXISTS for an existing name (nothing changes); INVALID_ARGUMENT for bad names or
  // algorithms; the version's key is generated in the token.
  absl::StatusOr<v1::KeyRing> CreateKeyRing(const v1::CreateKeyRingRequest& request);
  absl::StatusOr<v1::KeyRing> GetKeyRing(const std::string& name) const;
  absl::StatusOr<v1::ListKeyRingsResponse> ListKeyRings(const std::string& prefix) const;
  std::vector<std::string> RingNames() const;
  // Imports a private key as a new PENDING version of an existing ring. The key must fit the
  // ring's alg (curve, key type, RSA size); INVALID_ARGUMENT otherwise.
  absl::StatusOr<v1::KeyRing> ImportKeyVersion(const v1::ImportKeyVersionRequest& request);

  // Lifecycle operations; semantics in proto/custody/v1/custody.proto (KeyAdmin). Each state
  // change is one durable metadata commit before it is acknowledged or acted on.
  absl::StatusOr<v1::KeyRing> UpdateRotationPolicy(const v1::UpdateRotationPolicyRequest& request);
  absl::StatusOr<v1::RotateKeyRingResponse> RotateKeyRing(const v1::RotateKeyRingRequest& request);
  absl::StatusOr<v1::KeyRing> DisableKeyVersion(const v1::KeyVersionRequest& request);
  absl::StatusOr<v1::KeyRing> EnableKeyVersion(const v1::KeyVersionRequest& request);
  absl::StatusOr<v1::KeyRing> ScheduleKeyVersionDestruction(const v1::KeyVersionRequest& request);
  absl::StatusOr<v1::KeyRing> CancelKeyVersionDestruction(const v1::KeyVersionRequest& request);
  absl::StatusOr<v1::KeyRing> CompromiseKeyVersion(const v1::CompromiseKeyVersionRequest& request);

  absl::StatusOr<v1::SignJwsResponse> SignJws(const v1::SignJwsRequest& request) const;
  absl::StatusOr<v1::SignResponse> Sign(const v1::SignRequest& request) const;
  // A published version (version 0: the ACTIVE one); FAILED_PRECONDITION naming its state
  // otherwise, NOT_FOUND for an unknown ring or version.
  absl::StatusOr<v1::PublicKey> GetPublicKey(const v1::GetPublicKeyRequest& request) const;
  // A PKCS#10 CSR built here and signed by a PENDING or ACTIVE version's key in the token
  // (server/keys/certificates.h); FAILED_PRECONDITION for other states and DECRYPT rings.
  absl::StatusOr<v1::CertificateRequest> CreateCertificateRequest(
      const v1::CreateCertificateRequestRequest& request) const;
  // Attaches a checked X.509 chain to a PENDING, ACTIVE or RETIRED version (durable first).
  absl::StatusOr<v1::KeyRing> SetCertificate(const v1::SetCertificateRequest& request);
  struct Jwks {
    // Immutable and shared: every caller and watcher of one ring set in one generation holds the
    // same string, built once.
    std::shared_ptr<const std::string> json;
    std::string etag;             // base64url of the first 16 bytes of SHA-256(json)
    int64_t max_age_seconds = 0;  // half the smallest prepublish of the rings
    uint64_t generation = 0;      // of the published key set, for WaitForJwksChange
  };
  // The JWKS of `rings` (every ring when empty). NOT_FOUND names the first unknown ring.
  absl::StatusOr<Jwks> GetJwks(const std::vector<std::string>& rings) const;
  // Blocks until the published key set of any ring changes after `generation`, or `deadline`.
  // Returns the current generation.
  uint64_t WaitForJwksChange(uint64_t generation, absl::Time deadline) const;
  // The current generation of the published key set.
  uint64_t JwksGeneration() const;
  // Decrypts a compact JWE with a decrypting version of the ring (by kid, else each in turn,
  // ACTIVE first). Parse errors name the part; every later failure is INVALID_ARGUMENT
  // "decryption failed".
  absl::StatusOr<v1::DecryptJweResponse> DecryptJwe(const v1::DecryptJweRequest& request) const;

  // Replicas (server/keys/replica_sync.cc): re-reads the store and publishes every ring whose
  // generation moved: new snapshots (JWKS generation, WatchJwks streams), versions another
  // replica created resolved in the token by CKA_ID, rings another replica removed dropped.
  // CREATING versions are not shown until they complete. Serialized with admin operations.
  absl::Status Refresh();
  // OK while the snapshots are fresh enough to use (always with the embedded store); else
  // UNAVAILABLE "metadata unreachable for N s".
  absl::Status CheckMetadataFresh() const;

  // Replica state for /metrics (server/daemon/replica_metrics.h).
  struct ReplicaStatus {
    bool shared_store = false;
    int64_t last_good_read_ms = 0;  // Unix ms: start of the last successful read of the store
    absl::Duration max_staleness;
    bool scheduler_leader = false;  // this process runs the scheduler now
    uint64_t refreshes = 0;         // successful re-reads of a shared store
    uint64_t refresh_failures = 0;  // failed ones (store unreachable)
    uint64_t rings_refreshed = 0;   // ring snapshots replaced by a re-read (others' changes)
    uint64_t jwks_generation = 0;   // of the published key set
  };
  ReplicaStatus GetReplicaStatus() const;

  // The scheduler's step: carries out every transition due at the clock's time (rotation,
  // retention expiry, destruction, a missing PENDING version), once; returns the next due time
  // (Unix ms, 0 = none). The scheduler thread calls it (on a shared store only while it holds
  // the leadership); unit tests call it with run_scheduler = false and a FakeClock.
  int64_t RunDueTransitions();

 private:
  int64_t NowMs() const { return options_.clock->NowMs(); }
  struct Version {
    rotation::VersionRecord record;
    std::shared_ptr<pkcs11::KeyPair> key;  // null when the object is missing or untrusted
    bool object_missing = false;
    // The metadata's public key is not the token object's: out of service (key null).
    bool key_mismatch = false;
    // The record's tag does not verify (rotation/record_tag.h): out of service (key null), and
    // never changed by custody (not planned, not destroyed) until the row is restored.
    bool tag_mismatch = false;
    // This process's latest signature with the version, shared by every snapshot's copy. A
    // call that took the ACTIVE version before a rotation was published signs after the
    // recorded retire_time (by the commit's fsync and the call's own time); retention runs from
    // whichever is later (PlanningRecords). The monotonic time keeps that interval whole when
    // the wall clock is stepped forward meanwhile. In memory only: after a restart no such call
    // exists.
    struct LastSignature {
      std::atomic<int64_t> wall_ms{0};
      std::atomic<int64_t> monotonic_ms{0};
    };
    std::shared_ptr<LastSignature> last_signed = std::make_shared<LastSignature>();
    // When this process first saw the version RETIRED with its current retire_time, by the wall
    // clock and the monotonic one (PlanningRecords stamps it). Retention counts real time from
    // then on, so a wall clock stepped forward after a rotation does not shorten it, on DECRYPT
    // rings too, where no signature anchors it. Shared by every snapshot's copy; in memory only.
    struct RetiredSeen {
      absl::Mutex mu;
      int64_t retire_time ABSL_GUARDED_BY(mu) = 0;
      int64_t wall_ms ABSL_GUARDED_BY(mu) = 0;
      int64_t monotonic_ms ABSL_GUARDED_BY(mu) = 0;
    };
    std::shared_ptr<RetiredSeen> retired_seen = std::make_shared<RetiredSeen>();

    void NoteSignature(const Clock& clock) const;
  };
  struct Ring {
    rotation::RingRecord record;
    SigningProfile profile;        // SIGN rings
    DecryptionProfile decryption;  // DECRYPT rings
    std::vector<Version> versions;
    int active = -1;  // index into versions, -1 when none

    Version* Find(uint32_t version);
    const Version* Find(uint32_t version) const;
    const Version* NewestPending() const;
    void Reindex();  // recomputes `active`
    // The versions in JWKS, ACTIVE first (senders pick the first "enc" key): PENDING, ACTIVE and
    // RETIRED ones whose token object exists.
    std::vector<const Version*> Published() const;
  };
  // How a version added by AddVersion enters the ring.
  enum class Activation {
    kPending,             // published, not signing
    kReplaceActive,       // becomes ACTIVE at once; the ACTIVE one is RETIRED
    kReplaceCompromised,  // becomes ACTIVE at once; the ACTIVE one is compromised
  };

  KeyService(pkcs11::KeyOperations* token, rotation::MetadataStore* store, Options options);
  absl::Status Load();
  // Fills the ring's profile from its record (alg, rsa_bits, curve). INVALID_ARGUMENT with the
  // reason when they do not form a supported combination.
  static absl::Status ResolveProfile(Ring& ring);
  // Raises a stored ring's policy to options_.floors (see Options::floors); logs it when `log`.
  void ApplyFloors(Ring& ring, bool log) const;
  // Puts the key of `record` (CREATING, durable already) into the token: generated, or imported
  // from `import` when not null. Reads the public key back and fills kid and public_jwk.
  absl::StatusOr<Version> MaterializeVersion(const Ring& ring, rotation::VersionRecord record,
                                             const EVP_PKEY* import);
  // Destroys the token object of a version whose creation failed and deletes its intent; when
  // that fails too, the CREATING row stays for the next start to reconcile.
  void RollBackVersion(const rotation::VersionRecord& record);
  // OK when `record`'s public_jwk is exactly the public key of `key` as the token holds it (what
  // the JWKS would publish); FAILED_PRECONDITION otherwise; UNAVAILABLE for token trouble.
  absl::Status VerifyAgainstToken(const rotation::VersionRecord& record,
                                  const pkcs11::KeyPair& key) const;
  // Takes `version` out of service when the token does not vouch for its public key (logged as
  // `event`); token trouble is returned.
  absl::Status VouchForVersion(Version& version, const char* event) const;
  absl::StatusOr<rotation::VersionRecord> CompleteVersion(rotation::VersionRecord record,
                                                          const pkcs11::KeyPair& key) const;
  absl::StatusOr<std::shared_ptr<const Ring>> FindRing(const std::string& name) const;
  absl::StatusOr<const Version*> ActiveVersion(const Ring& ring) const;
  // The ACTIVE version of SIGN ring `name`, with the snapshot that keeps it alive: what every
  // signing call checks first (NOT_FOUND, FAILED_PRECONDITION for a DECRYPT ring or no ACTIVE
  // version, UNAVAILABLE when its token object is missing).
  struct Signer {
    std::shared_ptr<const Ring> ring;
    const Version* version = nullptr;
  };
  absl::StatusOr<Signer> ActiveSigner(const std::string& name) const;
  // Version `version` of `ring`, its ACTIVE version when 0; NOT_FOUND names a missing one.
  absl::StatusOr<const Version*> VersionOrActive(const Ring& ring, uint32_t version) const;
  v1::KeyRing ToProto(const Ring& ring) const;
  static v1::KeyVersionState ToProtoState(rotation::VersionState state);

  // A lifecycle change of one version (disable, enable, scheduling or cancelling destruction):
  // under admin_mu_ and synced with the shared store, `change` is applied to the version
  // (NOT_FOUND names a missing one) and its row committed; then `event` is logged with the ring,
  // the version and the fields `change` added. The ring as committed.
  absl::StatusOr<v1::KeyRing> ChangeVersion(
      const v1::KeyVersionRequest& request, LogLevel level, absl::string_view event,
      const std::function<absl::Status(Ring&, Version&, std::vector<LogField>&)>& change)
      ABSL_LOCKS_EXCLUDED(admin_mu_);
  // Applies `change` to a copy of the ring's latest snapshot; `change` records in `mutation` the
  // rows it changed. Commits the mutation durably, then publishes the new snapshot and wakes
  // JWKS watchers when the published key set changed. Requires admin_mu_.
  absl::StatusOr<std::shared_ptr<const Ring>> MutateRing(
      const std::string& name,
      const std::function<absl::Status(Ring&, rotation::Mutation&)>& change)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(admin_mu_);
  void Publish(std::shared_ptr<const Ring> ring);
  // Generates a new version's key in the token (durable CREATING intent first) and adds it as
  // `activation` says. Requires admin_mu_.
  absl::StatusOr<uint32_t> AddVersion(const std::string& name, Activation activation)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(admin_mu_);
  // Promotes PENDING `version`; the ACTIVE one becomes RETIRED (or compromised). Then adds the
  // next PENDING version: its failure leaves the promotion committed, OK is returned and the
  // reason is put in *pending_error (when not null). Requires admin_mu_.
  absl::Status Promote(const std::string& name, uint32_t version, bool compromise_active,
                       std::string* pending_error) ABSL_EXCLUSIVE_LOCKS_REQUIRED(admin_mu_);
  // Adds the ring's next PENDING version after a committed change; a failure is logged
  // (ring.pending_failed; the scheduler retries) and described in *pending_error when not null.
  void AddPendingAfter(const std::string& name, std::string* pending_error)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(admin_mu_);
  // DESTROY_SCHEDULED/DESTROYING → DESTROYING (durable) → token objects deleted → DESTROYED.
  absl::Status DestroyVersion(const std::string& name, uint32_t version)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(admin_mu_);
  absl::StatusOr<v1::RotateKeyRingResponse> RotateLocked(const std::string& name, bool force)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(admin_mu_);
  // The ring's records as the planner must see them: a RETIRED version's retire_time moved up by
  // any forward step of the wall clock since this process first saw it retired
  // (Version::retired_seen), up to its last signature in this process when that came later
  // (Version::last_signed), and, with
  // a shared store, to at least retire_time + max_staleness: another replica that has not yet
  // learned of the retirement may sign with the version until then (server/keys/replica_sync.cc).
  std::vector<rotation::VersionRecord> PlanningRecords(const Ring& ring) const;
  // Refresh's work; the status of reading the store (token trouble with one version is logged
  // and retried at the next refresh). Pokes the scheduler when a ring changed.
  absl::Status RefreshLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(admin_mu_);
  // With a shared store, every admin operation starts from the store's latest state (another
  // replica may have changed the ring): RefreshLocked. OK at once with the embedded store.
  absl::Status SyncShared() ABSL_EXCLUSIVE_LOCKS_REQUIRED(admin_mu_);
  // Records in the ring's snapshot that `commits` more commits moved its generation (shared
  // stores), so that the next conditional commit of this operation expects the right one.
  void BumpGeneration(const std::string& name, uint64_t commits)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(admin_mu_);
  // Drops a ring another replica removed from the in-memory map.
  void Unpublish(const std::string& name);
  // Tags the records that carry none (Options::adopt_untagged_metadata), in one commit.
  absl::Status AdoptUntagged(std::vector<rotation::RingRecord>& rings,
                             std::vector<rotation::VersionRecord>& versions);
  // Whether the store vouches for the record (tag valid, or no tagger); else logs
  // metadata.tag_mismatch naming it (never its contents) when `log`.
  static bool TagTrusted(const rotation::RingRecord& ring, bool log);
  static bool TagTrusted(const rotation::VersionRecord& version, bool log);
  // Two ACTIVE versions in one ring never come from custody's own commits (a rotation swaps them
  // in one transaction): every ACTIVE version but the newest is an earlier row put back (its tag
  // still verifies). Those are taken out of service like a tag mismatch; logged when `log`.
  static void RefuseReplayedActive(Ring& ring, bool log);
  // FAILED_PRECONDITION when `mutation` would change a version whose tag does not verify.
  static absl::Status RefuseUntrustedChange(const Ring& ring, const rotation::Mutation& mutation);

  pkcs11::KeyOperations* const token_;
  rotation::MetadataStore* const store_;
  const Options options_;

  RsaOaepPath oaep_path_;       // probed once at startup
  TokenSupport token_support_;  // the algorithms the token lacks mechanisms for, at startup

  // Serializes ring mutations (create, import) so that version numbers are assigned once. Held
  // across token calls on purpose: admin operations are rare and must not interleave; the
  // request path never takes it.
  absl::Mutex admin_mu_;
  // "ring#version" of due rotations already logged as waiting for a certificate.
  std::set<std::string> awaiting_certificate_logged_ ABSL_GUARDED_BY(admin_mu_);
  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<const Ring>> rings_ ABSL_GUARDED_BY(mu_);
  std::vector<v1::OrphanedObject> orphans_ ABSL_GUARDED_BY(mu_);
  // Rings whose record's tag does not verify: not served (FindRing says why).
  std::set<std::string> untrusted_rings_ ABSL_GUARDED_BY(mu_);
  uint64_t jwks_generation_ ABSL_GUARDED_BY(mu_) = 1;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  mutable absl::CondVar jwks_changed_;
  // Serialized JWKS (json, etag) by requested ring list, for one generation of the published key
  // set: the JSON is a function of the generation and the names, so repeated GetJwks calls (every
  // verifier's refresh, every watcher's wake-up) are served without rebuilding it. Bounded;
  // emptied when the generation moves on.
  struct CachedJwks {
    std::shared_ptr<const std::string> json;
    std::string etag;
  };
  mutable absl::Mutex jwks_cache_mu_;
  mutable uint64_t jwks_cache_generation_ ABSL_GUARDED_BY(jwks_cache_mu_) = 0;
  mutable std::map<std::string, CachedJwks> jwks_cache_ ABSL_GUARDED_BY(jwks_cache_mu_);

  // The start of the last successful re-read of a shared store (or of the startup load): Unix ms
  // for the status, monotonic ms for the staleness bound (CheckMetadataFresh).
  std::atomic<int64_t> last_synced_ms_{0};
  std::atomic<int64_t> last_synced_monotonic_ms_{0};
  std::atomic<uint64_t> rings_refreshed_{0};

  // The two threads (started by Create as the options say), last: they call into the members
  // above, and StopScheduler ends them before anything else goes.
  LifecycleScheduler scheduler_;  // runs RunDueTransitions
  ReplicaFollower follower_;      // runs Refresh (shared stores)
};

}  // namespace custody::server

#endif  // CUSTODY_SERVER_KEYS_KEY_SERVICE_H_
