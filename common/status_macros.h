// Status propagation for every layer (Abseil 20220623, Debian 12's, has no public macros for it).
//   CUSTODY_RETURN_IF_ERROR(DoSomething());             // returns the status unless OK
//   CUSTODY_ASSIGN_OR_RETURN(std::string v, Read());     // declares v, or returns the status
//   CUSTODY_ASSIGN_OR_RETURN(existing, Read());          // assigns, or returns the status
// Either works in a function returning absl::Status or any absl::StatusOr<T>.
#ifndef CUSTODY_COMMON_STATUS_MACROS_H_
#define CUSTODY_COMMON_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define CUSTODY_RETURN_IF_ERROR(expr)                  \
  do {                                                 \
    ::absl::Status custody_status_ = (expr);           \
    if (!custody_status_.ok()) return custody_status_; \
  } while (0)

#define CUSTODY_STATUS_CONCAT_INNER_(a, b) a##b
#define CUSTODY_STATUS_CONCAT_(a, b) CUSTODY_STATUS_CONCAT_INNER_(a, b)
#define CUSTODY_ASSIGN_OR_RETURN(lhs, expr) \
  CUSTODY_ASSIGN_OR_RETURN_IMPL_(CUSTODY_STATUS_CONCAT_(custody_statusor_, __LINE__), lhs, expr)
#define CUSTODY_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                   \
  if (!tmp.ok()) return tmp.status();                  \
  lhs = std::move(*tmp)

#endif  // CUSTODY_COMMON_STATUS_MACROS_H_
