"""Who a certificate of the cluster CA names: a host, an admin or a viewer.

The subject is ``O=<cluster>, OU=<role>, CN=<name>``; a host's certificate
also carries its DNS names and addresses as subjectAltNames. The role is in
the subject because the CA signed it there: a peer cannot claim another.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509
from cryptography.x509.oid import NameOID

from ferry.errors import PkiError

# The names a certificate may give: host names as DNS and xend have them
# (underscores included, as the classic xen_host_1), and operators' names.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class Role(StrEnum):
    HOST = "host"  # a ferryd: relocation peer, serves the control API
    ADMIN = "admin"  # an operator: every verb
    VIEWER = "viewer"  # an operator: list, info, watch


def check_name(name: str, what: str = "certificate name") -> str:
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise PkiError(
            f"{what} {name!r} is not valid: 1-63 letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class Identity:
    name: str
    role: Role
    cluster: str
    serial: int
    dns: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    # The subject as RFC 4514 text, most specific first ("CN=...,OU=...,O=...").
    dn: str = ""
    # The subject as GnuTLS (gnutls_x509_crt_get_dn) writes it, and QEMU's
    # tls-authz compares it: in the certificate's order, least specific first.
    gnutls_dn: str = ""

    @classmethod
    def of(cls, cert: x509.Certificate) -> Identity:
        def one(oid: x509.ObjectIdentifier, what: str) -> str:
            values = cert.subject.get_attributes_for_oid(oid)
            if len(values) != 1 or not isinstance(values[0].value, str):
                raise PkiError(f"certificate {cert.serial_number:x} has no single {what}")
            return values[0].value

        name = one(NameOID.COMMON_NAME, "common name")
        role_text = one(NameOID.ORGANIZATIONAL_UNIT_NAME, "role (OU)")
        try:
            role = Role(role_text)
        except ValueError:
            raise PkiError(f"certificate of {name!r} has an unknown role {role_text!r}") from None
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = tuple(san.get_values_for_type(x509.DNSName))
            addresses = tuple(str(a) for a in san.get_values_for_type(x509.IPAddress))
        except x509.ExtensionNotFound:
            dns, addresses = (), ()
        return cls(
            name=name,
            role=role,
            cluster=one(NameOID.ORGANIZATION_NAME, "cluster name (O)"),
            serial=cert.serial_number,
            dns=dns,
            addresses=addresses,
            dn=cert.subject.rfc4514_string(),
            gnutls_dn=",".join(rdn.rfc4514_string() for rdn in cert.subject.rdns),
        )

    @classmethod
    def of_der(cls, der: bytes | None) -> Identity:
        if not der:
            raise PkiError("the peer presented no certificate")
        return cls.of(x509.load_der_x509_certificate(der))

    def names(self) -> tuple[str, ...]:
        """Every name and address this identity answers to, name first."""
        return tuple(dict.fromkeys((self.name, *self.dns, *self.addresses)))

    def answers_to(self, host: str) -> bool:
        """Whether ``host`` (as a user typed it: a name or an address) is this identity."""
        wanted = host.strip().lower()
        with contextlib.suppress(ValueError):
            wanted = str(ipaddress.ip_address(wanted))
        return wanted in (n.lower() for n in self.names())

    def __str__(self) -> str:
        return f"{self.role} {self.name}"
