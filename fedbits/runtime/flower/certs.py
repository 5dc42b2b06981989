"""TLS certificates for a SuperLink and authentication keys for SuperNodes.

Flower 1.41 needs, for an encrypted deployment, a CA certificate every party trusts,
a server certificate whose subject alternative names cover every address nodes and
operators use to reach the SuperLink, and, for SuperNode authentication, one EC key
pair per node on a NIST curve in OpenSSH format (the SuperNode loads the private key,
``flwr supernode register`` the public one). This module makes all of them with the
``cryptography`` package Flower already depends on, so a user needs neither openssl
recipes nor ssh-keygen. Existing files are never replaced unless asked (``force``):
a new CA locks out every node and operator that trusts the old one, and a new node
key must be registered again.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedbits.errors import FedbitsError

VALID_DAYS = 365


@dataclass(frozen=True)
class CertPaths:
    """Where :func:`make_certificates` put each file (the names the CLI expects)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> CertPaths:
        return cls(directory / "ca.crt", directory / "superlink.crt", directory / "superlink.key")

    @property
    def ca_key(self) -> Path:
        """The CA's private key, next to its certificate (to issue more certificates)."""
        return self.ca_cert.with_name("ca.key")

    def files(self) -> list[Path]:
        """Every file :func:`make_certificates` writes."""
        return [self.ca_cert, self.ca_key, self.server_cert, self.server_key]

    def check(self) -> None:
        """Raise a clear error naming the first missing file."""
        for path in (self.ca_cert, self.server_cert, self.server_key):
            if not path.is_file():
                raise FedbitsError(f"TLS file {path} not found: create the set with "
                                   f"`fedbits flower certs {path.parent} --host ...`")


def node_key_files(private_path: Path) -> list[Path]:
    """The private and public key files :func:`make_node_key` writes."""
    return [private_path, private_path.with_name(private_path.name + ".pub")]


def refuse_to_replace(paths: list[Path]) -> None:
    """Raise an error naming those of ``paths`` that exist (the caller's ``--force``
    replaces them)."""
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        shown = ", ".join(existing[:4]) + (f" and {len(existing) - 4} more" if len(existing) > 4
                                           else "")
        raise FedbitsError(f"{shown} already exist: pass --force to replace them (every "
                           "SuperNode and operator then needs the new CA certificate, and "
                           "every new node key must be registered again)")


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (created with mode 0600, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a replaced file would keep its old, maybe wider, mode
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certificates(directory: Path, hosts: list[str], *, force: bool = False) -> CertPaths:
    """A fresh CA and a SuperLink certificate valid for ``hosts`` (IPs or DNS names).

    The CA key is written next to the CA certificate (mode 0600) so more server
    certificates can be issued later; keep it off the SuperLink machine if you can.
    Existing files are refused unless ``force``.
    """
    if not hosts:
        raise FedbitsError("name at least one host (IP address or DNS name) for the certificate")
    paths = CertPaths.in_dir(directory)
    if not force:
        refuse_to_replace(paths.files())
    now = datetime.datetime.now(datetime.UTC)
    not_after = now + datetime.timedelta(days=VALID_DAYS)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedbits SuperLink CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(not_after)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    directory.mkdir(parents=True, exist_ok=True)
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.ca_key, _pem_key(ca_key))
    paths.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.server_key, _pem_key(server_key))
    return paths


def make_node_key(private_path: Path, *, force: bool = False) -> Path:
    """An EC (P-384) key pair for SuperNode authentication; returns the public key path.

    ``private_path`` is what ``flower-supernode --auth-supernode-private-key`` reads;
    ``<private_path>.pub`` is what ``flwr supernode register`` takes. Existing files
    are refused unless ``force``.
    """
    private_path, public_path = node_key_files(private_path)
    if not force:
        refuse_to_replace([private_path, public_path])
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        private_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                          serialization.NoEncryption()),
    )
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                      serialization.PublicFormat.OpenSSH) + b"\n"
    )
    return public_path
