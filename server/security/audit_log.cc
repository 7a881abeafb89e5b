#include "server/security/audit_log.h"

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

using audit_format::AppendField;
using audit_format::FileIndex;
using audit_format::FileName;
using audit_format::FormatEventFields;
using audit_format::FormatLine;
using audit_format::kAnchor;
using audit_format::kMaxFieldBytes;
using audit_format::kMaxLineBytes;
using audit_format::ParseAuditLine;
using audit_format::ParsedLine;

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
  // The batch's callers wait here (under mu_): the leader that commits it wakes them alone, and
  // then one of the next queued batch to lead it. One condition variable for every caller woke
  // the whole next batch at each commit only to put all but one back to sleep.
  absl::CondVar cv;
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
      batch->cv.Wait(&mu_);
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
    mine->cv.SignalAll();
    if (queued_ != nullptr) queued_->cv.Signal();  // its leader
  }
  absl::Status result = batch->status;
  mu_.Unlock();
  return result;
}

AuditLog::Stats AuditLog::stats() const {
  return Stats{lines_.load(), batches_.load(), fsyncs_.load(), failures_.load()};
}

}  // namespace custody::server
