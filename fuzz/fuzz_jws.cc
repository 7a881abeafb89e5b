// libFuzzer target: compact JWS verification (jose::VerifyCompactJws) with a fixed P-256 key and
// every algorithm allowed, plus the pieces it is built from (JSON, alg names, ECDSA signature
// conversions). The seed corpus holds JWSs that verify with this key (fuzz/make_corpus.py).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "jose/json.h"
#include "jose/jwk.h"
#include "jose/jws.h"

namespace {

using custody::jose::JwsAlg;

const EVP_PKEY* FixedKey() {
  static const custody::jose::PkeyPtr key = [] {
    absl::StatusOr<custody::jose::Json> jwk = custody::jose::ParseJson(
        R"({"kty":"EC","crv":"P-256","x":"YmM9da5SozL-6iMrXxBAmy_Bt_6ZjajzAK8GTwePDhw",)"
        R"("y":"wOrBwYQXdl9hwqtZDZeuDEcdD3P_GfZEEFWAJEeTqGc"})");
    if (!jwk.ok()) std::abort();
    absl::StatusOr<custody::jose::PkeyPtr> pkey = custody::jose::PkeyFromPublicJwk(*jwk);
    if (!pkey.ok()) std::abort();
    return *std::move(pkey);
  }();
  return key.get();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  static const std::vector<JwsAlg> kAllAlgs = {JwsAlg::kES256, JwsAlg::kES384, JwsAlg::kES512,
                                               JwsAlg::kPS256, JwsAlg::kPS384, JwsAlg::kPS512,
                                               JwsAlg::kRS256, JwsAlg::kEdDSA};
  absl::StatusOr<custody::jose::VerifiedJws> verified =
      custody::jose::VerifyCompactJws(input, FixedKey(), kAllAlgs);
  if (verified.ok()) {
    // A verified header is an object naming an ES256 alg: the only one this key can verify.
    const custody::jose::Json* alg = verified->header.Find("alg");
    if (alg == nullptr || alg->as_string() != "ES256") std::abort();
  }

  (void)custody::jose::ParseJwsAlg(input);
  // Round trip: whatever DER parses to r||s must come back to the same r||s.
  absl::StatusOr<std::string> raw = custody::jose::EcdsaDerToRaw(input, 32);
  if (raw.ok()) {
    absl::StatusOr<std::string> der = custody::jose::EcdsaRawToDer(*raw);
    if (!der.ok()) std::abort();
    absl::StatusOr<std::string> again = custody::jose::EcdsaDerToRaw(*der, 32);
    if (!again.ok() || *again != *raw) std::abort();
  }
  (void)custody::jose::EcdsaRawToDer(input);
  return 0;
}
