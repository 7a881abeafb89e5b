// The OpenSSL owners used inside custody_jose, by the names its files use (internal; not part
// of the API). Each is common/openssl_ptr.h's OpensslPtr.
#ifndef CUSTODY_JOSE_OPENSSL_HANDLES_H_
#define CUSTODY_JOSE_OPENSSL_HANDLES_H_

#include "custody/common/openssl_ptr.h"

namespace custody::jose::internal {

using BnPtr = OpensslPtr<BIGNUM>;
using ParamBldPtr = OpensslPtr<OSSL_PARAM_BLD>;
using ParamsPtr = OpensslPtr<OSSL_PARAM>;
using PkeyCtxPtr = OpensslPtr<EVP_PKEY_CTX>;
using MdCtxPtr = OpensslPtr<EVP_MD_CTX>;
using MdPtr = OpensslPtr<EVP_MD>;
using EcdsaSigPtr = OpensslPtr<ECDSA_SIG>;
using CipherPtr = OpensslPtr<EVP_CIPHER>;
using CipherCtxPtr = OpensslPtr<EVP_CIPHER_CTX>;
using MacPtr = OpensslPtr<EVP_MAC>;
using MacCtxPtr = OpensslPtr<EVP_MAC_CTX>;
using KdfPtr = OpensslPtr<EVP_KDF>;
using KdfCtxPtr = OpensslPtr<EVP_KDF_CTX>;

}  // namespace custody::jose::internal

#endif  // CUSTODY_JOSE_OPENSSL_HANDLES_H_
