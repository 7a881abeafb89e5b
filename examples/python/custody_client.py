"""A Python client for custodyd (custody.v1), for authorization servers written in Python.

What it adds to the stubs generated from custody.proto:

* **Deadlines.** Every call has one overall deadline (default 5 s) that covers every attempt.
* **An address list with failover.** ``Client(["unix:/run/a.sock", "10.0.0.2:8443", ...])``
  keeps one channel per replica and sends each call to the replica that last answered. The
  idempotent calls (``sign_jws``, ``sign``, ``decrypt_jwe``, ``get_jwks``, ``get_key_ring``)
  are retried on the next replica after UNAVAILABLE until the deadline, with a jittered backoff
  once every replica was tried. A replica slow to accept a connection (paused, starved of CPU)
  is waited for until the deadline, not given up on after a fixed connect timeout. Lifecycle
  calls (KeyAdmin: create, rotate, disable, ...) are not offered here: they belong to
  custodyctl, and are never retried, since a first attempt may have committed.
* **A JWKS cache fed by WatchJwks.** ``JwksCache(client, rings)`` holds the latest published
  JWK Set of the rings, pushed by custodyd on every change (rotation, compromise), and
  subscribes again, on another replica if need be, when the stream ends.

Errors are ``CustodyError`` with the gRPC status code and custodyd's message (docs/api.md lists
them per RPC). Thread-safe: one Client and one JwksCache may be shared by threads.

Stubs: generate them from the proto custody installs (``share/custody/proto``) with Debian's
python3-grpc-tools, e.g. ``generate_stubs("/usr/share/custody/proto", "gen")``, before
creating a Client.
"""

import importlib
import json
import random
import sys
import threading
import time
from dataclasses import dataclass

import grpc

_pb2 = None
_pb2_grpc = None


def generate_stubs(proto_root, out_dir):
    """Generates custody/v1/custody_pb2{,_grpc}.py from PROTO_ROOT/custody/v1/custody.proto
    into out_dir (grpc_tools.protoc) and makes them importable."""
    from grpc_tools import protoc  # python3-grpc-tools

    import os

    os.makedirs(out_dir, exist_ok=True)
    rc = protoc.main(["protoc", f"-I{proto_root}", f"--python_out={out_dir}",
                      f"--grpc_python_out={out_dir}", "custody/v1/custody.proto"])
    if rc != 0:
        raise RuntimeError(f"grpc_tools.protoc failed ({rc}) on {proto_root}")
    if out_dir not in sys.path:
        sys.path.insert(0, out_dir)


def _stubs():
    global _pb2, _pb2_grpc
    if _pb2 is None:
        _pb2 = importlib.import_module("custody.v1.custody_pb2")
        _pb2_grpc = importlib.import_module("custody.v1.custody_pb2_grpc")
    return _pb2, _pb2_grpc


class CustodyError(Exception):
    """A failed call: code is a grpc.StatusCode, message is custodyd's (or gRPC's) text."""

    def __init__(self, code, message):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass
class SignedJws:
    jws: str
    kid: str
    version: int
    alg: str


@dataclass
class DecryptedJwe:
    plaintext: bytes
    protected_header: dict
    kid: str
    version: int


@dataclass
class Jwks:
    jwks: dict  # the RFC 7517 JWK Set, parsed
    etag: str
    max_age_seconds: int


def _split(addresses):
    if isinstance(addresses, str):
        addresses = addresses.split(",")
    out = [a.strip() for a in addresses if a.strip()]
    if not out:
        raise ValueError("no custodyd address")
    return out


class Client:
    """custody.v1 Signer calls (and KeyAdmin reads) over a list of replicas.

    addresses: a list, or a comma-separated string, of gRPC targets ("unix:/path",
    "host:port"). credentials: grpc.ssl_channel_credentials(...) for TLS/mTLS; None for a Unix
    socket or loopback. deadline: seconds per call, every attempt included.
    """

    def __init__(self, addresses, deadline=5.0, credentials=None, initial_backoff=0.05,
                 max_backoff=1.0):
        pb2, pb2_grpc = _stubs()
        self._pb2 = pb2
        self.addresses = _split(addresses)
        self.deadline = deadline
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        # A connection attempt is given 20 s (gRPC's default minimum connect timeout): the
        # call's deadline, not a short connect timeout, decides how long a slow replica is
        # waited for. Reconnection after a lost replica is tried again within a second.
        options = [("grpc.min_reconnect_backoff_ms", 20000),
                   ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000),
                   ("grpc.max_receive_message_length", 16 * 1024 * 1024)]
        self._channels = [
            grpc.secure_channel(a, credentials, options) if credentials is not None
            else grpc.insecure_channel(a, options) for a in self.addresses
        ]
        self._signers = [pb2_grpc.SignerStub(c) for c in self._channels]
        self._admins = [pb2_grpc.KeyAdminStub(c) for c in self._channels]
        self._lock = threading.Lock()
        self._current = 0

    def close(self):
        for c in self._channels:
            c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the idempotent calls ---------------------------------------------------------------

    def sign_jws(self, ring, payload, typ="", cty="", extra_header=None, deadline=None):
        """Signer.SignJws: a compact JWS of payload (bytes or str) with the ring's ACTIVE key."""
        if isinstance(payload, str):
            payload = payload.encode()
        req = self._pb2.SignJwsRequest(ring=ring, payload=payload, typ=typ, cty=cty,
                                       extra_header_json=json.dumps(extra_header)
                                       if extra_header else "")
        r = self._idempotent(lambda i, t: self._signers[i].SignJws(req, timeout=t), deadline)
        return SignedJws(r.jws, r.kid, r.version, r.alg)

    def sign(self, ring, data=None, digest=None, deadline=None):
        """Signer.Sign: a raw JOSE-encoded signature over data (or a digest)."""
        req = self._pb2.SignRequest(ring=ring, data=data) if digest is None else \
            self._pb2.SignRequest(ring=ring, digest=digest)
        return self._idempotent(lambda i, t: self._signers[i].Sign(req, timeout=t), deadline)

    def decrypt_jwe(self, ring, jwe, deadline=None):
        """Signer.DecryptJwe of a compact JWE; every decryption failure is the same
        INVALID_ARGUMENT "decryption failed"."""
        req = self._pb2.DecryptJweRequest(ring=ring, jwe=jwe.strip())
        r = self._idempotent(lambda i, t: self._signers[i].DecryptJwe(req, timeout=t), deadline)
        return DecryptedJwe(r.plaintext, json.loads(r.protected_header), r.kid, r.version)

    def get_jwks(self, rings=(), deadline=None):
        """Signer.GetJwks of the rings (every ring the caller may read when empty)."""
        req = self._pb2.GetJwksRequest(rings=list(rings))
        r = self._idempotent(lambda i, t: self._signers[i].GetJwks(req, timeout=t), deadline)
        return Jwks(json.loads(r.jwks), r.etag, r.max_age_seconds)

    def get_key_ring(self, name, deadline=None):
        """KeyAdmin.GetKeyRing (a read): the custody.v1.KeyRing message."""
        req = self._pb2.GetKeyRingRequest(name=name)
        return self._idempotent(lambda i, t: self._admins[i].GetKeyRing(req, timeout=t), deadline)

    # -- failover ---------------------------------------------------------------------------

    def replica(self):
        """The index in addresses of the replica calls go to now."""
        with self._lock:
            return self._current

    def _failed(self, index):
        """The replica at index failed: move on to the next one (unless another thread has)."""
        with self._lock:
            if self._current == index:
                self._current = (index + 1) % len(self.addresses)

    def _idempotent(self, call, deadline):
        end = time.monotonic() + (self.deadline if deadline is None else deadline)
        backoff = self._initial_backoff
        tried = 0
        while True:
            index = self.replica()
            left = end - time.monotonic()
            try:
                return call(index, max(left, 0.001))
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise CustodyError(e.code(), e.details()) from None
                last = e
            self._failed(index)
            tried += 1
            left = end - time.monotonic()
            if left <= 0.001:
                raise CustodyError(last.code(), last.details())
            if tried % len(self.addresses) == 0:  # every replica failed once: back off
                time.sleep(min(min(backoff, self._max_backoff) * random.uniform(0.8, 1.2),
                               left / 2))
                backoff *= 2

    def _watch(self, index, rings):
        return self._signers[index].WatchJwks(self._pb2.WatchJwksRequest(rings=list(rings)))


class JwksCache:
    """The published JWK Set of some rings (all when empty), kept current by WatchJwks.

    start() subscribes (returns once the first JWKS arrived, or raises CustodyError after the
    client's deadline); the stream's pushes replace the set; when the stream ends (custodyd
    shutting down, a replica killed) it subscribes again on the next replica, backing off up to
    a second. stop() ends it. jwks() is the latest set; key(kid) one key; wait_for(pred) blocks
    until the set satisfies pred.
    """

    def __init__(self, client, rings=()):
        self._client = client
        self._rings = list(rings)
        self._cond = threading.Condition()
        self._jwks = None
        self._updated = 0.0
        self._call = None
        self._stopped = False
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self._run, name="custody-jwks", daemon=True)
        self._thread.start()
        if not self.wait_for(lambda s: True, self._client.deadline):
            raise CustodyError(grpc.StatusCode.DEADLINE_EXCEEDED, "no JWKS from any replica")
        return self

    def stop(self):
        with self._cond:
            self._stopped = True
            if self._call is not None:
                self._call.cancel()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def jwks(self):
        with self._cond:
            return self._jwks

    def key(self, kid):
        s = self.jwks() or {"keys": []}
        return next((k for k in s["keys"] if k.get("kid") == kid), None)

    def age(self):
        """Seconds since the last push (a stream that is down leaves the set aging)."""
        with self._cond:
            return time.monotonic() - self._updated

    def wait_for(self, pred, timeout):
        end = time.monotonic() + timeout
        with self._cond:
            while self._jwks is None or not pred(self._jwks):
                left = end - time.monotonic()
                if left <= 0 or self._stopped:
                    return False
                self._cond.wait(left)
            return True

    def _run(self):
        backoff = 0.05
        while True:
            index = self._client.replica()
            with self._cond:
                if self._stopped:
                    return
                self._call = self._client._watch(index, self._rings)
            try:
                for message in self._call:
                    with self._cond:
                        self._jwks = json.loads(message.jwks)
                        self._updated = time.monotonic()
                        self._cond.notify_all()
                    backoff = 0.05
            except grpc.RpcError:
                pass  # cancelled by stop(), or the replica went away
            with self._cond:
                if self._stopped:
                    return
                self._cond.wait(backoff * random.uniform(0.8, 1.2))
            self._client._failed(index)
            backoff = min(backoff * 2, 1.0)
