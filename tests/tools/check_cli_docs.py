#!/usr/bin/python3
"""docs/ and --help agree with the binaries.

usage: check_cli_docs.py SOURCE_DIR CUSTODYD CUSTODYCTL

- Every custodyctl command of `custodyctl --help` lists its flags in `custodyctl COMMAND --help`,
  and each listed flag is accepted by the parser (never "unknown flag").
- Every `custodyctl ...` invocation in docs/*.md and README.md (code blocks, and inline code
  spans, which may wrap lines) names a real command and only flags that command accepts.
- Every flag a custodyctl command accepts is shown with that command in the docs, and every
  connection flag is described in docs/operating.md.
- Every `custodyd ...` invocation in the docs uses custodyd's flags only, and every custodyd flag
  (`custodyd --help`) is mentioned in the docs.
"""
import glob
import os
import re
import subprocess
import sys

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)


def run(argv, stdin=""):
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)


def commands_of(ctl):
    out = run([ctl, "--help"])
    check(out.returncode == 0, "custodyctl --help exits 0")
    commands, section = [], None
    for line in out.stdout.splitlines():
        if not line.startswith(" "):
            section = line
            continue
        if section == "commands:":
            words = []
            for w in re.split(r"\s{2,}", line.strip())[0].split():
                if not re.fullmatch(r"[a-z][a-z-]*", w):
                    break
                words.append(w)
            commands.append(" ".join(words))
    return commands, set(re.findall(r"^  --([a-z0-9_]+)", out.stdout, re.M))


def flags_of(ctl, command):
    out = run([ctl] + command.split() + ["--help"])
    check(out.returncode == 0, f"custodyctl {command} --help exits 0")
    own, connection, section = {}, {}, None
    for line in out.stdout.splitlines():
        if not line.startswith(" "):
            section = line
            continue
        m = re.match(r"^  --([a-z0-9_]+)(=\S+)?", line)
        if m:
            (own if section == "flags:" else connection)[m.group(1)] = m.group(2) is None
    operands = out.stdout.splitlines()[0].split()[2 + len(command.split()):]
    return own, connection, [o for o in operands if o != "[flags]"]


def accepted_by_parser(ctl, command, operands, flag, boolean):
    # Dummy operands; an unreachable server, so a remote command fails with exit 1 at worst.
    args = [ctl] + command.split()
    for o in operands:
        if o.startswith("["):
            continue
        args.append("1" if o == "VERSION" else "/nonexistent/x")
    args.append(f"--{flag}" if boolean else f"--{flag}=1")
    if flag != "addr" and "addr" not in args and command not in NO_ADDR:
        args.append("--addr=unix:/nonexistent/custodyd.sock")
    out = run(args)
    return "unknown flag" not in out.stderr and "needs a value" not in out.stderr, out.stderr


NO_ADDR = {"audit verify", "policy check", "policy explain"}


def doc_texts(source):
    files = sorted(glob.glob(os.path.join(source, "docs", "*.md"))) + [
        os.path.join(source, "README.md")]
    for path in files:
        with open(path) as f:
            yield os.path.relpath(path, source), f.read()


def invocations(text, program):
    """The text after each `program` in code blocks (continuation lines joined) and code spans."""
    found = []
    blocks = re.split(r"^```[a-z]*\n", text, flags=re.M)
    for i, part in enumerate(blocks):
        if i % 2 == 1:  # a fenced block
            logical = []
            for line in part.splitlines():
                line = line.split(" #")[0]
                if logical and (line.startswith(" ") or line.startswith("[")):
                    logical[-1] += " " + line.strip()
                else:
                    logical.append(line)
            for line in logical:
                # At the start of a command line (after a path or a pipe), not in a diagram.
                m = re.match(r"^\s*(?:.*\|\s*)?(?:\$\s+)?(?:\S*/)?" + program + r"((?:\s+\S+)*)", line)
                if m:
                    found.append(m.group(1))
        else:
            prose = part.replace("\n", " ")
            for span in re.findall(r"`([^`]+)`", prose):
                m = re.match(r"^(?:.*\|\s*)?(?:\S*/)?" + program + r"((?:\s+\S+)*)", span)
                if m:
                    found.append(m.group(1))
    # Stop at what is not this program's any more (a pipe, a chained command).
    # ("--jwk_file=F | --pem_file=F" is one command's alternatives, not a pipe).
    return [re.split(r"\s(?:\|(?!\s*\[?--)|&&|;|>)", f)[0] for f in found]


def main():
    source, custodyd, ctl = sys.argv[1:4]
    commands, general_flags = commands_of(ctl)
    check(len(commands) >= 15, f"custodyctl --help lists {len(commands)} commands")
    accepted = {}
    connection_flags = {}
    for command in commands:
        own, connection, operands = flags_of(ctl, command)
        accepted[command] = set(own) | set(connection)
        connection_flags.update(connection)
        for flag, boolean in list(own.items()) + list(connection.items()):
            ok, err = accepted_by_parser(ctl, command, operands, flag, boolean)
            check(ok, f"custodyctl {command} --help lists --{flag} but the parser refuses it: {err}")
    check(set(connection_flags) <= general_flags,
          "custodyctl --help does not list every connection flag")

    documented = {c: set() for c in commands}
    all_docs = ""
    operating = ""
    for name, text in doc_texts(source):
        all_docs += text
        if name == "docs/operating.md":
            operating = text
        for inv in invocations(text, "custodyctl"):
            words = [w for w in inv.split() if not w.lstrip("[").startswith("--")]
            flags = set(re.findall(r"--([a-z][a-z0-9_-]*)", inv))
            if not words or words[0].isupper():
                continue  # `custodyctl --help`, `custodyctl --version`, `custodyctl COMMAND --help`
            # "version disable|enable|destroy NAME VERSION": each alternative is a command.
            named = []
            for alt in words[1].split("|") if len(words) > 1 else [""]:
                two = f"{words[0]} {alt}"
                named.append(two if two in accepted else words[0])
            for command in named:
                if command not in accepted:
                    check(False, f"{name}: `custodyctl {inv.strip()}`: no command '{command}'")
                    continue
                for flag in flags - {"help"}:
                    check(flag in accepted[command],
                          f"{name}: `custodyctl {inv.strip()}`: '{command}' has no flag --{flag}")
                documented[command] |= flags
        for inv in invocations(text, "custodyd"):
            for flag in set(re.findall(r"--([a-z][a-z0-9_-]*)", inv)) - {"help", "version"}:
                daemon_flags = daemon_flag_set(custodyd)
                check(flag in daemon_flags, f"{name}: `custodyd{inv}`: custodyd has no flag --{flag}")

    for command, flags in accepted.items():
        for flag in sorted(flags - set(connection_flags)):
            check(flag in documented[command],
                  f"custodyctl {command} --{flag} is not shown with '{command}' in docs/")
    for flag in connection_flags:
        check(f"--{flag}" in operating, f"custodyctl --{flag} is not described in docs/operating.md")
    for flag in sorted(daemon_flag_set(custodyd)):
        check(f"--{flag}" in all_docs, f"custodyd --{flag} is not mentioned in docs/")


_daemon_flags = None


def daemon_flag_set(custodyd):
    global _daemon_flags
    if _daemon_flags is None:
        out = run([custodyd, "--help"])
        check(out.returncode == 0, "custodyd --help exits 0")
        _daemon_flags = set(re.findall(r"^  --([a-z0-9_]+)", out.stdout, re.M))
        check(len(_daemon_flags) >= 20, f"custodyd --help lists {len(_daemon_flags)} flags")
    return _daemon_flags


if __name__ == "__main__":
    main()
    for f in failures:
        print("FAIL:", f)
    print(f"{'0 failed' if not failures else str(len(failures)) + ' failed'}")
    sys.exit(1 if failures else 0)
