// Token, the facade (pkcs11/token.h): its lifetime, health and metrics, and one forwarding line
// per operation to the file of its concern (selection, objects, public keys, generation,
// operations), each running through the recovery state machine of token_recovery.cc. The file
// map is in docs/design.md.
#include "pkcs11/token.h"

#include <memory>
#include <utility>

#include "pkcs11/token_internal.h"

namespace custody::pkcs11 {

absl::StatusOr<std::unique_ptr<Token>> Token::Open(Options options) {
  CUSTODY_ASSIGN_OR_RETURN(std::unique_ptr<State> state, internal::OpenToken(std::move(options)));
  return std::unique_ptr<Token>(new Token(std::move(state)));
}

absl::Status Token::InitializeToken(const std::string& module_path, std::string_view label,
                                    const Secret& so_pin, const Secret& user_pin,
                                    const std::string& init_args) {
  return internal::InitializeToken(module_path, label, so_pin, user_pin, init_args);
}

Token::Token(std::unique_ptr<State> state) : state_(std::move(state)) {}

Token::~Token() {
  if (state_->pool != nullptr) {
    absl::ReaderMutexLock gate(&state_->module->gate());
    state_->pool.reset();
  }
}

const TokenInfo& Token::info() const { return state_->info; }

bool Token::Healthy() const { return state_->healthy.load(std::memory_order_relaxed); }

Token::Metrics Token::GetMetrics() const {
  Metrics metrics;
  metrics.retries = state_->retries.load(std::memory_order_relaxed);
  metrics.recoveries = state_->recoveries.load(std::memory_order_relaxed);
  metrics.module_reinitializations = state_->reinitializations.load(std::memory_order_relaxed);
  metrics.reinit_backoffs = state_->reinit_backoffs.load(std::memory_order_relaxed);
  const SessionPool::Stats pool = state_->pool->stats();
  metrics.pool_waits = pool.waits;
  metrics.pool_rejections = pool.rejections;
  metrics.pool_timeouts = pool.timeouts;
  metrics.pool_in_use = pool.in_use;
  metrics.pool_waiting = pool.waiting;
  metrics.pool_max_sessions = pool.max_sessions;
  absl::MutexLock lock(&state_->metrics_mu);
  metrics.errors_by_function = state_->errors;
  for (const auto& [key, n] : state_->errors) metrics.errors[key.second] += n;
  metrics.sign = state_->latency[static_cast<int>(internal::Timed::kSign)];
  metrics.decrypt = state_->latency[static_cast<int>(internal::Timed::kDecrypt)];
  metrics.derive = state_->latency[static_cast<int>(internal::Timed::kDerive)];
  return metrics;
}

absl::Status Token::Probe() {
  CK_FUNCTION_LIST* fn = state_->fn;
  return state_->Run(nullptr, [&](SessionPool::Lease& lease) -> absl::Status {
    CK_SESSION_INFO session{};
    CUSTODY_RETURN_IF_ERROR(
        lease.Check("C_GetSessionInfo", fn->C_GetSessionInfo(lease.get(), &session)));
    if (session.state != CKS_RW_USER_FUNCTIONS && session.state != CKS_RO_USER_FUNCTIONS) {
      // Logged out behind our back: recovered like a CKR_USER_NOT_LOGGED_IN from any call.
      return lease.Check("C_GetSessionInfo", CKR_USER_NOT_LOGGED_IN);
    }
    CK_TOKEN_INFO token{};
    return lease.Check("C_GetTokenInfo", fn->C_GetTokenInfo(lease.slot(), &token));
  });
}

bool Token::HasMechanism(std::string_view mechanism_name) const {
  return state_->mechanisms.contains(mechanism_name);
}

std::optional<std::pair<uint64_t, uint64_t>> Token::KeySizeRange(
    std::string_view mechanism_name) const {
  auto it = state_->key_sizes.find(mechanism_name);
  if (it == state_->key_sizes.end()) return std::nullopt;
  return it->second;
}

// ---- Key objects (token_objects.cc, token_public_keys.cc) ----------------------------------

absl::StatusOr<std::shared_ptr<KeyPair>> Token::FindKeyPair(std::string_view id) {
  return internal::FindKeyPair(*state_, id);
}

absl::StatusOr<std::map<std::string, std::shared_ptr<KeyPair>>> Token::FindAllKeyPairs(
    std::vector<ObjectInfo>* objects) {
  return internal::FindAllKeyPairs(*state_, objects);
}

absl::StatusOr<std::vector<ObjectInfo>> Token::ListKeyObjects() {
  std::vector<ObjectInfo> objects;
  absl::StatusOr<std::map<std::string, std::shared_ptr<KeyPair>>> pairs = FindAllKeyPairs(&objects);
  if (!pairs.ok()) return pairs.status();
  return objects;
}

absl::Status Token::DestroyKeyPair(std::string_view id) {
  return internal::DestroyKeyPair(*state_, id);
}

absl::StatusOr<PrivateKeyAttributes> Token::GetPrivateKeyAttributes(const KeyPair& key) {
  return internal::GetPrivateKeyAttributes(*state_, key);
}

absl::StatusOr<EvpPkeyPtr> Token::PublicKey(const KeyPair& key) {
  return internal::PublicKey(*state_, key);
}

// ---- Creating pairs (token_generation.cc) --------------------------------------------------

absl::StatusOr<std::shared_ptr<KeyPair>> Token::GenerateKeyPair(const KeySpec& spec,
                                                                std::string_view id,
                                                                std::string_view label,
                                                                bool for_decryption) {
  return internal::GenerateKeyPair(*state_, spec, id, label, for_decryption);
}

absl::StatusOr<std::shared_ptr<KeyPair>> Token::ImportKeyPair(const EVP_PKEY* private_key,
                                                              std::string_view id,
                                                              std::string_view label,
                                                              bool for_decryption) {
  return internal::ImportKeyPair(*state_, private_key, id, label, for_decryption);
}

// ---- Private-key operations (token_operations.cc) ------------------------------------------

absl::StatusOr<std::string> Token::Sign(const KeyPair& key, SignScheme scheme,
                                        std::string_view input) {
  return internal::Sign(*state_, key, scheme, input);
}

absl::StatusOr<Secret> Token::DecryptRsaOaep(const KeyPair& key, OaepHash hash,
                                             std::string_view ciphertext) {
  return internal::DecryptRsaOaep(*state_, key, hash, ciphertext);
}

absl::StatusOr<Secret> Token::DecryptRsaRaw(const KeyPair& key, std::string_view ciphertext) {
  return internal::DecryptRsaRaw(*state_, key, ciphertext);
}

bool Token::OaepSupported(OaepHash hash) { return internal::OaepSupported(*state_, hash); }

absl::StatusOr<Secret> Token::DeriveEcdh(const KeyPair& key, std::string_view peer_point) {
  return internal::DeriveEcdh(*state_, key, peer_point);
}

// ---- Secret keys (token_secret_keys.cc) -----------------------------------------------------

absl::StatusOr<std::vector<std::string>> Token::FindSecretKeyIds(std::string_view label) {
  return internal::FindSecretKeyIds(*state_, label);
}

absl::Status Token::GenerateHmacKey(std::string_view id, std::string_view label) {
  return internal::GenerateHmacKey(*state_, id, label);
}

absl::StatusOr<std::string> Token::HmacSha256(std::string_view id, std::string_view message) {
  return internal::HmacSha256(*state_, id, message);
}

}  // namespace custody::pkcs11
