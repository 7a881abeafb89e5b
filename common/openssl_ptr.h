// One owner for OpenSSL objects, as Tink's internal/ssl_unique_ptr.h: OpensslPtr<EVP_PKEY>
// frees with EVP_PKEY_free, OpensslPtr<BIO> with BIO_free_all, and so on for every type custody
// holds. An object with a second way to be freed names it: SecretBignumPtr clears the number
// first (BN_clear_free), for private key components.
#ifndef CUSTODY_COMMON_OPENSSL_PTR_H_
#define CUSTODY_COMMON_OPENSSL_PTR_H_

#include <memory>

#include "openssl/bio.h"
#include "openssl/bn.h"
#include "openssl/ec.h"
#include "openssl/evp.h"
#include "openssl/kdf.h"
#include "openssl/param_build.h"
#include "openssl/params.h"
#include "openssl/x509.h"

namespace custody {

// Calls kFree on the object: the deleter of an owner whose type has more than one free.
template <auto kFree>
struct FreeWith {
  template <typename T>
  void operator()(T* p) const {
    kFree(p);
  }
};

// The usual free of T; a type custody holds has its line below.
template <typename T>
struct OpensslFree;

#define CUSTODY_OPENSSL_FREE(T, free_function) \
  template <>                                  \
  struct OpensslFree<T> : FreeWith<free_function> {}

CUSTODY_OPENSSL_FREE(BIGNUM, BN_free);
CUSTODY_OPENSSL_FREE(BIO, BIO_free_all);
CUSTODY_OPENSSL_FREE(ECDSA_SIG, ECDSA_SIG_free);
CUSTODY_OPENSSL_FREE(EC_GROUP, EC_GROUP_free);
CUSTODY_OPENSSL_FREE(EC_POINT, EC_POINT_free);
CUSTODY_OPENSSL_FREE(EVP_CIPHER, EVP_CIPHER_free);
CUSTODY_OPENSSL_FREE(EVP_CIPHER_CTX, EVP_CIPHER_CTX_free);
CUSTODY_OPENSSL_FREE(EVP_KDF, EVP_KDF_free);
CUSTODY_OPENSSL_FREE(EVP_KDF_CTX, EVP_KDF_CTX_free);
CUSTODY_OPENSSL_FREE(EVP_MAC, EVP_MAC_free);
CUSTODY_OPENSSL_FREE(EVP_MAC_CTX, EVP_MAC_CTX_free);
CUSTODY_OPENSSL_FREE(EVP_MD, EVP_MD_free);
CUSTODY_OPENSSL_FREE(EVP_MD_CTX, EVP_MD_CTX_free);
CUSTODY_OPENSSL_FREE(EVP_PKEY, EVP_PKEY_free);
CUSTODY_OPENSSL_FREE(EVP_PKEY_CTX, EVP_PKEY_CTX_free);
CUSTODY_OPENSSL_FREE(OSSL_PARAM, OSSL_PARAM_free);
CUSTODY_OPENSSL_FREE(OSSL_PARAM_BLD, OSSL_PARAM_BLD_free);
CUSTODY_OPENSSL_FREE(X509, X509_free);
CUSTODY_OPENSSL_FREE(X509_NAME, X509_NAME_free);
CUSTODY_OPENSSL_FREE(X509_REQ, X509_REQ_free);

#undef CUSTODY_OPENSSL_FREE

template <typename T>
using OpensslPtr = std::unique_ptr<T, OpensslFree<T>>;

// A BIGNUM holding a private key component: cleared before it is freed.
using SecretBignumPtr = std::unique_ptr<BIGNUM, FreeWith<BN_clear_free>>;

}  // namespace custody

#endif  // CUSTODY_COMMON_OPENSSL_PTR_H_
