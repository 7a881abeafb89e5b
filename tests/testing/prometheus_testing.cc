#include "tests/testing/prometheus_testing.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "curl/curl.h"
#include "jose/json.h"
#include "tests/testing/harness.h"

extern char** environ;

namespace custody::testing {
namespace {

size_t Append(char* data, size_t size, size_t n, void* out) {
  static_cast<std::string*>(out)->append(data, size * n);
  return size * n;
}

std::string UrlEscape(const std::string& s) {
  CURL* curl = curl_easy_init();
  char* escaped = curl_easy_escape(curl, s.c_str(), static_cast<int>(s.size()));
  std::string out(escaped);
  curl_free(escaped);
  curl_easy_cleanup(curl);
  return out;
}

}  // namespace

std::string HttpGet(const std::string& url, long* code) {
  std::string body;
  CURL* curl = curl_easy_init();
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, &Append);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &body);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT, 10L);
  curl_easy_setopt(curl, CURLOPT_NOPROXY, "*");
  long status = 0;
  if (curl_easy_perform(curl) == CURLE_OK) {
    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
  } else {
    body.clear();
  }
  if (code != nullptr) *code = status;
  curl_easy_cleanup(curl);
  return body;
}

BackgroundProcess::BackgroundProcess(const std::vector<std::string>& argv, const std::string& log) {
  absl::StatusOr<ChildProcess> child =
      ChildProcess::Start({.argv = argv, .stdout_path = log, .stderr_path = log});
  if (child.ok()) process_ = *std::move(child);
}

Prometheus::Prometheus(const std::string& dir, const std::vector<int>& metrics_ports)
    : dir_(dir), port_(FreePort()) {
  std::string targets;
  for (int p : metrics_ports) {
    absl::StrAppend(&targets, targets.empty() ? "" : ", ", "'127.0.0.1:", p, "'");
  }
  const std::string config = dir_ + "/prometheus.yml";
  WriteFileOrDie(config, absl::StrCat("global:\n"
                                      "  scrape_interval: 1s\n"
                                      "  evaluation_interval: 1s\n"
                                      "rule_files:\n"
                                      "  - ",
                                      SourceDir(),
                                      "/deploy/prometheus/alerts.yml\n"
                                      "scrape_configs:\n"
                                      "  - job_name: custody\n"
                                      "    static_configs:\n"
                                      "      - targets: [",
                                      targets, "]\n"));
  process_ = std::make_unique<BackgroundProcess>(
      std::vector<std::string>{"/usr/bin/prometheus", "--config.file=" + config,
                               "--storage.tsdb.path=" + dir_ + "/tsdb",
                               absl::StrCat("--web.listen-address=127.0.0.1:", port_)},
      dir_ + "/prometheus.log");
}

std::string Prometheus::log() const { return ReadFileOrDie(dir_ + "/prometheus.log"); }

std::string Prometheus::QueryUntil(const std::string& promql, const std::string& expected,
                                   int timeout_ms) const {
  std::string last;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  do {
    const std::string body = HttpGet(
        absl::StrCat("http://127.0.0.1:", port_, "/api/v1/query?query=", UrlEscape(promql)));
    auto json = jose::ParseJson(body);
    if (json.ok()) {
      const jose::Json* data = json->Find("data");
      const jose::Json* result = data != nullptr ? data->Find("result") : nullptr;
      if (result != nullptr && result->as_array().size() == 1) {
        const jose::Json* value = result->as_array()[0].Find("value");
        if (value != nullptr && value->as_array().size() == 2) {
          last = value->as_array()[1].as_string();
        }
      }
    }
    if (last == expected) return last;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  } while (std::chrono::steady_clock::now() < deadline);
  return last;
}

}  // namespace custody::testing
