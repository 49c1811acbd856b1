"""TLS for Dask clusters: a private CA, certificates per role, ``Security``.

distributed requires certificates in both directions, so with these files a
peer without a certificate from this CA is refused. Public names are
re-exported by :mod:`ntkdist.cluster`.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING

from ._errors import InputError

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from distributed import Security

ROLES = ("scheduler", "worker", "client")


def write_tls_certificates(
    directory: str | os.PathLike[str],
    *,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 365,
) -> Path:
    """Write a private CA and one certificate per role into ``directory``.

    Files: ``ca.pem`` (share with everyone), ``ca-key.pem`` (keep it; only
    needed to sign more), and ``<role>.pem``/``<role>-key.pem`` for the
    scheduler, workers and clients. Keys are EC P-256 and mode ``0600``.
    distributed requires certificates in both directions, so a peer without a
    certificate from this CA is refused. Needs the ``cryptography`` package.

    Args:
        directory: where to write (created if missing).
        hosts: host names and IP addresses for the subject alternative names.
        days: validity.

    Returns:
        ``directory`` as a :class:`~pathlib.Path`.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write(
        stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
    ) -> None:
        (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path = out / f"{stem}-key.pem"
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)

    def builder(
        subject: str, issuer: str, public: ec.EllipticCurvePublicKey
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        builder("ntkdist CA", "ntkdist CA", ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
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
        .sign(ca_key, hashes.SHA256())
    )
    write("ca", ca_cert, ca_key)
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    for role in ROLES:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            builder(f"ntkdist {role}", "ntkdist CA", key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write(role, cert, key)
    return out


def security_from_directory(
    directory: str | os.PathLike[str],
    *,
    roles: Sequence[str] = ROLES,
) -> Security:
    """A distributed ``Security`` requiring TLS, from :func:`write_tls_certificates`.

    Args:
        directory: holds ``ca.pem`` and ``<role>.pem``/``<role>-key.pem``.
        roles: the roles this process plays; a client machine needs only
            ``("client",)`` and its two files.

    Returns:
        ``Security(require_encryption=True, ...)`` for those roles.

    Raises:
        FileNotFoundError: a needed file is missing (the message names it).
    """
    from distributed import Security

    base = Path(directory)
    files: dict[str, str] = {"tls_ca_file": str(base / "ca.pem")}
    for role in roles:
        files[f"tls_{role}_cert"] = str(base / f"{role}.pem")
        files[f"tls_{role}_key"] = str(base / f"{role}-key.pem")
    for path in files.values():
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"TLS file {path} is missing; create the set with "
                "ntkdist.cluster.write_tls_certificates() or python deploy/tls.py."
            )
    return Security(require_encryption=True, **files)


def tls_env(directory: str | os.PathLike[str], role: str = "client") -> dict[str, str]:
    """Dask configuration variables that turn on TLS for one role.

    A process started with these (a ``dask worker`` in a container, or a
    client such as ``ntkdist compute --scheduler tls://...``) builds its
    ``Security`` from them without code changes.

    Args:
        directory: holds ``ca.pem`` and ``<role>.pem``/``<role>-key.pem``.
        role: ``"client"``, ``"worker"`` or ``"scheduler"``.

    Returns:
        ``DASK_DISTRIBUTED__COMM__...`` variables as strings.

    Raises:
        InputError: ``role`` is not one of :data:`ROLES` (a ``ValueError``).

    Example:
        >>> env = tls_env("/etc/dask/tls")
        >>> env["DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT"]
        '/etc/dask/tls/client.pem'
    """
    if role not in ROLES:
        raise InputError(f"role={role!r} is not one of {ROLES}.")
    base = Path(directory)
    prefix = f"DASK_DISTRIBUTED__COMM__TLS__{role.upper()}__"
    return {
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(base / "ca.pem"),
        prefix + "CERT": str(base / f"{role}.pem"),
        prefix + "KEY": str(base / f"{role}-key.pem"),
    }
