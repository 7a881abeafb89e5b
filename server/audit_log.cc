#include "server/audit_log.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/caller_message.h"
#include "common/log.h"
#include "common/sha256.h"
#include "jose/json.h"

namespace custody::server {
namespace {

constexpr absl::string_view kAnchor =
    "0000000000000000000000000000000000000000000000000000000000000000";
constexpr absl::string_view kHashKey = ",\"hash\":\"";
constexpr size_t kHexHashBytes = 64;
// The fixed tail of every line: ,"hash":"<64 hex>"}
constexpr size_t kHashSuffixBytes = kHashKey.size() + kHexHashBytes + 2;
// Longest line the verifier and Open accept; ours stay below 16 KiB thanks to the field caps.
constexpr size_t kMaxLineBytes = 64 * 1024;
constexpr size_t kMaxDetailBytes = 4096;
constexpr size_t kMaxFieldBytes = 1024;

bool IsLowerHex(absl::string_view s) {
  return std::all_of(s.begin(), s.end(),
                     [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

// Length of the valid UTF-8 sequence starting at s[i] (RFC 3629: no overlongs, surrogates or
// code points above U+10FFFF), 0 when invalid.
size_t Utf8SequenceLength(absl::string_view s, size_t i) {
  auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  auto cont = [&](size_t k) { return k < s.size() && (byte(k) & 0xC0) == 0x80; };
  unsigned char c = byte(i);
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) return cont(i + 1) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    if (i + 1 >= s.size()) return 0;
    unsigned char c1 = byte(i + 1);
    if (c == 0xE0 && c1 < 0xA0) return 0;
    if (c == 0xED && c1 > 0x9F) return 0;
    return cont(i + 1) && cont(i + 2) ? 3 : 0;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (i + 1 >= s.size()) return 0;
    unsigned char c1 = byte(i + 1);
    if (c == 0xF0 && c1 < 0x90) return 0;
    if (c == 0xF4 && c1 > 0x8F) return 0;
    return cont(i + 1) && cont(i + 2) && cont(i + 3) ? 4 : 0;
  }
  return 0;
}

// Appends ,"name":"value" with value made valid UTF-8 (the verifier's strict JSON parser refuses
// anything else; identities come from peer certificates) and cut at max_bytes.
void AppendField(std::string& out, absl::string_view name, absl::string_view value,
                 size_t max_bytes) {
  out += ",\"";
  out.append(name.data(), name.size());
  out += "\":";
  // Fast path: short ASCII needs neither truncation nor UTF-8 repair.
  bool ascii = value.size() <= max_bytes;
  for (size_t i = 0; ascii && i < value.size(); ++i)
    ascii = static_cast<unsigned char>(value[i]) < 0x80;
  if (ascii) {
    AppendJsonString(out, value);
    return;
  }
  std::string clean;
  for (size_t i = 0; i < value.size();) {
    size_t len = Utf8SequenceLength(value, i);
    absl::string_view piece = len > 0 ? value.substr(i, len) : "\xEF\xBF\xBD";  // U+FFFD
    if (clean.size() + piece.size() > max_bytes) {
      clean += "[truncated]";
      break;
    }
    clean.append(piece.data(), piece.size());
    i += len > 0 ? len : 1;
  }
  AppendJsonString(out, clean);
}

// Everything of a line between "time" and "prev", formatted by the caller's thread.
std::string FormatEventFields(const AuditEvent& event) {
  std::string out;
  AppendField(out, "identity", event.identity, kMaxFieldBytes);
  AppendField(out, "operation", event.operation, kMaxFieldBytes);
  AppendField(out, "ring", event.ring, kMaxFieldBytes);
  absl::StrAppend(&out, ",\"version\":", event.version);
  AppendField(out, "kid", event.kid, kMaxFieldBytes);
  AppendField(out, "payload_sha256", event.payload_sha256, kMaxFieldBytes);
  AppendField(out, "result", event.result, kMaxFieldBytes);
  AppendField(out, "detail", event.detail, kMaxDetailBytes);
  return out;
}

std::string FormatLine(uint64_t seq, absl::Time time, absl::string_view fields,
                       absl::string_view prev) {
  std::string line = absl::StrCat("{\"seq\":", seq, ",\"time\":");
  AppendJsonString(line, absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", time, absl::UTCTimeZone()));
  absl::StrAppend(&line, fields, ",\"prev\":\"", prev, "\"");
  std::string hash = Sha256Hex(line);
  absl::StrAppend(&line, kHashKey, hash, "\"}");
  return line;
}

struct ParsedLine {
  uint64_t seq = 0;
  std::string prev;
  std::string replica;  // "" when the line has no "replica" member
};

// Checks one line (without its newline) on its own: JSON, the members the chain needs, and its
// own hash. The error message is the reason only; callers add where.
absl::StatusOr<ParsedLine> ParseAuditLine(absl::string_view line) {
  jose::JsonLimits limits;
  limits.max_bytes = kMaxLineBytes;
  limits.max_depth = 2;
  absl::StatusOr<jose::Json> json =
      jose::ParseJson(std::string_view(line.data(), line.size()), limits);
  if (!json.ok())
    return absl::InvalidArgumentError(absl::StrCat("not JSON (", json.status().message(), ")"));
  if (!json->is_object()) return absl::InvalidArgumentError("not a JSON object");
  const jose::Json* seq = json->Find("seq");
  const jose::Json* prev = json->Find("prev");
  const jose::Json* hash = json->Find("hash");
  if (seq == nullptr || !seq->as_int().has_value() || *seq->as_int() < 1) {
    return absl::InvalidArgumentError("missing or malformed 'seq'");
  }
  if (prev == nullptr || prev->as_string().size() != kHexHashBytes ||
      !IsLowerHex(prev->as_string())) {
    return absl::InvalidArgumentError("missing or malformed 'prev'");
  }
  if (hash == nullptr || json->as_object().back().first != "hash" ||
      hash->as_string().size() != kHexHashBytes || !IsLowerHex(hash->as_string())) {
    return absl::InvalidArgumentError("missing or malformed 'hash' (it must be the last member)");
  }
  // The hash covers the exact bytes before ,"hash":"; a line that is not byte-for-byte in our
  // canonical shape fails here too.
  if (line.size() < kHashSuffixBytes ||
      line.substr(line.size() - kHashSuffixBytes, kHashKey.size()) != kHashKey ||
      line.substr(line.size() - kHashSuffixBytes + kHashKey.size(), kHexHashBytes) !=
          hash->as_string() ||
      Sha256Hex(line.substr(0, line.size() - kHashSuffixBytes)) != hash->as_string()) {
    return absl::InvalidArgumentError("line hash does not match its content (line modified)");
  }
  const jose::Json* replica = json->Find("replica");
  return ParsedLine{static_cast<uint64_t>(*seq->as_int()), prev->as_string(),
                    replica == nullptr ? "" : replica->as_string()};
}

absl::Status ErrnoError(absl::string_view what) { return absl::ErrnoToStatus(errno, what); }

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

// audit-NNNNNN.jsonl, or audit-REPLICA-NNNNNN.jsonl for a replica's chain.
std::string FilePrefix(absl::string_view replica) {
  return replica.empty() ? "audit-" : absl::StrCat("audit-", replica, "-");
}

std::string FileName(uint64_t index, absl::string_view replica) {
  return absl::StrCat(FilePrefix(replica), absl::StrFormat("%06d.jsonl", index));
}

// audit-[REPLICA-]NNNNNN.jsonl -> NNNNNN; 0 for other names (and other replicas' files).
uint64_t FileIndex(absl::string_view name, absl::string_view replica) {
  const std::string prefix = FilePrefix(replica);
  const absl::string_view kPrefix = prefix, kSuffix = ".jsonl";
  if (name.size() < kPrefix.size() + 6 + kSuffix.size() ||
      name.substr(0, kPrefix.size()) != kPrefix ||
      name.substr(name.size() - kSuffix.size()) != kSuffix) {
    return 0;
  }
  absl::string_view digits =
      name.substr(kPrefix.size(), name.size() - kPrefix.size() - kSuffix.size());
  uint64_t index = 0;
  if (!std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }) ||
      !absl::SimpleAtoi(digits, &index)) {
    return 0;
  }
  return index;
}

// Where the chain continues: the current file, its size, and the last line's seq and hash.
struct ChainTail {
  uint64_t index = 1;
  uint64_t size = 0;
  uint64_t seq = 0;
  std::string hash = std::string(kAnchor);
};

// Walks the files from the newest down to the first with a line. A torn last line in the newest
// file (a crash mid-write: never acknowledged) is cut off; anything else wrong is DATA_LOSS.
absl::StatusOr<ChainTail> FindChainTail(const std::string& dir, std::vector<uint64_t> indices,
                                        absl::string_view replica) {
  ChainTail tail;
  if (indices.empty()) return tail;
  std::sort(indices.rbegin(), indices.rend());
  tail.index = indices.front();
  for (size_t i = 0; i < indices.size(); ++i) {
    const std::string path = absl::StrCat(dir, "/", FileName(indices[i], replica));
    if (i > 0 && indices[i] != indices[i - 1] - 1) {
      return absl::FailedPreconditionError(
          absl::StrCat("audit log ", dir, ": ", FileName(indices[i - 1] - 1, replica),
                       " is missing and the newer files are empty; cannot continue the chain"));
    }
    Fd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
    if (fd.get() < 0) return ErrnoError(absl::StrCat("open ", path));
    struct stat st;
    if (::fstat(fd.get(), &st) != 0) return ErrnoError(absl::StrCat("stat ", path));
    if (!S_ISREG(st.st_mode)) {
      return absl::FailedPreconditionError(absl::StrCat(path, " is not a regular file"));
    }
    uint64_t size = static_cast<uint64_t>(st.st_size);
    const uint64_t offset = size > kMaxLineBytes + 1 ? size - (kMaxLineBytes + 1) : 0;
    std::string buf(size - offset, '\0');
    if (::pread(fd.get(), buf.data(), buf.size(), static_cast<off_t>(offset)) !=
        static_cast<ssize_t>(buf.size())) {
      return ErrnoError(absl::StrCat("read ", path));
    }
    if (!buf.empty() && buf.back() != '\n') {
      if (i > 0) {
        return absl::DataLossError(absl::StrCat(path, ": last line is incomplete"));
      }
      size_t cut = buf.rfind('\n');
      if (cut == std::string::npos && offset > 0) {
        return absl::DataLossError(
            absl::StrCat(path, ": last line is longer than ", kMaxLineBytes, " bytes"));
      }
      const uint64_t new_size = cut == std::string::npos ? 0 : offset + cut + 1;
      if (::ftruncate(fd.get(), static_cast<off_t>(new_size)) != 0 || ::fsync(fd.get()) != 0) {
        return ErrnoError(absl::StrCat("truncate ", path));
      }
      Log(LogLevel::kWarning, "audit_log_torn_line_removed",
          {{"file", path}, {"bytes", absl::StrCat(size - new_size)}});
      size = new_size;
      buf.resize(new_size - offset);
    }
    if (i == 0) tail.size = size;
    if (buf.empty()) continue;
    const size_t end = buf.size() - 1;  // the final newline
    size_t start = end == 0 ? std::string::npos : buf.rfind('\n', end - 1);
    if (start == std::string::npos) {
      if (offset > 0) {
        return absl::DataLossError(
            absl::StrCat(path, ": last line is longer than ", kMaxLineBytes, " bytes"));
      }
      start = 0;
    } else {
      ++start;
    }
    absl::string_view line = absl::string_view(buf).substr(start, end - start);
    absl::StatusOr<ParsedLine> parsed = ParseAuditLine(line);
    if (!parsed.ok()) {
      return absl::DataLossError(absl::StrCat(path,
                                              ": last line is damaged: ", parsed.status().message(),
                                              "; check with 'custodyctl audit verify'"));
    }
    tail.seq = parsed->seq;
    tail.hash = Sha256Hex(line);
    return tail;
  }
  if (indices.back() != 1) {
    return absl::FailedPreconditionError(absl::StrCat("audit log ", dir, ": ", FileName(1, replica),
                                                      " .. ", FileName(indices.back() - 1, replica),
                                                      " are missing and the newer files are "
                                                      "empty; cannot continue the chain"));
  }
  return tail;
}

}  // namespace

struct AuditLog::Batch {
  struct Entry {
    absl::Time time;
    std::string fields;
  };
  std::vector<Entry> entries;
  bool done = false;
  absl::Status status;
};

AuditLog::AuditLog(Options options) : options_(std::move(options)), last_hash_(kAnchor) {}

AuditLog::~AuditLog() {
  if (fd_ >= 0) ::close(fd_);
  if (lock_fd_ >= 0) ::close(lock_fd_);
}

absl::StatusOr<std::unique_ptr<AuditLog>> AuditLog::Open(Options options) {
  if (options.dir.empty()) return absl::InvalidArgumentError("audit log: no directory given");
  if (options.max_file_bytes == 0) {
    return absl::InvalidArgumentError("audit log: max_file_bytes must be positive");
  }
  if (!options.write_fn) {
    options.write_fn = [](int fd, const void* data, size_t size) {
      return ::write(fd, data, size);
    };
  }
  // fdatasync is enough for appends: the new size is metadata needed to read the data back, so
  // it is flushed too.
  if (!options.fsync_fn) options.fsync_fn = [](int fd) { return ::fdatasync(fd); };

  const std::string dir = options.dir;  // a copy: options moves into the log below
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return ErrnoError(absl::StrCat("audit log: mkdir ", dir));
  }
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0) return ErrnoError(absl::StrCat("audit log: stat ", dir));
  if (!S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat("audit log: ", dir, " is not a directory"));
  }
  if ((st.st_mode & 077) != 0) {
    Log(LogLevel::kWarning, "audit_log_dir_permissions",
        {{"dir", dir}, {"mode", absl::StrFormat("%04o", st.st_mode & 07777)}, {"want", "0700"}});
  }

  std::unique_ptr<AuditLog> log(new AuditLog(std::move(options)));
  const std::string lock_path = absl::StrCat(dir, "/.lock");
  log->lock_fd_ = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (log->lock_fd_ < 0) return ErrnoError(absl::StrCat("audit log: open ", lock_path));
  if (::flock(log->lock_fd_, LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) {
      return absl::FailedPreconditionError(
          absl::StrCat("audit log ", dir, " is in use by another process"));
    }
    return ErrnoError(absl::StrCat("audit log: lock ", lock_path));
  }

  std::vector<uint64_t> indices;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return ErrnoError(absl::StrCat("audit log: opendir ", dir));
  while (struct dirent* entry = ::readdir(d)) {
    if (uint64_t index = FileIndex(entry->d_name, log->options_.replica_id); index > 0)
      indices.push_back(index);
  }
  ::closedir(d);

  absl::StatusOr<ChainTail> tail = FindChainTail(dir, std::move(indices), log->options_.replica_id);
  if (!tail.ok()) return tail.status();
  log->index_ = tail->index;
  log->good_size_ = tail->size;
  log->seq_ = tail->seq;
  log->last_hash_ = tail->hash;
  if (absl::Status s = log->ReopenCurrent(); !s.ok()) return s;
  {
    absl::MutexLock lock(&log->head_mu_);
    log->head_ = {log->seq_, log->last_hash_, FileName(log->index_, log->options_.replica_id)};
  }
  return log;
}

AuditLog::Head AuditLog::head() const {
  absl::MutexLock lock(&head_mu_);
  return head_;
}

absl::Status AuditLog::Probe() {
  // Room for real lines first. A full file system still takes a short append into the slack of
  // the file's last block (or tmpfs page), so a probe line alone would report the log healthy
  // while every signing call's longer line is refused, and health would flap SERVING/NOT_SERVING
  // once a second. Service returns when there is headroom again.
  struct statvfs fs {};
  if (statvfs(options_.dir.c_str(), &fs) == 0) {
    const uint64_t free_bytes = static_cast<uint64_t>(fs.f_bavail) * fs.f_frsize;
    if (free_bytes < kProbeHeadroomBytes) {
      return absl::UnavailableError(absl::StrCat("audit log directory has ", free_bytes,
                                                 " bytes free (", kProbeHeadroomBytes,
                                                 " needed before service resumes)"));
    }
  }
  AuditEvent probe;
  probe.identity = "custodyd";
  probe.operation = "audit.probe";
  probe.result = "OK";
  probe.detail = "the audit log is re-tested after a failure";
  return Append(probe);
}

absl::Status AuditLog::CheckStillLinked(const std::string& path) const {
  struct stat open_file {};
  struct stat named {};
  if (::fstat(fd_, &open_file) != 0) return ErrnoError(absl::StrCat("stat ", path));
  if (open_file.st_nlink == 0 || ::stat(path.c_str(), &named) != 0) {
    return absl::DataLossError(
        absl::StrCat(path,
                     " was deleted while custodyd wrote it; restore it or start a new "
                     "chain (custodyd --audit_new_chain) after checking what happened"));
  }
  if (named.st_ino != open_file.st_ino || named.st_dev != open_file.st_dev) {
    return absl::DataLossError(
        absl::StrCat(path, " was replaced by another file while custodyd wrote it"));
  }
  return absl::OkStatus();
}

std::string AuditLog::FilePath(uint64_t index) const {
  return absl::StrCat(options_.dir, "/", FileName(index, options_.replica_id));
}

absl::Status AuditLog::WriteAll(int fd, const std::string& data, const std::string& path) {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = options_.write_fn(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoError(absl::StrCat("write ", path));
    if (n == 0) return absl::UnavailableError(absl::StrCat("write ", path, ": wrote nothing"));
    done += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::Status AuditLog::Sync(int fd, const std::string& path) {
  fsyncs_.fetch_add(1);
  const absl::Time start = absl::Now();
  const int rc = options_.fsync_fn(fd);
  fsync_seconds_.Observe(absl::ToDoubleSeconds(absl::Now() - start));
  if (rc != 0) return ErrnoError(absl::StrCat("fsync ", path));
  return absl::OkStatus();
}

absl::Status AuditLog::SyncDir() {
  Fd dir(::open(options_.dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir.get() < 0) return ErrnoError(absl::StrCat("open ", options_.dir));
  return Sync(dir.get(), options_.dir);
}

// (Re)opens the current file and cuts whatever a failed batch left past the acknowledged size.
absl::Status AuditLog::ReopenCurrent() {
  if (fd_ >= 0) ::close(std::exchange(fd_, -1));
  const std::string path = FilePath(index_);
  Fd fd(::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600));
  if (fd.get() < 0) return ErrnoError(absl::StrCat("open ", path));
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return ErrnoError(absl::StrCat("stat ", path));
  if (!S_ISREG(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(path, " is not a regular file"));
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < good_size_) {
    return absl::DataLossError(absl::StrCat(path, " holds ", size, " bytes, fewer than the ",
                                            good_size_, " already acknowledged"));
  }
  if (size > good_size_ && ::ftruncate(fd.get(), static_cast<off_t>(good_size_)) != 0) {
    return ErrnoError(absl::StrCat("truncate ", path));
  }
  // The file may have just been created: make its directory entry durable.
  if (absl::Status s = SyncDir(); !s.ok()) return s;
  fd_ = fd.release();
  dirty_ = false;
  return absl::OkStatus();
}

absl::Status AuditLog::OpenNextFile() {
  if (fd_ >= 0) ::close(std::exchange(fd_, -1));
  const std::string path = FilePath(index_ + 1);
  // O_TRUNC: a file left by an earlier failed rotation holds nothing acknowledged.
  Fd fd(::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (fd.get() < 0) return ErrnoError(absl::StrCat("open ", path));
  fd_ = fd.release();
  ++index_;
  good_size_ = 0;
  return SyncDir();
}

absl::Status AuditLog::WriteLines(const Batch& batch) {
  if (fd_ < 0 || dirty_) {
    if (absl::Status s = ReopenCurrent(); !s.ok()) return s;
  }
  dirty_ = true;  // from here until success the file may hold unacknowledged bytes
  std::string buf;
  uint64_t size = good_size_;  // bytes already in the current file
  uint64_t seq = seq_;
  std::string prev = last_hash_;
  for (const Batch::Entry& entry : batch.entries) {
    std::string line = FormatLine(seq + 1, entry.time, entry.fields, prev);
    if (size + buf.size() + line.size() + 1 > options_.max_file_bytes && size + buf.size() > 0) {
      // Rotate: the old file gets its share of the batch, synced, before the new one exists,
      // so a crash never leaves a newer file without the lines it chains from.
      const std::string path = FilePath(index_);
      if (absl::Status s = WriteAll(fd_, buf, path); !s.ok()) return s;
      if (absl::Status s = Sync(fd_, path); !s.ok()) return s;
      buf.clear();
      if (absl::Status s = OpenNextFile(); !s.ok()) return s;
      size = 0;
    }
    prev = Sha256Hex(line);
    ++seq;
    buf += line;
    buf += '\n';
  }
  const std::string path = FilePath(index_);
  if (absl::Status s = WriteAll(fd_, buf, path); !s.ok()) return s;
  if (absl::Status s = Sync(fd_, path); !s.ok()) return s;
  // One fstat and one stat per group commit: lines written to a deleted file are not durable.
  if (absl::Status s = CheckStillLinked(path); !s.ok()) return s;
  good_size_ = size + buf.size();
  seq_ = seq;
  last_hash_ = std::move(prev);
  dirty_ = false;
  absl::MutexLock lock(&head_mu_);
  head_ = {seq_, last_hash_, FileName(index_, options_.replica_id)};
  return absl::OkStatus();
}

absl::Status AuditLog::Commit(const Batch& batch) {
  const uint64_t start_index = index_, start_size = good_size_, start_seq = seq_;
  const std::string start_hash = last_hash_;
  absl::Status status = WriteLines(batch);
  if (status.ok()) {
    lines_.fetch_add(batch.entries.size());
    batches_.fetch_add(1);
    if (!healthy_.exchange(true)) {
      Log(LogLevel::kInfo, "audit_log_recovered", {{"dir", options_.dir}});
    }
    return status;
  }
  // Undo the whole batch: nothing of it was acknowledged. Files this batch created go (they hold
  // only its lines); the start file is cut back to start_size by ReopenCurrent on the next try.
  if (fd_ >= 0) ::close(std::exchange(fd_, -1));
  for (uint64_t index = index_; index > start_index; --index) ::unlink(FilePath(index).c_str());
  index_ = start_index;
  good_size_ = start_size;
  seq_ = start_seq;
  last_hash_ = start_hash;
  dirty_ = true;
  failures_.fetch_add(1);
  if (healthy_.exchange(false)) {
    Log(LogLevel::kError, "audit_log_unavailable",
        {{"dir", options_.dir}, {"error", std::string(status.message())}});
  }
  return WithCallerMessage(
      absl::UnavailableError(absl::StrCat("audit log unavailable: ", status.message())),
      "audit log unavailable (the details are in custodyd's log)");
}

absl::Status AuditLog::Append(const AuditEvent& event) {
  return AppendAll(absl::MakeConstSpan(&event, 1));
}

absl::Status AuditLog::AppendAll(absl::Span<const AuditEvent> events) {
  if (events.empty()) return absl::OkStatus();
  std::vector<std::string> fields;
  fields.reserve(events.size());
  for (const AuditEvent& event : events) {
    std::string f;
    if (!options_.replica_id.empty())
      AppendField(f, "replica", options_.replica_id, kMaxFieldBytes);
    fields.push_back(f + FormatEventFields(event));
  }
  mu_.Lock();
  if (queued_ == nullptr) queued_ = std::make_shared<Batch>();
  std::shared_ptr<Batch> batch = queued_;
  // The time is taken under the lock so that times never go backwards along seq.
  const absl::Time now = absl::Now();
  for (std::string& f : fields) batch->entries.push_back({now, std::move(f)});
  while (!batch->done) {
    if (writing_) {
      cv_.Wait(&mu_);
      continue;
    }
    // Leader: our batch is the queued one (a batch taken by a writer is done before writing_
    // clears). Write it, and everything that joined it, with one fsync.
    writing_ = true;
    std::shared_ptr<Batch> mine = std::move(queued_);
    queued_ = nullptr;
    mu_.Unlock();
    absl::Status status = Commit(*mine);
    mu_.Lock();
    mine->status = std::move(status);
    mine->done = true;
    writing_ = false;
    cv_.SignalAll();
  }
  absl::Status result = batch->status;
  mu_.Unlock();
  return result;
}

AuditLog::Stats AuditLog::stats() const {
  Stats s;
  s.lines = lines_.load();
  s.batches = batches_.load();
  s.fsyncs = fsyncs_.load();
  s.failures = failures_.load();
  return s;
}

namespace {

std::string ShortHash(absl::string_view hash) { return std::string(hash.substr(0, 16)); }

// VerifyAuditFiles, and when `replica` is given, every line must carry that replica id; checked
// against `anchors` (AuditAnchors) when given. `result` (may be null) gets the figures.
absl::Status VerifyChain(const std::vector<std::string>& files, uint64_t* lines,
                         std::string* last_hash, const std::string* replica,
                         const AuditAnchors* anchors = nullptr,
                         AuditChainResult* result = nullptr) {
  if (files.empty()) return absl::InvalidArgumentError("no audit files given");
  const AuditChainPoint* start =
      anchors != nullptr && anchors->start.has_value() ? &*anchors->start : nullptr;
  const AuditChainPoint* end =
      anchors != nullptr && anchors->end.has_value() ? &*anchors->end : nullptr;
  uint64_t count = 0;
  uint64_t expected_seq = 1;
  uint64_t first_seq = 0;
  bool start_seen = false, end_seen = false;
  std::string prev(kAnchor);
  for (const std::string& file : files) {
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(file.c_str(), "rb"), &std::fclose);
    if (f == nullptr) return ErrnoError(file);
    struct LineBuffer {
      char* data = nullptr;
      size_t capacity = 0;
      ~LineBuffer() { std::free(data); }
    } buf;
    uint64_t line_no = 0;
    for (;;) {
      ssize_t n = ::getline(&buf.data, &buf.capacity, f.get());
      if (n <= 0) break;
      ++line_no;
      auto bad = [&](absl::string_view reason) {
        return absl::InvalidArgumentError(absl::StrCat(file, ":", line_no, ": ", reason));
      };
      absl::string_view line(buf.data, static_cast<size_t>(n));
      if (line.back() != '\n') return bad("incomplete line (no trailing newline)");
      line.remove_suffix(1);
      absl::StatusOr<ParsedLine> parsed = ParseAuditLine(line);
      if (!parsed.ok()) return bad(parsed.status().message());
      if (replica != nullptr && parsed->replica != *replica) {
        return bad(absl::StrCat("line of replica '", parsed->replica, "' in a file of replica '",
                                *replica, "'"));
      }
      if (count == 0) {
        first_seq = parsed->seq;
        const bool chain_start = parsed->seq == 1 && parsed->prev == kAnchor;
        const bool continues_start =
            start != nullptr && parsed->seq == start->seq + 1 && parsed->prev == start->hash;
        const bool holds_start = start != nullptr && parsed->seq <= start->seq;
        if (continues_start) start_seen = true;
        if (!chain_start && !continues_start && !holds_start) {
          if (start != nullptr) {
            return bad(absl::StrCat("first line (seq ", parsed->seq,
                                    ") neither starts the chain nor continues from the start "
                                    "anchor (seq ",
                                    start->seq, ")"));
          }
          return bad(absl::StrCat("first line not anchored (seq ", parsed->seq,
                                  "; a chain starts at seq 1 with prev of 64 zeros; when earlier "
                                  "files were archived, pass --start=SEQ:HASH of their last line "
                                  "or of an anchor)"));
        }
      } else {
        if (parsed->seq != expected_seq) {
          return bad(absl::StrCat("seq ", parsed->seq, " not consecutive (expected ", expected_seq,
                                  "): a line is missing or out of order"));
        }
        if (parsed->prev != prev) {
          return bad("prev does not match the hash of the previous line");
        }
      }
      prev = Sha256Hex(line);
      for (const auto& [point, seen, what] :
           {std::tuple{start, &start_seen, "start"}, std::tuple{end, &end_seen, "end"}}) {
        if (point == nullptr || point->seq != parsed->seq) continue;
        if (point->hash != prev) {
          return bad(absl::StrCat("line seq ", parsed->seq, " has hash ", ShortHash(prev),
                                  "..., the ", what, " anchor says ", ShortHash(point->hash),
                                  "...: the chain was rewritten"));
        }
        *seen = true;
      }
      expected_seq = parsed->seq + 1;
      ++count;
    }
    if (std::ferror(f.get())) return ErrnoError(absl::StrCat("read ", file));
  }
  const uint64_t last_seq = count == 0 ? 0 : expected_seq - 1;
  if (start != nullptr && !start_seen && first_seq != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the files end (seq ", last_seq, ") before the start anchor at seq ", start->seq));
  }
  if (end != nullptr && end->seq > last_seq) {
    return absl::InvalidArgumentError(absl::StrCat("truncated: anchor at seq ", end->seq,
                                                   ", file ends at ", last_seq, " (", files.back(),
                                                   ")"));
  }
  if (lines != nullptr) *lines = count;
  if (last_hash != nullptr) *last_hash = prev;
  if (result != nullptr) {
    result->first_seq = first_seq;
    result->last_seq = last_seq;
    result->end_anchored = end_seen;
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status VerifyAuditFiles(const std::vector<std::string>& files, uint64_t* lines,
                              std::string* last_hash) {
  return VerifyChain(files, lines, last_hash, nullptr);
}

std::string AuditFileReplica(const std::string& path) {
  const size_t slash = path.rfind('/');
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  constexpr absl::string_view kPrefix = "audit-";
  if (!absl::StartsWith(name, kPrefix)) return "";
  const size_t dash = name.rfind('-');
  if (dash + 1 <= kPrefix.size()) return "";  // audit-NNNNNN.jsonl
  const std::string replica = name.substr(kPrefix.size(), dash - kPrefix.size());
  return FileIndex(name, replica) > 0 ? replica : "";
}

absl::StatusOr<AuditChainPoint> ParseAuditChainPoint(absl::string_view text) {
  const size_t colon = text.find(':');
  AuditChainPoint point;
  if (colon == absl::string_view::npos || !absl::SimpleAtoi(text.substr(0, colon), &point.seq) ||
      point.seq == 0 || text.size() - colon - 1 != kHexHashBytes ||
      !IsLowerHex(text.substr(colon + 1))) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", text.substr(0, 100),
                     "' is not SEQ:HASH (a line number >= 1, a colon, "
                     "64 lowercase hex digits), e.g. from the audit.anchor log line"));
  }
  point.hash = std::string(text.substr(colon + 1));
  return point;
}

absl::StatusOr<std::vector<AuditChainResult>> VerifyAuditChains(
    const std::vector<std::string>& files, const std::map<std::string, AuditAnchors>& anchors) {
  if (files.empty()) return absl::InvalidArgumentError("no audit files given");
  std::vector<std::string> order;
  std::map<std::string, std::vector<std::string>> groups;
  for (const std::string& f : files) {
    const std::string replica = AuditFileReplica(f);
    if (groups.count(replica) == 0) order.push_back(replica);
    groups[replica].push_back(f);
  }
  std::vector<AuditChainResult> out;
  for (const std::string& replica : order) {
    AuditChainResult r;
    r.replica = replica;
    r.files = groups[replica].size();
    // A single process's files (no replica in the name) are checked as before; a replica's
    // lines must all name it.
    auto anchor = anchors.find(replica);
    absl::Status s =
        VerifyChain(groups[replica], &r.lines, &r.last_hash, replica.empty() ? nullptr : &replica,
                    anchor == anchors.end() ? nullptr : &anchor->second, &r);
    if (!s.ok()) {
      if (replica.empty()) return s;
      return absl::Status(s.code(), absl::StrCat("replica ", replica, ": ", s.message()));
    }
    out.push_back(std::move(r));
  }
  return out;
}

}  // namespace custody::server
