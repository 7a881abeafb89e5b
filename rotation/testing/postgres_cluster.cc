#include "rotation/testing/postgres_cluster.h"

#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "openssl/rand.h"

namespace custody::rotation::testing {
namespace {

constexpr int kPort = 5432;  // on a socket in the cluster's own directory: never collides

absl::Status WriteFile(const std::string& path, const std::string& content, mode_t mode) {
  std::ofstream out(path, std::ios::trunc);
  out << content;
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  chmod(path.c_str(), mode);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<PostgresCluster>> PostgresCluster::Start() {
  auto cluster = std::unique_ptr<PostgresCluster>(new PostgresCluster());
  const char* bindir = getenv("CUSTODY_PG_BINDIR");
  cluster->bindir_ = bindir != nullptr ? bindir : "/usr/lib/postgresql/15/bin";
  if (access((cluster->bindir_ + "/initdb").c_str(), X_OK) != 0) {
    return absl::FailedPreconditionError(absl::StrCat("no PostgreSQL 15 at ", cluster->bindir_,
                                                      " (scripts/deps.sh installs postgresql-15)"));
  }
  char tmpl[] = "/tmp/custody-pg-XXXXXX";
  if (mkdtemp(tmpl) == nullptr) return absl::InternalError("mkdtemp failed");
  cluster->dir_ = tmpl;
  unsigned char raw[18];
  if (RAND_bytes(raw, sizeof(raw)) != 1) return absl::InternalError("RAND_bytes failed");
  cluster->password_ =
      absl::WebSafeBase64Escape(absl::string_view(reinterpret_cast<const char*>(raw), sizeof(raw)));
  const std::string& dir = cluster->dir_;
  uid_t owner = getuid();
  gid_t group = getgid();
  if (geteuid() == 0) {
    // PostgreSQL refuses to run as root: the cluster belongs to nobody.
    struct passwd* nobody = getpwnam("nobody");
    if (nobody == nullptr) return absl::FailedPreconditionError("no user 'nobody'");
    owner = nobody->pw_uid;
    group = nobody->pw_gid;
    cluster->run_as_ =
        absl::StrCat("setpriv --reuid=", owner, " --regid=", group, " --clear-groups ");
    if (chown(dir.c_str(), owner, group) != 0) return absl::InternalError("chown failed");
  }
  // The superuser's password for initdb, readable by the cluster's owner only.
  const std::string pw = dir + "/initdb-password";
  if (absl::Status s = WriteFile(pw, cluster->password_ + "\n", 0600); !s.ok()) return s;
  if (chown(pw.c_str(), owner, group) != 0) return absl::InternalError("chown failed");
  // The clients' copies, owned by the caller.
  cluster->password_file_ = dir + "/client-password";
  if (absl::Status s = WriteFile(cluster->password_file_, cluster->password_ + "\n", 0600);
      !s.ok()) {
    return s;
  }
  cluster->pgpass_file_ = dir + "/pgpass";
  if (absl::Status s = WriteFile(cluster->pgpass_file_,
                                 absl::StrCat("*:*:*:*:", cluster->password_, "\n"), 0600);
      !s.ok()) {
    return s;
  }
  if (cluster->RunAsOwner(absl::StrCat(
          cluster->bindir_, "/initdb -D ", dir, "/data -U custody -A scram-sha-256 --pwfile=", pw,
          " -E UTF8 --locale=C --no-sync >", dir, "/initdb.log 2>&1")) != 0) {
    return absl::InternalError(absl::StrCat("initdb failed, see ", dir, "/initdb.log"));
  }
  unlink(pw.c_str());
  if (absl::Status s = cluster->StartServer(); !s.ok()) return s;
  return cluster;
}

PostgresCluster::~PostgresCluster() {
  if (running_) Stop("immediate").IgnoreError();
  if (!dir_.empty() && getenv("CUSTODY_KEEP_PG") == nullptr) {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
}

int PostgresCluster::RunAsOwner(const std::string& command) const {
  const std::string line = absl::StrCat("cd ", dir_, " && ", run_as_, command);
  int rc = system(line.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

absl::Status PostgresCluster::StartServer() {
  if (RunAsOwner(absl::StrCat(bindir_, "/pg_ctl -D ", dir_, "/data -l ", dir_,
                              "/server.log -w -t 60 -o \"-k ", dir_, " -p ", kPort,
                              " -c listen_addresses= -c fsync=off -c max_connections=200\" "
                              "start >/dev/null 2>&1")) != 0) {
    return absl::InternalError(absl::StrCat("pg_ctl start failed, see ", dir_, "/server.log"));
  }
  running_ = true;
  return absl::OkStatus();
}

absl::Status PostgresCluster::Stop(const std::string& mode) {
  if (RunAsOwner(absl::StrCat(bindir_, "/pg_ctl -D ", dir_, "/data -w -t 60 -m ", mode,
                              " stop >/dev/null 2>&1")) != 0) {
    return absl::InternalError("pg_ctl stop failed");
  }
  running_ = false;
  return absl::OkStatus();
}

absl::Status PostgresCluster::Restart(const std::string& mode) {
  if (absl::Status s = Stop(mode); !s.ok()) return s;
  return StartServer();
}

std::string PostgresCluster::Conninfo(const std::string& dbname) const {
  return absl::StrCat("host=", dir_, " port=", kPort, " user=custody dbname=", dbname);
}

std::string PostgresCluster::Uri(const std::string& dbname) const {
  // The socket directory as the host, percent-encoded.
  std::string host;
  for (char c : dir_) {
    if (c == '/') {
      host += "%2F";
    } else {
      host += c;
    }
  }
  return absl::StrCat("postgresql://custody@", host, ":", kPort, "/", dbname);
}

absl::StatusOr<std::string> PostgresCluster::Psql(const std::string& dbname,
                                                  const std::string& sql) {
  const std::string sql_file = absl::StrCat(dir_, "/psql-", getpid(), ".sql");
  if (absl::Status s = WriteFile(sql_file, sql, 0600); !s.ok()) return s;
  const std::string cmd = absl::StrCat("PGPASSFILE=", pgpass_file_, " ", bindir_,
                                       "/psql -X -q -A -t -v ON_ERROR_STOP=1 \"", Conninfo(dbname),
                                       "\" -f ", sql_file, " 2>&1");
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return absl::InternalError("popen failed");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  int rc = pclose(p);
  unlink(sql_file.c_str());
  if (!WIFEXITED(rc) || WEXITSTATUS(rc) != 0) {
    return absl::InternalError(absl::StrCat("psql failed: ", out));
  }
  return out;
}

absl::Status PostgresCluster::CreateDatabase(const std::string& name) {
  return Psql("postgres", absl::StrCat("CREATE DATABASE \"", name, "\";")).status();
}

}  // namespace custody::rotation::testing
