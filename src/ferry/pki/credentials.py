"""A host's or an operator's credentials: checked once, then TLS contexts made from them.

One directory holds the four files of a bundle (``ca.pem``, ``crl.pem``,
``cert.pem``, ``key.pem``): ``/etc/ferry/pki`` on a host or a station.
The contexts are rebuilt whenever one of the files changes, so a new CRL
copied into place is honoured at the next handshake, without a restart.
"""

from __future__ import annotations

import datetime
import logging
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from ferry.errors import PkiError
from ferry.pki.files import BUNDLE_FILES
from ferry.pki.identity import Identity

log = logging.getLogger("ferry.pki")

DEFAULT_PKI_DIR = Path("/etc/ferry/pki")
HANDSHAKE_TIMEOUT = 10.0
EXPIRY_WARNING = datetime.timedelta(days=30)

Stamp = tuple[tuple[int, int], ...]


class Credentials:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._stamp: Stamp | None = None
        self._identity: Identity | None = None
        self._contexts: dict[bool, ssl.SSLContext] = {}
        self._revoked: frozenset[int] = frozenset()

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def identity(self) -> Identity:
        """Whom these credentials name (checked, and re-checked when the files change)."""
        self._refresh()
        assert self._identity is not None
        return self._identity

    def server_context(self) -> ssl.SSLContext:
        self._refresh()
        return self._contexts.setdefault(True, self._context(server=True))

    def client_context(self) -> ssl.SSLContext:
        self._refresh()
        return self._contexts.setdefault(False, self._context(server=False))

    def peer(self, der: bytes | None) -> Identity:
        """The identity of a peer that passed the handshake, if it is not revoked.

        The handshake checked the chain and the validity dates. Revocation is
        checked here, against the CRL as it is now, so that a revoked peer is
        told why in a message rather than by a dropped handshake (asyncio
        closes a failed TLS handshake without sending OpenSSL's alert).
        """
        self._refresh()
        identity = Identity.of_der(der)
        if identity.cluster != self.identity.cluster:
            raise PkiError(f"{identity} belongs to cluster {identity.cluster!r}, not ours")
        if identity.serial in self._revoked:
            raise PkiError(f"the certificate of {identity} (serial {identity.serial:x}) is revoked")
        return identity

    # -- checking ------------------------------------------------------------------

    def _refresh(self) -> None:
        stamp = self._files_stamp()
        if stamp == self._stamp:
            return
        self._identity, self._revoked = self.check()
        self._contexts.clear()
        self._stamp = stamp

    def _files_stamp(self) -> Stamp:
        stamps = []
        for name in BUNDLE_FILES:
            try:
                st = self.path(name).stat()
            except FileNotFoundError:
                raise PkiError(
                    f"no {name} in {self.dir}: make credentials with `ferry ca issue` "
                    "on the CA's machine and copy its bundle here"
                ) from None
            except OSError as err:
                raise PkiError(f"cannot read {self.path(name)}: {err.strerror}") from None
            stamps.append((st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def check(self) -> tuple[Identity, frozenset[int]]:
        """Every file present and sound; the certificate ours, current and not revoked.

        Returns our identity and the serial numbers the CRL revokes.
        """
        key_path = self.path("key.pem")
        mode = key_path.stat().st_mode & 0o777
        if mode & 0o077:
            raise PkiError(f"{key_path} is readable by others (mode {mode:04o}): chmod 600 it")
        ca = self._load(x509.load_pem_x509_certificate, "ca.pem")
        cert = self._load(x509.load_pem_x509_certificate, "cert.pem")
        crl = self._load(x509.load_pem_x509_crl, "crl.pem")
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise PkiError(
                f"{self.path('cert.pem')} was not issued by {self.path('ca.pem')}"
            ) from None
        if not crl.is_signature_valid(ca.public_key()):
            raise PkiError(f"{self.path('crl.pem')} is not signed by {self.path('ca.pem')}")
        identity = Identity.of(cert)
        now = datetime.datetime.now(datetime.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise PkiError(
                f"the certificate of {identity} in {self.dir} is valid from "
                f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}, "
                "not now"
            )
        if cert.not_valid_after_utc - now < EXPIRY_WARNING:
            log.warning(
                "the certificate of %s expires on %s", identity, cert.not_valid_after_utc.date()
            )
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise PkiError(f"the certificate of {identity} in {self.dir} is revoked")
        key = self._load(lambda data: serialization.load_pem_private_key(data, None), "key.pem")
        if key.public_key() != cert.public_key():
            raise PkiError(f"{key_path} is not the key of {self.path('cert.pem')}")
        return identity, frozenset(r.serial_number for r in crl)

    def _load(self, parse, name: str):  # type: ignore[no-untyped-def]
        path = self.path(name)
        try:
            return parse(path.read_bytes())
        except OSError as err:
            raise PkiError(f"cannot read {path}: {err.strerror}") from None
        except ValueError as err:
            raise PkiError(f"{path} is not a valid PEM file: {err}") from None

    def _context(self, server: bool) -> ssl.SSLContext:
        """Mutual TLS 1.3 against the cluster CA (revocation: :meth:`peer`).

        Host names are not checked by OpenSSL: ferry checks the peer's
        identity itself (its role, and the name the user asked for), since
        xend-style names such as ``xen_host_1`` are not DNS host names.
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=str(self.path("ca.pem")))
            ctx.load_cert_chain(str(self.path("cert.pem")), str(self.path("key.pem")))
        except (OSError, ssl.SSLError) as err:
            raise PkiError(f"cannot load the credentials in {self.dir}: {err}") from None
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        return ctx


def tls_failure(err: BaseException) -> str:
    """OpenSSL's reason for a failed handshake, as a person would say it."""
    reason = getattr(err, "reason", None) or str(err)
    text = str(reason).lower().replace("_", " ")
    for prefix in ("sslv3 alert ", "tlsv1 alert ", "tlsv13 alert "):
        text = text.replace(prefix, "")
    verify = getattr(err, "verify_message", None)
    return f"{text}: {verify}" if verify else text


def insecure_warning(where: str) -> str:
    return (
        f"INSECURE: {where} runs without TLS (insecure = true): any host that hosts_allow "
        "lets in can push a domain here, and memory streams cross the network in clear"
    )
