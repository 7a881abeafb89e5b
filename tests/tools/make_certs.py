#!/usr/bin/python3
"""Test PKI for custody's mTLS tests, made with python3-cryptography (not with custody).

usage: make_certs.py OUT_DIR
Writes PEM files: ca, other-ca (an unrelated CA); server (RSA-2048, SAN IP:127.0.0.1 and
DNS:localhost, signed by ca) and server-rotated (a new key and certificate, CN custodyd-rotated);
clients signed by ca: as (URI spiffe://bank.example/as), rp (URI spiffe://bank.example/rp),
dns (DNS:as.bank.example), expired (URI .../as, expired yesterday); other (URI .../as, signed by
other-ca). Each NAME gets NAME.pem and NAME.key.
"""
import datetime
import ipaddress
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

OUT = sys.argv[1]
NOW = datetime.datetime.utcnow()


def write(name, key, cert):
    with open(os.path.join(OUT, name + ".key"), "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(os.path.join(OUT, name + ".key"), 0o600)
    with open(os.path.join(OUT, name + ".pem"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_leaf(cn, sans, ca_key, ca_cert, rsa_key=False, not_after=None, server=False):
    key = rsa.generate_private_key(65537, 2048) if rsa_key else ec.generate_private_key(
        ec.SECP256R1())
    usage = x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server else \
        x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=2))
            .not_valid_after(not_after or NOW + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


ca_key, ca = make_ca("custody test CA")
other_key, other = make_ca("unrelated CA")
write("ca", ca_key, ca)
write("other-ca", other_key, other)
server_sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
write("server", *make_leaf("custodyd", server_sans, ca_key, ca, rsa_key=True, server=True))
write("server-rotated",
      *make_leaf("custodyd-rotated", server_sans, ca_key, ca, rsa_key=True, server=True))
uri = x509.UniformResourceIdentifier
write("as", *make_leaf("as", [uri("spiffe://bank.example/as")], ca_key, ca))
write("rp", *make_leaf("rp", [uri("spiffe://bank.example/rp")], ca_key, ca))
write("dns", *make_leaf("as-dns", [x509.DNSName("as.bank.example")], ca_key, ca))
write("expired", *make_leaf("as", [uri("spiffe://bank.example/as")], ca_key, ca,
                            not_after=NOW - datetime.timedelta(days=1)))
write("other", *make_leaf("as", [uri("spiffe://bank.example/as")], other_key, other))
