"""``fedtune certs``: TLS certificates for the SuperLink and authentication keys for the SuperNodes.

What Flower 1.42 expects:

- the SuperLink serves every API (Fleet, Control, Runtime) over HTTPS with ``--ssl-ca-certfile``,
  ``--ssl-certfile`` and ``--ssl-keyfile`` (PEM); SuperNodes and ``flwr`` verify it with the CA
  certificate (``--root-certificates`` / ``root-certificates``), so the server certificate carries
  a subject alternative name for every host they dial;
- with ``--enable-supernode-auth`` a SuperNode signs its requests with an EC key on a NIST curve
  (``--auth-supernode-private-key``, an unencrypted OpenSSH private key, as ``ssh-keygen -t ecdsa
  -b 384 -N ""`` writes it); the SuperLink accepts only nodes whose OpenSSH public key was
  registered beforehand with ``flwr supernode register site-<i>.pub <connection>``.

Layout of ``DIR``: ``ca.crt``/``ca.key``, ``server.crt``/``server.key``, ``site-<i>.key``/``site-<i>.pub``
and ``authorized_supernodes.txt`` (the sites' public keys, one OpenSSH line each: the list the
coordinator registers).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
AUTHORIZED_LIST = "authorized_supernodes.txt"


@dataclass(frozen=True)
class CertFiles:
    """Paths of everything :func:`make_certs` writes under ``root``."""

    root: Path
    sites: int = 0

    @property
    def ca_cert(self) -> Path:  # noqa: D102
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:  # noqa: D102
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:  # noqa: D102
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:  # noqa: D102
        return self.root / "server.key"

    @property
    def authorized_list(self) -> Path:  # noqa: D102
        return self.root / AUTHORIZED_LIST

    def site_key(self, i: int) -> Path:
        """OpenSSH private key of site ``i`` (``--auth-supernode-private-key``)."""
        return self.root / f"site-{i}.key"

    def site_pub(self, i: int) -> Path:
        """OpenSSH public key of site ``i`` (``flwr supernode register``)."""
        return self.root / f"site-{i}.pub"

    def all_files(self) -> list[Path]:
        """Every file written, private keys included."""
        files = [self.ca_key, self.ca_cert, self.server_key, self.server_cert]
        for i in range(self.sites):
            files += [self.site_key(i), self.site_pub(i)]
        return files + ([self.authorized_list] if self.sites else [])


def parse_hosts(text: str) -> list[str]:
    """``"127.0.0.1,localhost"`` -> ``["127.0.0.1", "localhost"]``.

    Raises
    ------
    ValueError
        When no host is given.
    """
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    if not hosts:
        raise ValueError("`--hosts` is empty; give the SuperLink's addresses, e.g. 127.0.0.1,localhost.")
    return hosts


def san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """An IP SAN for each IP address, a DNS SAN for each name."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _certificate(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    days: int,
    ca: bool,
    hosts: Sequence[str] = (),
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = (
            builder.add_extension(x509.SubjectAlternativeName(san_entries(hosts)), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
            )
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write ``data``; a private key is created with mode 0600 (and reset to 0600 when overwritten)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    try:
        if private:
            os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def make_certs(
    out_dir: str | Path,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    sites: int = 0,
    *,
    force: bool = False,
    days: int = 365,
) -> CertFiles:
    """Write a CA, the SuperLink's server certificate and ``sites`` SuperNode key pairs into ``out_dir``.

    Parameters
    ----------
    out_dir
        Folder to write to (created if missing).
    hosts
        Addresses SuperNodes and ``flwr`` use to reach the SuperLink: IPs become IP SANs, names DNS SANs.
    sites
        Number of SuperNode authentication key pairs (EC P-384, OpenSSH format).
    force
        Overwrite existing files; otherwise an existing file is an error and nothing is written.
    days
        Validity of the certificates.

    Returns
    -------
    CertFiles
        The paths written.

    Raises
    ------
    FileExistsError
        A file to write exists and ``force`` is false (the message names it).
    ValueError
        ``sites`` is negative or ``hosts`` is empty.
    """
    if sites < 0:
        raise ValueError(f"`--sites` must be >= 0, got {sites}.")
    if not hosts:
        raise ValueError("`--hosts` is empty; give the SuperLink's addresses, e.g. 127.0.0.1,localhost.")
    files = CertFiles(Path(out_dir), sites)
    if not force:
        for path in files.all_files():
            if path.exists():
                raise FileExistsError(
                    f"{path} exists; pass --force to overwrite it or choose another folder "
                    "(nothing was written)."
                )
    files.root.mkdir(parents=True, exist_ok=True)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("fedtune CA")
    ca_cert = _certificate(ca_name, ca_key.public_key(), ca_name, ca_key, days=days, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _certificate(
        _name(hosts[0]), server_key.public_key(), ca_name, ca_key, days=days, ca=False, hosts=hosts
    )
    _write(files.ca_key, _pem_key(ca_key), private=True)
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files.server_key, _pem_key(server_key), private=True)
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)

    authorized: list[bytes] = []
    for i in range(sites):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = (
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            + f" site-{i}\n".encode()
        )
        _write(files.site_key(i), private, private=True)
        _write(files.site_pub(i), public, private=False)
        authorized.append(public)
    if sites:
        _write(files.authorized_list, b"".join(authorized), private=False)
    return files
