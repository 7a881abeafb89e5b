#include "examples/http_session.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace custody::examples {
namespace {

size_t AppendBody(char* data, size_t size, size_t count, void* body) {
  static_cast<std::string*>(body)->append(data, size * count);
  return size * count;
}

std::string Header(CURL* curl, const char* name) {
  curl_header* header = nullptr;
  return curl_easy_header(curl, name, 0, CURLH_HEADER, -1, &header) == CURLHE_OK ? header->value
                                                                                 : "";
}

std::string Unescape(CURL* curl, absl::string_view value) {
  int length = 0;
  char* raw = curl_easy_unescape(curl, value.data(), static_cast<int>(value.size()), &length);
  std::string out(raw, length);
  curl_free(raw);
  return out;
}

}  // namespace

HttpSession::HttpSession() : curl_(curl_easy_init(), curl_easy_cleanup) {
  curl_easy_setopt(curl_.get(), CURLOPT_COOKIEFILE, "");  // cookie engine on, nothing loaded
  curl_easy_setopt(curl_.get(), CURLOPT_WRITEFUNCTION, AppendBody);
  curl_easy_setopt(curl_.get(), CURLOPT_TIMEOUT, 10L);
}

absl::StatusOr<HttpResponse> HttpSession::Send(const std::string& url, const std::string& form,
                                               const std::vector<std::string>& headers) {
  CURL* curl = curl_.get();
  HttpResponse response;
  std::unique_ptr<curl_slist, void (*)(curl_slist*)> header_list(nullptr, curl_slist_free_all);
  for (const std::string& header : headers) {
    header_list.reset(curl_slist_append(header_list.release(), header.c_str()));
  }
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_HTTPGET, 1L);
  if (!form.empty()) curl_easy_setopt(curl, CURLOPT_POSTFIELDS, form.c_str());
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, header_list.get());
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &response.body);
  const CURLcode code = curl_easy_perform(curl);
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, nullptr);
  if (code != CURLE_OK) {
    return absl::UnavailableError(absl::StrCat(url, ": ", curl_easy_strerror(code)));
  }
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &response.status);
  char* location = nullptr;
  if (curl_easy_getinfo(curl, CURLINFO_REDIRECT_URL, &location) == CURLE_OK && location) {
    response.location = location;
  }
  response.dpop_nonce = Header(curl, "DPoP-Nonce");
  response.www_authenticate = Header(curl, "WWW-Authenticate");
  return response;
}

absl::StatusOr<std::string> HttpSession::FollowRedirects(std::string url,
                                                         const std::string& stop_prefix) {
  for (int hops = 0; hops <= 10; ++hops) {
    absl::StatusOr<HttpResponse> response = Send(url);
    if (!response.ok()) return response.status();
    if (response->location.empty()) {
      return absl::FailedPreconditionError(
          absl::StrCat("no redirect from ", url, ": HTTP ", response->status, " ", response->body));
    }
    if (absl::StartsWith(response->location, stop_prefix)) return response->location;
    url = response->location;
  }
  return absl::FailedPreconditionError("too many redirects, last to " + url);
}

std::string HttpSession::Form(
    const std::vector<std::pair<std::string, std::string>>& fields) const {
  std::string out;
  for (const auto& [name, value] : fields) {
    char* escaped = curl_easy_escape(curl_.get(), value.data(), static_cast<int>(value.size()));
    absl::StrAppend(&out, out.empty() ? "" : "&", name, "=", escaped);
    curl_free(escaped);
  }
  return out;
}

std::string HttpSession::QueryParam(const std::string& url, const std::string& name) const {
  const size_t query = url.find('?');
  if (query == std::string::npos) return "";
  absl::string_view rest = absl::string_view(url).substr(query + 1);
  rest = rest.substr(0, rest.find('#'));
  for (absl::string_view pair : absl::StrSplit(rest, '&')) {
    std::pair<absl::string_view, absl::string_view> kv =
        absl::StrSplit(pair, absl::MaxSplits('=', 1));
    if (Unescape(curl_.get(), kv.first) == name) return Unescape(curl_.get(), kv.second);
  }
  return "";
}

absl::StatusOr<jose::Json> JsonBody(const absl::StatusOr<HttpResponse>& response, long expected) {
  if (!response.ok()) return response.status();
  if (response->status != expected) {
    return absl::FailedPreconditionError(absl::StrCat(
        "HTTP ", response->status, ": ", response->body, " ", response->www_authenticate));
  }
  return jose::ParseJson(response->body);
}

std::string Member(const jose::Json& json, const char* name) {
  const jose::Json* member = json.Find(name);
  return member != nullptr ? member->as_string() : "";
}

}  // namespace custody::examples
