// custodyctl's commands and flags: the one table its command line is parsed against
// (tools/command_line.h), its --help is printed from and tests/tools/check_cli_docs.py checks
// docs/ against.
#ifndef CUSTODY_TOOLS_CUSTODYCTL_COMMANDS_H_
#define CUSTODY_TOOLS_CUSTODYCTL_COMMANDS_H_

#include <vector>

#include "tools/command_line.h"

namespace custody::tools {

// Every command with its operands and flags.
const std::vector<CommandSpec>& Commands();
// The flags every command takes: where custodyd is and how to reach it.
std::vector<FlagSpec> ConnectionFlags();
// The rotation policy's flags (ring create, ring set-policy).
std::vector<FlagSpec> PolicyFlags();

}  // namespace custody::tools

#endif  // CUSTODY_TOOLS_CUSTODYCTL_COMMANDS_H_
