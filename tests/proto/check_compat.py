#!/usr/bin/python3
"""The custody.v1 versioning rule: fields, enum values, messages and RPCs are only added.

Builds the descriptor set of the proto as it is now (protoc --descriptor_set_out
--include_imports) and compares it with the committed v1 baseline, a text FileDescriptorSet
(proto/custody/v1/baseline.txtpb). Fails, listing every violation, on a removed message, enum,
enum value, field, service or RPC; a field whose number, type, message/enum type, cardinality
(repeated/singular) or oneof changed; an enum value renumbered; an RPC whose request, response or
streaming changed; a changed package or language option. Anything added passes (and is listed).

  check_compat.py --protoc PROTOC --proto_path DIR --proto custody/v1/custody.proto \\
      --baseline proto/custody/v1/baseline.txtpb [--write]

--write regenerates the baseline from the proto (only when a new major version, custody.v2,
starts: v1's baseline is never rewritten).
"""

import argparse
import subprocess
import sys
import tempfile

from google.protobuf import descriptor_pb2, text_format

FIELD_TYPE = {v: k for k, v in descriptor_pb2.FieldDescriptorProto.Type.items()}
FIELD_LABEL = {v: k for k, v in descriptor_pb2.FieldDescriptorProto.Label.items()}
FILE_OPTIONS = ("go_package", "java_package", "java_multiple_files", "java_outer_classname",
                "csharp_namespace")


def build(protoc, proto_path, proto):
    with tempfile.NamedTemporaryFile(suffix=".binpb") as out:
        subprocess.run([protoc, "--proto_path=" + proto_path, "--descriptor_set_out=" + out.name,
                        "--include_imports", proto], check=True)
        fds = descriptor_pb2.FileDescriptorSet()
        fds.ParseFromString(out.read())
        return fds


def field_shape(f, oneofs):
    oneof = oneofs[f.oneof_index] if f.HasField("oneof_index") else ""
    if f.proto3_optional:
        oneof = ""  # a synthetic oneof: presence, not a choice
    return {
        "name": f.name,
        "type": FIELD_TYPE[f.type],
        "type_name": f.type_name,
        "label": FIELD_LABEL[f.label],
        "oneof": oneof,
    }


class Compare:
    def __init__(self):
        self.errors = []
        self.added = []

    def matched(self, kind, prefix, old_list, new_list):
        """(full name, old, new) for each `kind` kept by name; records removals and additions."""
        new_by_name = {x.name: x for x in new_list}
        old_names = {x.name for x in old_list}
        self.added += [f"{kind} {prefix}{x.name}" for x in new_list if x.name not in old_names]
        for old in old_list:
            new = new_by_name.get(old.name)
            if new is None:
                self.errors.append(f"{kind} {prefix}{old.name} was removed")
            else:
                yield prefix + old.name, old, new

    def messages(self, prefix, old_list, new_list):
        for name, old, new in self.matched("message", prefix, old_list, new_list):
            old_oneofs = [o.name for o in old.oneof_decl]
            new_oneofs = [o.name for o in new.oneof_decl]
            new_fields = {f.number: f for f in new.field}
            for f in old.field:
                n = new_fields.get(f.number)
                if n is None:
                    by_name = [x for x in new.field if x.name == f.name]
                    if by_name:
                        self.errors.append(f"field {name}.{f.name} was renumbered "
                                           f"{f.number} -> {by_name[0].number}")
                    else:
                        self.errors.append(f"field {name}.{f.name} = {f.number} was removed")
                    continue
                a, b = field_shape(f, old_oneofs), field_shape(n, new_oneofs)
                for key in ("name", "type", "type_name", "label", "oneof"):
                    if a[key] != b[key]:
                        self.errors.append(f"field {name}.{f.name} = {f.number}: {key} changed "
                                           f"{a[key] or '(none)'} -> {b[key] or '(none)'}")
            old_numbers = {f.number for f in old.field}
            for f in new.field:
                if f.number not in old_numbers:
                    self.added.append(f"field {name}.{f.name} = {f.number}")
            self.messages(name + ".", list(old.nested_type), list(new.nested_type))
            self.enums(name + ".", list(old.enum_type), list(new.enum_type))

    def enums(self, prefix, old_list, new_list):
        for name, old, new in self.matched("enum", prefix, old_list, new_list):
            values = {v.name: v.number for v in new.value}
            for v in old.value:
                if v.name not in values:
                    self.errors.append(f"enum value {name}.{v.name} = {v.number} was removed")
                elif values[v.name] != v.number:
                    self.errors.append(f"enum value {name}.{v.name} was renumbered "
                                       f"{v.number} -> {values[v.name]}")
            old_names = {v.name for v in old.value}
            self.added += [f"enum value {name}.{v.name}" for v in new.value if v.name not in old_names]

    def services(self, prefix, old_list, new_list):
        for name, old, new in self.matched("service", prefix, old_list, new_list):
            for _, m, n in self.matched("rpc", name + ".", list(old.method), list(new.method)):
                for key in ("input_type", "output_type", "client_streaming", "server_streaming"):
                    if getattr(m, key) != getattr(n, key):
                        self.errors.append(f"rpc {name}.{m.name}: {key} changed "
                                           f"{getattr(m, key)} -> {getattr(n, key)}")

    def files(self, old_set, new_set):
        new_files = {f.name: f for f in new_set.file}
        for old in old_set.file:
            new = new_files.get(old.name)
            if new is None:
                self.errors.append(f"file {old.name} was removed")
                continue
            if old.package != new.package:
                self.errors.append(f"file {old.name}: package changed {old.package} -> "
                                   f"{new.package}")
            for option in FILE_OPTIONS:
                if getattr(old.options, option) != getattr(new.options, option):
                    self.errors.append(f"file {old.name}: option {option} changed")
            prefix = old.package + "."
            self.messages(prefix, list(old.message_type), list(new.message_type))
            self.enums(prefix, list(old.enum_type), list(new.enum_type))
            self.services(prefix, list(old.service), list(new.service))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protoc", required=True)
    parser.add_argument("--proto_path", required=True)
    parser.add_argument("--proto", required=True)
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    current = build(args.protoc, args.proto_path, args.proto)
    # Comments and source positions are not part of the contract.
    for f in current.file:
        f.ClearField("source_code_info")
    if args.write:
        with open(args.baseline, "w") as out:
            out.write("# custody.v1 baseline: the descriptor set every later v1 must stay\n"
                      "# compatible with (tests/proto/check_compat.py). Never edited by hand.\n")
            out.write(text_format.MessageToString(current))
        return 0
    baseline = descriptor_pb2.FileDescriptorSet()
    with open(args.baseline) as f:
        text_format.Parse(f.read(), baseline)
    compare = Compare()
    compare.files(baseline, current)
    for a in compare.added:
        print("added (allowed):", a)
    if compare.errors:
        for e in compare.errors:
            print("INCOMPATIBLE:", e, file=sys.stderr)
        print(f"{len(compare.errors)} incompatible change(s) to {args.proto} against "
              f"{args.baseline}: in v1, fields, values and RPCs are only ever added (see "
              "docs/api.md, Versioning)", file=sys.stderr)
        return 1
    print(f"{args.proto} is compatible with {args.baseline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
