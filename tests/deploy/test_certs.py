"""fedpeft certs: what TLS and Flower's node authentication need, and nothing overwritten."""

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)

from fedpeft.deploy.certs import check_server_files, client_names, make_certs, server_cert_names
from fedpeft.errors import FedpeftError


def test_server_certificate_is_signed_by_the_ca_for_the_given_names(tmp_path: Path) -> None:
    paths = make_certs(tmp_path / "c", ["127.0.0.1", "edge.example.org"], ["a"])
    ca = x509.load_pem_x509_certificate(paths.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert server_cert_names(paths.server_cert) == ["127.0.0.1", "edge.example.org"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = load_pem_private_key(paths.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert paths.server_key.stat().st_mode & 0o077 == 0  # private keys are owner-only


def test_client_keys_are_p384_in_openssh_format(tmp_path: Path) -> None:
    paths = make_certs(tmp_path / "c", ["127.0.0.1"], client_names("2"))
    for name in ("client-1", "client-2"):
        private = load_ssh_private_key(paths.client_key(name).read_bytes(), None)
        public = load_ssh_public_key(paths.client_pub(name).read_bytes())
        assert isinstance(private.curve, ec.SECP384R1)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert paths.client_key(name).stat().st_mode & 0o077 == 0
    assert [p.stem for p in paths.client_pubs()] == ["client-1", "client-2"]


def test_rerunning_adds_clients_and_overwrites_nothing(tmp_path: Path) -> None:
    paths = make_certs(tmp_path / "c", ["127.0.0.1"], ["a"])
    before = {p: p.read_bytes() for p in (paths.ca, paths.server_cert, paths.client_key("a"))}
    make_certs(tmp_path / "c", ["10.0.0.1"], ["a", "b"])
    assert all(p.read_bytes() == data for p, data in before.items())
    assert paths.client_key("b").is_file()


@pytest.mark.parametrize("spec", ["0", "a,a", "bad name", "x/y"])
def test_bad_client_names_are_refused(spec: str) -> None:
    with pytest.raises(FedpeftError):
        client_names(spec)


def test_a_bad_san_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FedpeftError, match="not an IP address or host name"):
        make_certs(tmp_path / "c", ["no spaces allowed"], [])


def test_a_file_in_the_way_is_refused_untouched(tmp_path: Path) -> None:
    (tmp_path / "c").write_text("keep me")
    with pytest.raises(FedpeftError, match="not a folder"):
        make_certs(tmp_path / "c", ["127.0.0.1"], ["a"])
    assert (tmp_path / "c").read_text() == "keep me"


def test_broken_or_mismatched_server_files_are_caught_before_tls_starts(tmp_path: Path) -> None:
    paths = make_certs(tmp_path / "c", ["127.0.0.1"], [])
    check_server_files(paths)  # a fresh folder is fine
    other = make_certs(tmp_path / "other", ["127.0.0.1"], [])
    paths.ca.write_bytes(other.ca.read_bytes())
    with pytest.raises(FedpeftError, match="is not signed by"):
        check_server_files(paths)
    paths.server_cert.write_text("garbage")
    with pytest.raises(FedpeftError, match="unreadable certificate files"):
        check_server_files(paths)
