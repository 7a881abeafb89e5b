// Owners for the OpenSSL handles used inside custody_jose (internal; not part of the API).
#ifndef CUSTODY_JOSE_OPENSSL_HANDLES_H_
#define CUSTODY_JOSE_OPENSSL_HANDLES_H_

#include <memory>

#include "openssl/bn.h"
#include "openssl/ec.h"
#include "openssl/evp.h"
#include "openssl/kdf.h"
#include "openssl/param_build.h"
#include "openssl/params.h"

namespace custody::jose::internal {

struct BnDeleter {
  void operator()(BIGNUM* p) const { BN_free(p); }
};
using BnPtr = std::unique_ptr<BIGNUM, BnDeleter>;

struct ParamBldDeleter {
  void operator()(OSSL_PARAM_BLD* p) const { OSSL_PARAM_BLD_free(p); }
};
using ParamBldPtr = std::unique_ptr<OSSL_PARAM_BLD, ParamBldDeleter>;

struct ParamsDeleter {
  void operator()(OSSL_PARAM* p) const { OSSL_PARAM_free(p); }
};
using ParamsPtr = std::unique_ptr<OSSL_PARAM, ParamsDeleter>;

struct PkeyCtxDeleter {
  void operator()(EVP_PKEY_CTX* p) const { EVP_PKEY_CTX_free(p); }
};
using PkeyCtxPtr = std::unique_ptr<EVP_PKEY_CTX, PkeyCtxDeleter>;

struct MdCtxDeleter {
  void operator()(EVP_MD_CTX* p) const { EVP_MD_CTX_free(p); }
};
using MdCtxPtr = std::unique_ptr<EVP_MD_CTX, MdCtxDeleter>;

struct MdDeleter {
  void operator()(EVP_MD* p) const { EVP_MD_free(p); }
};
using MdPtr = std::unique_ptr<EVP_MD, MdDeleter>;

struct EcdsaSigDeleter {
  void operator()(ECDSA_SIG* p) const { ECDSA_SIG_free(p); }
};
using EcdsaSigPtr = std::unique_ptr<ECDSA_SIG, EcdsaSigDeleter>;

struct CipherDeleter {
  void operator()(EVP_CIPHER* p) const { EVP_CIPHER_free(p); }
};
using CipherPtr = std::unique_ptr<EVP_CIPHER, CipherDeleter>;

struct CipherCtxDeleter {
  void operator()(EVP_CIPHER_CTX* p) const { EVP_CIPHER_CTX_free(p); }
};
using CipherCtxPtr = std::unique_ptr<EVP_CIPHER_CTX, CipherCtxDeleter>;

struct MacDeleter {
  void operator()(EVP_MAC* p) const { EVP_MAC_free(p); }
};
using MacPtr = std::unique_ptr<EVP_MAC, MacDeleter>;

struct MacCtxDeleter {
  void operator()(EVP_MAC_CTX* p) const { EVP_MAC_CTX_free(p); }
};
using MacCtxPtr = std::unique_ptr<EVP_MAC_CTX, MacCtxDeleter>;

struct KdfDeleter {
  void operator()(EVP_KDF* p) const { EVP_KDF_free(p); }
};
using KdfPtr = std::unique_ptr<EVP_KDF, KdfDeleter>;

struct KdfCtxDeleter {
  void operator()(EVP_KDF_CTX* p) const { EVP_KDF_CTX_free(p); }
};
using KdfCtxPtr = std::unique_ptr<EVP_KDF_CTX, KdfCtxDeleter>;

}  // namespace custody::jose::internal

#endif  // CUSTODY_JOSE_OPENSSL_HANDLES_H_
