// OSSL_PARAM descriptor tables (what a provider's gettable and settable functions return),
// built at compile time from named groups, so that a parameter several tables share is listed
// once and each table reads as the groups it is made of.
#ifndef CUSTODY_PROVIDER_PARAM_TABLE_H_
#define CUSTODY_PROVIDER_PARAM_TABLE_H_

#include <array>
#include <cstddef>

#include "openssl/core.h"
#include "openssl/params.h"

namespace custody::provider {

template <size_t N>
using ParamGroup = std::array<OSSL_PARAM, N>;

// The descriptor of a parameter by its key and type (no data: these tables only describe).
constexpr OSSL_PARAM Int(const char* key) { return OSSL_PARAM_int(key, nullptr); }
constexpr OSSL_PARAM Utf8(const char* key) { return OSSL_PARAM_utf8_string(key, nullptr, 0); }
constexpr OSSL_PARAM Octets(const char* key) { return OSSL_PARAM_octet_string(key, nullptr, 0); }
constexpr OSSL_PARAM BigNum(const char* key) { return OSSL_PARAM_BN(key, nullptr, 0); }

// The descriptors of each group in order, then OSSL_PARAM_END. Use as
//   static constexpr auto kTable = ParamTable(kGroupA, kGroupB);  return kTable.data();
template <size_t... N>
constexpr std::array<OSSL_PARAM, (N + ... + 0) + 1> ParamTable(const ParamGroup<N>&... groups) {
  std::array<OSSL_PARAM, (N + ... + 0) + 1> table{};  // the last stays zero: OSSL_PARAM_END
  size_t i = 0;
  [[maybe_unused]] auto append = [&](const auto& group) {
    for (const OSSL_PARAM& p : group) table[i++] = p;
  };
  (append(groups), ...);
  return table;
}

}  // namespace custody::provider

#endif  // CUSTODY_PROVIDER_PARAM_TABLE_H_
