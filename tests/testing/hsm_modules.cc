#include "tests/testing/hsm_modules.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "p11-kit/pkcs11.h"
#include "pkcs11/token.h"
#include "tests/testing/harness.h"

namespace custody::testing {
namespace {

using namespace std::chrono_literals;

constexpr char kSoftHsm[] = "/usr/lib/softhsm/libsofthsm2.so";
constexpr char kSoftokn[] = "/usr/lib/x86_64-linux-gnu/libsoftokn3.so";
constexpr char kTpm2Pkcs11[] = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so";
constexpr char kOpencryptoki[] = "/usr/lib/x86_64-linux-gnu/pkcs11/libopencryptoki.so";
constexpr char kP11KitClient[] = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so";
// opencryptoki's software token ships with this SO PIN; C_InitToken keeps it.
constexpr char kOpencryptokiSoPin[] = "87654321";
constexpr char kSoPin[] = "custodySO";

bool Exists(const std::string& path) { return access(path.c_str(), F_OK) == 0; }

// Whether something accepts TCP connections on 127.0.0.1:port.
bool Listening(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const bool connected =
      connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0;
  close(fd);
  return connected;
}

// Polls `ready` every 50 ms for up to `timeout`.
template <typename F>
bool WaitFor(F ready, std::chrono::milliseconds timeout) {
  for (auto deadline = std::chrono::steady_clock::now() + timeout;
       std::chrono::steady_clock::now() < deadline; std::this_thread::sleep_for(50ms)) {
    if (ready()) return true;
  }
  return ready();
}

std::string SoftHsmConf(const std::string& dir) {
  mkdir((dir + "/tokens").c_str(), 0700);
  const std::string conf = dir + "/softhsm2.conf";
  WriteFileOrDie(conf, absl::StrCat("directories.tokendir = ", dir,
                                    "/tokens\nobjectstore.backend = file\nlog.level = ERROR\n"));
  return conf;
}

}  // namespace

std::string HsmName(HsmKind kind) {
  switch (kind) {
    case HsmKind::kSoftHsm2:
      return "softhsm2";
    case HsmKind::kNssSoftokn:
      return "nss-softokn";
    case HsmKind::kTpm2:
      return "tpm2-pkcs11";
    case HsmKind::kOpencryptoki:
      return "opencryptoki-swtok";
    case HsmKind::kP11KitClient:
      return "p11-kit-client";
  }
  return "?";
}

namespace {

// The module loaded and C_Initialize'd in this process until destruction (C_Finalize; the
// library stays mapped, as pkcs11/cryptoki.cc does: modules leave callbacks behind).
class RawModule {
 public:
  RawModule(const std::string& path, const std::string& init_args) {
    void* library = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (library == nullptr) {
      error_ = absl::StrCat("dlopen: ", dlerror());
      return;
    }
    auto get = reinterpret_cast<CK_C_GetFunctionList>(dlsym(library, "C_GetFunctionList"));
    if (get == nullptr || get(&fn_) != CKR_OK) {
      error_ = "no C_GetFunctionList";
      fn_ = nullptr;
      return;
    }
    CK_C_INITIALIZE_ARGS args{};
    args.flags = CKF_OS_LOCKING_OK;
    if (!init_args.empty()) args.pReserved = const_cast<char*>(init_args.c_str());
    if (CK_RV rv = fn_->C_Initialize(&args); rv != CKR_OK) {
      error_ = absl::StrCat("C_Initialize: ", pkcs11::CkrName(rv));
      fn_ = nullptr;
    }
  }
  ~RawModule() {
    if (fn_ != nullptr) fn_->C_Finalize(nullptr);
  }
  CK_FUNCTION_LIST* fn() const { return fn_; }
  const std::string& error() const { return error_; }

 private:
  CK_FUNCTION_LIST* fn_ = nullptr;
  std::string error_;
};

CK_UTF8CHAR* PinBytes(const std::string& p) {
  return reinterpret_cast<CK_UTF8CHAR*>(const_cast<char*>(p.data()));
}

}  // namespace

std::string InitTokenInSlot(const std::string& module_path, const std::string& init_args,
                            size_t slot_index, const std::string& so_pin, const std::string& label,
                            const std::string& user_pin) {
  RawModule module(module_path, init_args);
  if (module.fn() == nullptr) return module.error();
  CK_FUNCTION_LIST* fn = module.fn();
  CK_RV rv = CKR_OK;
  std::string error;
  auto fail = [&](const char* call, CK_RV r) {
    error = absl::StrCat(call, ": ", pkcs11::CkrName(r));
  };
  CK_SLOT_ID slots[16];
  CK_ULONG count = 16;
  CK_SESSION_HANDLE session = CK_INVALID_HANDLE;
  unsigned char padded[32];
  std::memset(padded, ' ', sizeof(padded));
  std::memcpy(padded, label.data(), std::min(label.size(), sizeof(padded)));
  auto pin = PinBytes;
  if ((rv = fn->C_GetSlotList(CK_TRUE, slots, &count)) != CKR_OK) {
    fail("C_GetSlotList", rv);
  } else if (slot_index >= count) {
    error = absl::StrCat("the module lists ", count, " slots with a token");
  } else if ((rv = fn->C_InitToken(slots[slot_index], pin(so_pin), so_pin.size(), padded)) !=
             CKR_OK) {
    fail("C_InitToken", rv);
  } else {
    // Some modules move the token to another slot on initialization (SoftHSM2): find it.
    count = 16;
    CK_SLOT_ID slot = slots[slot_index];
    if (fn->C_GetSlotList(CK_TRUE, slots, &count) == CKR_OK) {
      for (CK_ULONG i = 0; i < count; ++i) {
        CK_TOKEN_INFO info{};
        if (fn->C_GetTokenInfo(slots[i], &info) == CKR_OK &&
            std::memcmp(info.label, padded, sizeof(padded)) == 0) {
          slot = slots[i];
        }
      }
    }
    if ((rv = fn->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr,
                                &session)) != CKR_OK) {
      fail("C_OpenSession", rv);
    } else if ((rv = fn->C_Login(session, CKU_SO, pin(so_pin), so_pin.size())) != CKR_OK) {
      fail("C_Login(SO)", rv);
    } else if ((rv = fn->C_InitPIN(session, pin(user_pin), user_pin.size())) != CKR_OK) {
      fail("C_InitPIN", rv);
    }
    if (session != CK_INVALID_HANDLE) fn->C_CloseSession(session);
  }
  return error;
}

std::string PublicKeyUsages(const HsmModule& hsm, std::map<std::string, std::string>* usages) {
  RawModule module(hsm.module_path(), hsm.init_args());
  if (module.fn() == nullptr) return module.error();
  CK_FUNCTION_LIST* fn = module.fn();
  CK_SLOT_ID slots[16];
  CK_ULONG count = 16;
  CK_RV rv = fn->C_GetSlotList(CK_TRUE, slots, &count);
  if (rv != CKR_OK) return absl::StrCat("C_GetSlotList: ", pkcs11::CkrName(rv));
  unsigned char padded[32];
  std::memset(padded, ' ', sizeof(padded));
  std::memcpy(padded, hsm.token_label().data(), std::min(hsm.token_label().size(), sizeof(padded)));
  for (CK_ULONG i = 0; i < count; ++i) {
    CK_TOKEN_INFO info{};
    if (fn->C_GetTokenInfo(slots[i], &info) != CKR_OK ||
        std::memcmp(info.label, padded, sizeof(padded)) != 0) {
      continue;
    }
    CK_SESSION_HANDLE session = CK_INVALID_HANDLE;
    if ((rv = fn->C_OpenSession(slots[i], CKF_SERIAL_SESSION, nullptr, nullptr, &session)) !=
        CKR_OK) {
      return absl::StrCat("C_OpenSession: ", pkcs11::CkrName(rv));
    }
    fn->C_Login(session, CKU_USER, PinBytes(hsm.pin()), hsm.pin().size());
    CK_OBJECT_CLASS public_class = CKO_PUBLIC_KEY;
    CK_ATTRIBUTE find[] = {{CKA_CLASS, &public_class, sizeof(public_class)}};
    CK_OBJECT_HANDLE objects[256];
    CK_ULONG found = 0;
    fn->C_FindObjectsInit(session, find, 1);
    fn->C_FindObjects(session, objects, 256, &found);
    fn->C_FindObjectsFinal(session);
    for (CK_ULONG o = 0; o < found; ++o) {
      char label[128] = {};
      CK_BBOOL wrap = CK_FALSE, encrypt = CK_FALSE, verify = CK_FALSE;
      CK_ATTRIBUTE read[] = {{CKA_LABEL, label, sizeof(label) - 1},
                             {CKA_WRAP, &wrap, sizeof(wrap)},
                             {CKA_ENCRYPT, &encrypt, sizeof(encrypt)},
                             {CKA_VERIFY, &verify, sizeof(verify)}};
      // Attributes a module does not keep read as CKR_ATTRIBUTE_TYPE_INVALID: FALSE then.
      fn->C_GetAttributeValue(session, objects[o], read, 4);
      const std::string name(label, read[0].ulValueLen == CK_UNAVAILABLE_INFORMATION
                                        ? 0
                                        : std::min<size_t>(read[0].ulValueLen, 127));
      if (name.rfind("custody/", 0) != 0) continue;
      std::vector<std::string> flags;
      if (wrap == CK_TRUE) flags.push_back("wrap");
      if (encrypt == CK_TRUE) flags.push_back("encrypt");
      if (verify == CK_TRUE) flags.push_back("verify");
      (*usages)[name] = absl::StrJoin(flags, " ");
    }
    fn->C_Logout(session);
    fn->C_CloseSession(session);
    return "";
  }
  return "no token labelled " + hsm.token_label();
}

std::unique_ptr<HsmModule> HsmModule::Start(HsmKind kind, const std::string& dir) {
  std::unique_ptr<HsmModule> module(new HsmModule(kind, dir));
  module->pin_file_ = dir + "/pin";
  WriteFileOrDie(module->pin_file_, module->pin_);
  chmod(module->pin_file_.c_str(), 0600);
  switch (kind) {
    case HsmKind::kSoftHsm2:
      module->SetUpSoftHsm2();
      break;
    case HsmKind::kNssSoftokn:
      module->SetUpNss();
      break;
    case HsmKind::kTpm2:
      module->SetUpTpm2();
      break;
    case HsmKind::kOpencryptoki:
      module->SetUpOpencryptoki();
      break;
    case HsmKind::kP11KitClient:
      module->SetUpP11Kit();
      break;
  }
  return module;
}

HsmModule::~HsmModule() {
  while (!daemons_.empty()) {
    daemons_.back().Stop();
    daemons_.pop_back();
  }
}

bool HsmModule::StartDaemon(const std::vector<std::string>& argv, const std::string& log,
                            const std::vector<std::string>& env) {
  logs_.push_back(log);
  ChildOptions options;
  options.argv = argv;
  options.env = env;
  options.stdout_path = log;
  options.stderr_path = log;
  options.append = true;
  absl::StatusOr<ChildProcess> child = ChildProcess::Start(options);
  if (!child.ok()) return Fail(std::string(child.status().message()));
  daemons_.push_back(*std::move(child));
  return true;
}

std::vector<std::string> HsmModule::CustodydFlags() const {
  std::vector<std::string> flags = {"--pkcs11_module=" + module_path_,
                                    "--token_label=" + token_label_, "--pin_file=" + pin_file_};
  if (!init_args_.empty()) flags.push_back("--pkcs11_init_args=" + init_args_);
  return flags;
}

std::string HsmModule::Logs() const {
  std::string out;
  for (const std::string& log : logs_) {
    if (Exists(log)) absl::StrAppend(&out, "--- ", log, "\n", ReadFileOrDie(log));
  }
  return out;
}

bool HsmModule::Fail(std::string why) {
  error_ = std::move(why);
  return false;
}

void HsmModule::SetEnv(const std::string& name, const std::string& value) {
  env_.push_back(name + "=" + value);
  setenv(name.c_str(), value.c_str(), 1);
}

bool HsmModule::SetUpSoftHsm2() {
  module_path_ = kSoftHsm;
  if (!Exists(module_path_)) {
    unavailable_ = true;
    return Fail("softhsm2 is not installed");
  }
  SetEnv("SOFTHSM2_CONF", SoftHsmConf(dir_));
  std::string e = InitTokenInSlot(module_path_, "", 0, kSoPin, token_label_, pin_);
  return e.empty() || Fail("SoftHSM2 token: " + e);
}

bool HsmModule::SetUpNss() {
  module_path_ = kSoftokn;
  if (!Exists(module_path_) || !Exists("/usr/bin/certutil")) {
    unavailable_ = true;
    return Fail("libnss3 / libnss3-tools are not installed");
  }
  const std::string db = dir_ + "/nssdb";
  mkdir(db.c_str(), 0700);
  // certutil -N makes the key database; its password (from a file) is the token's user PIN.
  CommandResult r = RunCommand({"certutil", "-N", "-d", "sql:" + db, "-f", pin_file_});
  if (r.exit_code != 0) return Fail("certutil -N: " + r.err);
  init_args_ =
      absl::StrCat("configdir='sql:", db, "' certPrefix='' keyPrefix='' secmod='secmod.db' flags=");
  token_label_ = "NSS Certificate DB";
  return true;
}

bool HsmModule::SetUpTpm2() {
  module_path_ = kTpm2Pkcs11;
  for (const char* needed : {kTpm2Pkcs11, "/usr/bin/swtpm", "/usr/sbin/tpm2-abrmd",
                             "/usr/bin/dbus-daemon", "/usr/bin/tpm2_ptool"}) {
    if (!Exists(needed)) {
      unavailable_ = true;
      return Fail(absl::StrCat(needed, " is not installed"));
    }
  }
  const std::string state = dir_ + "/tpm";
  const std::string store = dir_ + "/tpm2-pkcs11";
  mkdir(state.c_str(), 0700);
  mkdir(store.c_str(), 0700);
  // The TPM: swtpm on loopback (its command port, and the control port next to it, where the
  // swtpm TCTI looks for it).
  const int port = FreePort();
  const int ctrl = port + 1;
  if (!StartDaemon({"/usr/bin/swtpm", "socket", "--tpm2", "--tpmstate", "dir=" + state, "--server",
                    absl::StrCat("type=tcp,port=", port, ",bindaddr=127.0.0.1"), "--ctrl",
                    absl::StrCat("type=tcp,port=", ctrl, ",bindaddr=127.0.0.1"), "--flags",
                    "not-need-init,startup-clear"},
                   dir_ + "/swtpm.log")) {
    return false;
  }
  if (!WaitFor([&] { return Listening(port) && Listening(ctrl); }, 10s)) {
    return Fail("swtpm did not start");
  }
  // The resource manager, on a private D-Bus session bus (a Unix socket in `dir`).
  const std::string bus = dir_ + "/bus";
  if (!StartDaemon({"/usr/bin/dbus-daemon", "--session", "--nofork", "--address=unix:path=" + bus},
                   dir_ + "/dbus.log")) {
    return false;
  }
  if (!WaitFor([&] { return Exists(bus); }, 10s)) return Fail("dbus-daemon did not start");
  SetEnv("DBUS_SESSION_BUS_ADDRESS", "unix:path=" + bus);
  if (!StartDaemon({"/usr/sbin/tpm2-abrmd", "--session", "--allow-root", "--flush-all",
                    absl::StrCat("--tcti=swtpm:host=127.0.0.1,port=", port)},
                   dir_ + "/tpm2-abrmd.log")) {
    return false;
  }
  SetEnv("TPM2_PKCS11_TCTI", "tabrmd:bus_type=session");
  SetEnv("TPM2TOOLS_TCTI", "tabrmd:bus_type=session");
  SetEnv("TPM2_PKCS11_STORE", store);
  // The store's primary key in the TPM, once abrmd answers on the bus.
  CommandResult init;
  if (!WaitFor(
          [&] {
            init = RunCommand({"/usr/bin/tpm2_ptool", "init", "--path=" + store});
            return init.exit_code == 0;
          },
          15s)) {
    return Fail("tpm2_ptool init: " + init.out + init.err);
  }
  // The token with tpm2_ptool addtoken, not C_InitToken: addtoken tests whether the TPM's PSS
  // signatures carry the salt length PKCS#11 asks for and records "pss-sigs-good"; a token made
  // by C_InitToken lacks that record and tpm2-pkcs11 then lists no RSA-PSS mechanism at all.
  // (The tool takes the PINs on its command line: test values here.)
  CommandResult add =
      RunCommand({"/usr/bin/tpm2_ptool", "addtoken", "--pid=1", std::string("--sopin=") + kSoPin,
                  "--userpin=" + pin_, "--label=" + token_label_, "--path=" + store});
  return add.exit_code == 0 || Fail("tpm2_ptool addtoken: " + add.out + add.err);
}

bool HsmModule::SetUpOpencryptoki() {
  module_path_ = kOpencryptoki;
  if (!Exists(module_path_) || !Exists("/usr/sbin/pkcsslotd")) {
    unavailable_ = true;
    return Fail("opencryptoki is not installed");
  }
  // pkcsslotd keeps its socket and lock here (root:pkcs11, as the package's tmpfiles.d says).
  mkdir("/run/opencryptoki", 0770);
  if (struct group* g = getgrnam("pkcs11"); g != nullptr) {
    if (chown("/run/opencryptoki", 0, g->gr_gid) != 0) return Fail("chown /run/opencryptoki");
  }
  if (!StartDaemon({"/usr/sbin/pkcsslotd", "-f"}, dir_ + "/pkcsslotd.log")) return false;
  // The one software token of the machine, wiped and labelled for this test (its SO PIN stays
  // the package's default). C_Initialize fails until pkcsslotd is up.
  std::string e;
  WaitFor(
      [&] {
        e = InitTokenInSlot(module_path_, "", 0, kOpencryptokiSoPin, token_label_, pin_);
        return e.empty() || e.find("C_Initialize") == std::string::npos;
      },
      10s);
  return e.empty() || Fail("opencryptoki token: " + e);
}

bool HsmModule::SetUpP11Kit() {
  module_path_ = kP11KitClient;
  if (!Exists(module_path_) || !Exists(kSoftHsm) || !Exists("/usr/bin/p11-kit")) {
    unavailable_ = true;
    return Fail("p11-kit-modules / softhsm2 are not installed");
  }
  const std::string conf = SoftHsmConf(dir_);
  setenv("SOFTHSM2_CONF", conf.c_str(), 1);
  std::string e = InitTokenInSlot(kSoftHsm, "", 0, kSoPin, token_label_, pin_);
  if (!e.empty()) return Fail("SoftHSM2 token behind p11-kit: " + e);
  const std::string socket = dir_ + "/p11-kit.sock";
  if (!StartDaemon({"/usr/bin/p11-kit", "server", "-f", "--provider", kSoftHsm, "-n", socket,
                    "pkcs11:token=" + token_label_},
                   dir_ + "/p11-kit-server.log", {"SOFTHSM2_CONF=" + conf})) {
    return false;
  }
  if (!WaitFor([&] { return Exists(socket); }, 10s)) return Fail("p11-kit server did not start");
  SetEnv("P11_KIT_SERVER_ADDRESS", "unix:path=" + socket);
  return true;
}

}  // namespace custody::testing
