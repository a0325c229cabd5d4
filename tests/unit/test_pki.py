"""The cluster CA and credentials: real certificates, real TLS handshakes on loopback."""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from ferry.errors import PkiError
from ferry.pki.ca import CertificateAuthority
from ferry.pki.credentials import Credentials
from ferry.pki.identity import Identity, Role

from .pki_support import TestCA


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path)


def test_ca_files_and_permissions(ca: TestCA) -> None:
    directory = ca.ca.dir
    assert directory.stat().st_mode & 0o777 == 0o700
    assert (directory / "ca.key").stat().st_mode & 0o777 == 0o600
    bundle = ca.ca.issue("xen_host_1", Role.HOST, addresses=("10.42.0.11",))
    assert bundle == directory / "issued" / "xen_host_1"
    assert bundle.stat().st_mode & 0o777 == 0o700
    assert {p.name for p in bundle.iterdir()} == {"ca.pem", "crl.pem", "cert.pem", "key.pem"}
    assert (bundle / "key.pem").stat().st_mode & 0o777 == 0o600


def test_a_second_ca_in_the_same_place_is_refused(ca: TestCA) -> None:
    with pytest.raises(PkiError, match="a CA is already set up there"):
        CertificateAuthority.init(ca.ca.dir)


def test_host_identity_carries_its_names_and_role(ca: TestCA) -> None:
    bundle = ca.ca.issue("xen_host_1", Role.HOST, dns=("h1.lan",), addresses=("10.42.0.11",))
    identity = Identity.of(x509.load_pem_x509_certificate((bundle / "cert.pem").read_bytes()))
    assert (identity.name, identity.role, identity.cluster) == ("xen_host_1", Role.HOST, "ferry")
    assert identity.names() == ("xen_host_1", "h1.lan", "10.42.0.11")
    assert identity.answers_to("XEN_HOST_1") and identity.answers_to("10.42.0.11")
    assert not identity.answers_to("10.42.0.12") and not identity.answers_to("xen_host_2")
    # QEMU's tls-authz compares GnuTLS's order: the certificate's own, O first.
    assert identity.gnutls_dn == "O=ferry,OU=host,CN=xen_host_1"
    assert identity.dn == "CN=xen_host_1,OU=host,O=ferry"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a b", "x\n", "-lead", "a" * 64])
def test_bad_names_are_refused(ca: TestCA, name: str) -> None:
    with pytest.raises(PkiError, match="not valid"):
        ca.ca.issue(name, Role.ADMIN)


def test_operators_get_no_addresses_and_names_are_issued_once(ca: TestCA) -> None:
    with pytest.raises(PkiError, match="only host certificates"):
        ca.ca.issue("alice", Role.ADMIN, addresses=("10.0.0.1",))
    ca.ca.issue("alice", Role.ADMIN)
    with pytest.raises(PkiError, match="already has a certificate"):
        ca.ca.issue("alice", Role.VIEWER)
    ca.ca.revoke("alice")
    ca.ca.issue("alice", Role.VIEWER)  # a new one, once the old one is revoked


def test_revocation_is_in_the_crl_and_in_the_index(ca: TestCA) -> None:
    ca.ca.issue("bob", Role.VIEWER)
    [entry] = ca.ca.revoke("bob")
    crl = x509.load_pem_x509_crl((ca.ca.dir / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(entry.serial, 16)) is not None
    assert [e.revoked is not None for e in ca.ca.issued()] == [True]
    with pytest.raises(PkiError, match="no live certificate"):
        ca.ca.revoke("bob")


def test_credentials_check(ca: TestCA, tmp_path: Path) -> None:
    creds = ca.credentials("h1")
    assert creds.identity.name == "h1"
    os.chmod(creds.path("key.pem"), 0o644)
    with pytest.raises(PkiError, match=r"readable by others \(mode 0644\): chmod 600"):
        _ = Credentials(creds.dir).identity
    os.chmod(creds.path("key.pem"), 0o600)
    creds.path("crl.pem").unlink()
    with pytest.raises(PkiError, match=r"no crl\.pem in"):
        _ = Credentials(creds.dir).identity


def test_credentials_of_another_ca_expired_or_revoked_are_refused(
    ca: TestCA, tmp_path: Path
) -> None:
    other = TestCA(tmp_path / "other").credentials("h1")
    mixed = ca.credentials("h2")
    mixed.path("ca.pem").write_bytes(other.path("ca.pem").read_bytes())
    with pytest.raises(PkiError, match="was not issued by"):
        _ = Credentials(mixed.dir).identity
    expired = ca.credentials("h3")
    ca.expire(expired)
    with pytest.raises(PkiError, match="not now"):
        _ = Credentials(expired.dir).identity
    revoked = ca.credentials("h4")
    ca.ca.revoke("h4")
    ca.publish_crl(revoked)
    with pytest.raises(PkiError, match="is revoked"):
        _ = Credentials(revoked.dir).identity


async def handshake(server: Credentials, client: Credentials) -> tuple[Identity, Identity]:
    """A real TLS 1.3 handshake; each side's view of the other (checked by peer())."""
    seen: asyncio.Future[Identity] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = server.peer(writer.get_extra_info("ssl_object").getpeercert(True))
            seen.set_result(peer)
        except PkiError as err:
            seen.set_exception(err)
        writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server.server_context())
    port = srv.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client.client_context(), server_hostname=""
        )
        theirs = client.peer(writer.get_extra_info("ssl_object").getpeercert(True))
        writer.close()
        return theirs, await asyncio.wait_for(seen, 5)
    finally:
        srv.close()


async def test_mutual_tls_between_hosts(ca: TestCA) -> None:
    h1, h2 = ca.credentials("h1"), ca.credentials("h2")
    server_seen_by_client, client_seen_by_server = await handshake(h1, h2)
    assert (server_seen_by_client.name, client_seen_by_server.name) == ("h1", "h2")
    assert h1.server_context().minimum_version is ssl.TLSVersion.TLSv1_3


async def test_a_revoked_peer_is_refused_once_the_crl_arrives(ca: TestCA) -> None:
    h1, viewer = ca.credentials("h1"), ca.credentials("carol", Role.VIEWER)
    await handshake(h1, viewer)
    ca.ca.revoke("carol")
    ca.publish_crl(h1)  # no restart: the new CRL is read at the next handshake
    with pytest.raises(PkiError, match=r"viewer carol .* is revoked"):
        await handshake(h1, viewer)


async def test_a_peer_of_another_ca_fails_the_handshake(ca: TestCA, tmp_path: Path) -> None:
    h1 = ca.credentials("h1")
    stranger = TestCA(tmp_path / "stranger").credentials("h1")
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(h1, stranger)
