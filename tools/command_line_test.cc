// The parsing rules of custodyctl's command line on a small command table (the operator
// mistakes against the real custodyctl and custodyd are tests/operator_mistakes_test.cc).
#include "tools/command_line.h"

#include "gtest/gtest.h"

namespace custody::tools {
namespace {

const std::vector<CommandSpec>& Table() {
  static const std::vector<CommandSpec> table = {
      {"ring rotate", {"NAME"}, {{"force", FlagKind::kBool, "", "now"}}, true, "rotate"},
      {"ring create",
       {"NAME"},
       {{"rsa_bits", FlagKind::kNumber, "N", "bits"},
        {"prepublish", FlagKind::kDuration, "D", "before"},
        {"require_certificate", FlagKind::kBool, "", "certs"}},
       true,
       "create"},
      {"jwks", {"[NAME...]"}, {}, true, "keys"},
      {"audit verify", {"FILE..."}, {}, false, "chain"},
  };
  return table;
}

const std::vector<FlagSpec>& Connection() {
  static const std::vector<FlagSpec> flags = {{"addr", FlagKind::kString, "ADDR", "where"}};
  return flags;
}

absl::StatusOr<CommandLine> Parse(std::vector<std::string> args) {
  return ParseCommandLine(Table(), Connection(), args);
}

std::string Error(std::vector<std::string> args) {
  absl::StatusOr<CommandLine> line = Parse(std::move(args));
  return line.ok() ? "ok" : std::string(line.status().message());
}

TEST(CommandLineTest, MisspelledFlagIsNamedWithTheClosestKnownOne) {
  EXPECT_EQ(Error({"ring", "rotate", "r", "--froce"}),
            "unknown flag --froce for 'ring rotate'; did you mean --force?");
  EXPECT_EQ(Error({"ring", "create", "r", "--rsa-bits=4096"}),
            "unknown flag --rsa-bits for 'ring create'; did you mean --rsa_bits?");
  EXPECT_EQ(Error({"ring", "create", "r", "--adr=unix:x"}),
            "unknown flag --adr for 'ring create'; did you mean --addr?");
  EXPECT_EQ(Error({"ring", "create", "r", "--force"}),
            "unknown flag --force for 'ring create' (--force is a flag of 'ring rotate'); "
            "custodyctl ring create --help lists its flags");
}

TEST(CommandLineTest, BooleansTakeBareTrueOrFalse) {
  for (const auto& [arg, value] :
       std::vector<std::pair<std::string, std::string>>{{"--require_certificate", "true"},
                                                        {"--require_certificate=true", "true"},
                                                        {"--require_certificate=false", "false"},
                                                        {"--require_certificate=0", "false"}}) {
    absl::StatusOr<CommandLine> line = Parse({"ring", "create", "r", arg});
    ASSERT_TRUE(line.ok()) << arg << ": " << line.status();
    EXPECT_EQ(line->parsed.Flag("require_certificate"), value) << arg;
    EXPECT_EQ(line->parsed.Bool("require_certificate"), value == "true") << arg;
  }
  EXPECT_EQ(Error({"ring", "rotate", "r", "--force=yes"}),
            "flag --force=yes for 'ring rotate': --force is a boolean: give it bare, =true or "
            "=false");
}

TEST(CommandLineTest, MissingValuesAndBadValuesAreRefused) {
  EXPECT_EQ(Error({"ring", "create", "r", "--rsa_bits"}),
            "flag --rsa_bits for 'ring create' needs a value; write --rsa_bits=N");
  EXPECT_EQ(Error({"ring", "create", "--rsa_bits", "4096", "r"}),
            "flag --rsa_bits for 'ring create' needs a value; write --rsa_bits=4096 (one "
            "argument, with '=')");
  EXPECT_EQ(Error({"--addr", "unix:/s", "ring", "rotate", "r"}),
            "flag --addr needs a value; write --addr=unix:/s (one argument, with '=')");
  EXPECT_EQ(Error({"ring", "create", "r", "--rsa_bits="}),
            "flag --rsa_bits for 'ring create' needs a value; write --rsa_bits=N");
  EXPECT_EQ(Error({"ring", "create", "r", "--rsa_bits=-1"}),
            "flag --rsa_bits='-1' for 'ring create': not a number (a decimal such as 4096)");
  EXPECT_EQ(Error({"ring", "create", "r", "--prepublish=3600"}),
            "flag --prepublish='3600' for 'ring create': not a duration (90d, 12h, 30m, 10s, "
            "500ms, 1h30m or 0)");
  EXPECT_EQ(Error({"ring", "create", "r", "--prepublish=1h", "--prepublish=2h"}),
            "flag --prepublish given twice for 'ring create'");
}

TEST(CommandLineTest, OperandsAreCounted) {
  EXPECT_EQ(Error({"ring", "rotate"}),
            "'ring rotate' needs NAME (usage: custodyctl ring rotate NAME [flags]; custodyctl "
            "ring rotate --help lists them)");
  EXPECT_EQ(Error({"ring", "rotate", "a", "b"}),
            "extra argument 'b' for 'ring rotate' (usage: custodyctl ring rotate NAME [flags]; "
            "custodyctl ring rotate --help lists them)");
  EXPECT_EQ(Error({"jwks"}), "ok");
  EXPECT_EQ(Error({"jwks", "a", "b", "c"}), "ok");
  EXPECT_NE(Error({"audit", "verify"}).find("'audit verify' needs FILE..."), std::string::npos);
  // After "--" everything is an operand, even what looks like a flag.
  absl::StatusOr<CommandLine> line = Parse({"jwks", "--", "--weird"});
  ASSERT_TRUE(line.ok()) << line.status();
  EXPECT_EQ(line->parsed.operands, std::vector<std::string>{"--weird"});
}

TEST(CommandLineTest, CommandsAreResolvedOrTheClosestIsSuggested) {
  EXPECT_EQ(Error({"ring", "roate", "r"}),
            "unknown command 'ring roate'; did you mean 'ring rotate'?");
  EXPECT_EQ(Error({"ring"}), "'ring' needs a subcommand: rotate, create");
  EXPECT_EQ(Error({"rign", "rotate"}), "unknown command 'rign'; did you mean 'ring'?");
  EXPECT_EQ(Error({}), "no command; custodyctl --help lists them");
}

TEST(CommandLineTest, FlagsGoAnywhereAndConnectionFlagsOnlyOnRemoteCommands) {
  absl::StatusOr<CommandLine> line = Parse({"--addr=unix:/s", "ring", "--force", "rotate", "r"});
  ASSERT_TRUE(line.ok()) << line.status();
  EXPECT_EQ(line->parsed.command->name, "ring rotate");
  EXPECT_EQ(line->parsed.Flag("addr"), "unix:/s");
  EXPECT_TRUE(line->parsed.Bool("force"));
  EXPECT_EQ(Error({"audit", "verify", "f", "--addr=x"}),
            "flag --addr does not apply to 'audit verify': it works offline, on local files");
  EXPECT_EQ(Error({"ring", "rotate", "r", "-f"}),
            "unknown flag -f: flags are --name=value (custodyctl --help)");
}

TEST(CommandLineTest, HelpAndVersion) {
  absl::StatusOr<CommandLine> general = Parse({"--help"});
  ASSERT_TRUE(general.ok());
  EXPECT_EQ(general->action, CommandLine::Action::kHelp);
  EXPECT_EQ(general->parsed.command, nullptr);
  absl::StatusOr<CommandLine> one = Parse({"ring", "create", "--help"});
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(one->action, CommandLine::Action::kHelp);
  ASSERT_NE(one->parsed.command, nullptr);
  const std::string help = CommandHelp(*one->parsed.command, Connection());
  EXPECT_NE(help.find("  --rsa_bits=N "), std::string::npos) << help;
  EXPECT_NE(help.find("  --require_certificate "), std::string::npos) << help;
  EXPECT_EQ(help.find("--force"), std::string::npos) << help;
  EXPECT_EQ(Error({"ring", "rotate", "r", "--version"}),
            "unknown flag --version for 'ring rotate'; custodyctl --version (alone) prints the "
            "build");
  absl::StatusOr<CommandLine> version = Parse({"--version"});
  ASSERT_TRUE(version.ok());
  EXPECT_EQ(version->action, CommandLine::Action::kVersion);
}

TEST(CommandLineTest, Durations) {
  EXPECT_EQ(ParseDurationMs("0"), 0);
  EXPECT_EQ(ParseDurationMs("500ms"), 500);
  EXPECT_EQ(ParseDurationMs("1h30m"), 90 * 60 * 1000);
  EXPECT_EQ(ParseDurationMs("30d"), 30LL * 24 * 3600 * 1000);
  EXPECT_EQ(ParseDurationMs("-1h"), -1);
  EXPECT_EQ(ParseDurationMs("10"), -1);
  EXPECT_EQ(ParseDurationMs("1x"), -1);
  EXPECT_EQ(ParseDurationMs("inf"), -1);
}

}  // namespace
}  // namespace custody::tools
