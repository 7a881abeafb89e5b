// custodyd: the custody gRPC service. See README.md for flags and the embedded default.
//
// Run() is the start as a sequence of named steps (custodyd_startup.h): flags and listen
// address, token, metadata store, policy and audit, key service, gRPC services, listeners; then
// serve until a shutdown signal and drain. The flags are in custodyd_flags.cc.
#include <signal.h>

#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "common/log.h"
#include "common/version.h"
#include "server/daemon/custodyd_flags.h"
#include "server/daemon/custodyd_startup.h"

namespace custody::server {
namespace {

int Run() {
  BeginStartup();
  Daemon d;
  // Flags first: nothing is opened before the listeners' bounds and address are known good.
  // Each step logs its own failure (a startup.* line); custodyd then exits 1.
  if (!CheckHttpBounds(&d)) return 1;
  if (!CheckServiceBounds()) return 1;
  if (!PrepareListenAddress(&d)) return 1;
  if (!OpenToken(&d)) return 1;
  if (!OpenMetadataStore(&d)) return 1;
  if (!OpenPolicyAndAudit(&d)) return 1;
  if (!CreateKeyService(&d)) return 1;
  if (!CreateGrpcServices(&d)) return 1;
  if (!StartHttpListeners(&d)) return 1;
  if (!StartGrpcServer(&d)) return 1;
  AnnounceReady(d);
  ServeUntilShutdown(&d);  // until SIGTERM/SIGINT, then the drain
  return 0;
}

}  // namespace
}  // namespace custody::server

int main(int argc, char** argv) {
  // Block the shutdown signals in every thread (gRPC's included) before any is created, so
  // only the waiter thread receives them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);
#ifdef NDEBUG
  // Debian's Abseil keeps Mutex deadlock detection on, which records every lock acquisition in
  // a global graph (about 2% of custodyd's CPU per signature). Debug builds (the sanitizer CI
  // job) keep it.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
#endif
  absl::SetProgramUsageMessage("custodyd --state_dir=DIR [--listen=unix:PATH|HOST:PORT] ...");
  // --help and --version answer on stdout and exit 0 (Abseil's own --help exits 1 and lists
  // every library's flags under the source file that defines them).
  for (int i = 1; i < argc; ++i) {
    const absl::string_view arg = argv[i];
    if (arg == "--help" || arg == "-help" || arg == "-h" || arg == "--helpfull") {
      custody::server::PrintHelp();
      return 0;
    }
    if (arg == "--version" || arg == "-version") {
      std::printf("%s\n", custody::VersionLine("custodyd").c_str());
      return 0;
    }
  }
  if (const std::string error = custody::server::DurationWithoutUnit(argc, argv); !error.empty()) {
    custody::Log(custody::LogLevel::kError, "startup.flags", {{"error", error}});
    return 1;
  }
  absl::ParseCommandLine(argc, argv);
  if (absl::GetFlag(FLAGS_verbose)) custody::SetLogLevel(custody::LogLevel::kDebug);
  return custody::server::Run();
}
