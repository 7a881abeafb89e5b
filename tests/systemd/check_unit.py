#!/usr/bin/python3
"""Checks deploy/custodyd.service (ctest: systemd_unit).

1. `systemd-analyze verify` accepts it (ExecStart pointed at the custodyd just built).
2. `systemd-analyze security --offline=yes` rates its exposure at most 2.0.
3. custodyd speaks the notify protocol Type=notify relies on: READY=1 (with its MAINPID) once it
   serves, RELOADING=1 then READY=1 around a SIGHUP (ExecReload), STOPPING=1 on SIGTERM, then a
   clean exit. The test plays systemd's part with a datagram socket as $NOTIFY_SOCKET.
systemd itself cannot run as PID 1 in this sandbox, so the unit is not started for real here.

usage: check_unit.py UNIT_FILE CUSTODYD
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

MAX_EXPOSURE = 2.0


def main():
    unit, custodyd = sys.argv[1], os.path.abspath(sys.argv[2])
    text = open(unit).read()
    assert re.search(r"^Type=notify$", text, re.M), "Type=notify"
    assert re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", text, re.M), "ExecReload SIGHUP"
    # Bounded resources: room for custodyd's default --max_connections (1024) plus the 128
    # descriptors it keeps for itself, and for its --max_threads (512) plus its own threads.
    nofile = re.search(r"^LimitNOFILE=(\d+)$", text, re.M)
    assert nofile and int(nofile.group(1)) >= 1024 + 128, "LimitNOFILE >= 1152"
    tasks = re.search(r"^TasksMax=(\d+)$", text, re.M)
    assert tasks and int(tasks.group(1)) >= 512 + 64, "TasksMax >= 576"
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "custodyd.service")
        with open(copy, "w") as f:
            f.write(text.replace("/usr/local/bin/custodyd", custodyd))
        if shutil.which("systemd-analyze"):
            v = subprocess.run(["systemd-analyze", "verify", copy], capture_output=True, text=True)
            assert v.returncode == 0 and not v.stderr.strip(), f"verify: {v.stderr}"
            s = subprocess.run(["systemd-analyze", "security", "--offline=yes", copy],
                               capture_output=True, text=True)
            m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", s.stdout)
            assert m, f"security: {s.stdout[-500:]} {s.stderr}"
            exposure = float(m.group(1))
            print(f"systemd-analyze security exposure: {exposure}")
            assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}"
        else:
            print("systemd-analyze not installed: verify/security not run")

        notify = os.path.join(tmp, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(notify)
        sock.settimeout(60)
        env = dict(os.environ, NOTIFY_SOCKET=notify)
        log = open(os.path.join(tmp, "custodyd.log"), "w")
        proc = subprocess.Popen([custodyd, "--state_dir=" + os.path.join(tmp, "state")],
                                env=env, stdout=log, stderr=log)
        try:
            ready = sock.recv(4096).decode()
            assert ready == f"READY=1\nMAINPID={proc.pid}", f"first message: {ready!r}"
            proc.send_signal(signal.SIGHUP)
            assert sock.recv(4096) == b"RELOADING=1"
            assert sock.recv(4096) == b"READY=1"
            proc.send_signal(signal.SIGTERM)
            assert sock.recv(4096) == b"STOPPING=1"
            assert proc.wait(timeout=30) == 0, "custodyd did not exit cleanly"
        except BaseException:
            proc.kill()
            proc.wait()
            print(open(os.path.join(tmp, "custodyd.log")).read()[-2000:])
            raise
    print("systemd unit: verify OK, notify protocol OK")


if __name__ == "__main__":
    main()
