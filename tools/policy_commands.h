// custodyctl policy check / policy explain: the access policy (server/security/access_policy.h)
// read offline from a file, as custodyd reads it, so that a policy can be checked before SIGHUP.
#ifndef CUSTODY_TOOLS_POLICY_COMMANDS_H_
#define CUSTODY_TOOLS_POLICY_COMMANDS_H_

#include <string>

namespace custody::tools {

// Prints {"ok":true,"file":F,"grants":N,"warnings":[...]} and returns 0, or
// {"ok":false,"file":F,"error":"grants[0].identities[0]: ..."} and returns 1.
int PolicyCheck(const std::string& file);

// Prints {"allowed":B,"file":F,"grant":"grants[N]","explanation":[...]} and returns 0 when
// allowed, 1 when denied or the file cannot be loaded, 2 for an operation custody does not know.
int PolicyExplain(const std::string& file, const std::string& identity,
                  const std::string& operation, const std::string& ring);

}  // namespace custody::tools

#endif  // CUSTODY_TOOLS_POLICY_COMMANDS_H_
