"""``fedtune certs``: CA, SuperLink server certificate and SuperNode keys in Flower 1.42's formats."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fedtune.simulations.cli import main
from fedtune.simulations.deploy.certs import CertFiles, make_certs, parse_hosts


def test_server_certificate_verifies_against_the_ca_and_has_the_requested_sans(tmp_path: Path) -> None:
    # Prepare / Execute
    files = make_certs(tmp_path / "c", hosts=["127.0.0.1", "localhost", "coord.hospital.example", "::1"])

    # Assert
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises on a bad signature or issuer
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "coord.hospital.example"]
    server_key = serialization.load_pem_private_key(files.server_key.read_bytes(), None)
    assert server_key.public_key().public_numbers() == server.public_key().public_numbers()


def test_site_keys_are_openssh_ec_keys_flower_loads_and_listed_as_authorised(tmp_path: Path) -> None:
    # Prepare
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    # Execute
    files = make_certs(tmp_path / "c", sites=3)

    # Assert: the private key loads as `flower-supernode --auth-supernode-private-key` loads it, the
    # public key as `flwr supernode register` loads it, and they are a pair
    authorised = files.authorized_list.read_text().splitlines()
    assert len(authorised) == 3
    for i in range(3):
        private = serialization.load_ssh_private_key(files.site_key(i).read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == "secp384r1"
        registered = try_load_public_key(files.site_pub(i))
        assert registered == public_key_to_bytes(private.public_key())
        assert authorised[i] == files.site_pub(i).read_text().strip()
        assert authorised[i].endswith(f" site-{i}")


def test_private_keys_are_written_with_mode_0600(tmp_path: Path) -> None:
    # Execute
    files = make_certs(tmp_path / "c", sites=2)

    # Assert
    for path in (files.ca_key, files.server_key, files.site_key(0), files.site_key(1)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in (files.ca_cert, files.server_cert, files.site_pub(0)):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 != 0o077  # readable certificates, not writable


def test_existing_files_are_never_overwritten_without_force(tmp_path: Path) -> None:
    # Prepare
    files = make_certs(tmp_path / "c", sites=1)
    before = {p: p.read_bytes() for p in files.all_files()}

    # Execute / Assert: the error names the file and the fix; nothing changed
    with pytest.raises(FileExistsError, match=r"ca\.key exists; pass --force"):
        make_certs(tmp_path / "c", sites=1)
    assert {p: p.read_bytes() for p in files.all_files()} == before

    # Execute / Assert: a single existing site key also blocks
    only_site = tmp_path / "d"
    only_site.mkdir()
    (only_site / "site-1.key").write_text("mine")
    with pytest.raises(FileExistsError, match=r"site-1\.key"):
        make_certs(only_site, sites=2)
    assert sorted(p.name for p in only_site.iterdir()) == ["site-1.key"]


def test_force_overwrites_and_resets_the_private_key_mode(tmp_path: Path) -> None:
    # Prepare
    files = make_certs(tmp_path / "c", sites=1)
    old_ca = files.ca_cert.read_bytes()
    files.site_key(0).chmod(0o644)

    # Execute
    make_certs(tmp_path / "c", sites=1, force=True)

    # Assert
    assert files.ca_cert.read_bytes() != old_ca
    assert stat.S_IMODE(files.site_key(0).stat().st_mode) == 0o600


def test_cli_writes_certs_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    first = main(["certs", str(tmp_path / "c"), "--sites", "2", "--hosts", "127.0.0.1,coordinator"])
    second = main(["certs", str(tmp_path / "c"), "--sites", "2"])
    err = capsys.readouterr().err
    forced = main(["certs", str(tmp_path / "c"), "--sites", "2", "--force"])

    # Assert
    assert (first, second, forced) == (0, 2, 0)
    assert "ca.key exists; pass --force" in err
    assert all(p.is_file() for p in CertFiles(tmp_path / "c", 2).all_files())


def test_hosts_parsing_and_bad_arguments() -> None:
    assert parse_hosts(" 127.0.0.1, localhost ,") == ["127.0.0.1", "localhost"]
    with pytest.raises(ValueError, match="--hosts"):
        parse_hosts(" , ")
    with pytest.raises(ValueError, match="--sites"):
        make_certs("/nonexistent", sites=-1)
