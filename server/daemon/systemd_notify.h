// The systemd notification protocol (sd_notify(3)) without libsystemd: a datagram such as
// "READY=1" to the Unix socket named by $NOTIFY_SOCKET (a path, or "@name" in the abstract
// namespace). Lets deploy/custodyd.service use Type=notify: systemd considers custodyd started
// only once it serves. Does nothing when $NOTIFY_SOCKET is unset (not under systemd).
#ifndef CUSTODY_SERVER_DAEMON_SYSTEMD_NOTIFY_H_
#define CUSTODY_SERVER_DAEMON_SYSTEMD_NOTIFY_H_

#include <string>

namespace custody::server {

// Sends `state` ("READY=1", "RELOADING=1", "STOPPING=1", ...). False when $NOTIFY_SOCKET is
// unset or the datagram could not be sent.
bool NotifySystemd(const std::string& state);

}  // namespace custody::server

#endif  // CUSTODY_SERVER_DAEMON_SYSTEMD_NOTIFY_H_
