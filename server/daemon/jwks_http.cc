#include "server/daemon/jwks_http.h"

#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "rotation/key_ring.h"

namespace custody::server {
namespace {

constexpr absl::string_view kRingPrefix = "/rings/";
constexpr absl::string_view kRingSuffix = "/jwks.json";

void AddCors(metrics::HttpResponse& r) {
  r.headers.emplace_back("Access-Control-Allow-Origin", "*");
  r.headers.emplace_back("Access-Control-Expose-Headers", "ETag");
}

}  // namespace

absl::StatusOr<JwksPublication> ParseJwksPublication(const std::vector<std::string>& publish,
                                                     const std::vector<std::string>& aliases) {
  JwksPublication out;
  for (const std::string& ring : publish) {
    if (ring.empty()) continue;  // "--jwks_publish=a,,b"
    if (absl::Status s = rotation::ValidateRingName(ring); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--jwks_publish: '", ring, "' is not a ring name: ", s.message()));
    }
    out.rings.insert(ring);
  }
  for (const std::string& alias : aliases) {
    if (alias.empty()) continue;
    const size_t eq = alias.find('=');
    if (eq == std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("--jwks_alias: '", alias,
                       "' is not PATH=RING (e.g. /.well-known/jwks.json=op/id-token)"));
    }
    std::string path = alias.substr(0, eq);
    std::vector<std::string> rings = absl::StrSplit(alias.substr(eq + 1), '+');
    if (!absl::StartsWith(path, "/") || absl::StrContains(path, "?") ||
        absl::StrContains(path, "#")) {
      return absl::InvalidArgumentError(absl::StrCat("--jwks_alias: the path of '", alias,
                                                     "' must start with '/' and have no query"));
    }
    if (absl::StartsWith(path, kRingPrefix)) {
      return absl::InvalidArgumentError(absl::StrCat("--jwks_alias: '", path,
                                                     "' is under /rings/, where each published "
                                                     "ring already has its path"));
    }
    for (const std::string& ring : rings) {
      if (out.rings.count(ring) == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("--jwks_alias: '", alias, "' names ring '", ring,
                         "', which --jwks_publish does not list; add it there to publish it"));
      }
    }
    if (!out.aliases.emplace(std::move(path), std::move(rings)).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("--jwks_alias: the path of '", alias, "' is given twice"));
    }
  }
  return out;
}

bool IfNoneMatchHits(absl::string_view if_none_match, absl::string_view etag) {
  for (absl::string_view tag : absl::StrSplit(if_none_match, ',')) {
    tag = absl::StripAsciiWhitespace(tag);
    if (tag == "*") return true;
    absl::ConsumePrefix(&tag, "W/");  // If-None-Match compares weakly (RFC 9110 13.1.2)
    if (tag.size() >= 2 && tag.front() == '"' && tag.back() == '"' &&
        tag.substr(1, tag.size() - 2) == etag) {
      return true;
    }
  }
  return false;
}

metrics::HttpServer::Handler JwksHandler(const KeyService* keys, JwksPublication publication) {
  return [keys, publication = std::move(publication)](const metrics::HttpRequest& request) {
    using metrics::HttpResponse;
    std::vector<std::string> rings;
    if (auto alias = publication.aliases.find(request.path); alias != publication.aliases.end()) {
      rings = alias->second;
    } else if (absl::string_view path = request.path;
               absl::ConsumePrefix(&path, kRingPrefix) && absl::ConsumeSuffix(&path, kRingSuffix) &&
               publication.rings.count(std::string(path)) != 0) {
      rings.emplace_back(path);
    } else {
      HttpResponse r = HttpResponse::Text(404, "not found\n");
      AddCors(r);
      return r;
    }
    if (request.method == "OPTIONS") {  // a CORS preflight (a browser adding If-None-Match)
      HttpResponse r = HttpResponse::Text(204, "");
      AddCors(r);
      r.headers.emplace_back("Access-Control-Allow-Methods", "GET, HEAD");
      r.headers.emplace_back("Access-Control-Allow-Headers", "If-None-Match");
      r.headers.emplace_back("Access-Control-Max-Age", "86400");
      return r;
    }
    if (request.method != "GET" && request.method != "HEAD") {
      HttpResponse r = HttpResponse::Text(405, "only GET\n");
      r.headers.emplace_back("Allow", "GET, HEAD, OPTIONS");
      return r;
    }
    auto jwks = keys->GetJwks(rings);
    if (!jwks.ok()) {
      // A published ring that does not exist (yet, or any more) is not found like any other
      // path; anything else (a replica past its staleness) is the server's state.
      HttpResponse r = jwks.status().code() == absl::StatusCode::kNotFound
                           ? HttpResponse::Text(404, "not found\n")
                           : HttpResponse::Text(503, "the key set cannot be served now\n");
      AddCors(r);
      if (r.status == 503) r.headers.emplace_back("Retry-After", "5");
      return r;
    }
    const std::string etag = absl::StrCat("\"", jwks->etag, "\"");
    HttpResponse r;
    if (!request.if_none_match.empty() && IfNoneMatchHits(request.if_none_match, jwks->etag)) {
      r = HttpResponse::Text(304, "");
    } else {
      r = HttpResponse::Text(200, *jwks->json, "application/jwk-set+json");
    }
    r.headers.emplace_back("ETag", etag);
    r.headers.emplace_back("Cache-Control",
                           absl::StrCat("public, max-age=", jwks->max_age_seconds));
    AddCors(r);
    return r;
  };
}

}  // namespace custody::server
