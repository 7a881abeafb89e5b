#include "server/daemon/service_metrics.h"

#include <time.h>

#include <algorithm>
#include <array>
#include <map>
#include <memory>
#include <optional>

#include "absl/strings/str_cat.h"
#include "common/openssl_ptr.h"
#include "metrics/exposition.h"
#include "openssl/asn1.h"
#include "openssl/bio.h"
#include "openssl/pem.h"
#include "openssl/x509.h"
#include "server/daemon/replica_metrics.h"

#ifndef CUSTODY_VERSION
#define CUSTODY_VERSION "unknown"
#endif

namespace custody::server {
namespace {

using metrics::ExpositionWriter;
using metrics::MetricType;

void Scalar(ExpositionWriter& out, absl::string_view name, absl::string_view help, MetricType type,
            double value) {
  out.Family(name, help, type);
  out.Sample(name, {}, value);
}

void Counter(ExpositionWriter& out, absl::string_view name, absl::string_view help,
             uint64_t value) {
  Scalar(out, name, help, MetricType::kCounter, static_cast<double>(value));
}

void Gauge(ExpositionWriter& out, absl::string_view name, absl::string_view help, double value) {
  Scalar(out, name, help, MetricType::kGauge, value);
}

void WriteToken(ExpositionWriter& out, const pkcs11::Token& token) {
  const pkcs11::Token::Metrics m = token.GetMetrics();
  out.Family("custody_hsm_errors_total",
             "Cryptoki calls that failed (ending an attempt or a recovery), by function and CKR "
             "code. Decryption failures of a caller's ciphertext are not counted.",
             MetricType::kCounter);
  for (const auto& [key, n] : m.errors_by_function) {
    out.Sample("custody_hsm_errors_total", {{"function", key.first}, {"ckr", key.second}},
               static_cast<double>(n));
  }
  struct Op {
    const char* name;
    const pkcs11::Token::Latency* latency;
  };
  const Op ops[] = {{"sign", &m.sign}, {"decrypt", &m.decrypt}, {"derive", &m.derive}};
  out.Family("custody_hsm_operations_total",
             "Private-key operations run on the token (pool wait and retry included, failed ones "
             "too), by operation: sign (C_Sign), decrypt (C_Decrypt), derive (C_DeriveKey).",
             MetricType::kCounter);
  for (const Op& op : ops) {
    out.Sample("custody_hsm_operations_total", {{"operation", op.name}},
               static_cast<double>(op.latency->count));
  }
  out.Family("custody_hsm_operation_duration_seconds",
             "Time of the token's private-key operations as custodyd sees them (pool wait and "
             "retry included), by operation.",
             MetricType::kHistogram);
  std::vector<double> bounds;
  for (uint64_t micros : pkcs11::Token::kLatencyBoundsMicros) bounds.push_back(micros / 1e6);
  for (const Op& op : ops) {
    std::vector<uint64_t> cumulative;
    uint64_t running = 0;
    for (uint64_t n : op.latency->buckets) cumulative.push_back(running += n);
    out.Histogram("custody_hsm_operation_duration_seconds", {{"operation", op.name}}, bounds,
                  cumulative, static_cast<double>(op.latency->total_micros) / 1e6);
  }
  Counter(out, "custody_hsm_retries_total", "Token operations run a second time after a recovery.",
          m.retries);
  Counter(out, "custody_hsm_session_recoveries_total",
          "Sessions re-opened and logged in again by a recovery.", m.recoveries);
  Counter(out, "custody_hsm_module_reinitializations_total",
          "C_Finalize + C_Initialize cycles after the device was removed.",
          m.module_reinitializations);
  Counter(out, "custody_hsm_reinit_backoffs_total",
          "Recoveries refused at once because module re-initialization was backing off.",
          m.reinit_backoffs);
  Gauge(out, "custody_hsm_pool_sessions_in_use", "PKCS#11 sessions leased to calls now.",
        m.pool_in_use);
  Gauge(out, "custody_hsm_pool_sessions_max", "Size of the PKCS#11 session pool (--max_sessions).",
        m.pool_max_sessions);
  Gauge(out, "custody_hsm_pool_waiters", "Calls waiting for a PKCS#11 session now.",
        m.pool_waiting);
  Counter(out, "custody_hsm_pool_waits_total", "Calls that had to wait for a PKCS#11 session.",
          m.pool_waits);
  Counter(out, "custody_hsm_pool_rejections_total",
          "Calls refused at once (RESOURCE_EXHAUSTED) because too many were already waiting.",
          m.pool_rejections);
  Counter(out, "custody_hsm_pool_timeouts_total",
          "Calls that waited the pool's limit (2 s) without getting a session.", m.pool_timeouts);
  Gauge(out, "custody_hsm_up",
        "1 while the token serves operations, 0 after a failed recovery until one succeeds.",
        token.Healthy() ? 1 : 0);
}

void WriteAudit(ExpositionWriter& out, const AuditLog& audit) {
  const AuditLog::Stats s = audit.stats();
  Counter(out, "custody_audit_lines_total", "Audit lines written and fsynced.", s.lines);
  Counter(out, "custody_audit_group_commits_total",
          "Successful group commits (one write and fsync for all lines queued).", s.batches);
  Counter(out, "custody_audit_write_failures_total",
          "Group commits that failed (write or fsync error); their calls were refused.",
          s.failures);
  Counter(out, "custody_audit_fsyncs_total", "fsync calls on audit files and their directory.",
          s.fsyncs);
  out.Family("custody_audit_fsync_duration_seconds", "Duration of each audit fsync.",
             MetricType::kHistogram);
  metrics::Histogram::Snapshot h = audit.fsync_seconds().Read();
  out.Histogram("custody_audit_fsync_duration_seconds", {}, h.bounds, h.cumulative, h.sum);
  Gauge(out, "custody_audit_up",
        "1 while the audit log can be written, 0 after a failed commit until one succeeds.",
        audit.healthy() ? 1 : 0);
}

void WriteRings(ExpositionWriter& out, const KeyService& keys, RequestMetrics* requests,
                absl::Time now) {
  auto listed = keys.ListKeyRings("");
  if (!listed.ok()) return;
  const int64_t now_ms = absl::ToUnixMillis(now);
  const bool by_ring = requests == nullptr || requests->ring_label();
  struct Aggregate {
    std::map<int, uint64_t> versions;     // by KeyVersionState
    std::optional<double> next_rotation;  // the soonest (most overdue) of the rings
    std::optional<double> active_age;     // the oldest
  };
  std::map<std::string, Aggregate> rings;  // by label value
  int untrusted = 0;
  for (const v1::KeyRing& ring : listed->rings()) {
    std::string label;
    if (by_ring) label = requests != nullptr ? requests->RingLabel(ring.name()) : ring.name();
    Aggregate& a = rings[label];
    for (const v1::KeyVersion& v : ring.versions()) {
      ++a.versions[v.state()];
      untrusted += v.public_key_mismatch() || v.metadata_tag_mismatch() ? 1 : 0;
      if (v.state() == v1::ACTIVE && v.activate_time_ms() > 0) {
        const double age = static_cast<double>(now_ms - v.activate_time_ms()) / 1000;
        a.active_age = std::max(a.active_age.value_or(age), age);
      }
    }
    if (ring.next_rotation_ms() != 0) {
      const double next = static_cast<double>(ring.next_rotation_ms() - now_ms) / 1000;
      a.next_rotation = std::min(a.next_rotation.value_or(next), next);
    }
  }
  auto labels = [&](const std::string& label) {
    return by_ring ? metrics::Labels{{"ring", label}} : metrics::Labels{};
  };
  Gauge(out, "custody_rings", "Key rings in the metadata.", listed->rings_size());
  out.Family("custody_ring_versions",
             "Key versions by ring and state (PENDING, ACTIVE, RETIRED, DISABLED, "
             "DESTROY_SCHEDULED, DESTROYING, DESTROYED, CREATING).",
             MetricType::kGauge);
  for (const auto& [label, a] : rings) {
    for (const auto& [state, n] : a.versions) {
      metrics::Labels l = labels(label);
      const std::string state_name =
          v1::KeyVersionState_Name(static_cast<v1::KeyVersionState>(state));
      l.emplace_back("state", state_name);
      out.Sample("custody_ring_versions", l, static_cast<double>(n));
    }
  }
  out.Family("custody_ring_next_rotation_seconds",
             "Seconds until the ring's next scheduled rotation (negative: overdue); rings with "
             "automatic rotation only. Aggregated rings (_other) show the soonest.",
             MetricType::kGauge);
  for (const auto& [label, a] : rings) {
    if (a.next_rotation)
      out.Sample("custody_ring_next_rotation_seconds", labels(label), *a.next_rotation);
  }
  out.Family("custody_ring_active_age_seconds",
             "Seconds since the ring's ACTIVE version was activated. Aggregated rings (_other) "
             "show the oldest.",
             MetricType::kGauge);
  for (const auto& [label, a] : rings) {
    if (a.active_age) out.Sample("custody_ring_active_age_seconds", labels(label), *a.active_age);
  }
  Gauge(out, "custody_key_versions_untrusted",
        "Key versions out of service because the token does not vouch for their metadata (the "
        "public key is not their token object's, or the record's tag does not verify): the "
        "metadata was changed outside custody.",
        untrusted);
  Gauge(out, "custody_rings_untrusted",
        "Key rings not served because their metadata record's tag does not verify: the "
        "metadata was changed outside custody.",
        listed->untrusted_rings_size());
  Gauge(out, "custody_orphaned_token_objects",
        "custody-labelled token objects that no metadata names (see ListKeyRings).",
        listed->orphaned_objects_size());
}

// notAfter of the first certificate in a PEM file, as Unix seconds.
std::optional<double> CertificateExpiry(const std::string& path) {
  OpensslPtr<BIO> bio(BIO_new_file(path.c_str(), "r"));
  if (bio == nullptr) return std::nullopt;
  OpensslPtr<X509> cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (cert == nullptr) return std::nullopt;
  struct tm tm {};
  if (ASN1_TIME_to_tm(X509_get0_notAfter(cert.get()), &tm) != 1) return std::nullopt;
  return static_cast<double>(timegm(&tm));
}

}  // namespace

std::string RenderMetrics(const MetricsSources& sources, absl::Time now) {
  ExpositionWriter out;
  out.Family("custody_build_info", "custodyd's version (the value is always 1).",
             MetricType::kGauge);
  out.Sample("custody_build_info", {{"version", CUSTODY_VERSION}}, 1);
  Gauge(out, "custody_start_time_seconds", "When custodyd started (Unix seconds).",
        absl::ToDoubleSeconds(sources.start_time - absl::UnixEpoch()));
  if (sources.serving) {
    Gauge(out, "custody_health_serving",
          "1 while grpc.health.v1 reports SERVING (token and audit log usable), else 0.",
          sources.serving() ? 1 : 0);
  }
  if (sources.requests != nullptr) sources.requests->Write(out);
  if (sources.token != nullptr) WriteToken(out, *sources.token);
  if (sources.audit != nullptr) WriteAudit(out, *sources.audit);
  if (sources.keys != nullptr) WriteRings(out, *sources.keys, sources.requests, now);
  if (sources.keys != nullptr) WriteReplicaMetrics(out, *sources.keys, now);
  if (!sources.tls_cert_file.empty()) {
    if (std::optional<double> expiry = CertificateExpiry(sources.tls_cert_file)) {
      out.Family("custody_tls_certificate_expiry_timestamp_seconds",
                 "notAfter of custodyd's TLS server certificate (--tls_cert), Unix seconds.",
                 MetricType::kGauge);
      out.Sample("custody_tls_certificate_expiry_timestamp_seconds", {{"certificate", "server"}},
                 *expiry);
    }
  }
  return out.Release();
}

}  // namespace custody::server
