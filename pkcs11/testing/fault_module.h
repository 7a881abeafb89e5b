// Test-only: the control API of the fault-injecting PKCS#11 module (fault_module.cc, shared
// library custody_fault_pkcs11). Tests do not link the module: they load it as the Token's
// module_path and find these functions with dlopen(path, RTLD_NOW | RTLD_NOLOAD) + dlsym, typed
// with decltype(&custody_fault_inject) and so on.
//
// Function names are Cryptoki names ("C_Sign"). Faults apply to the functions custody calls
// (the CUSTODY_WRAP list in fault_module.cc); every other function is forwarded untouched.
//
// Driving another process (custodyd) through a control file: start it with
// CUSTODY_FAULT_CONTROL=/path/file in its environment. At most every 10 ms, from whichever
// wrapped call comes first (never from C_Initialize/C_Finalize, which no other call overlaps),
// the module reads the file and, when its content differs from the content it applied last,
// applies its lines in order, one command per line ('#' starts a comment):
//   seq N                              names this write (makes equal command sets distinct)
//   reset                              custody_fault_reset()
//   inject FUNCTION CKR COUNT          custody_fault_inject
//   inject_ex FUNCTION CKR COUNT SKIP LOSE_REPLY
//   leave_active FUNCTION CKR COUNT    custody_fault_inject_leaving_operation_active
//   close_all_sessions                 every session open now is closed behind the application's
//                                      back: lazily, each really closed by the next call made on
//                                      it, which gets CKR_SESSION_HANDLE_INVALID (SoftHSM2 crashes
//                                      when a session is closed under a call running on it, which
//                                      custody_fault_close_all_sessions cannot rule out in a
//                                      process under load)
//   device_removed CYCLES              custody_fault_device_removed
//   delay FUNCTION MS                  custody_fault_delay_ms
// CKR is a name from a short list (CKR_DEVICE_ERROR, CKR_SESSION_HANDLE_INVALID, ...) or a
// number (0xB3). Commands act at once, so a test writes the whole file atomically (a temporary
// file renamed over it) with a new `seq` each time. After applying, the module replaces
// /path/file.ack with "seq N" (the last seq line, "-" without one), one "error LINE" per line it
// did not understand, then "calls FUNCTION COUNT" (since the last reset) and "total FUNCTION
// COUNT" (since the module was loaded) for every function called so far. A process that makes
// no Cryptoki call applies nothing, so the test keeps it busy (custodyd probes its token every
// second anyway).
#ifndef CUSTODY_PKCS11_TESTING_FAULT_MODULE_H_
#define CUSTODY_PKCS11_TESTING_FAULT_MODULE_H_

#ifdef __cplusplus
extern "C" {
#endif

// The next `count` calls of `function` return `ckr` without reaching the real module (a failed
// C_Sign/C_Decrypt still ends the real operation, as the standard says a failed call does).
// count < 0: every call until custody_fault_reset. count 0: cancels.
void custody_fault_inject(const char* function, unsigned long ckr, int count);

// As custody_fault_inject, after letting `skip` calls through; with `lose_reply` the faulted calls
// do reach the real module (objects get created) and only their answer is replaced by `ckr`.
void custody_fault_inject_ex(const char* function, unsigned long ckr, int count, int skip,
                             int lose_reply);

// As custody_fault_inject for C_Sign or C_Decrypt, except that the real operation stays active in
// the session (the real module is not called at all), as tpm2-pkcs11 1.9 leaves it when the TPM
// refuses a ciphertext: the session's next C_SignInit/C_DecryptInit gets CKR_OPERATION_ACTIVE.
void custody_fault_inject_leaving_operation_active(const char* function, unsigned long ckr,
                                                   int count);

// C_CloseAllSessions in the real module on every slot a session was opened on: later calls on
// the old handles get CKR_SESSION_HANDLE_INVALID, and the application is logged out.
void custody_fault_close_all_sessions(void);

// The token is "removed": every session call, C_OpenSession, C_GetTokenInfo and C_Login return
// CKR_DEVICE_REMOVED until `cycles` C_Finalize/C_Initialize cycles have happened (1: the next
// re-initialization cures it). cycles < 0: until custody_fault_reset; 0: cancels.
void custody_fault_device_removed(int cycles);

// Every call of `function` sleeps `ms` milliseconds first (a slow token). 0 cancels.
void custody_fault_delay_ms(const char* function, int ms);

// How many times `function` was called (faulted calls included) since the last reset.
unsigned long custody_fault_calls(const char* function);

// Clears every fault, delay and call count.
void custody_fault_reset(void);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // CUSTODY_PKCS11_TESTING_FAULT_MODULE_H_
