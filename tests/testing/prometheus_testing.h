// Test-only: a real Prometheus (Debian's /usr/bin/prometheus) on loopback, scraping custodyd's
// /metrics and evaluating deploy/prometheus/alerts.yml, and the HTTP calls to ask it PromQL
// questions. Shared by prometheus_integration_test and replica_integration_test.
#ifndef CUSTODY_TESTS_TESTING_PROMETHEUS_TESTING_H_
#define CUSTODY_TESTS_TESTING_PROMETHEUS_TESTING_H_

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "common/testing/child_process.h"

namespace custody::testing {

// GET url → body ("" on any failure; *code gets the HTTP status).
std::string HttpGet(const std::string& url, long* code = nullptr);

// A background process (no shell, stdout and stderr to `log`), SIGTERMed and reaped on
// destruction (SIGKILLed after 10 s).
class BackgroundProcess {
 public:
  BackgroundProcess(const std::vector<std::string>& argv, const std::string& log);
  ~BackgroundProcess() { process_.Stop(std::chrono::seconds(10)); }
  BackgroundProcess(const BackgroundProcess&) = delete;
  BackgroundProcess& operator=(const BackgroundProcess&) = delete;
  bool running() const { return process_.Running(); }

 private:
  mutable ChildProcess process_;
};

// Prometheus with its state under `dir`, scraping every second the /metrics of each
// 127.0.0.1:PORT in `metrics_ports` (job "custody") and evaluating deploy/prometheus/alerts.yml
// every second.
class Prometheus {
 public:
  Prometheus(const std::string& dir, const std::vector<int>& metrics_ports);
  bool running() const { return process_->running(); }
  int port() const { return port_; }
  std::string log() const;

  // The value of an instant PromQL query with one result, polled until it equals `expected`
  // (the next scrape or evaluation brings it) or `timeout_ms` pass; the last value seen ("" for
  // none).
  std::string QueryUntil(const std::string& promql, const std::string& expected,
                         int timeout_ms = 30000) const;

 private:
  std::string dir_;
  int port_ = 0;
  std::unique_ptr<BackgroundProcess> process_;
};

}  // namespace custody::testing

#endif  // CUSTODY_TESTS_TESTING_PROMETHEUS_TESTING_H_
