// Test-only: the PKCS#11 modules Debian 12 ships, each set up the way docs/hsm-compatibility.md
// tells an operator to, with a fresh token labelled as the module names it and a user PIN in a
// file: SoftHSM2, NSS softokn (direct, with its initialization string), tpm2-pkcs11 on swtpm +
// tpm2-abrmd (a private swtpm on loopback, a private D-Bus session bus on a Unix socket, abrmd on
// that bus), opencryptoki's software token (pkcsslotd, one per machine) and p11-kit's RPC client
// in front of a `p11-kit server` exporting a SoftHSM2 token (a network-HSM stand-in).
//
// Every daemon is started here with posix_spawn (common/testing/child_process.h, in the
// foreground) and ended by its PID when the HsmModule goes. The module's environment
// (SOFTHSM2_CONF, TPM2_PKCS11_*, D-Bus address, P11_KIT_SERVER_ADDRESS) is in env() for custodyd,
// and is set in this process too so that the test can load the module itself (to read key
// attributes back).
#ifndef CUSTODY_TESTS_TESTING_HSM_MODULES_H_
#define CUSTODY_TESTS_TESTING_HSM_MODULES_H_

#include <sys/types.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/testing/child_process.h"

namespace custody::testing {

enum class HsmKind { kSoftHsm2, kNssSoftokn, kTpm2, kOpencryptoki, kP11KitClient };

std::string HsmName(HsmKind kind);  // "softhsm2", "nss-softokn", ...

class HsmModule {
 public:
  // Sets the module up under `dir` (which must outlive it). On failure, error() says why and
  // nothing else is meaningful; unavailable() is true when the machine lacks the module's
  // packages altogether (the only reason a test may skip).
  static std::unique_ptr<HsmModule> Start(HsmKind kind, const std::string& dir);
  ~HsmModule();

  HsmKind kind() const { return kind_; }
  const std::string& error() const { return error_; }
  bool unavailable() const { return unavailable_; }
  const std::string& module_path() const { return module_path_; }
  const std::string& token_label() const { return token_label_; }
  const std::string& pin_file() const { return pin_file_; }
  const std::string& pin() const { return pin_; }
  const std::string& init_args() const { return init_args_; }
  const std::vector<std::string>& env() const { return env_; }
  // custodyd's flags for this module: --pkcs11_module, --token_label, --pin_file and
  // --pkcs11_init_args when the module takes one.
  std::vector<std::string> CustodydFlags() const;
  // The daemons' logs, for failure messages.
  std::string Logs() const;

 private:
  explicit HsmModule(HsmKind kind, std::string dir) : kind_(kind), dir_(std::move(dir)) {}
  bool SetUpSoftHsm2();
  bool SetUpNss();
  bool SetUpTpm2();
  bool SetUpOpencryptoki();
  bool SetUpP11Kit();
  bool Fail(std::string why);
  // Starts a daemon in the foreground (posix_spawn), stdout and stderr appended to `log`.
  bool StartDaemon(const std::vector<std::string>& argv, const std::string& log,
                   const std::vector<std::string>& env = {});
  void SetEnv(const std::string& name, const std::string& value);

  HsmKind kind_;
  std::string dir_;
  std::string error_;
  bool unavailable_ = false;
  std::string module_path_;
  std::string token_label_ = "custody";
  std::string pin_file_;
  std::string pin_ = "custody1";  // opencryptoki takes 4 to 8 characters
  std::string init_args_;
  std::vector<std::string> env_;
  std::vector<std::string> logs_;
  std::vector<ChildProcess> daemons_;  // stopped by PID, in reverse order of start
};

// Initializes the token in slot `slot_index` of the module's slot list (C_InitToken with
// `so_pin`, label, then C_InitPIN with `user_pin` as SO), with the module loaded in this
// process and finalized again. An already initialized token is wiped (C_InitToken with its SO
// PIN). "" on success, else the failing call and CKR.
std::string InitTokenInSlot(const std::string& module_path, const std::string& init_args,
                            size_t slot_index, const std::string& so_pin, const std::string& label,
                            const std::string& user_pin);

// The usage flags (CKA_WRAP, CKA_ENCRYPT, CKA_VERIFY: "wrap encrypt verify", "" for none) of
// every public key custody made in `hsm`'s token (CKA_LABEL "custody/..."), by label, read with
// the module loaded in this process. "" on success, else the failing call.
std::string PublicKeyUsages(const HsmModule& hsm, std::map<std::string, std::string>* usages);

}  // namespace custody::testing

#endif  // CUSTODY_TESTS_TESTING_HSM_MODULES_H_
