#!/usr/bin/env python3
"""Regenerates the seed corpora in fuzz/corpus/ (python3 with `cryptography`).

Deterministic: the keys derive from fixed constants, so the output only changes with this file.
The fixed P-256 key matches the public key in fuzz_jws.cc; the fixed CEK (bytes 0..63, the first
CekBytes(enc) of them) matches fuzz_jwe.cc, so seeds reach the end of DecryptContent.
"""
import base64
import hashlib
import hmac
import json
import os
import struct
import zlib

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives import padding as sympad
from cryptography.hazmat.primitives import serialization as ser

HERE = os.path.dirname(os.path.abspath(__file__))
CEK = bytes(range(64))


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact_json(obj):
    return json.dumps(obj, separators=(",", ":"))


def write(target, name, text):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "w") as f:
        f.write(text)


def fixed_p256():
    d = int.from_bytes(hashlib.sha256(b"custody fuzz_jws P-256").digest(), "big")
    return ec.derive_private_key(d % (2**256 - 2**224), ec.SECP256R1())


def ec_coords(key, size):
    n = key.public_key().public_numbers()
    return b64(n.x.to_bytes(size, "big")), b64(n.y.to_bytes(size, "big"))


def jws_corpus():
    key = fixed_p256()
    x, y = ec_coords(key, 32)
    print(f"fuzz_jws P-256 public key: x={x} y={y}")
    for name, header, payload in [
        ("es256_valid", {"alg": "ES256", "kid": "k1"}, b'{"iss":"op","sub":"a"}'),
        ("es256_typ", {"alg": "ES256", "typ": "JWT", "kid": "k2"}, b"hello"),
        ("es256_empty_payload", {"alg": "ES256"}, b""),
    ]:
        signing_input = f"{b64(compact_json(header).encode())}.{b64(payload)}"
        der = key.sign(signing_input.encode(),
                       ec.ECDSA(hashes.SHA256(), deterministic_signing=True))  # RFC 6979
        r, s = decode_dss_signature(der)
        write("fuzz_jws", name, f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}")
    other = {"PS256": 256, "RS256": 256, "EdDSA": 64, "ES384": 96, "none": 0, "HS256": 32}
    for alg, sig_len in other.items():
        signing_input = f"{b64(compact_json({'alg': alg}).encode())}.{b64(b'payload')}"
        write("fuzz_jws", f"alg_{alg}", f"{signing_input}.{b64(bytes(sig_len))}")
    crit = b64(b'{"alg":"ES256","crit":["b64"],"b64":false}')
    write("fuzz_jws", "crit_b64", f"{crit}.x.AA")


def gcm(cek, iv, plaintext, aad):
    out = AESGCM(cek).encrypt(iv, plaintext, aad)
    return out[:-16], out[-16:]


def cbc_hs(cek, iv, plaintext, aad):
    half = len(cek) // 2
    mac_key, enc_key = cek[:half], cek[half:]
    padder = sympad.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    enc = Cipher(algorithms.AES(enc_key), modes.CBC(iv)).encryptor()
    ct = enc.update(padded) + enc.finalize()
    digest = {16: hashlib.sha256, 24: hashlib.sha384, 32: hashlib.sha512}[half]
    tag = hmac.new(mac_key, aad + iv + ct + struct.pack(">Q", len(aad) * 8), digest).digest()
    return ct, tag[:half]


ENCS = {
    "A128GCM": (16, 12, gcm), "A192GCM": (24, 12, gcm), "A256GCM": (32, 12, gcm),
    "A128CBC-HS256": (32, 16, cbc_hs), "A192CBC-HS384": (48, 16, cbc_hs),
    "A256CBC-HS512": (64, 16, cbc_hs),
}


def jwe(header, plaintext, encrypted_key=b""):
    cek_len, iv_len, fn = ENCS[header["enc"]]
    protected = b64(compact_json(header).encode())
    iv = hashlib.sha256(protected.encode()).digest()[:iv_len]
    if header.get("zip") == "DEF":
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        plaintext = c.compress(plaintext) + c.flush()
    ct, tag = fn(CEK[:cek_len], iv, plaintext, protected.encode())
    return ".".join([protected, b64(encrypted_key), b64(iv), b64(ct), b64(tag)])


def jwe_corpus():
    fake_rsa_key = hashlib.sha512(b"encrypted key").digest() * 4  # 256 bytes, never unwrapped
    epk_key = ec.derive_private_key(12345, ec.SECP256R1())
    x, y = ec_coords(epk_key, 32)
    epk = {"kty": "EC", "crv": "P-256", "x": x, "y": y}
    text = b'{"sub":"alice","claims":["a","b","c"],"note":"' + b"z" * 200 + b'"}'
    for enc in ENCS:
        write("fuzz_jwe", f"rsa_oaep_256_{enc}",
              jwe({"alg": "RSA-OAEP-256", "enc": enc, "kid": "r1"}, text, fake_rsa_key))
    write("fuzz_jwe", "rsa_oaep_zip", jwe({"alg": "RSA-OAEP", "enc": "A256GCM", "zip": "DEF"},
                                          text * 20, fake_rsa_key))
    write("fuzz_jwe", "ecdh_es_direct",
          jwe({"alg": "ECDH-ES", "enc": "A128GCM", "epk": epk, "apu": b64(b"alice")}, text))
    write("fuzz_jwe", "ecdh_es_a256kw",
          jwe({"alg": "ECDH-ES+A256KW", "enc": "A256CBC-HS512", "epk": epk}, text, bytes(72)))
    write("fuzz_jwe", "rsa1_5_refused", jwe({"alg": "RSA1_5", "enc": "A128GCM"}, text, fake_rsa_key))


def jwk_corpus():
    p256 = fixed_p256()
    x, y = ec_coords(p256, 32)
    d = b64(p256.private_numbers().private_value.to_bytes(32, "big"))
    write("fuzz_jwk", "ec_p256_public", compact_json({"kty": "EC", "crv": "P-256", "x": x, "y": y}))
    write("fuzz_jwk", "ec_p256_private",
          compact_json({"kty": "EC", "crv": "P-256", "x": x, "y": y, "d": d}))
    p384 = ec.derive_private_key(987654321, ec.SECP384R1())
    x, y = ec_coords(p384, 48)
    write("fuzz_jwk", "ec_p384_public", compact_json({"kty": "EC", "crv": "P-384", "x": x, "y": y}))
    ed = ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"ed").digest())
    ed_x = ed.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    ed_d = ed.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    write("fuzz_jwk", "okp_public", compact_json({"kty": "OKP", "crv": "Ed25519", "x": b64(ed_x)}))
    write("fuzz_jwk", "okp_private",
          compact_json({"kty": "OKP", "crv": "Ed25519", "x": b64(ed_x), "d": b64(ed_d)}))
    # A fixed 2048-bit RSA key from two primes found deterministically from constants.
    p = next_prime(b"custody fuzz rsa p")
    q = next_prime(b"custody fuzz rsa q")
    write("fuzz_jwk", "rsa2048_private", rsa_jwk(p, q, private=True))
    write("fuzz_jwk", "rsa2048_public", rsa_jwk(p, q, private=False))


def next_prime(seed):
    """The first probable prime >= a 1024-bit number with its top two bits set, from seed."""
    n = int.from_bytes(hashlib.sha512(seed).digest() + hashlib.sha512(seed + b"2").digest(), "big")
    n |= (3 << 1022) | 1
    while not is_probable_prime(n):
        n += 2
    return n


def is_probable_prime(n):
    if n % 2 == 0:
        return False
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if pow(a, n - 1, n) != 1:
            return False
    return True


def rsa_jwk(p, q, private):
    def u(v):
        return b64(v.to_bytes((v.bit_length() + 7) // 8, "big"))
    n, e = p * q, 65537
    jwk = {"kty": "RSA", "n": u(n), "e": u(e)}
    if private:
        d = pow(e, -1, (p - 1) * (q - 1))
        jwk.update({"d": u(d), "p": u(p), "q": u(q), "dp": u(d % (p - 1)), "dq": u(d % (q - 1)),
                    "qi": u(pow(q, -1, p))})
    return compact_json(jwk)


def policy_corpus():
    write("fuzz_policy", "documented", """{"version": 1,
 "grants": [
   {"identities": ["spiffe://bank.example/as", "dns:as.bank.example", "uid:1000"],
    "operations": ["sign", "decrypt", "jwks"], "rings": ["op/*", "clients/**"]},
   {"identities": ["*"], "operations": ["jwks"], "rings": ["**"]}
 ]}
""")
    write("fuzz_policy", "empty", '{"version":1,"grants":[]}')
    write("fuzz_policy", "admin", compact_json({"version": 1, "grants": [
        {"identities": ["uid:0"], "operations": ["admin.read", "admin.rotate", "admin.create",
                                                 "admin.destroy", "admin.import"],
         "rings": ["**/sig", "team-*/x*y/**", "a.b_c-d/e"]}]}))
    # "PATTERN\nRING": the differential check of the ring matcher.
    write("fuzz_policy", "diff_star", "op/*\nop/id-token")
    write("fuzz_policy", "diff_doublestar", "**/sig\na/b/sig")
    write("fuzz_policy", "diff_mixed", "a*b**c\naxb/y/c")


if __name__ == "__main__":
    jws_corpus()
    jwe_corpus()
    jwk_corpus()
    policy_corpus()
