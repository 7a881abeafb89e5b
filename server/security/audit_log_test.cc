#include "server/security/audit_log.h"

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "jose/json.h"
#include "openssl/evp.h"

namespace custody::server {
namespace {

// Independent of the code under test: OpenSSL's one-shot digest, hex by hand.
std::string Sha256Hex(const std::string& data) {
  unsigned char md[32];
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), md, &len, EVP_sha256(), nullptr);
  std::string out;
  for (unsigned int i = 0; i < len; ++i) {
    static const char kHex[] = "0123456789abcdef";
    out += kHex[md[i] >> 4];
    out += kHex[md[i] & 15];
  }
  return out;
}

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "audit-test-XXXXXX").string();
    root_ = ::mkdtemp(tmpl.data());
  }
  ~TempDir() { std::filesystem::remove_all(root_); }
  // The log directory itself does not exist yet: Open creates it.
  std::string dir() const { return root_ + "/audit"; }
  std::string File(int index) const {
    char name[32];
    std::snprintf(name, sizeof(name), "audit-%06d.jsonl", index);
    return dir() + "/" + name;
  }

 private:
  std::string root_;
};

std::vector<std::string> ReadLines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

void WriteLines(const std::string& path, const std::vector<std::string>& lines) {
  std::ofstream out(path, std::ios::trunc);
  for (const std::string& line : lines) out << line << "\n";
}

AuditEvent Event(const std::string& detail, const std::string& result = "OK") {
  AuditEvent e;
  e.identity = "spiffe://bank.example/as";
  e.operation = "sign";
  e.ring = "op/id-token";
  e.version = 3;
  e.kid = "kid-3";
  e.payload_sha256 = Sha256Hex(detail);
  e.result = result;
  e.detail = detail;
  return e;
}

std::unique_ptr<AuditLog> MustOpen(AuditLog::Options options) {
  absl::StatusOr<std::unique_ptr<AuditLog>> log = AuditLog::Open(std::move(options));
  EXPECT_TRUE(log.ok()) << log.status();
  return log.ok() ? *std::move(log) : nullptr;
}

jose::Json MustParseJson(const std::string& line) {
  absl::StatusOr<jose::Json> json = jose::ParseJson(line);
  EXPECT_TRUE(json.ok()) << json.status() << "\n" << line;
  return json.ok() ? *json : jose::Json();
}

// Replaces the first occurrence of `from` in `s`.
std::string ReplaceFirst(std::string s, const std::string& from, const std::string& to) {
  size_t at = s.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  if (at != std::string::npos) s.replace(at, from.size(), to);
  return s;
}

TEST(AuditLogTest, WritesTheDocumentedLineFormat) {
  TempDir tmp;
  auto log = MustOpen({.dir = tmp.dir()});
  ASSERT_NE(log, nullptr);
  ASSERT_TRUE(log->Append(Event("first")).ok());
  std::vector<std::string> lines = ReadLines(tmp.File(1));
  ASSERT_EQ(lines.size(), 1u);
  jose::Json json = MustParseJson(lines[0]);
  std::vector<std::string> keys;
  for (const auto& [key, value] : json.as_object()) keys.push_back(key);
  EXPECT_EQ(keys, (std::vector<std::string>{"seq", "time", "identity", "operation", "ring",
                                            "version", "kid", "payload_sha256", "result", "detail",
                                            "prev", "hash"}));
  EXPECT_EQ(json.Find("seq")->as_int(), 1);
  EXPECT_EQ(json.Find("version")->as_int(), 3);
  EXPECT_EQ(json.Find("ring")->as_string(), "op/id-token");
  EXPECT_EQ(json.Find("prev")->as_string(), std::string(64, '0'));
  // RFC 3339, UTC, milliseconds: 2024-05-01T12:00:00.123Z
  const std::string time = json.Find("time")->as_string();
  ASSERT_EQ(time.size(), 24u) << time;
  EXPECT_EQ(time[10], 'T');
  EXPECT_EQ(time[19], '.');
  EXPECT_EQ(time.back(), 'Z');
  // hash: SHA-256 of the bytes before ,"hash":
  const size_t at = lines[0].rfind(",\"hash\":\"");
  EXPECT_EQ(json.Find("hash")->as_string(), Sha256Hex(lines[0].substr(0, at)));

  struct stat st;
  ASSERT_EQ(::stat(tmp.dir().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  ASSERT_EQ(::stat(tmp.File(1).c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST(AuditLogTest, ChainSpansThreeRotatedFilesAndVerifies) {
  TempDir tmp;
  auto log = MustOpen({.dir = tmp.dir(), .max_file_bytes = 2000});
  ASSERT_NE(log, nullptr);
  int appended = 0;
  while (!std::filesystem::exists(tmp.File(3)) || ReadLines(tmp.File(3)).size() < 2) {
    ASSERT_TRUE(log->Append(Event(absl::StrCat("event ", appended))).ok());
    ++appended;
    ASSERT_LT(appended, 100);
  }
  EXPECT_FALSE(std::filesystem::exists(tmp.File(4)));
  for (int i = 1; i <= 3; ++i) {
    EXPECT_LE(std::filesystem::file_size(tmp.File(i)), 2000u) << i;
  }
  // The first line of each later file chains to the last line of the file before it.
  for (int i = 2; i <= 3; ++i) {
    std::string last_of_previous = ReadLines(tmp.File(i - 1)).back();
    jose::Json first = MustParseJson(ReadLines(tmp.File(i)).front());
    EXPECT_EQ(first.Find("prev")->as_string(), Sha256Hex(last_of_previous)) << i;
  }
  uint64_t lines = 0;
  std::string last_hash;
  absl::Status s = VerifyAuditFiles({tmp.File(1), tmp.File(2), tmp.File(3)}, &lines, &last_hash);
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(lines, static_cast<uint64_t>(appended));
  EXPECT_EQ(last_hash, Sha256Hex(ReadLines(tmp.File(3)).back()));

  // Without the first file the chain has no anchor; without the middle one it has a gap.
  s = VerifyAuditFiles({tmp.File(2), tmp.File(3)});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message().substr(0, tmp.File(2).size() + 27),
            tmp.File(2) + ":1: first line not anchored")
      << s;
  s = VerifyAuditFiles({tmp.File(1), tmp.File(3)});
  EXPECT_EQ(s.message().substr(0, tmp.File(3).size() + 8), tmp.File(3) + ":1: seq ") << s;
}

TEST(AuditLogTest, ReopenContinuesTheChain) {
  TempDir tmp;
  {
    auto log = MustOpen({.dir = tmp.dir(), .max_file_bytes = 1500});
    ASSERT_NE(log, nullptr);
    for (int i = 0; i < 5; ++i) ASSERT_TRUE(log->Append(Event(absl::StrCat(i))).ok());
  }
  {
    auto log = MustOpen({.dir = tmp.dir(), .max_file_bytes = 1500});
    ASSERT_NE(log, nullptr);
    for (int i = 5; i < 9; ++i) ASSERT_TRUE(log->Append(Event(absl::StrCat(i))).ok());
  }
  std::vector<std::string> files;
  for (int i = 1; std::filesystem::exists(tmp.File(i)); ++i) files.push_back(tmp.File(i));
  ASSERT_GE(files.size(), 2u);
  uint64_t lines = 0;
  absl::Status s = VerifyAuditFiles(files, &lines);
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(lines, 9u);
}

TEST(AuditLogTest, OpenCutsATornLastLine) {
  TempDir tmp;
  {
    auto log = MustOpen({.dir = tmp.dir()});
    ASSERT_NE(log, nullptr);
    ASSERT_TRUE(log->Append(Event("a")).ok());
    ASSERT_TRUE(log->Append(Event("b")).ok());
  }
  // A crash in the middle of a write: half a line, no newline.
  { std::ofstream(tmp.File(1), std::ios::app) << "{\"seq\":3,\"time\":\"20"; }
  EXPECT_EQ(VerifyAuditFiles({tmp.File(1)}).message(),
            tmp.File(1) + ":3: incomplete line (no trailing newline)");
  auto log = MustOpen({.dir = tmp.dir()});
  ASSERT_NE(log, nullptr);
  ASSERT_TRUE(log->Append(Event("c")).ok());
  uint64_t lines = 0;
  absl::Status s = VerifyAuditFiles({tmp.File(1)}, &lines);
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(lines, 3u);
}

TEST(AuditLogTest, OpenRefusesADamagedLastLine) {
  TempDir tmp;
  {
    auto log = MustOpen({.dir = tmp.dir()});
    ASSERT_NE(log, nullptr);
    ASSERT_TRUE(log->Append(Event("a")).ok());
  }
  std::vector<std::string> lines = ReadLines(tmp.File(1));
  lines[0] = ReplaceFirst(lines[0], "\"result\":\"OK\"", "\"result\":\"NO\"");
  WriteLines(tmp.File(1), lines);
  absl::StatusOr<std::unique_ptr<AuditLog>> log = AuditLog::Open({.dir = tmp.dir()});
  ASSERT_FALSE(log.ok());
  EXPECT_EQ(log.status().code(), absl::StatusCode::kDataLoss) << log.status();
}

TEST(AuditLogTest, SecondOpenOfTheSameDirectoryIsRefused) {
  TempDir tmp;
  auto log = MustOpen({.dir = tmp.dir()});
  ASSERT_NE(log, nullptr);
  absl::StatusOr<std::unique_ptr<AuditLog>> second = AuditLog::Open({.dir = tmp.dir()});
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition) << second.status();
}

class TamperTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto log = MustOpen({.dir = tmp_.dir()});
    ASSERT_NE(log, nullptr);
    for (int i = 1; i <= 6; ++i) ASSERT_TRUE(log->Append(Event(absl::StrCat("event ", i))).ok());
    lines_ = ReadLines(tmp_.File(1));
    ASSERT_EQ(lines_.size(), 6u);
    ASSERT_TRUE(VerifyAuditFiles({file()}).ok());
  }
  std::string file() const { return tmp_.File(1); }
  // The error message VerifyAuditFiles gives after `lines` replace the file.
  std::string VerifyWith(const std::vector<std::string>& lines) {
    WriteLines(file(), lines);
    absl::Status s = VerifyAuditFiles({file()});
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    return std::string(s.message());
  }

  TempDir tmp_;
  std::vector<std::string> lines_;
};

TEST_F(TamperTest, EditedFieldIsReportedOnTheEditedLine) {
  std::vector<std::string> lines = lines_;
  lines[2] = ReplaceFirst(lines[2], "\"result\":\"OK\"", "\"result\":\"NO\"");
  EXPECT_EQ(VerifyWith(lines), file() + ":3: line hash does not match its content (line modified)");
}

TEST_F(TamperTest, EditWithRecomputedHashIsCaughtByTheNextLine) {
  std::vector<std::string> lines = lines_;
  std::string edited = ReplaceFirst(lines[2], "\"result\":\"OK\"", "\"result\":\"NO\"");
  const size_t at = edited.rfind(",\"hash\":\"");
  std::string prefix = edited.substr(0, at);
  lines[2] = prefix + ",\"hash\":\"" + Sha256Hex(prefix) + "\"}";
  EXPECT_EQ(VerifyWith(lines), file() + ":4: prev does not match the hash of the previous line");
}

TEST_F(TamperTest, DeletedLineIsReported) {
  std::vector<std::string> lines = lines_;
  lines.erase(lines.begin() + 2);
  EXPECT_EQ(VerifyWith(lines).substr(0, file().size() + 38),
            file() + ":3: seq 4 not consecutive (expected 3)");
}

TEST_F(TamperTest, ReorderedLinesAreReported) {
  std::vector<std::string> lines = lines_;
  std::swap(lines[1], lines[2]);
  EXPECT_EQ(VerifyWith(lines).substr(0, file().size() + 38),
            file() + ":2: seq 3 not consecutive (expected 2)");
}

TEST_F(TamperTest, InsertedGarbageIsNotJson) {
  std::vector<std::string> lines = lines_;
  lines.insert(lines.begin() + 4, "hello");
  EXPECT_EQ(VerifyWith(lines).substr(0, file().size() + 12), file() + ":5: not JSON");
}

TEST_F(TamperTest, ReplacedFirstLineIsNotAnchored) {
  std::vector<std::string> lines(lines_.begin() + 1, lines_.end());
  EXPECT_EQ(VerifyWith(lines).substr(0, file().size() + 27),
            file() + ":1: first line not anchored");
}

// A batch RPC's lines: consecutive in the file, in the order given, under one fsync, while other
// threads append single lines around them; a failed fsync acknowledges none of them.
TEST(AuditLogTest, AppendAllWritesConsecutiveLinesUnderOneCommit) {
  TempDir tmp;
  std::atomic<bool> fail_fsync{false};
  AuditLog::Options options{.dir = tmp.dir()};
  options.fsync_fn = [&](int fd) {
    if (fail_fsync.load()) {
      errno = EIO;
      return -1;
    }
    return ::fdatasync(fd);
  };
  auto log = MustOpen(options);
  ASSERT_NE(log, nullptr);
  std::atomic<bool> stop{false};
  std::thread single([&] {
    for (int i = 0; !stop.load(); ++i)
      ASSERT_TRUE(log->Append(Event(absl::StrCat("single ", i))).ok());
  });
  for (int b = 0; b < 50; ++b) {
    std::vector<AuditEvent> events;
    for (int i = 0; i < 7; ++i) events.push_back(Event(absl::StrCat("batch ", b, " item ", i)));
    const AuditLog::Stats before = log->stats();
    ASSERT_TRUE(log->AppendAll(events).ok());
    EXPECT_GE(log->stats().lines - before.lines, 7u);
  }
  stop = true;
  single.join();
  ASSERT_TRUE(log->AppendAll({}).ok());

  std::vector<std::string> lines = ReadLines(tmp.File(1));
  uint64_t verified = 0;
  absl::Status s = VerifyAuditFiles({tmp.File(1)}, &verified);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(verified, lines.size());
  int batches_seen = 0;
  for (size_t at = 0; at < lines.size(); ++at) {
    const std::string detail = MustParseJson(lines[at]).Find("detail")->as_string();
    if (detail.rfind("batch ", 0) != 0 || detail.find(" item 0") == std::string::npos) continue;
    const std::string prefix = detail.substr(0, detail.find(" item"));
    ASSERT_LE(at + 7, lines.size());
    for (int i = 0; i < 7; ++i) {
      EXPECT_EQ(MustParseJson(lines[at + i]).Find("detail")->as_string(),
                absl::StrCat(prefix, " item ", i));
    }
    ++batches_seen;
  }
  EXPECT_EQ(batches_seen, 50);

  fail_fsync = true;
  const uint64_t lines_before = log->stats().lines;
  absl::Status failed = log->AppendAll({Event("x"), Event("y")});
  EXPECT_EQ(failed.code(), absl::StatusCode::kUnavailable) << failed;
  EXPECT_EQ(log->stats().lines, lines_before);
  fail_fsync = false;
  ASSERT_TRUE(log->Append(Event("after")).ok());
  s = VerifyAuditFiles({tmp.File(1)}, &verified);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(verified, lines.size() + 1);
}

TEST(AuditLogTest, ConcurrentAppendsAreGroupCommitted) {
  TempDir tmp;
  AuditLog::Options options{.dir = tmp.dir()};
  // A real disk takes a while to fsync (tmpfs does not): model 1 ms so that batching shows.
  options.fsync_fn = [](int fd) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return ::fdatasync(fd);
  };
  auto log = MustOpen(options);
  ASSERT_NE(log, nullptr);
  const uint64_t fsyncs_before = log->stats().fsyncs;
  constexpr int kThreads = 8, kPerThread = 125;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        if (!log->Append(Event(absl::StrCat(t, ":", i))).ok()) ++failures;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);

  AuditLog::Stats stats = log->stats();
  EXPECT_EQ(stats.lines, 1000u);
  const uint64_t fsyncs = stats.fsyncs - fsyncs_before;
  EXPECT_LT(fsyncs, 500u) << "group commit is not batching";
  RecordProperty("fsyncs_for_1000_lines", static_cast<int>(fsyncs));
  EXPECT_EQ(fsyncs, stats.batches);

  uint64_t lines = 0;
  absl::Status s = VerifyAuditFiles({tmp.File(1)}, &lines);
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(lines, 1000u);
  // Every event is there once, and each thread's events are in the order it appended them.
  std::map<int, int> next;
  for (const std::string& line : ReadLines(tmp.File(1))) {
    std::string detail = MustParseJson(line).Find("detail")->as_string();
    int t = std::stoi(detail.substr(0, detail.find(':')));
    int i = std::stoi(detail.substr(detail.find(':') + 1));
    EXPECT_EQ(i, next[t]) << detail;
    next[t] = i + 1;
  }
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(next[t], kPerThread) << t;
}

// Root (as in CI) ignores permission bits, so a read-only directory would not fail; the fault is
// injected through the write hook instead. It writes half the bytes and then fails, like a disk
// filling up mid-batch, to show that the partial line is cut before the next attempt.
TEST(AuditLogTest, WriteFailureTurnsUnhealthyAndRecoversWithAValidChain) {
  TempDir tmp;
  std::atomic<bool> disk_full{false};
  AuditLog::Options options{.dir = tmp.dir()};
  options.write_fn = [&](int fd, const void* data, size_t size) -> ssize_t {
    if (!disk_full.load()) return ::write(fd, data, size);
    if (size > 1) return ::write(fd, data, size / 2);
    errno = ENOSPC;
    return -1;
  };
  auto log = MustOpen(options);
  ASSERT_NE(log, nullptr);
  ASSERT_TRUE(log->Append(Event("1")).ok());
  ASSERT_TRUE(log->Append(Event("2")).ok());
  EXPECT_TRUE(log->healthy());

  disk_full = true;
  absl::Status s = log->Append(Event("lost"));
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(s.message().substr(0, 23), "audit log unavailable: ") << s;
  EXPECT_NE(s.message().find("No space left on device"), std::string::npos) << s;
  EXPECT_FALSE(log->healthy());
  EXPECT_EQ(log->Append(Event("lost too")).code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE(log->healthy());

  disk_full = false;
  ASSERT_TRUE(log->Append(Event("3")).ok());
  EXPECT_TRUE(log->healthy());
  uint64_t lines = 0;
  s = VerifyAuditFiles({tmp.File(1)}, &lines);
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(lines, 3u);
  std::vector<std::string> details;
  for (const std::string& line : ReadLines(tmp.File(1))) {
    details.push_back(MustParseJson(line).Find("detail")->as_string());
  }
  EXPECT_EQ(details, (std::vector<std::string>{"1", "2", "3"}));
  EXPECT_EQ(log->stats().failures, 2u);
}

TEST(AuditLogTest, FsyncFailureIsNotAcknowledged) {
  TempDir tmp;
  std::atomic<bool> fail{false};
  AuditLog::Options options{.dir = tmp.dir()};
  options.fsync_fn = [&](int fd) {
    if (fail.load()) {
      errno = EIO;
      return -1;
    }
    return ::fdatasync(fd);
  };
  auto log = MustOpen(options);
  ASSERT_NE(log, nullptr);
  ASSERT_TRUE(log->Append(Event("1")).ok());
  fail = true;
  EXPECT_EQ(log->Append(Event("written, not synced")).code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE(log->healthy());
  fail = false;
  ASSERT_TRUE(log->Append(Event("2")).ok());
  EXPECT_TRUE(log->healthy());
  uint64_t lines = 0;
  absl::Status s = VerifyAuditFiles({tmp.File(1)}, &lines);
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(lines, 2u);
}

// A fault that even root cannot write through: the next file's name is taken by a directory.
TEST(AuditLogTest, FailedRotationTurnsUnhealthyAndRecovers) {
  TempDir tmp;
  auto log = MustOpen({.dir = tmp.dir(), .max_file_bytes = 1200});
  ASSERT_NE(log, nullptr);
  ASSERT_TRUE(log->Append(Event("1")).ok());
  ASSERT_TRUE(std::filesystem::create_directory(tmp.File(2)));
  absl::Status s;
  int attempts = 0;
  while ((s = log->Append(Event("x"))).ok()) ASSERT_LT(++attempts, 20);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_FALSE(log->healthy());
  EXPECT_EQ(log->Append(Event("x")).code(), absl::StatusCode::kUnavailable);

  std::filesystem::remove(tmp.File(2));
  ASSERT_TRUE(log->Append(Event("after")).ok());
  EXPECT_TRUE(log->healthy());
  uint64_t lines = 0;
  s = VerifyAuditFiles({tmp.File(1), tmp.File(2)}, &lines);
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(lines, static_cast<uint64_t>(2 + attempts));
  EXPECT_EQ(MustParseJson(ReadLines(tmp.File(2)).back()).Find("detail")->as_string(), "after");
}

TEST(AuditLogTest, HostileStringsStayOneVerifiableLine) {
  TempDir tmp;
  auto log = MustOpen({.dir = tmp.dir()});
  ASSERT_NE(log, nullptr);
  AuditEvent e = Event("line\nbreak \"quoted\" \\ \x01");
  e.identity = std::string("bad\xff\xc0utf8");
  e.detail += std::string(10000, 'd');
  ASSERT_TRUE(log->Append(e).ok());
  std::vector<std::string> lines = ReadLines(tmp.File(1));
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_TRUE(VerifyAuditFiles({tmp.File(1)}).ok());
  jose::Json json = MustParseJson(lines[0]);
  EXPECT_EQ(json.Find("identity")->as_string(), "bad\xEF\xBF\xBD\xEF\xBF\xBDutf8");
  EXPECT_LT(json.Find("detail")->as_string().size(), 4200u);
}

TEST(AuditLogTest, OpenFailsWhenTheDirectoryIsAFile) {
  TempDir tmp;
  std::filesystem::create_directories(std::filesystem::path(tmp.dir()).parent_path());
  { std::ofstream(tmp.dir()) << "not a directory"; }
  absl::StatusOr<std::unique_ptr<AuditLog>> log = AuditLog::Open({.dir = tmp.dir()});
  EXPECT_FALSE(log.ok());
}

// Replicas: each writes its own chain into audit-REPLICA-NNNNNN.jsonl with its id in every
// line; VerifyAuditChains takes every replica's files at once and checks each chain, and a
// file passed off as another replica's fails.
TEST(AuditLogTest, EachReplicaHasItsOwnChainAndAllVerifyTogether) {
  TempDir a_tmp, b_tmp;
  std::map<std::string, std::vector<std::string>> files;
  std::map<std::string, int> appended;
  for (auto [tmp, replica] :
       {std::pair{&a_tmp, std::string("host-a")}, std::pair{&b_tmp, std::string("host-b")}}) {
    AuditLog::Options options;
    options.dir = tmp->dir();
    options.max_file_bytes = 1500;
    options.replica_id = replica;
    auto log = AuditLog::Open(options);
    ASSERT_TRUE(log.ok()) << log.status();
    const int n = replica == "host-a" ? 9 : 5;
    for (int i = 0; i < n; ++i) ASSERT_TRUE((*log)->Append(Event(absl::StrCat(replica, i))).ok());
    appended[replica] = n;
    for (int index = 1;; ++index) {
      char name[64];
      std::snprintf(name, sizeof(name), "audit-%s-%06d.jsonl", replica.c_str(), index);
      std::string path = tmp->dir() + "/" + name;
      if (!std::filesystem::exists(path)) break;
      files[replica].push_back(path);
    }
    ASSERT_FALSE(files[replica].empty());
    EXPECT_FALSE(std::filesystem::exists(tmp->File(1)));  // no unnamed chain
    for (const std::string& line : ReadLines(files[replica].front())) {
      jose::Json json = MustParseJson(line);
      EXPECT_EQ(json.Find("replica")->as_string(), replica);
      EXPECT_EQ(json.as_object()[2].first, "replica");  // seq, time, replica, ...
    }
    EXPECT_EQ(AuditFileReplica(files[replica].front()), replica);
  }
  EXPECT_GE(files["host-a"].size(), 2u);  // rotated: the chain spans files
  // Interleaved on the command line: still one chain per replica, in order of appearance.
  std::vector<std::string> all = {files["host-b"].front()};
  for (const std::string& f : files["host-a"]) all.push_back(f);
  for (size_t i = 1; i < files["host-b"].size(); ++i) all.push_back(files["host-b"][i]);
  auto chains = VerifyAuditChains(all);
  ASSERT_TRUE(chains.ok()) << chains.status();
  ASSERT_EQ(chains->size(), 2u);
  EXPECT_EQ((*chains)[0].replica, "host-b");
  EXPECT_EQ((*chains)[0].lines, static_cast<uint64_t>(appended["host-b"]));
  EXPECT_EQ((*chains)[1].replica, "host-a");
  EXPECT_EQ((*chains)[1].lines, static_cast<uint64_t>(appended["host-a"]));
  EXPECT_EQ((*chains)[1].last_hash, Sha256Hex(ReadLines(files["host-a"].back()).back()));

  // host-b's first file renamed as host-a's: its lines name host-b.
  std::string forged = b_tmp.dir() + "/audit-host-c-000001.jsonl";
  std::filesystem::copy_file(files["host-a"].front(), forged);
  auto bad = VerifyAuditChains({forged});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("replica host-c: "), absl::string_view::npos)
      << bad.status();
  EXPECT_NE(bad.status().message().find("line of replica 'host-a'"), absl::string_view::npos);
  // A gap in one replica's chain is reported for that replica.
  std::vector<std::string> gap = {files["host-a"].front(), files["host-a"].back()};
  gap.insert(gap.begin(), files["host-b"].begin(), files["host-b"].end());
  if (files["host-a"].size() >= 3) {
    auto broken = VerifyAuditChains(gap);
    ASSERT_FALSE(broken.ok());
    EXPECT_EQ(broken.status().message().substr(0, 16), "replica host-a: ");
  }
}

TEST(AuditLogTest, ADeletedFileFailsClosedAndStaysUnhealthy) {
  TempDir tmp;
  auto log = MustOpen({.dir = tmp.dir()});
  ASSERT_NE(log, nullptr);
  ASSERT_TRUE(log->Append(Event("1")).ok());
  EXPECT_EQ(log->head().seq, 1u);
  ASSERT_EQ(::unlink(tmp.File(1).c_str()), 0);
  absl::Status s = log->Append(Event("into the deleted inode"));
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find("was deleted"), std::string::npos) << s;
  EXPECT_FALSE(log->healthy());
  // The probe cannot repair it (the acknowledged line is gone): fail closed until an operator
  // acts.
  EXPECT_FALSE(log->Probe().ok());
  EXPECT_FALSE(log->healthy());
  EXPECT_EQ(log->head().seq, 1u);
}

TEST(AuditLogTest, AReplacedFileFailsClosed) {
  TempDir tmp;
  auto log = MustOpen({.dir = tmp.dir()});
  ASSERT_NE(log, nullptr);
  ASSERT_TRUE(log->Append(Event("1")).ok());
  const std::vector<std::string> lines = ReadLines(tmp.File(1));
  ASSERT_EQ(::unlink(tmp.File(1).c_str()), 0);
  WriteLines(tmp.File(1), lines);  // same content, another inode
  absl::Status s = log->Append(Event("2"));
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_FALSE(log->healthy());
}

TEST(AuditLogTest, ProbeRestoresHealthOnceTheDiskWorksWithoutACaller) {
  TempDir tmp;
  std::atomic<bool> disk_full{false};
  AuditLog::Options options{.dir = tmp.dir()};
  options.write_fn = [&](int fd, const void* data, size_t size) -> ssize_t {
    if (!disk_full.load()) return ::write(fd, data, size);
    errno = ENOSPC;
    return -1;
  };
  auto log = MustOpen(options);
  ASSERT_NE(log, nullptr);
  ASSERT_TRUE(log->Append(Event("1")).ok());
  disk_full = true;
  EXPECT_FALSE(log->Append(Event("lost")).ok());
  EXPECT_FALSE(log->Probe().ok());
  EXPECT_FALSE(log->healthy());
  disk_full = false;
  EXPECT_TRUE(log->Probe().ok());
  EXPECT_TRUE(log->healthy());
  const std::vector<std::string> lines = ReadLines(tmp.File(1));
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(MustParseJson(lines[1]).Find("operation")->as_string(), "audit.probe");
  EXPECT_TRUE(VerifyAuditFiles({tmp.File(1)}).ok());
}

TEST(AuditLogTest, VerifyAgainstAnAnchorDetectsATruncatedTail) {
  TempDir tmp;
  auto log = MustOpen({.dir = tmp.dir()});
  ASSERT_NE(log, nullptr);
  for (int i = 1; i <= 8; ++i) ASSERT_TRUE(log->Append(Event(absl::StrCat(i))).ok());
  const AuditLog::Head head = log->head();
  ASSERT_EQ(head.seq, 8u);
  EXPECT_EQ(head.file, "audit-000001.jsonl");
  log.reset();
  std::map<std::string, AuditAnchors> anchors;
  anchors[""].end = AuditChainPoint{head.seq, head.hash};
  auto ok = VerifyAuditChains({tmp.File(1)}, anchors);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_TRUE(ok->front().end_anchored);
  // Cutting lines off the end keeps every remaining link valid: only the anchor tells.
  std::vector<std::string> lines = ReadLines(tmp.File(1));
  lines.resize(5);
  WriteLines(tmp.File(1), lines);
  EXPECT_TRUE(VerifyAuditFiles({tmp.File(1)}).ok());
  auto cut = VerifyAuditChains({tmp.File(1)}, anchors);
  ASSERT_FALSE(cut.ok());
  EXPECT_EQ(cut.status().message(),
            absl::StrCat("truncated: anchor at seq 8, file ends at 5 (", tmp.File(1), ")"));
  // A different line at the anchored seq: rewritten.
  anchors[""].end = AuditChainPoint{4, std::string(64, 'a')};
  auto rewritten = VerifyAuditChains({tmp.File(1)}, anchors);
  ASSERT_FALSE(rewritten.ok());
  EXPECT_NE(rewritten.status().message().find("the chain was rewritten"), std::string::npos)
      << rewritten.status();
}

TEST(AuditLogTest, FilesWhoseFirstPartWasArchivedVerifyFromAStartAnchor) {
  TempDir tmp;
  auto log = MustOpen({.dir = tmp.dir(), .max_file_bytes = 1500});
  ASSERT_NE(log, nullptr);
  for (int i = 1; i <= 12; ++i) ASSERT_TRUE(log->Append(Event(absl::StrCat(i))).ok());
  log.reset();
  ASSERT_TRUE(std::filesystem::exists(tmp.File(3)));
  // The first file is archived; what is kept starts mid-chain.
  uint64_t archived_lines = 0;
  std::string archived_last;
  ASSERT_TRUE(VerifyAuditFiles({tmp.File(1)}, &archived_lines, &archived_last).ok());
  std::vector<std::string> rest;
  for (int i = 2; std::filesystem::exists(tmp.File(i)); ++i) rest.push_back(tmp.File(i));
  auto alone = VerifyAuditChains(rest);
  ASSERT_FALSE(alone.ok());
  EXPECT_NE(alone.status().message().find("first line not anchored"), std::string::npos);
  std::map<std::string, AuditAnchors> anchors;
  auto point = ParseAuditChainPoint(absl::StrCat(archived_lines, ":", archived_last));
  ASSERT_TRUE(point.ok()) << point.status();
  anchors[""].start = *point;
  auto from = VerifyAuditChains(rest, anchors);
  ASSERT_TRUE(from.ok()) << from.status();
  EXPECT_EQ(from->front().first_seq, archived_lines + 1);
  EXPECT_EQ(from->front().last_seq, 12u);
  // A start anchor that does not match the kept files is refused.
  anchors[""].start = AuditChainPoint{archived_lines, std::string(64, 'b')};
  EXPECT_FALSE(VerifyAuditChains(rest, anchors).ok());
  EXPECT_FALSE(ParseAuditChainPoint("12").ok());
  EXPECT_FALSE(ParseAuditChainPoint("0:" + archived_last).ok());
}

}  // namespace
}  // namespace custody::server
