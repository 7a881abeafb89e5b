#include "tools/command_line.h"

#include <algorithm>
#include <limits>
#include <optional>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"

namespace custody::tools {
namespace {

struct FlagToken {
  std::string text;  // as given, for messages
  std::string name;
  std::optional<std::string> value;  // after '=', when there was one
  std::string next;                  // the argument after it (for the "--typ JWT" hint)
};

absl::Status UsageError(absl::string_view message) { return absl::InvalidArgumentError(message); }

const FlagSpec* FindFlag(const std::vector<FlagSpec>& flags, absl::string_view name) {
  for (const FlagSpec& f : flags) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

// The closest of `candidates` to `name`, or "" when none is close enough to be a likely typo.
std::string Closest(absl::string_view name, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_distance = std::numeric_limits<size_t>::max();
  for (const std::string& c : candidates) {
    size_t d = FlagDistance(name, c);
    // A prefix ("--rotation" for "--rotation_period") or a longer word ("--address" for
    // "--addr") is as good as one typo.
    if ((name.size() >= 3 && absl::StartsWith(c, name)) ||
        (c.size() >= 3 && absl::StartsWith(name, c))) {
      d = std::min<size_t>(d, 1);
    }
    if (d < best_distance) {
      best_distance = d;
      best = c;
    }
  }
  size_t limit = std::max<size_t>(2, name.size() / 3);
  return best_distance <= limit ? best : "";
}

std::string Placeholder(const FlagSpec& flag) {
  if (flag.kind == FlagKind::kBool) return absl::StrCat("--", flag.name);
  return absl::StrCat("--", flag.name, "=", flag.value.empty() ? "VALUE" : flag.value);
}

std::string Usage(const CommandSpec& command) {
  std::string line = absl::StrCat("custodyctl ", command.name);
  for (const std::string& operand : command.operands) absl::StrAppend(&line, " ", operand);
  return line;
}

std::string UsageHint(const CommandSpec& command) {
  return absl::StrCat(" (usage: ", Usage(command), " [flags]; custodyctl ", command.name,
                      " --help lists them)");
}

absl::Status CheckOperands(const CommandSpec& command, const std::vector<std::string>& operands) {
  size_t required = command.operands.size();
  bool variadic = false;
  if (!command.operands.empty()) {
    const std::string& last = command.operands.back();
    if (absl::EndsWith(last, "...") || absl::EndsWith(last, "...]")) {
      variadic = true;
      if (last.front() == '[') --required;
    }
  }
  if (operands.size() < required) {
    return UsageError(absl::StrCat("'", command.name, "' needs ",
                                   command.operands[std::min(operands.size(), required - 1)],
                                   UsageHint(command)));
  }
  if (!variadic && operands.size() > required) {
    return UsageError(absl::StrCat("extra argument '", operands[required], "' for '", command.name,
                                   "'", UsageHint(command)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> FlagValue(const CommandSpec& command, const FlagSpec& spec,
                                      const FlagToken& token) {
  const std::string where = absl::StrCat(" for '", command.name, "'");
  if (spec.kind == FlagKind::kBool) {
    if (!token.value.has_value()) return std::string("true");
    std::string v = absl::AsciiStrToLower(*token.value);
    if (v == "true" || v == "1") return std::string("true");
    if (v == "false" || v == "0") return std::string("false");
    return UsageError(absl::StrCat("flag ", token.text, where, ": --", spec.name,
                                   " is a boolean: give it bare, =true or =false"));
  }
  if (!token.value.has_value() || token.value->empty()) {
    std::string hint;
    if (!token.value.has_value() && !token.next.empty() && token.next[0] != '-') {
      hint = absl::StrCat("; write --", spec.name, "=", token.next, " (one argument, with '=')");
    } else {
      hint = absl::StrCat("; write ", Placeholder(spec));
    }
    return UsageError(absl::StrCat("flag --", spec.name, where, " needs a value", hint));
  }
  const std::string& v = *token.value;
  if (spec.kind == FlagKind::kNumber) {
    uint32_t n = 0;
    if (!absl::SimpleAtoi(v, &n) || v.find_first_not_of("0123456789") != std::string::npos) {
      return UsageError(absl::StrCat("flag --", spec.name, "='", v, "'", where,
                                     ": not a number (a decimal such as 4096)"));
    }
  }
  if (spec.kind == FlagKind::kDuration && ParseDurationMs(v) < 0) {
    return UsageError(absl::StrCat("flag --", spec.name, "='", v, "'", where,
                                   ": not a duration (90d, 12h, 30m, 10s, 500ms, 1h30m or 0)"));
  }
  return v;
}

absl::Status UnknownFlag(const std::vector<CommandSpec>& commands, const CommandSpec& command,
                         const std::vector<FlagSpec>& connection_flags, const FlagToken& token) {
  std::vector<std::string> known;
  for (const FlagSpec& f : command.flags) known.push_back(f.name);
  if (command.remote) {
    for (const FlagSpec& f : connection_flags) known.push_back(f.name);
  }
  std::string message = absl::StrCat("unknown flag ", token.text.substr(0, token.text.find('=')),
                                     " for '", command.name, "'");
  if (token.name == "version" && !token.value.has_value()) {
    return UsageError(absl::StrCat(message, "; custodyctl --version (alone) prints the build"));
  }
  if (std::string close = Closest(token.name, known); !close.empty()) {
    return UsageError(absl::StrCat(message, "; did you mean --", close, "?"));
  }
  for (const CommandSpec& other : commands) {
    if (FindFlag(other.flags, token.name) != nullptr) {
      return UsageError(absl::StrCat(message, " (--", token.name, " is a flag of '", other.name,
                                     "'); custodyctl ", command.name, " --help lists its flags"));
    }
  }
  return UsageError(
      absl::StrCat(message, "; custodyctl ", command.name, " --help lists its flags"));
}

// Finds the command named by the first one or two operands; the rest stay in `operands`.
absl::StatusOr<const CommandSpec*> ResolveCommand(const std::vector<CommandSpec>& commands,
                                                  std::vector<std::string>* operands) {
  const std::vector<std::string>& p = *operands;
  if (p.size() >= 2) {
    const std::string two = absl::StrCat(p[0], " ", p[1]);
    for (const CommandSpec& c : commands) {
      if (c.name == two) {
        operands->erase(operands->begin(), operands->begin() + 2);
        return &c;
      }
    }
  }
  for (const CommandSpec& c : commands) {
    if (c.name == p[0]) {
      operands->erase(operands->begin());
      return &c;
    }
  }
  // A group ("ring", "version") with a missing or misspelled subcommand, or a misspelled command.
  std::vector<std::string> in_group, names;
  for (const CommandSpec& c : commands) {
    names.push_back(c.name.substr(0, c.name.find(' ')));  // "ring" for "ring create"
    if (absl::StartsWith(c.name, p[0] + " ")) in_group.push_back(c.name.substr(p[0].size() + 1));
  }
  if (!in_group.empty()) {
    if (p.size() == 1) {
      return UsageError(
          absl::StrCat("'", p[0], "' needs a subcommand: ", absl::StrJoin(in_group, ", ")));
    }
    std::string close = Closest(p[1], in_group);
    return UsageError(absl::StrCat(
        "unknown command '", p[0], " ", p[1], "'",
        close.empty() ? absl::StrCat("; ", p[0], " takes ", absl::StrJoin(in_group, ", "))
                      : absl::StrCat("; did you mean '", p[0], " ", close, "'?")));
  }
  std::string close = Closest(p[0], names);
  return UsageError(absl::StrCat("unknown command '", p[0], "'",
                                 close.empty() ? "; custodyctl --help lists the commands"
                                               : absl::StrCat("; did you mean '", close, "'?")));
}

void AppendFlagLines(std::string* out, const std::vector<FlagSpec>& flags) {
  size_t width = 0;
  for (const FlagSpec& f : flags) width = std::max(width, Placeholder(f).size());
  for (const FlagSpec& f : flags) {
    std::string p = Placeholder(f);
    absl::StrAppend(out, "  ", p, std::string(width - p.size() + 2, ' '), f.help, "\n");
  }
}

}  // namespace

std::string ParsedCommand::Flag(const std::string& name, const std::string& fallback) const {
  auto it = flags.find(name);
  return it == flags.end() ? fallback : it->second;
}

uint32_t ParsedCommand::Number(const std::string& name, uint32_t fallback) const {
  uint32_t n = fallback;
  if (Has(name) && !absl::SimpleAtoi(Flag(name), &n)) return fallback;
  return n;
}

int64_t ParsedCommand::DurationMs(const std::string& name, int64_t fallback) const {
  if (!Has(name)) return fallback;
  int64_t ms = ParseDurationMs(Flag(name));
  return ms < 0 ? fallback : ms;
}

int64_t ParseDurationMs(absl::string_view text) {
  if (text == "0") return 0;
  if (text.size() > 1 && text.back() == 'd') {
    int64_t days = 0;
    if (!absl::SimpleAtoi(text.substr(0, text.size() - 1), &days) || days < 0 || days > 100 * 365) {
      return -1;
    }
    return days * 24 * 3600 * 1000;
  }
  absl::Duration d;
  if (!absl::ParseDuration(text, &d) || d < absl::ZeroDuration() || d == absl::InfiniteDuration()) {
    return -1;
  }
  return absl::ToInt64Milliseconds(d);
}

size_t FlagDistance(absl::string_view a, absl::string_view b) {
  auto same = [](char x, char y) {
    if (x == '-') x = '_';
    if (y == '-') y = '_';
    return absl::ascii_tolower(static_cast<unsigned char>(x)) ==
           absl::ascii_tolower(static_cast<unsigned char>(y));
  };
  // Optimal string alignment: insertions, deletions, substitutions and transpositions of two
  // adjacent characters ("froce" is one step from "force") each cost one.
  std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    for (size_t j = 1; j <= b.size(); ++j) {
      d[i][j] = std::min(
          {d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (same(a[i - 1], b[j - 1]) ? 0 : 1)});
      if (i > 1 && j > 1 && same(a[i - 1], b[j - 2]) && same(a[i - 2], b[j - 1])) {
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
      }
    }
  }
  return d[a.size()][b.size()];
}

absl::StatusOr<CommandLine> ParseCommandLine(const std::vector<CommandSpec>& commands,
                                             const std::vector<FlagSpec>& connection_flags,
                                             const std::vector<std::string>& args) {
  std::vector<FlagToken> tokens;
  std::vector<std::string> operands;
  bool help = false, flags_ended = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (flags_ended || a == "-" || a.empty() || a[0] != '-') {
      operands.push_back(a);
    } else if (a == "--") {
      flags_ended = true;
    } else if (a == "--help" || a == "-h" || a == "-help") {
      help = true;
    } else if (absl::StartsWith(a, "--") && a.size() > 2 && a[2] != '=') {
      FlagToken t;
      t.text = a;
      size_t eq = a.find('=');
      t.name = a.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
      if (eq != std::string::npos) t.value = a.substr(eq + 1);
      if (i + 1 < args.size()) t.next = args[i + 1];
      tokens.push_back(std::move(t));
    } else {
      return UsageError(absl::StrCat("unknown flag ", a.substr(0, a.find('=')),
                                     ": flags are --name=value (custodyctl --help)"));
    }
  }
  CommandLine line;
  if (operands.empty()) {
    if (help) {
      line.action = CommandLine::Action::kHelp;
      return line;
    }
    if (tokens.size() == 1 && tokens[0].name == "version" && !tokens[0].value.has_value()) {
      line.action = CommandLine::Action::kVersion;
      return line;
    }
    return UsageError("no command; custodyctl --help lists them");
  }
  absl::StatusOr<const CommandSpec*> command = ResolveCommand(commands, &operands);
  if (!command.ok()) {
    // "--addr unix:/x ring list": the value taken for a command.
    for (const FlagToken& token : tokens) {
      if (token.value.has_value() || token.next != operands.front()) continue;
      const FlagSpec* flag = FindFlag(connection_flags, token.name);
      for (const CommandSpec& c : commands) {
        if (flag == nullptr) flag = FindFlag(c.flags, token.name);
      }
      if (flag != nullptr && flag->kind != FlagKind::kBool) {
        return UsageError(absl::StrCat("flag --", flag->name, " needs a value; write --",
                                       flag->name, "=", token.next, " (one argument, with '=')"));
      }
    }
    return command.status();
  }
  const CommandSpec& spec = **command;
  line.parsed.command = &spec;
  if (help) {
    line.action = CommandLine::Action::kHelp;
    return line;
  }
  for (const FlagToken& token : tokens) {
    const FlagSpec* flag = FindFlag(spec.flags, token.name);
    if (flag == nullptr) {
      flag = FindFlag(connection_flags, token.name);
      if (flag != nullptr && !spec.remote) {
        return UsageError(absl::StrCat("flag --", token.name, " does not apply to '", spec.name,
                                       "': it works offline, on local files"));
      }
    }
    if (flag == nullptr) return UnknownFlag(commands, spec, connection_flags, token);
    if (line.parsed.Has(flag->name)) {
      return UsageError(absl::StrCat("flag --", flag->name, " given twice for '", spec.name, "'"));
    }
    absl::StatusOr<std::string> value = FlagValue(spec, *flag, token);
    if (!value.ok()) return value.status();
    line.parsed.flags[flag->name] = *std::move(value);
  }
  if (absl::Status s = CheckOperands(spec, operands); !s.ok()) return s;
  line.parsed.operands = std::move(operands);
  return line;
}

std::string CommandHelp(const CommandSpec& command, const std::vector<FlagSpec>& connection_flags) {
  std::string out = absl::StrCat("usage: ", Usage(command), command.flags.empty() ? "" : " [flags]",
                                 "\n  ", command.summary, "\n");
  if (!command.flags.empty()) {
    out += "flags:\n";
    AppendFlagLines(&out, command.flags);
  }
  if (command.remote) {
    out += "connection flags:\n";
    AppendFlagLines(&out, connection_flags);
  } else {
    out += "offline: reads local files, takes no connection flags\n";
  }
  return out;
}

std::string GeneralHelp(const std::vector<CommandSpec>& commands,
                        const std::vector<FlagSpec>& connection_flags) {
  std::string out = "usage: custodyctl COMMAND [OPERANDS] [--flag=value ...]\ncommands:\n";
  size_t width = 0;
  for (const CommandSpec& c : commands) width = std::max(width, Usage(c).size() - 11);
  for (const CommandSpec& c : commands) {
    std::string u = Usage(c).substr(11);  // without "custodyctl "
    absl::StrAppend(&out, "  ", u, std::string(width - u.size() + 2, ' '), c.summary, "\n");
  }
  out += "connection flags (commands that talk to custodyd):\n";
  AppendFlagLines(&out, connection_flags);
  out +=
      "custodyctl COMMAND --help lists the flags of one command; custodyctl --version.\n"
      "Durations D: 90d, 12h, 30m, 10s, 500ms, 1h30m, 0. Booleans: --flag, --flag=true, "
      "--flag=false.\n"
      "Exit status: 0 ok, 1 the call failed (gRPC code and message on stderr), 2 usage error.\n";
  return out;
}

}  // namespace custody::tools
