// An OAuth client authenticating with mutual TLS whose TLS key is held in custody: libcurl with
// the SSL_CTX prepared through CURLOPT_SSL_CTX_FUNCTION (the key and certificate of a custody:
// URI, loaded with the custody provider), for oidc_mtls_e2e_test against oidc-provider.
//
//   mtls_flow ISSUER CA_FILE CLIENT_URI OTHER_URI CLIENT_ID REDIRECT_URI
//
// Authorization code flow with PKCE (the provider approves the interaction by itself), token
// request authenticated by `tls_client_auth`, then prints one line each:
//   token <token endpoint JSON>
//   introspection <introspection JSON>           (the token's cnf.x5t#S256)
//   userinfo <HTTP status> <body>                (same certificate)
//   userinfo_other <HTTP status> <body>          (OTHER_URI's key and certificate)
//   userinfo_none <HTTP status> <body>           (no client certificate)
// Exit 0 when a token was obtained, 1 otherwise (with the reason on stderr).
//
// Links libssl, libcurl and custody_tls only: the custody provider cannot be loaded into a
// process that also links custody's protobuf messages (docs/provider.md).
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "curl/curl.h"
#include "openssl/err.h"
#include "openssl/evp.h"
#include "openssl/provider.h"
#include "openssl/rand.h"
#include "openssl/ssl.h"
#include "provider/tls_credentials.h"

namespace {

using Pair = std::shared_ptr<const custody::tls::KeyAndCertificate>;

size_t Append(char* data, size_t size, size_t n, void* out) {
  static_cast<std::string*>(out)->append(data, size * n);
  return size * n;
}

// curl's SSL_CTX, before the handshake: the custody key and its certificate.
CURLcode UseCustodyKey(CURL*, void* ssl_ctx, void* arg) {
  const auto* pair = static_cast<const custody::tls::KeyAndCertificate*>(arg);
  return SSL_CTX_use_cert_and_key(static_cast<SSL_CTX*>(ssl_ctx), pair->certificate, pair->key,
                                  pair->chain, 1) == 1
             ? CURLE_OK
             : CURLE_SSL_CERTPROBLEM;
}

struct Response {
  long status = 0;
  std::string body, redirect;
  std::string error;
};

class Session {
 public:
  // `pair` null: no client certificate.
  Session(const std::string& ca, Pair pair) : curl_(curl_easy_init()), pair_(std::move(pair)) {
    curl_easy_setopt(curl_, CURLOPT_CAINFO, ca.c_str());
    curl_easy_setopt(curl_, CURLOPT_COOKIEFILE, "");  // cookie engine: the login session
    curl_easy_setopt(curl_, CURLOPT_TIMEOUT, 20L);
    curl_easy_setopt(curl_, CURLOPT_WRITEFUNCTION, Append);
    if (pair_ != nullptr) {
      curl_easy_setopt(curl_, CURLOPT_SSL_CTX_FUNCTION, UseCustodyKey);
      curl_easy_setopt(curl_, CURLOPT_SSL_CTX_DATA, pair_.get());
    }
  }
  ~Session() { curl_easy_cleanup(curl_); }

  Response Send(const std::string& url, const std::string& form = "",
                const std::vector<std::string>& headers = {}) {
    Response r;
    curl_easy_setopt(curl_, CURLOPT_URL, url.c_str());
    curl_easy_setopt(curl_, CURLOPT_WRITEDATA, &r.body);
    if (form.empty()) {
      curl_easy_setopt(curl_, CURLOPT_HTTPGET, 1L);
    } else {
      curl_easy_setopt(curl_, CURLOPT_POSTFIELDS, form.c_str());
    }
    curl_slist* list = nullptr;
    for (const std::string& h : headers) list = curl_slist_append(list, h.c_str());
    curl_easy_setopt(curl_, CURLOPT_HTTPHEADER, list);
    const CURLcode code = curl_easy_perform(curl_);
    curl_slist_free_all(list);
    curl_easy_setopt(curl_, CURLOPT_HTTPHEADER, nullptr);
    if (code != CURLE_OK) {
      r.error = curl_easy_strerror(code);
      return r;
    }
    curl_easy_getinfo(curl_, CURLINFO_RESPONSE_CODE, &r.status);
    char* location = nullptr;
    curl_easy_getinfo(curl_, CURLINFO_REDIRECT_URL, &location);
    if (location != nullptr) r.redirect = location;
    return r;
  }
  std::string Escape(const std::string& s) {
    char* e = curl_easy_escape(curl_, s.data(), static_cast<int>(s.size()));
    std::string out = e;
    curl_free(e);
    return out;
  }

 private:
  CURL* curl_;
  Pair pair_;
};

std::string Base64Url(const unsigned char* data, size_t n) {
  std::string out(4 * ((n + 2) / 3) + 1, '\0');
  const int len =
      EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()), data, static_cast<int>(n));
  out.resize(static_cast<size_t>(len));
  for (char& c : out) c = c == '+' ? '-' : c == '/' ? '_' : c;
  while (!out.empty() && out.back() == '=') out.pop_back();
  return out;
}

std::string JsonString(const std::string& json, const std::string& name) {
  const std::string key = "\"" + name + "\":\"";
  const size_t p = json.find(key);
  if (p == std::string::npos) return "";
  const size_t start = p + key.size();
  return json.substr(start, json.find('"', start) - start);
}

std::string QueryParam(const std::string& url, const std::string& name) {
  const size_t q = url.find('?');
  if (q == std::string::npos) return "";
  for (size_t p = q + 1; p < url.size();) {
    const size_t end = std::min(url.find('&', p), url.size());
    const std::string field = url.substr(p, end - p);
    if (field.rfind(name + "=", 0) == 0) return field.substr(name.size() + 1);
    p = end + 1;
  }
  return "";
}

int Fail(const std::string& why) {
  std::fprintf(stderr, "mtls_flow: %s\n", why.c_str());
  ERR_print_errors_fp(stderr);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr,
                 "usage: mtls_flow ISSUER CA_FILE CLIENT_URI OTHER_URI CLIENT_ID REDIRECT_URI\n");
    return 2;
  }
  const std::string issuer = argv[1], ca = argv[2], client_uri = argv[3], other_uri = argv[4],
                    client_id = argv[5], redirect_uri = argv[6];
  // curl makes its SSL_CTX in the default library context: the custody provider goes there,
  // with the default provider preferred for everything else (docs/provider.md).
  if (OSSL_PROVIDER_load(nullptr, "custody") == nullptr ||
      OSSL_PROVIDER_load(nullptr, "default") == nullptr ||
      EVP_set_default_properties(nullptr, "?provider=default") != 1) {
    return Fail("cannot load the custody and default providers");
  }
  std::string error;
  Pair mine = custody::tls::LoadKeyAndCertificate(nullptr, nullptr, client_uri, &error);
  if (mine == nullptr) return Fail(error);
  Pair other = custody::tls::LoadKeyAndCertificate(nullptr, nullptr, other_uri, &error);
  if (other == nullptr) return Fail(error);
  curl_global_init(CURL_GLOBAL_DEFAULT);

  Session session(ca, mine);
  unsigned char random[32];
  if (RAND_bytes(random, sizeof(random)) != 1) return Fail("RAND_bytes");
  const std::string verifier = Base64Url(random, sizeof(random));
  unsigned char digest[32];
  unsigned int digest_len = 0;
  EVP_Digest(verifier.data(), verifier.size(), digest, &digest_len, EVP_sha256(), nullptr);
  const std::string challenge = Base64Url(digest, digest_len);

  // Authorization: follow the redirects (interaction, approval) back to the redirect_uri.
  std::string url = issuer + "/auth?response_type=code&scope=openid&state=s1&client_id=" +
                    session.Escape(client_id) + "&redirect_uri=" + session.Escape(redirect_uri) +
                    "&code_challenge=" + challenge + "&code_challenge_method=S256";
  for (int i = 0; i < 10 && url.rfind(redirect_uri, 0) != 0; ++i) {
    Response r = session.Send(url);
    if (!r.error.empty() || r.redirect.empty()) {
      return Fail("authorization: " + r.error + " " + std::to_string(r.status) + " " + r.body);
    }
    url = r.redirect;
  }
  const std::string code = QueryParam(url, "code");
  if (code.empty()) return Fail("no code in " + url);

  // Token request: tls_client_auth, the client's certificate is its credential.
  Response token =
      session.Send(issuer + "/token", "grant_type=authorization_code&code=" + session.Escape(code) +
                                          "&redirect_uri=" + session.Escape(redirect_uri) +
                                          "&code_verifier=" + verifier +
                                          "&client_id=" + session.Escape(client_id));
  std::printf("token %s\n", token.body.c_str());
  const std::string access_token = JsonString(token.body, "access_token");
  if (token.status != 200 || access_token.empty()) {
    return Fail("token: " + token.error + " " + std::to_string(token.status));
  }
  Response introspection =
      session.Send(issuer + "/token/introspection", "token=" + session.Escape(access_token) +
                                                        "&client_id=" + session.Escape(client_id));
  std::printf("introspection %s\n", introspection.body.c_str());
  const std::vector<std::string> bearer = {"Authorization: Bearer " + access_token};
  Response me = session.Send(issuer + "/me", "", bearer);
  std::printf("userinfo %ld %s\n", me.status, me.body.c_str());
  {
    Session other_session(ca, other);
    Response r = other_session.Send(issuer + "/me", "", bearer);
    std::printf("userinfo_other %ld %s%s\n", r.status, r.body.c_str(), r.error.c_str());
  }
  {
    Session none(ca, nullptr);
    Response r = none.Send(issuer + "/me", "", bearer);
    std::printf("userinfo_none %ld %s%s\n", r.status, r.body.c_str(), r.error.c_str());
  }
  curl_global_cleanup();
  return 0;
}
