// Decoders for key files that hold a custody: URI instead of key material. Applications that
// read private keys with PEM_read_bio_PrivateKey (OpenSSL 3 runs the providers' "input=pem"
// decoders for it) and know no OSSL_STORE URIs — nginx 1.22's ssl_certificate_key — then use a
// custody key by pointing at a file containing `custody:ring=NAME[;version=N][;addr=...]`.
//
// Anything that is not such a file is left to the other decoders (decode returns 1 without an
// object). One decoder per key type, because OpenSSL matches decoders to key management by name:
// each loads the key and hands it over only when it is of its type.
#include <memory>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "openssl/core_names.h"
#include "provider/provider.h"

namespace custody::provider {
namespace {

struct DecoderContext {
  ProviderContext* provider;
};

void* NewDecoder(void* provctx) {
  return new DecoderContext{static_cast<ProviderContext*>(provctx)};
}

void FreeDecoder(void* vctx) { delete static_cast<DecoderContext*>(vctx); }

int DoesSelection(void*, int selection) {
  // Private keys (what a key file is read for), or a whole key pair.
  return selection == 0 || (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0 ||
                 (selection & OSSL_KEYMGMT_SELECT_KEYPAIR) != 0
             ? 1
             : 0;
}

template <const char* kType>
int Decode(void* vctx, OSSL_CORE_BIO* in, int, OSSL_CALLBACK* data_cb, void* data_cbarg,
           OSSL_PASSPHRASE_CALLBACK*, void*) {
  auto* ctx = static_cast<DecoderContext*>(vctx);
  std::string content;
  if (!ctx->provider->ReadAll(in, 4096, &content)) return 1;
  const std::string uri(absl::StripAsciiWhitespace(content));
  // Not ours (a PEM or DER key, something else): let the other decoders try.
  if (!absl::StartsWith(uri, "custody:") || uri.find('\n') != std::string::npos) return 1;
  auto key = LoadCustodyKey(ctx->provider, uri, "decode");
  if (!key.ok()) return 0;  // a custody key file whose key cannot be loaded: the reason is raised
  if (key->type != kType) return 1;  // another type's decoder hands it over
  return PassKey(*key, data_cb, data_cbarg);
}

constexpr char kEc[] = "EC";
constexpr char kRsa[] = "RSA";
constexpr char kEd25519[] = "ED25519";

#define CUSTODY_FN(id, fn) \
  { id, reinterpret_cast<void (*)()>(fn) }
#define CUSTODY_DECODER(kType)                                       \
  {                                                                  \
    CUSTODY_FN(OSSL_FUNC_DECODER_NEWCTX, NewDecoder),                \
        CUSTODY_FN(OSSL_FUNC_DECODER_FREECTX, FreeDecoder),          \
        CUSTODY_FN(OSSL_FUNC_DECODER_DOES_SELECTION, DoesSelection), \
        CUSTODY_FN(OSSL_FUNC_DECODER_DECODE, Decode<kType>), {       \
      0, nullptr                                                     \
    }                                                                \
  }

}  // namespace

const OSSL_DISPATCH kEcDecoder[] = CUSTODY_DECODER(kEc);
const OSSL_DISPATCH kRsaDecoder[] = CUSTODY_DECODER(kRsa);
const OSSL_DISPATCH kEd25519Decoder[] = CUSTODY_DECODER(kEd25519);

}  // namespace custody::provider
