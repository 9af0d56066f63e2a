"""`fedpeft certs`: a private CA, a TLS server certificate and client node-authentication key pairs.

TLS: the SuperLink presents `server.pem` (signed by `ca.pem`); SuperNodes verify it with `ca.pem`
(`--root-cert`). The certificate names every address clients dial (IP or DNS SANs): a client dialling
127.0.0.1 fails verification unless 127.0.0.1 is a SAN.

Node authentication: each client holds an ECDSA P-384 key (`clients/NAME.key`, never leaves the device);
the server registers `clients/NAME.pub` (OpenSSH format, what `flwr supernode register` reads) and the
SuperLink then refuses any SuperNode whose signed requests do not come from a registered key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpeft.errors import FedpeftError

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
CLIENTS = "clients"
VALID_DAYS = 365
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class CertPaths:
    root: Path

    @property
    def ca(self) -> Path:
        return self.root / CA_CERT

    @property
    def server_cert(self) -> Path:
        return self.root / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.root / SERVER_KEY

    def client_key(self, name: str) -> Path:
        return self.root / CLIENTS / f"{name}.key"

    def client_pub(self, name: str) -> Path:
        return self.root / CLIENTS / f"{name}.pub"

    def client_pubs(self) -> list[Path]:
        return sorted((self.root / CLIENTS).glob("*.pub"))


def _write_private(path: Path, data: bytes) -> None:
    """Owner-only, written under a temporary name then renamed: never a half-written or world-readable key."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", n):
                raise FedpeftError(f"not an IP address or host name: {n!r}") from None
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_ca(paths: CertPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpeft federation CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=VALID_DAYS * 5))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_private(paths.root / CA_KEY, _pem_key(key))
    _write_public(paths.ca, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def load_ca(paths: CertPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(paths.ca.read_bytes())
        key = serialization.load_pem_private_key((paths.root / CA_KEY).read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise FedpeftError(f"cannot read the CA in {paths.root}: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedpeftError(f"{paths.root / CA_KEY} is not an EC key")
    return cert, key


def make_server_cert(
    paths: CertPaths, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, names: list[str]
) -> None:
    if not names:
        raise FedpeftError("the server certificate needs at least one --san (IP address or host name)")
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=VALID_DAYS))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(paths.server_key, _pem_key(key))
    _write_public(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM))


def make_client_key(paths: CertPaths, name: str) -> None:
    """An ECDSA P-384 key pair for SuperNode authentication (the curve Flower's node auth expects)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(  # OpenSSH format: what flower-supernode's key loader reads
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    _write_private(paths.client_key(name), private)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_public(paths.client_pub(name), pub + f" fedpeft-{name}\n".encode())


def client_names(spec: str) -> list[str]:
    """'3' -> client-1..client-3; 'alice,bob' -> those names."""
    spec = spec.strip()
    if spec.isdigit():
        n = int(spec)
        if n < 1 or n > 10_000:
            raise FedpeftError(f"--clients must be between 1 and 10000, got {n}")
        return [f"client-{i}" for i in range(1, n + 1)]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if not NAME_RE.match(n)]
    if bad or not names:
        raise FedpeftError(
            f"bad client name {bad[0] if bad else spec!r}: use letters, digits, '.', '_' or '-' (or a count)"
        )
    if len(set(names)) != len(names):
        raise FedpeftError("client names must be distinct")
    return names


def make_certs(out: Path, sans: list[str], clients: list[str]) -> CertPaths:
    """Create (or extend) a certificate folder. An existing CA, server certificate or client key is never
    overwritten: re-running adds only what is missing, so registered clients keep working."""
    paths = CertPaths(Path(out))
    if paths.root.exists() and not paths.root.is_dir():
        raise FedpeftError(f"--out exists and is not a folder: {paths.root}")
    paths.root.mkdir(parents=True, exist_ok=True)
    (paths.root / CLIENTS).mkdir(exist_ok=True)
    if paths.ca.exists():
        ca, ca_key = load_ca(paths)
    else:
        ca, ca_key = make_ca(paths)
    if not paths.server_cert.exists():
        make_server_cert(paths, ca, ca_key, sans)
    for name in clients:
        if not paths.client_key(name).exists():
            make_client_key(paths, name)
    return paths


def check_server_files(paths: CertPaths) -> None:
    """The CA and the server's certificate and key load, belong together, and are in date: a broken file
    is reported here in one line rather than as the SuperLink's TLS traceback."""
    try:
        ca = x509.load_pem_x509_certificate(paths.ca.read_bytes())
        cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
        key = serialization.load_pem_private_key(paths.server_key.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise FedpeftError(f"unreadable certificate files in {paths.root}: {e}") from None
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise FedpeftError(f"{paths.server_key} is not the key of {paths.server_cert}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise FedpeftError(f"{paths.server_cert} is not signed by {paths.ca}") from None
    if cert.not_valid_after_utc < _now():
        raise FedpeftError(f"{paths.server_cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}")


def server_cert_names(path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName)
