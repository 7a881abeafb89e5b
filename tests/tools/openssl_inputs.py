#!/usr/bin/python3
"""Splits a compact JWS into files the OpenSSL CLI can verify, with no custody code involved.

usage: openssl_inputs.py JWKS_FILE JWS_FILE OUT_DIR
Writes OUT_DIR/pub.pem (the kid's key, converted by jwcrypto), OUT_DIR/input (the JWS signing
input), OUT_DIR/sig (the raw signature) and, for ECDSA, OUT_DIR/sig.der (r||s as DER, encoded
here by hand). Prints the header's alg.
"""
import base64
import json
import os
import sys

from jwcrypto import jwk


def b64d(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def der_int(b):
    b = b.lstrip(b"\x00") or b"\x00"
    if b[0] & 0x80:
        b = b"\x00" + b
    return b"\x02" + der_len(len(b)) + b


def der_len(n):
    if n < 0x80:
        return bytes([n])
    out = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(out)]) + out


def main():
    jwks_file, jws_file, out = sys.argv[1:4]
    with open(jws_file) as f:
        h, p, s = f.read().strip().split(".")
    header = json.loads(b64d(h))
    with open(jwks_file) as f:
        keys = jwk.JWKSet.from_json(f.read())
    key = keys.get_key(header["kid"])
    with open(os.path.join(out, "pub.pem"), "wb") as f:
        f.write(key.export_to_pem())
    with open(os.path.join(out, "input"), "wb") as f:
        f.write(f"{h}.{p}".encode())
    sig = b64d(s)
    with open(os.path.join(out, "sig"), "wb") as f:
        f.write(sig)
    if header["alg"].startswith("ES"):
        half = len(sig) // 2
        body = der_int(sig[:half]) + der_int(sig[half:])
        with open(os.path.join(out, "sig.der"), "wb") as f:
            f.write(b"\x30" + der_len(len(body)) + body)
    print(header["alg"])


if __name__ == "__main__":
    main()
