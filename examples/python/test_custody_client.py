"""custody_client against a real custodyd (run by tests/language_clients_test.cc, which starts
replicas on PostgreSQL and creates the rings with custodyctl: this test creates nothing).

Environment: CUSTODY_ADDRS (the replicas, comma-separated), CUSTODY_SIGN_RING (ES256),
CUSTODY_ENC_RING (ECDH-ES+A128KW), CUSTODY_PROTO_ROOT (where custody/v1/custody.proto is);
for the failover test CUSTODY_KILL_PID (the replica at the first address); for the rotation
test CUSTODYCTL (the binary; the rotation is an operator's act).
Tokens are checked with python3-jwcrypto, an independent JOSE implementation.
"""

import json
import os
import signal
import subprocess
import tempfile
import time
import unittest

from jwcrypto import jwe, jwk, jws, jwt

import custody_client

ENV = os.environ
_gen = tempfile.TemporaryDirectory()


def setUpModule():
    custody_client.generate_stubs(ENV["CUSTODY_PROTO_ROOT"], _gen.name)


def keyset(jwks):
    return jwk.JWKSet.from_json(json.dumps(jwks))


class CustodyClientTest(unittest.TestCase):
    def setUp(self):
        self.client = custody_client.Client(ENV["CUSTODY_ADDRS"], deadline=5.0)
        self.addCleanup(self.client.close)
        self.ring = ENV["CUSTODY_SIGN_RING"]

    def verify(self, compact, jwks):
        """Verifies with jwcrypto (kid must be the RFC 7638 thumbprint); the claims."""
        token = jws.JWS()
        token.deserialize(compact)
        kid = token.jose_header["kid"]
        key = keyset(jwks).get_key(kid)
        self.assertIsNotNone(key, f"kid {kid} not in the JWKS")
        self.assertEqual(key.thumbprint(), kid)
        checked = jwt.JWT(jwt=compact, key=key, algs=["ES256"],
                          check_claims={"iss": "https://op.example", "aud": "client-1"})
        return token.jose_header, json.loads(checked.claims)

    def test_signs_an_id_token_that_jwcrypto_verifies(self):
        now = int(time.time())
        claims = {"iss": "https://op.example", "sub": "alice", "aud": "client-1", "iat": now,
                  "exp": now + 300, "nonce": "n-0S6_WzA2Mj"}
        signed = self.client.sign_jws(self.ring, json.dumps(claims), typ="JWT")
        self.assertEqual(signed.alg, "ES256")
        cache = custody_client.JwksCache(self.client, [self.ring]).start()
        self.addCleanup(cache.stop)
        header, got = self.verify(signed.jws, cache.jwks())
        self.assertEqual(header["typ"], "JWT")
        self.assertEqual(header["kid"], signed.kid)
        self.assertEqual(got, claims)
        # A caller cannot choose alg or kid; custodyd says why.
        with self.assertRaises(custody_client.CustodyError) as refused:
            self.client.sign_jws(self.ring, "{}", extra_header={"alg": "none"})
        self.assertEqual(refused.exception.code.name, "INVALID_ARGUMENT")
        with self.assertRaises(custody_client.CustodyError) as missing:
            self.client.sign_jws("no/such-ring", "{}")
        self.assertEqual(missing.exception.code.name, "NOT_FOUND")

    def test_decrypts_a_jwe_that_jwcrypto_made(self):
        ring = ENV["CUSTODY_ENC_RING"]
        jwks = self.client.get_jwks([ring]).jwks
        public = jwks["keys"][0]
        plaintext = b'{"request":"object","n":1}'
        token = jwe.JWE(plaintext, protected=json.dumps(
            {"alg": "ECDH-ES+A128KW", "enc": "A256GCM", "kid": public["kid"]}))
        token.add_recipient(jwk.JWK(**public))
        compact = token.serialize(compact=True)
        got = self.client.decrypt_jwe(ring, compact)
        self.assertEqual(got.plaintext, plaintext)
        self.assertEqual(got.kid, public["kid"])
        self.assertEqual(got.protected_header["enc"], "A256GCM")
        # One uniform error for a tampered JWE.
        parts = compact.split(".")
        parts[3] = parts[3][:-2] + ("AA" if parts[3][-2:] != "AA" else "BB")
        with self.assertRaises(custody_client.CustodyError) as bad:
            self.client.decrypt_jwe(ring, ".".join(parts))
        self.assertEqual(bad.exception.code.name, "INVALID_ARGUMENT")
        self.assertIn("decryption failed", bad.exception.message)

    @unittest.skipUnless(ENV.get("CUSTODY_KILL_PID"), "needs CUSTODY_KILL_PID")
    def test_fails_over_when_a_replica_is_killed(self):
        jwks = self.client.get_jwks([self.ring]).jwks
        self.assertEqual(self.client.replica(), 0)
        results, failures = [], []
        for n in range(40):
            if n == 10:
                os.kill(int(ENV["CUSTODY_KILL_PID"]), signal.SIGKILL)
            now = int(time.time())
            claims = {"iss": "https://op.example", "aud": "client-1", "sub": f"u{n}",
                      "iat": now, "exp": now + 60}
            try:
                signed = self.client.sign_jws(self.ring, json.dumps(claims), typ="JWT")
                results.append((self.verify(signed.jws, jwks)[1], claims))
                self.client.get_jwks([self.ring])
                self.assertEqual(self.client.get_key_ring(self.ring).name, self.ring)
            except custody_client.CustodyError as e:
                failures.append(f"call {n}: {e}")
        self.assertEqual(failures, [])
        self.assertEqual(len(results), 40)
        for got, want in results:
            self.assertEqual(got, want)
        self.assertNotEqual(self.client.replica(), 0, "calls still go to the killed replica")

    @unittest.skipUnless(ENV.get("CUSTODYCTL"), "needs CUSTODYCTL")
    def test_jwks_cache_follows_a_rotation(self):
        cache = custody_client.JwksCache(self.client, [self.ring]).start()
        self.addCleanup(cache.stop)
        before = {k["kid"] for k in cache.jwks()["keys"]}
        old = self.client.sign_jws(self.ring, "{}").kid
        rotated = subprocess.run(
            [ENV["CUSTODYCTL"], "--addr=" + self.client.addresses[-1], "ring", "rotate",
             self.ring, "--force"], capture_output=True, text=True, timeout=30)
        self.assertEqual(rotated.returncode, 0, rotated.stderr)
        # The new ACTIVE kid is pushed to the cache, and signatures then verify against it.
        deadline = time.monotonic() + 10
        signed = self.client.sign_jws(self.ring, "{}")
        while signed.kid == old and time.monotonic() < deadline:
            time.sleep(0.05)
            signed = self.client.sign_jws(self.ring, "{}")
        self.assertNotEqual(signed.kid, old)
        self.assertTrue(cache.wait_for(lambda s: any(k["kid"] == signed.kid for k in s["keys"]),
                                       10), f"the cache never showed {signed.kid}")
        self.assertIsNotNone(cache.key(signed.kid))
        now = int(time.time())
        claims = {"iss": "https://op.example", "aud": "client-1", "iat": now, "exp": now + 60}
        token = self.client.sign_jws(self.ring, json.dumps(claims))
        self.assertEqual(self.verify(token.jws, cache.jwks())[1], claims)
        self.assertIn(old, {k["kid"] for k in cache.jwks()["keys"]} | before)


if __name__ == "__main__":
    unittest.main()
