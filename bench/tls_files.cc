#include "bench/tls_files.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/proc_util.h"

namespace custody::bench {
namespace {

absl::Status IssueLeaf(const std::string& dir, const std::string& name, const std::string& cn,
                       const std::string& extensions, const std::string& serial, const TlsFiles& ca,
                       const std::string& log) {
  const std::string base = dir + "/" + name;
  if (absl::Status s = WriteFile(base + ".ext", extensions, 0600); !s.ok()) return s;
  if (absl::Status s = RunCommand(
          {"openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
           "-nodes", "-keyout", base + ".key", "-out", base + ".csr", "-subj", "/CN=" + cn},
          log);
      !s.ok()) {
    return s;
  }
  return RunCommand({"openssl", "x509", "-req", "-in", base + ".csr", "-CA", ca.ca_cert, "-CAkey",
                     dir + "/ca.key", "-set_serial", serial, "-days", "2", "-out", base + ".pem",
                     "-extfile", base + ".ext"},
                    log);
}

}  // namespace

absl::StatusOr<TlsFiles> MakeTlsFiles(const std::string& dir) {
  const std::string log = dir + "/openssl.log";
  TlsFiles files;
  files.ca_cert = dir + "/ca.pem";
  if (absl::Status s =
          RunCommand({"openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                      "ec_paramgen_curve:P-256", "-nodes", "-keyout", dir + "/ca.key", "-out",
                      files.ca_cert, "-days", "2", "-subj", "/CN=custody-bench throwaway CA"},
                     log);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = IssueLeaf(dir, "server", "localhost",
                                 "basicConstraints=critical,CA:FALSE\n"
                                 "keyUsage=critical,digitalSignature\n"
                                 "extendedKeyUsage=serverAuth\n"
                                 "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
                                 "2", files, log);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = IssueLeaf(dir, "client", "custody-bench client",
                                 absl::StrCat("basicConstraints=critical,CA:FALSE\n"
                                              "keyUsage=critical,digitalSignature\n"
                                              "extendedKeyUsage=clientAuth\n"
                                              "subjectAltName=URI:",
                                              kBenchClientIdentity, "\n"),
                                 "3", files, log);
      !s.ok()) {
    return s;
  }
  files.server_cert = dir + "/server.pem";
  files.server_key = dir + "/server.key";
  files.client_cert = dir + "/client.pem";
  files.client_key = dir + "/client.key";
  return files;
}

}  // namespace custody::bench
