"""The cluster CA: one key that signs hosts' and operators' certificates and the CRL.

The CA lives in one directory, on the management station, never on the hosts::

    /etc/ferry/ca/          0700
      ca.key                0600  the CA's private key
      ca.pem                      the CA certificate (every host and operator has a copy)
      crl.pem                     the revocation list, re-signed at every revocation
      issued.json                 every certificate issued: serial, name, role, expiry, revocation
      issued/NAME/          0700  one bundle per certificate, to copy to its owner's /etc/ferry/pki/

A bundle holds ``ca.pem``, ``crl.pem``, ``cert.pem`` and ``key.pem`` (0600):
the same four files wherever ferry looks for credentials.

Keys are ECDSA P-256: small, fast to make, and accepted by OpenSSL (ferryd's
channels) and GnuTLS (QEMU's memory stream) alike.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ferry.errors import PkiError
from ferry.pki.files import BUNDLE_FILES, write_private, write_public
from ferry.pki.identity import Role, check_name

DEFAULT_CA_DIR = Path("/etc/ferry/ca")
CA_DAYS = 3650
HOST_DAYS = 825
OPERATOR_DAYS = 365
# Hosts read the CRL at every handshake. A CRL past its nextUpdate fails
# every handshake (OpenSSL and GnuTLS both refuse it), so it is valid as
# long as the CA: revocations are published by re-signing, not by expiry.
CRL_DAYS = CA_DAYS


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class Issued:
    serial: str  # hex
    name: str
    role: str
    not_after: str  # ISO 8601, UTC
    revoked: str | None = None  # ISO 8601, UTC


class CertificateAuthority:
    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        self.dir = directory
        self.key = key
        self.cert = cert

    # -- creation and loading ----------------------------------------------------

    @classmethod
    def init(cls, directory: Path, cluster: str = "ferry", days: int = CA_DAYS) -> Self:
        check_name(cluster, "cluster name")
        if (directory / "ca.key").exists():
            raise PkiError(f"{directory}/ca.key exists: a CA is already set up there")
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster} cluster CA"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        write_private(directory / "ca.key", _key_pem(key))
        write_public(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
        ca = cls(directory, key, cert)
        ca._save_index([])
        ca._write_crl([])
        return ca

    @classmethod
    def open(cls, directory: Path) -> Self:
        try:
            key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
            cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        except FileNotFoundError as err:
            raise PkiError(
                f"no CA in {directory} ({Path(err.filename).name} missing); "
                "create one with `ferry ca init`"
            ) from None
        except PermissionError:
            raise PkiError(f"cannot read the CA in {directory}: permission denied") from None
        except ValueError as err:
            raise PkiError(f"the CA in {directory} is not readable: {err}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{directory}/ca.key is not an ECDSA key")
        return cls(directory, key, cert)

    @property
    def cluster(self) -> str:
        values = self.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        return str(values[0].value)

    # -- issuing -------------------------------------------------------------------

    def issue(
        self,
        name: str,
        role: Role,
        dns: tuple[str, ...] = (),
        addresses: tuple[str, ...] = (),
        days: int | None = None,
        out: Path | None = None,
    ) -> Path:
        """A new key and certificate for ``name``, as a bundle directory; returns it."""
        check_name(name)
        for extra in dns:
            check_name(extra, "DNS name")
        ips = [_address(a) for a in addresses]
        if role is not Role.HOST and (dns or ips):
            raise PkiError("only host certificates carry DNS names and addresses")
        live = [i for i in self.issued() if i.name == name and i.revoked is None]
        if live and out is None:
            raise PkiError(
                f"{name!r} already has a certificate (serial {live[0].serial}); "
                f"revoke it first with `ferry ca revoke {name}`"
            )
        days = days or (HOST_DAYS if role is Role.HOST else OPERATOR_DAYS)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        host = role is Role.HOST
        purposes = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if host:
            purposes.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys((name, *dns))]
        names += [x509.IPAddress(ip) for ip in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.cluster),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
                        x509.NameAttribute(NameOID.COMMON_NAME, name),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(
                min(now + datetime.timedelta(days=days), self.cert.not_valid_after_utc)
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        entry = Issued(
            serial=f"{cert.serial_number:x}",
            name=name,
            role=role.value,
            not_after=cert.not_valid_after_utc.isoformat(),
        )
        self._save_index([*self.issued(), entry])
        bundle = out or self.dir / "issued" / name
        self.write_bundle(bundle, cert, key)
        return bundle

    def write_bundle(self, bundle: Path, cert: x509.Certificate, key: Any) -> None:
        bundle.mkdir(parents=True, exist_ok=True)
        os.chmod(bundle, 0o700)
        pem = serialization.Encoding.PEM
        write_public(bundle / "ca.pem", self.cert.public_bytes(pem))
        write_public(bundle / "crl.pem", (self.dir / "crl.pem").read_bytes())
        write_public(bundle / "cert.pem", cert.public_bytes(pem))
        write_private(bundle / "key.pem", _key_pem(key))
        assert {p.name for p in bundle.iterdir()} >= set(BUNDLE_FILES)

    # -- revocation ------------------------------------------------------------------

    def revoke(self, who: str) -> list[Issued]:
        """Revoke every live certificate of a name (or the one with that hex serial)."""
        entries = self.issued()
        hits = [e for e in entries if e.revoked is None and who in (e.name, e.serial)]
        if not hits:
            raise PkiError(f"no live certificate named or numbered {who!r} in {self.dir}")
        when = _now().isoformat()
        updated = [Issued(**(asdict(e) | {"revoked": when})) if e in hits else e for e in entries]
        self._save_index(updated)
        self._write_crl([e for e in updated if e.revoked is not None])
        return hits

    def _write_crl(self, revoked: list[Issued]) -> None:
        now = _now()
        number = self._crl_number() + 1
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - datetime.timedelta(minutes=5))
            .next_update(now + datetime.timedelta(days=CRL_DAYS))
            .add_extension(x509.CRLNumber(number), critical=False)
        )
        for entry in revoked:
            assert entry.revoked is not None
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(entry.serial, 16))
                .revocation_date(datetime.datetime.fromisoformat(entry.revoked))
                .build()
            )
        crl = builder.sign(self.key, hashes.SHA256())
        write_public(self.dir / "crl.pem", crl.public_bytes(serialization.Encoding.PEM))

    def _crl_number(self) -> int:
        try:
            crl = x509.load_pem_x509_crl((self.dir / "crl.pem").read_bytes())
        except FileNotFoundError:
            return 0
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)

    # -- the index ---------------------------------------------------------------------

    def issued(self) -> list[Issued]:
        try:
            rows = json.loads((self.dir / "issued.json").read_text())
            return [Issued(**row) for row in rows]
        except FileNotFoundError:
            return []
        except (ValueError, TypeError) as err:
            raise PkiError(f"{self.dir}/issued.json is damaged: {err}") from None

    def _save_index(self, entries: list[Issued]) -> None:
        text = json.dumps([asdict(e) for e in entries], indent=1) + "\n"
        write_public(self.dir / "issued.json", text.encode())


def _usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise PkiError(f"{text!r} is not an IP address") from None
