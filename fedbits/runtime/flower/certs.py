"""TLS certificates for a SuperLink and authentication keys for SuperNodes.

Flower 1.41 needs, for an encrypted deployment, a CA certificate every party trusts,
a server certificate whose subject alternative names cover every address nodes and
operators use to reach the SuperLink, and, for SuperNode authentication, one EC key
pair per node on a NIST curve in OpenSSH format (the SuperNode loads the private key,
``flwr supernode register`` the public one). This module makes all of them with the
``cryptography`` package Flower already depends on, so a user needs neither openssl
recipes nor ssh-keygen.

Each node makes its own key pair (:func:`make_node_key`, ``fedbits flower keygen``),
so a node's private key never leaves it and the operator handles public keys only.
The CA lasts :data:`CA_VALID_DAYS`, the SuperLink certificate
:data:`SERVER_VALID_DAYS`: :func:`renew_server_certificate` issues a new one from the
same CA, so nodes and operators keep their ``ca.crt``. Existing files are never
replaced unless asked (``force``): a new CA locks out every node and operator that
trusts the old one, and a new node key must be registered again. Every file is
written by :mod:`.keyfiles` (new files only, private keys 0600, no symbolic links).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedbits.errors import FedbitsError
from fedbits.runtime.flower.keyfiles import check_new, write_new

CA_VALID_DAYS = 3650
SERVER_VALID_DAYS = 365
CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedbits SuperLink CA")])


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


REPLACE_CA = ("a new CA would lock out every SuperNode and operator that trusts this one. "
              "To issue a new SuperLink certificate from this CA (renewal, other --host "
              "names) pass --renew; to replace the CA itself pass --force (every SuperNode "
              "and operator then needs the new ca.crt)")


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


def _server_certificate(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                        hosts: list[str]) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new SuperLink key and certificate for ``hosts``, signed by the CA; valid
    :data:`SERVER_VALID_DAYS`, never past the CA's own end."""
    if not hosts:
        raise FedbitsError("name at least one host (IP address or DNS name) for the certificate")
    now = datetime.datetime.now(datetime.UTC)
    not_after = min(now + datetime.timedelta(days=SERVER_VALID_DAYS), ca_cert.not_valid_after_utc)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(not_after)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _write_server(paths: CertPaths, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate,
                  replace: bool) -> None:
    write_new(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM), private=False,
              replace=replace)
    write_new(paths.server_key, _pem_key(key), private=True, replace=replace)


def make_certificates(directory: Path, hosts: list[str], *, force: bool = False) -> CertPaths:
    """A fresh CA and a SuperLink certificate valid for ``hosts`` (IPs or DNS names).

    The CA key is written next to the CA certificate (mode 0600) so more server
    certificates can be issued later (:func:`renew_server_certificate`); keep it off
    the SuperLink machine if you can. Existing files are refused unless ``force``.
    """
    paths = CertPaths.in_dir(directory)
    check_new(paths.files(), replace=force, hint=REPLACE_CA)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(CA_NAME)
        .issuer_name(CA_NAME)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=CA_VALID_DAYS))
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
    server_key, server_cert = _server_certificate(ca_key, ca_cert, hosts)
    write_new(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False,
              replace=force)
    write_new(paths.ca_key, _pem_key(ca_key), private=True, replace=force)
    _write_server(paths, server_key, server_cert, replace=force)
    return paths


def renew_server_certificate(directory: Path, hosts: list[str]) -> CertPaths:
    """A new SuperLink key and certificate for ``hosts`` from the CA in ``directory``,
    replacing the old pair; ``ca.crt`` and ``ca.key`` stay as they are, so every node
    and operator keeps trusting the SuperLink."""
    paths = CertPaths.in_dir(directory)
    for path in (paths.ca_cert, paths.ca_key):
        if not path.is_file():
            raise FedbitsError(f"cannot renew: {path} not found (make a CA first with "
                               f"`fedbits flower certs {directory} --host ...`)")
    check_new([paths.server_cert, paths.server_key], replace=True, hint="")
    try:
        ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise FedbitsError(f"cannot renew: cannot read the CA in {directory}: {e}") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or (
            ca_key.public_key().public_bytes(*spki) != ca_cert.public_key().public_bytes(*spki)):
        raise FedbitsError(f"cannot renew: {paths.ca_key} is not the key of {paths.ca_cert}")
    if ca_cert.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
        raise FedbitsError(f"cannot renew: the CA {paths.ca_cert} expired on "
                           f"{ca_cert.not_valid_after_utc:%Y-%m-%d}; make a new one with --force")
    key, cert = _server_certificate(ca_key, ca_cert, hosts)
    _write_server(paths, key, cert, replace=True)
    return paths


def make_node_key(private_path: Path, *, force: bool = False) -> Path:
    """An EC (P-384) key pair for SuperNode authentication; returns the public key path.

    Made on the node itself (``fedbits flower keygen``): ``private_path`` (mode 0600)
    is what ``flower-supernode --auth-supernode-private-key`` reads and never leaves
    the node; ``<private_path>.pub`` is what the operator registers with ``flwr
    supernode register``. Existing files are refused unless ``force``.
    """
    private_path, public_path = node_key_files(private_path)
    check_new([private_path, public_path], replace=force,
              hint="pass --force to replace them (the new public key must then be "
              "registered again)")
    key = ec.generate_private_key(ec.SECP384R1())
    write_new(private_path,
              key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()),
              private=True, replace=force)
    write_new(public_path,
              key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                            serialization.PublicFormat.OpenSSH) + b"\n",
              private=False, replace=force)
    return public_path
