#include "provider/tls_credentials.h"

#include <utility>

#include "openssl/err.h"
#include "openssl/store.h"

namespace custody::tls {
namespace {

// The first error on OpenSSL's queue as text (left on the queue).
std::string OpenSslError(const std::string& context) {
  const unsigned long code = ERR_peek_last_error();
  if (code == 0) return context;
  char text[512];
  ERR_error_string_n(code, text, sizeof(text));
  const char* data = nullptr;
  int flags = 0;
  ERR_peek_last_error_data(&data, &flags);
  std::string out = context + ": " + text;
  if (data != nullptr && (flags & ERR_TXT_STRING) != 0 && data[0] != '\0') {
    out += std::string(" (") + data + ")";
  }
  return out;
}

}  // namespace

KeyAndCertificate::~KeyAndCertificate() {
  EVP_PKEY_free(key);
  X509_free(certificate);
  sk_X509_pop_free(chain, X509_free);
}

std::shared_ptr<const KeyAndCertificate> LoadKeyAndCertificate(OSSL_LIB_CTX* libctx,
                                                               const char* properties,
                                                               const std::string& uri,
                                                               std::string* error) {
  auto pair = std::make_shared<KeyAndCertificate>();
  pair->chain = sk_X509_new_null();
  OSSL_STORE_CTX* store = OSSL_STORE_open_ex(uri.c_str(), libctx, properties, nullptr, nullptr,
                                             nullptr, nullptr, nullptr);
  if (store == nullptr || pair->chain == nullptr) {
    *error = OpenSslError("cannot open " + uri);
    return nullptr;
  }
  bool failed = false;
  while (!OSSL_STORE_eof(store)) {
    OSSL_STORE_INFO* info = OSSL_STORE_load(store);
    if (info == nullptr) {
      if (OSSL_STORE_error(store)) failed = true;
      break;
    }
    switch (OSSL_STORE_INFO_get_type(info)) {
      case OSSL_STORE_INFO_PKEY:
        if (pair->key == nullptr) pair->key = OSSL_STORE_INFO_get1_PKEY(info);
        break;
      case OSSL_STORE_INFO_CERT:
        if (pair->certificate == nullptr) {
          pair->certificate = OSSL_STORE_INFO_get1_CERT(info);
        } else if (X509* c = OSSL_STORE_INFO_get1_CERT(info); c != nullptr) {
          if (!sk_X509_push(pair->chain, c)) X509_free(c);
        }
        break;
      default:
        break;
    }
    OSSL_STORE_INFO_free(info);
  }
  OSSL_STORE_close(store);
  if (failed || pair->key == nullptr) {
    *error = OpenSslError("no key loaded from " + uri);
    return nullptr;
  }
  if (pair->certificate == nullptr) {
    *error = uri + " has no certificate (custodyctl certificate set)";
    return nullptr;
  }
  if (X509_check_private_key(pair->certificate, pair->key) != 1) {
    *error = OpenSslError(uri + ": the certificate is not for the key");
    return nullptr;
  }
  pair->loaded = std::chrono::steady_clock::now();
  return pair;
}

std::unique_ptr<RotatingCredentials> RotatingCredentials::Create(OSSL_LIB_CTX* libctx,
                                                                 std::string properties,
                                                                 std::string uri,
                                                                 std::chrono::milliseconds refresh,
                                                                 std::string* error) {
  std::unique_ptr<RotatingCredentials> out(
      new RotatingCredentials(libctx, std::move(properties), std::move(uri), refresh));
  out->current_ = LoadKeyAndCertificate(
      libctx, out->properties_.empty() ? nullptr : out->properties_.c_str(), out->uri_, error);
  if (out->current_ == nullptr) return nullptr;
  return out;
}

std::shared_ptr<const KeyAndCertificate> RotatingCredentials::Current() {
  std::shared_ptr<const KeyAndCertificate> current;
  {
    std::lock_guard<std::mutex> lock(mu_);
    current = current_;
    if (reloading_ || std::chrono::steady_clock::now() - current->loaded < refresh_) {
      return current;
    }
    reloading_ = true;  // this caller reloads; the others keep the current pair meanwhile
  }
  std::string error;
  auto fresh = LoadKeyAndCertificate(libctx_, properties_.empty() ? nullptr : properties_.c_str(),
                                     uri_, &error);
  ERR_clear_error();  // a failed reload is reported by last_error(), not by this handshake
  std::lock_guard<std::mutex> lock(mu_);
  reloading_ = false;
  last_error_ = error;
  if (fresh != nullptr) {
    current_ = std::move(fresh);
  } else {
    // Keep the pair, and try again after another `refresh`.
    auto retry = std::make_shared<KeyAndCertificate>();
    retry->key = current_->key;
    EVP_PKEY_up_ref(retry->key);
    retry->certificate = current_->certificate;
    X509_up_ref(retry->certificate);
    retry->chain = X509_chain_up_ref(current_->chain);
    retry->loaded = std::chrono::steady_clock::now();
    current_ = std::move(retry);
  }
  return current_;
}

std::string RotatingCredentials::last_error() {
  std::lock_guard<std::mutex> lock(mu_);
  return last_error_;
}

int RotatingCredentials::CertificateCallback(SSL* ssl, void* arg) {
  auto pair = static_cast<RotatingCredentials*>(arg)->Current();
  // The SSL object takes its own references: the pair can be replaced while this handshake
  // still signs with it.
  return SSL_use_cert_and_key(ssl, pair->certificate, pair->key, pair->chain, 1) == 1 ? 1 : 0;
}

void RotatingCredentials::Install(SSL_CTX* ctx) {
  SSL_CTX_set_cert_cb(ctx, &RotatingCredentials::CertificateCallback, this);
}

}  // namespace custody::tls
