#include "pkcs11/cryptoki.h"

#include <dlfcn.h>

#include <atomic>
#include <map>
#include <memory>
#include <optional>
#include <utility>

#include "absl/base/const_init.h"
#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "pkcs11/token.h"

namespace custody::pkcs11 {
namespace {

struct LoadedModule {
  void* library = nullptr;
  std::shared_ptr<Module::Shared> shared;
  int references = 0;
};

// The registry lock is held across C_Initialize/C_Finalize on purpose: a Load racing with the
// last release must not observe a module between C_Finalize and the refcount reaching zero.
// These calls happen at start-up, shutdown and re-initialization only, never on a request path.
ABSL_CONST_INIT absl::Mutex registry_mu(absl::kConstInit);

std::map<std::string, LoadedModule>& Registry() ABSL_EXCLUSIVE_LOCKS_REQUIRED(registry_mu) {
  // Never destroyed: Modules may be released from static destructors of other objects.
  static auto* registry = new std::map<std::string, LoadedModule>();
  return *registry;
}

CK_RV InitializeForThreads(CK_FUNCTION_LIST* fn, const std::string& init_args) {
  // CKF_OS_LOCKING_OK: the pool calls into the module from many threads at once.
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  // The module reads the string during C_Initialize only (it is NUL-terminated by std::string).
  if (!init_args.empty()) args.pReserved = const_cast<char*>(init_args.c_str());
  return fn->C_Initialize(&args);
}

// What an operator should look at when C_Initialize fails with `rv`.
std::string InitializeHint(const std::string& path, CK_RV rv) {
  switch (rv) {
    case CKR_ARGUMENTS_BAD:
      return absl::StrCat(
          " (the module '", path,
          "' refused its initialization arguments: modules such as NSS softokn need a "
          "module-specific string, given with --pkcs11_init_args, e.g. \"configdir='sql:DIR' "
          "certPrefix='' keyPrefix='' secmod='secmod.db' flags=\")");
    case CKR_HOST_MEMORY:
    case CKR_GENERAL_ERROR:
    case CKR_FUNCTION_FAILED:
    case CKR_DEVICE_ERROR:
      return absl::StrCat(
          " (the module '", path,
          "' could not reach what stands behind it: is its daemon or device up? opencryptoki "
          "needs pkcsslotd running (without it, it answers CKR_HOST_MEMORY, or CKR_FUNCTION_FAILED "
          "before pkcsslotd ever ran since boot); tpm2-pkcs11 needs "
          "its TPM and resource manager (TPM2_PKCS11_TCTI); a network HSM needs its client "
          "configuration and server; the module's own output is in the log)");
    default:
      return "";
  }
}

constexpr char kCkrPayload[] = "type.custody/pkcs11.CK_RV";
constexpr char kFunctionPayload[] = "type.custody/pkcs11.function";

absl::Status CkErrorWithoutPayload(std::string_view function, CK_RV rv);

}  // namespace

struct Module::Shared {
  explicit Shared(CK_FUNCTION_LIST* f) : fn(f) {}
  CK_FUNCTION_LIST* const fn;
  absl::Mutex gate;
  std::atomic<uint64_t> generation{1};
  bool finalize_on_last ABSL_GUARDED_BY(registry_mu) = false;  // false: someone else's module
  std::string init_args;  // set by the Load that initializes, before anyone else sees it
};

absl::StatusOr<std::unique_ptr<Module>> Module::Load(const std::string& path,
                                                     const std::string& init_args) {
  absl::MutexLock lock(&registry_mu);
  LoadedModule& entry = Registry()[path];
  if (entry.library == nullptr) {
    // The library stays mapped for the life of the process even after C_Finalize: modules such
    // as SoftHSM2 link libcrypto and may leave callbacks registered there, and unmapping their
    // code would turn a later OpenSSL cleanup into a crash.
    void* library = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (library == nullptr) {
      const char* why = dlerror();
      Registry().erase(path);
      return absl::FailedPreconditionError(
          absl::StrCat("cannot load PKCS#11 module '", path, "': ", why ? why : "dlopen failed"));
    }
    auto get_function_list =
        reinterpret_cast<CK_C_GetFunctionList>(dlsym(library, "C_GetFunctionList"));
    CK_FUNCTION_LIST* fn = nullptr;
    if (get_function_list == nullptr) {
      dlclose(library);
      Registry().erase(path);
      return absl::FailedPreconditionError(
          absl::StrCat("'", path, "' is not a PKCS#11 module: no C_GetFunctionList"));
    }
    CK_RV rv = get_function_list(&fn);
    if (rv != CKR_OK || fn == nullptr) {
      dlclose(library);
      Registry().erase(path);
      return rv != CKR_OK ? CkError("C_GetFunctionList", rv)
                          : absl::InternalError("C_GetFunctionList returned no list");
    }
    entry.library = library;
    entry.shared = std::make_shared<Shared>(fn);
  }
  if (entry.references == 0) {
    entry.shared->init_args = init_args;
    CK_RV rv = InitializeForThreads(entry.shared->fn, entry.shared->init_args);
    if (rv == CKR_CRYPTOKI_ALREADY_INITIALIZED) {
      entry.shared->finalize_on_last = false;  // not ours to finalize
    } else if (rv == CKR_OK) {
      entry.shared->finalize_on_last = true;
    } else {
      absl::Status failed = CkError("C_Initialize", rv);
      return WithMessage(failed, absl::StrCat(failed.message(), InitializeHint(path, rv)));
    }
  }
  ++entry.references;
  return std::unique_ptr<Module>(new Module(path, entry.shared));
}

Module::~Module() {
  absl::MutexLock lock(&registry_mu);
  auto it = Registry().find(path_);
  if (it == Registry().end()) return;
  LoadedModule& entry = it->second;
  if (--entry.references == 0 && entry.shared->finalize_on_last) {
    entry.shared->fn->C_Finalize(nullptr);
  }
}

CK_FUNCTION_LIST* Module::fn() const { return shared_->fn; }

absl::Mutex& Module::gate() const { return shared_->gate; }

uint64_t Module::generation() const { return shared_->generation.load(std::memory_order_acquire); }

absl::StatusOr<bool> Module::Reinitialize(uint64_t seen) {
  // Exclusive: waits for every call sequence in flight (all Tokens on this module) to end, and
  // holds new ones back until the module is initialized again.
  absl::WriterMutexLock gate_lock(&shared_->gate);
  if (shared_->generation.load(std::memory_order_acquire) != seen) return false;
  absl::MutexLock lock(&registry_mu);
  if (!shared_->finalize_on_last) {
    return absl::FailedPreconditionError(
        absl::StrCat("'", path_,
                     "' was initialized by someone else in this process: not ours to "
                     "re-initialize"));
  }
  // CKR_CRYPTOKI_NOT_INITIALIZED from C_Finalize (a previous C_Initialize failed) is fine.
  shared_->fn->C_Finalize(nullptr);
  // Every handle issued so far is void from here on, whether C_Initialize succeeds or not.
  shared_->generation.fetch_add(1, std::memory_order_acq_rel);
  CK_RV rv = InitializeForThreads(shared_->fn, shared_->init_args);
  if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED) return CkError("C_Initialize", rv);
  return true;
}

absl::Status CkError(std::string_view function, CK_RV rv) {
  absl::Status status = CkErrorWithoutPayload(function, rv);
  status.SetPayload(kCkrPayload, absl::Cord(absl::StrCat(rv)));
  status.SetPayload(kFunctionPayload, absl::Cord(AsAbsl(function)));
  return status;
}

std::string CkFunctionOf(const absl::Status& status) {
  absl::optional<absl::Cord> payload = status.GetPayload(kFunctionPayload);
  return payload.has_value() ? std::string(*payload) : std::string();
}

std::optional<CK_RV> CkrOf(const absl::Status& status) {
  absl::optional<absl::Cord> payload = status.GetPayload(kCkrPayload);
  unsigned long rv = 0;
  if (!payload.has_value() || !absl::SimpleAtoi(std::string(*payload), &rv)) return std::nullopt;
  return rv;
}

absl::Status WithCode(const absl::Status& status, absl::StatusCode code) {
  absl::Status out(code, status.message());
  status.ForEachPayload(
      [&](absl::string_view type, const absl::Cord& value) { out.SetPayload(type, value); });
  return out;
}

absl::Status WithMessage(const absl::Status& status, std::string_view message) {
  absl::Status out(status.code(), AsAbsl(message));
  status.ForEachPayload(
      [&](absl::string_view type, const absl::Cord& value) { out.SetPayload(type, value); });
  return out;
}

Damage DamageOf(CK_RV rv) {
  switch (rv) {
    case CKR_OBJECT_HANDLE_INVALID:
    case CKR_KEY_HANDLE_INVALID:
      return Damage::kHandles;
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED:
    case CKR_USER_NOT_LOGGED_IN:
    case CKR_DEVICE_ERROR:
    // An operation some earlier call left open in the session (tpm2-pkcs11 1.9 leaves C_Decrypt's
    // operation active when the TPM refuses the ciphertext, and C_Sign's on some failures, though
    // the standard says a failed call ends it): the session is closed and the call retried on a
    // fresh one, instead of failing a caller for another caller's request.
    case CKR_OPERATION_ACTIVE:
      return Damage::kSession;
    case CKR_DEVICE_REMOVED:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_CRYPTOKI_NOT_INITIALIZED:
      return Damage::kModule;
    default:
      return Damage::kNone;
  }
}

bool IsSessionGone(CK_RV rv) {
  switch (rv) {
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED:
    case CKR_DEVICE_REMOVED:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_CRYPTOKI_NOT_INITIALIZED:
      return true;
    default:
      return false;
  }
}

namespace {

absl::Status CkErrorWithoutPayload(std::string_view function, CK_RV rv) {
  std::string message = absl::StrCat(AsAbsl(function), ": ", CkrName(rv));
  switch (rv) {
    case CKR_DEVICE_ERROR:
    case CKR_DEVICE_REMOVED:
    case CKR_DEVICE_MEMORY:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_TOKEN_NOT_RECOGNIZED:
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED:
    case CKR_SESSION_COUNT:
    case CKR_USER_NOT_LOGGED_IN:
    case CKR_GENERAL_ERROR:
    case CKR_CRYPTOKI_NOT_INITIALIZED:
      return absl::UnavailableError(message);
    case CKR_DATA_LEN_RANGE:
    case CKR_DATA_INVALID:
    case CKR_ARGUMENTS_BAD:
    case CKR_MECHANISM_INVALID:
    case CKR_MECHANISM_PARAM_INVALID:
    case CKR_KEY_TYPE_INCONSISTENT:
    case CKR_KEY_SIZE_RANGE:
    case CKR_KEY_FUNCTION_NOT_PERMITTED:
    case CKR_TEMPLATE_INCONSISTENT:
    case CKR_TEMPLATE_INCOMPLETE:
    case CKR_ATTRIBUTE_VALUE_INVALID:
    case CKR_ATTRIBUTE_TYPE_INVALID:
    case CKR_DOMAIN_PARAMS_INVALID:
    case CKR_CURVE_NOT_SUPPORTED:
    case CKR_ENCRYPTED_DATA_INVALID:
    case CKR_ENCRYPTED_DATA_LEN_RANGE:
      return absl::InvalidArgumentError(message);
    case CKR_OBJECT_HANDLE_INVALID:
    case CKR_KEY_HANDLE_INVALID:
      return absl::NotFoundError(message);
    case CKR_PIN_INCORRECT:
    case CKR_PIN_INVALID:
    case CKR_PIN_LEN_RANGE:
    case CKR_PIN_EXPIRED:
    case CKR_PIN_LOCKED:
    case CKR_USER_PIN_NOT_INITIALIZED:
      return absl::PermissionDeniedError(message);
    default:
      return absl::InternalError(message);
  }
}

}  // namespace

bool IsSessionBroken(CK_RV rv) {
  switch (rv) {
    case CKR_DEVICE_ERROR:
    case CKR_DEVICE_REMOVED:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED:
    case CKR_USER_NOT_LOGGED_IN:
    case CKR_OPERATION_ACTIVE:  // a previous operation was left open: do not reuse
    case CKR_CRYPTOKI_NOT_INITIALIZED:
      return true;
    default:
      return false;
  }
}

namespace {

// The constant's name, or `prefix` and its value in hex when the table has none.
std::string NameOrHex(const std::map<CK_ULONG, std::string_view>& names, CK_ULONG value,
                      absl::string_view prefix) {
  auto it = names.find(value);
  if (it != names.end()) return std::string(it->second);
  return absl::StrCat(prefix, absl::Hex(value));
}

}  // namespace

#define CKR_ENTRY(x) \
  { x, #x }
#define CKM_ENTRY(x) \
  { x, #x }

std::string CkrName(unsigned long rv) {
  static const auto* const kNames = new std::map<unsigned long, std::string_view>{
      CKR_ENTRY(CKR_OK),
      CKR_ENTRY(CKR_CANCEL),
      CKR_ENTRY(CKR_HOST_MEMORY),
      CKR_ENTRY(CKR_SLOT_ID_INVALID),
      CKR_ENTRY(CKR_GENERAL_ERROR),
      CKR_ENTRY(CKR_FUNCTION_FAILED),
      CKR_ENTRY(CKR_ARGUMENTS_BAD),
      CKR_ENTRY(CKR_NO_EVENT),
      CKR_ENTRY(CKR_NEED_TO_CREATE_THREADS),
      CKR_ENTRY(CKR_CANT_LOCK),
      CKR_ENTRY(CKR_ATTRIBUTE_READ_ONLY),
      CKR_ENTRY(CKR_ATTRIBUTE_SENSITIVE),
      CKR_ENTRY(CKR_ATTRIBUTE_TYPE_INVALID),
      CKR_ENTRY(CKR_ATTRIBUTE_VALUE_INVALID),
      CKR_ENTRY(CKR_ACTION_PROHIBITED),
      CKR_ENTRY(CKR_DATA_INVALID),
      CKR_ENTRY(CKR_DATA_LEN_RANGE),
      CKR_ENTRY(CKR_DEVICE_ERROR),
      CKR_ENTRY(CKR_DEVICE_MEMORY),
      CKR_ENTRY(CKR_DEVICE_REMOVED),
      CKR_ENTRY(CKR_ENCRYPTED_DATA_INVALID),
      CKR_ENTRY(CKR_ENCRYPTED_DATA_LEN_RANGE),
      CKR_ENTRY(CKR_FUNCTION_CANCELED),
      CKR_ENTRY(CKR_FUNCTION_NOT_PARALLEL),
      CKR_ENTRY(CKR_FUNCTION_NOT_SUPPORTED),
      CKR_ENTRY(CKR_KEY_HANDLE_INVALID),
      CKR_ENTRY(CKR_KEY_SIZE_RANGE),
      CKR_ENTRY(CKR_KEY_TYPE_INCONSISTENT),
      CKR_ENTRY(CKR_KEY_NOT_NEEDED),
      CKR_ENTRY(CKR_KEY_CHANGED),
      CKR_ENTRY(CKR_KEY_NEEDED),
      CKR_ENTRY(CKR_KEY_INDIGESTIBLE),
      CKR_ENTRY(CKR_KEY_FUNCTION_NOT_PERMITTED),
      CKR_ENTRY(CKR_KEY_NOT_WRAPPABLE),
      CKR_ENTRY(CKR_KEY_UNEXTRACTABLE),
      CKR_ENTRY(CKR_MECHANISM_INVALID),
      CKR_ENTRY(CKR_MECHANISM_PARAM_INVALID),
      CKR_ENTRY(CKR_OBJECT_HANDLE_INVALID),
      CKR_ENTRY(CKR_OPERATION_ACTIVE),
      CKR_ENTRY(CKR_OPERATION_NOT_INITIALIZED),
      CKR_ENTRY(CKR_PIN_INCORRECT),
      CKR_ENTRY(CKR_PIN_INVALID),
      CKR_ENTRY(CKR_PIN_LEN_RANGE),
      CKR_ENTRY(CKR_PIN_EXPIRED),
      CKR_ENTRY(CKR_PIN_LOCKED),
      CKR_ENTRY(CKR_SESSION_CLOSED),
      CKR_ENTRY(CKR_SESSION_COUNT),
      CKR_ENTRY(CKR_SESSION_HANDLE_INVALID),
      CKR_ENTRY(CKR_SESSION_PARALLEL_NOT_SUPPORTED),
      CKR_ENTRY(CKR_SESSION_READ_ONLY),
      CKR_ENTRY(CKR_SESSION_EXISTS),
      CKR_ENTRY(CKR_SESSION_READ_ONLY_EXISTS),
      CKR_ENTRY(CKR_SESSION_READ_WRITE_SO_EXISTS),
      CKR_ENTRY(CKR_SIGNATURE_INVALID),
      CKR_ENTRY(CKR_SIGNATURE_LEN_RANGE),
      CKR_ENTRY(CKR_TEMPLATE_INCOMPLETE),
      CKR_ENTRY(CKR_TEMPLATE_INCONSISTENT),
      CKR_ENTRY(CKR_TOKEN_NOT_PRESENT),
      CKR_ENTRY(CKR_TOKEN_NOT_RECOGNIZED),
      CKR_ENTRY(CKR_TOKEN_WRITE_PROTECTED),
      CKR_ENTRY(CKR_UNWRAPPING_KEY_SIZE_RANGE),
      CKR_ENTRY(CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT),
      CKR_ENTRY(CKR_USER_ALREADY_LOGGED_IN),
      CKR_ENTRY(CKR_USER_NOT_LOGGED_IN),
      CKR_ENTRY(CKR_USER_PIN_NOT_INITIALIZED),
      CKR_ENTRY(CKR_USER_TYPE_INVALID),
      CKR_ENTRY(CKR_USER_ANOTHER_ALREADY_LOGGED_IN),
      CKR_ENTRY(CKR_USER_TOO_MANY_TYPES),
      CKR_ENTRY(CKR_WRAPPED_KEY_INVALID),
      CKR_ENTRY(CKR_WRAPPED_KEY_LEN_RANGE),
      CKR_ENTRY(CKR_WRAPPING_KEY_HANDLE_INVALID),
      CKR_ENTRY(CKR_WRAPPING_KEY_SIZE_RANGE),
      CKR_ENTRY(CKR_WRAPPING_KEY_TYPE_INCONSISTENT),
      CKR_ENTRY(CKR_RANDOM_SEED_NOT_SUPPORTED),
      CKR_ENTRY(CKR_RANDOM_NO_RNG),
      CKR_ENTRY(CKR_DOMAIN_PARAMS_INVALID),
      CKR_ENTRY(CKR_CURVE_NOT_SUPPORTED),
      CKR_ENTRY(CKR_BUFFER_TOO_SMALL),
      CKR_ENTRY(CKR_SAVED_STATE_INVALID),
      CKR_ENTRY(CKR_INFORMATION_SENSITIVE),
      CKR_ENTRY(CKR_STATE_UNSAVEABLE),
      CKR_ENTRY(CKR_CRYPTOKI_NOT_INITIALIZED),
      CKR_ENTRY(CKR_CRYPTOKI_ALREADY_INITIALIZED),
      CKR_ENTRY(CKR_MUTEX_BAD),
      CKR_ENTRY(CKR_MUTEX_NOT_LOCKED),
      CKR_ENTRY(CKR_NEW_PIN_MODE),
      CKR_ENTRY(CKR_NEXT_OTP),
      CKR_ENTRY(CKR_EXCEEDED_MAX_ITERATIONS),
      CKR_ENTRY(CKR_FIPS_SELF_TEST_FAILED),
      CKR_ENTRY(CKR_LIBRARY_LOAD_FAILED),
      CKR_ENTRY(CKR_PIN_TOO_WEAK),
      CKR_ENTRY(CKR_PUBLIC_KEY_INVALID),
      CKR_ENTRY(CKR_FUNCTION_REJECTED),
  };
  return NameOrHex(*kNames, rv, "CKR_0x");
}

std::string CkmName(CK_MECHANISM_TYPE mechanism) {
  static const auto* const kNames = new std::map<CK_MECHANISM_TYPE, std::string_view>{
      CKM_ENTRY(CKM_RSA_PKCS_KEY_PAIR_GEN),
      CKM_ENTRY(CKM_RSA_PKCS),
      CKM_ENTRY(CKM_RSA_X_509),
      CKM_ENTRY(CKM_RSA_PKCS_OAEP),
      CKM_ENTRY(CKM_RSA_PKCS_PSS),
      CKM_ENTRY(CKM_SHA256_RSA_PKCS),
      CKM_ENTRY(CKM_SHA256_RSA_PKCS_PSS),
      CKM_ENTRY(CKM_EC_KEY_PAIR_GEN),
      CKM_ENTRY(CKM_ECDSA),
      CKM_ENTRY(CKM_ECDSA_SHA256),
      CKM_ENTRY(CKM_ECDH1_DERIVE),
      CKM_ENTRY(CKM_ECDH1_COFACTOR_DERIVE),
      CKM_ENTRY(CKM_EC_EDWARDS_KEY_PAIR_GEN),
      CKM_ENTRY(CKM_EDDSA),
      CKM_ENTRY(CKM_AES_KEY_GEN),
      CKM_ENTRY(CKM_AES_ECB),
      CKM_ENTRY(CKM_AES_CBC),
      CKM_ENTRY(CKM_AES_GCM),
      CKM_ENTRY(CKM_AES_KEY_WRAP),
      CKM_ENTRY(CKM_AES_KEY_WRAP_PAD),
      CKM_ENTRY(CKM_GENERIC_SECRET_KEY_GEN),
      CKM_ENTRY(CKM_SHA256),
      CKM_ENTRY(CKM_SHA384),
      CKM_ENTRY(CKM_SHA512),
      CKM_ENTRY(CKM_SHA256_HMAC),
  };
  return NameOrHex(*kNames, mechanism, "CKM_0x");
}

#undef CKR_ENTRY
#undef CKM_ENTRY

void AlignRight(std::string& buffer, size_t length) {
  const size_t size = buffer.size();
  const size_t shift = size - length;
  auto* bytes = reinterpret_cast<unsigned char*>(buffer.data());
  // A barrel shifter: pass `bit` shifts everything right by 2^bit exactly when that bit of
  // `shift` is set, selected with a mask instead of a branch. Bytes past `length` end up either
  // shifted out or overwritten, so their initial value does not matter.
  for (size_t bit = 0; bit < sizeof(size_t) * 8 && (size_t{1} << bit) <= size; ++bit) {
    const size_t step = size_t{1} << bit;
    const auto mask = static_cast<unsigned char>(0u - ((shift >> bit) & 1u));
    for (size_t i = size; i-- > 0;) {
      const unsigned char moved = i >= step ? bytes[i - step] : 0;
      bytes[i] = static_cast<unsigned char>((moved & mask) | (bytes[i] & ~mask));
    }
  }
}

std::string TrimPadded(const unsigned char* data, size_t size) {
  std::string out(reinterpret_cast<const char*>(data), size);
  size_t end = out.find_last_not_of(std::string_view(" \0", 2));
  out.resize(end == std::string::npos ? 0 : end + 1);
  return out;
}

}  // namespace custody::pkcs11
