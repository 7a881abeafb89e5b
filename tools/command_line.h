// A strict command line for custodyctl: every command declares its operands and flags, and
// anything else is a usage error that names the offending argument and, for a misspelled flag,
// the closest flag the command knows ("unknown flag --froce for 'ring rotate'; did you mean
// --force?"). Flags are --name=value (or bare --name for a boolean, which also takes =true and
// =false) and may appear anywhere; "--" ends the flags. Help text is generated from the same
// tables, so `custodyctl COMMAND --help` lists exactly the flags the command accepts.
#ifndef CUSTODY_TOOLS_COMMAND_LINE_H_
#define CUSTODY_TOOLS_COMMAND_LINE_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace custody::tools {

enum class FlagKind {
  kBool,      // bare, =true or =false
  kString,    // any non-empty value
  kNumber,    // a decimal unsigned 32-bit number
  kDuration,  // 90d, 12h, 30m, 10s, 500ms, 1h30m, or 0
};

struct FlagSpec {
  std::string name;  // without the leading "--"
  FlagKind kind = FlagKind::kString;
  std::string value;  // placeholder in help, e.g. "D", "N", "FILE"; unused for booleans
  std::string help;
};

struct CommandSpec {
  std::string name;  // one or two words: "health", "ring create"
  // Operand placeholders, in order. The last may be "NAME..." (one or more) or "[NAME...]"
  // (zero or more).
  std::vector<std::string> operands;
  std::vector<FlagSpec> flags;
  bool remote = true;  // talks to custodyd: also takes the connection flags
  std::string summary;
};

struct ParsedCommand {
  const CommandSpec* command = nullptr;
  std::vector<std::string> operands;
  std::map<std::string, std::string> flags;  // booleans as "true" / "false"

  bool Has(const std::string& name) const { return flags.count(name) > 0; }
  std::string Flag(const std::string& name, const std::string& fallback = "") const;
  bool Bool(const std::string& name) const { return Flag(name) == "true"; }
  uint32_t Number(const std::string& name, uint32_t fallback = 0) const;
  int64_t DurationMs(const std::string& name, int64_t fallback = 0) const;
};

struct CommandLine {
  enum class Action { kRun, kHelp, kVersion };
  Action action = Action::kRun;
  ParsedCommand parsed;  // kRun; for kHelp, parsed.command is null for the general help
};

// Parses argv[1..] against `commands` (connection flags in `connection_flags`). INVALID_ARGUMENT
// with the message to print for every usage error.
absl::StatusOr<CommandLine> ParseCommandLine(const std::vector<CommandSpec>& commands,
                                             const std::vector<FlagSpec>& connection_flags,
                                             const std::vector<std::string>& args);

// "custodyctl ring create NAME [flags]" and one line per flag.
std::string CommandHelp(const CommandSpec& command, const std::vector<FlagSpec>& connection_flags);
// Every command's usage line and the connection flags.
std::string GeneralHelp(const std::vector<CommandSpec>& commands,
                        const std::vector<FlagSpec>& connection_flags);

// "90d", "12h", "30m", "10s", "500ms", "1h30m", "0" → milliseconds; -1 when not a duration.
int64_t ParseDurationMs(absl::string_view text);

// Levenshtein distance, '-' and '_' counted as the same character.
size_t FlagDistance(absl::string_view a, absl::string_view b);

}  // namespace custody::tools

#endif  // CUSTODY_TOOLS_COMMAND_LINE_H_
