#!/usr/bin/python3
"""Verifies a compact JWS against a JWKS with python3-jwcrypto (an independent JOSE stack).

usage: jwcrypto_verify.py JWKS_FILE JWS_FILE EXPECTED_ALG
Selects the key by the header's kid, verifies with exactly EXPECTED_ALG, and prints the header
(JSON) on the first line and the payload on the second. Exit 1 on any failure.
"""
import json
import sys

from jwcrypto import jwk, jws


def main():
    jwks_file, jws_file, alg = sys.argv[1:4]
    with open(jwks_file) as f:
        keys = jwk.JWKSet.from_json(f.read())
    with open(jws_file) as f:
        compact = f.read().strip()
    token = jws.JWS()
    token.deserialize(compact)
    header = token.jose_header
    if header.get("alg") != alg:
        print(f"alg is {header.get('alg')}, expected {alg}", file=sys.stderr)
        return 1
    key = keys.get_key(header["kid"])
    if key is None:
        print(f"kid {header['kid']} not in JWKS", file=sys.stderr)
        return 1
    # The kid must be the RFC 7638 thumbprint of the key (jwcrypto computes it independently).
    if key.thumbprint() != header["kid"]:
        print("kid is not the RFC 7638 thumbprint of the key", file=sys.stderr)
        return 1
    token.allowed_algs = [alg]
    token.verify(key, alg=alg)
    print(json.dumps(header, sort_keys=True))
    print(token.payload.decode())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - any failure is a verification failure
        print(f"verification failed: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
