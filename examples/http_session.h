// A minimal HTTP client for examples/fapi_flow.cc over libcurl: one connection-reusing handle
// with curl's cookie engine on (the authorization server's login session lives in cookies) and
// redirects not followed (the caller walks them, to stop at its own redirect_uri); and the JSON
// response helpers an OAuth client needs.
//
// Not thread-safe: one HttpSession per thread.
#ifndef CUSTODY_EXAMPLES_HTTP_SESSION_H_
#define CUSTODY_EXAMPLES_HTTP_SESSION_H_

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "curl/curl.h"
#include "jose/json.h"

namespace custody::examples {

struct HttpResponse {
  long status = 0;
  std::string body;
  std::string location;          // absolute Location of a redirect, else empty
  std::string dpop_nonce;        // DPoP-Nonce header (RFC 9449 §8), else empty
  std::string www_authenticate;  // WWW-Authenticate header, else empty
};

class HttpSession {
 public:
  HttpSession();
  HttpSession(const HttpSession&) = delete;
  HttpSession& operator=(const HttpSession&) = delete;

  // GET when `form` is empty, else POST application/x-www-form-urlencoded. `headers` are
  // "Name: value" lines. UNAVAILABLE when no HTTP response arrived (10 s timeout).
  absl::StatusOr<HttpResponse> Send(const std::string& url, const std::string& form = "",
                                    const std::vector<std::string>& headers = {});

  // GETs `url` and the redirects it leads to (at most 10), until a Location starting with
  // `stop_prefix`, which is returned without being fetched. FAILED_PRECONDITION when a response
  // is not a redirect (with its status and body).
  absl::StatusOr<std::string> FollowRedirects(std::string url, const std::string& stop_prefix);

  // application/x-www-form-urlencoded encoding of `fields`.
  std::string Form(const std::vector<std::pair<std::string, std::string>>& fields) const;
  // The decoded value of query parameter `name` in `url`, "" when absent.
  std::string QueryParam(const std::string& url, const std::string& name) const;

 private:
  std::unique_ptr<CURL, void (*)(CURL*)> curl_;
};

// The JSON body of `response` when its status is `expected`; otherwise FAILED_PRECONDITION with
// the status, body and WWW-Authenticate (the server's error), or the transport error.
absl::StatusOr<jose::Json> JsonBody(const absl::StatusOr<HttpResponse>& response, long expected);

// String member `name` of a JSON object, "" when absent or not a string.
std::string Member(const jose::Json& json, const char* name);

}  // namespace custody::examples

#endif  // CUSTODY_EXAMPLES_HTTP_SESSION_H_
