#!/usr/bin/python3
"""Encrypts a plaintext to a JWKS key with python3-jwcrypto (an independent JOSE stack).

usage: jwcrypto_encrypt.py JWKS_FILE KID ALG PLAINTEXT_FILE ENC [ENC...]
Prints one compact JWE per line. Extra header members may be given as JSON in $JWE_EXTRA_HEADER.
"""
import json
import os
import sys

from jwcrypto import jwe, jwk


def main():
    jwks_file, kid, alg, plaintext_file, *encs = sys.argv[1:]
    with open(jwks_file) as f:
        key = jwk.JWKSet.from_json(f.read()).get_key(kid)
    with open(plaintext_file, "rb") as f:
        plaintext = f.read()
    extra = json.loads(os.environ.get("JWE_EXTRA_HEADER", "{}"))
    for enc in encs:
        header = {"alg": alg, "enc": enc, "kid": kid, **extra}
        token = jwe.JWE(plaintext, protected=json.dumps(header))
        token.allowed_algs = [alg, enc]
        token.add_recipient(key)
        print(token.serialize(compact=True))


if __name__ == "__main__":
    main()
