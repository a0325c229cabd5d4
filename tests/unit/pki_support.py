"""A cluster CA for tests: real certificates, made in the test's directory in milliseconds."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ferry.pki.ca import CertificateAuthority
from ferry.pki.credentials import Credentials
from ferry.pki.identity import Role


class TestCA:
    __test__ = False  # not a test class, whatever its name

    def __init__(self, directory: Path, cluster: str = "ferry") -> None:
        self.dir = directory
        self.ca = CertificateAuthority.init(directory / "ca", cluster)

    @classmethod
    def existing(cls, ca_dir: Path) -> TestCA:
        """The helpers on a CA made elsewhere (the lab's)."""
        made = cls.__new__(cls)
        made.dir = ca_dir.parent
        made.ca = CertificateAuthority.open(ca_dir)
        return made

    def credentials(
        self, name: str, role: Role = Role.HOST, addresses: tuple[str, ...] = ("127.0.0.1",)
    ) -> Credentials:
        out = self.dir / "bundles" / f"{name}-{role}"
        extra = addresses if role is Role.HOST else ()
        self.ca.issue(name, role, addresses=extra, out=out)
        return Credentials(out)

    def publish_crl(self, *holders: Credentials) -> None:
        """Copy the CA's current CRL to each holder, as an operator would."""
        for holder in holders:
            holder.path("crl.pem").write_bytes((self.ca.dir / "crl.pem").read_bytes())

    def expire(self, holder: Credentials) -> None:
        """Re-sign the holder's certificate so that it expired yesterday."""
        cert = x509.load_pem_x509_certificate(holder.path("cert.pem").read_bytes())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(cert.subject)
            .issuer_name(cert.issuer)
            .public_key(cert.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=30))
            .not_valid_after(now - datetime.timedelta(days=1))
        )
        for ext in cert.extensions:
            builder = builder.add_extension(ext.value, ext.critical)
        expired = builder.sign(self.ca.key, hashes.SHA256())
        holder.path("cert.pem").write_bytes(expired.public_bytes(serialization.Encoding.PEM))
