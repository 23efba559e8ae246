"""Throwaway X.509 material for TLS tests: two CAs, a server certificate for 127.0.0.1/localhost,
and client certificates from each CA (written as PEM files into a directory)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pem:
    """One identity's PEM files."""

    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes()


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA that signed server and client
    other_ca: Path  # an unrelated CA
    server: Pem  # CN=127.0.0.1, SAN IP 127.0.0.1 and DNS localhost, signed by ca
    client: Pem  # signed by ca
    stranger: Pem  # a client certificate signed by other_ca


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey,
          *, ca: bool, usage: x509.ObjectIdentifier | None = None, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, encipher_only=False,
                                          decipher_only=False), critical=True)
    if usage is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                         x509.DNSName("localhost")]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    c, k = directory / f"{name}.crt", directory / f"{name}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return Pem(c, k)


def make_pki(directory: Path) -> Pki:
    """Generate the CAs and certificates into `directory`."""
    ca_key, other_key = _key(), _key()
    ca = _write(directory, "ca", _cert("Tandem test CA", ca_key, "Tandem test CA", ca_key, ca=True), ca_key)
    other = _write(directory, "other-ca", _cert("Other CA", other_key, "Other CA", other_key, ca=True),
                   other_key)
    sk, ck, xk = _key(), _key(), _key()
    server = _write(directory, "server", _cert("127.0.0.1", sk, "Tandem test CA", ca_key, ca=False,
                                               usage=ExtendedKeyUsageOID.SERVER_AUTH, server=True), sk)
    client = _write(directory, "client", _cert("client-a", ck, "Tandem test CA", ca_key, ca=False,
                                               usage=ExtendedKeyUsageOID.CLIENT_AUTH), ck)
    stranger = _write(directory, "stranger", _cert("client-x", xk, "Other CA", other_key, ca=False,
                                                   usage=ExtendedKeyUsageOID.CLIENT_AUTH), xk)
    return Pki(ca.cert, other.cert, server, client, stranger)
