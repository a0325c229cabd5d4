"""QEMU's TLS server gets a fixed, well-known DH group, so it never generates one per migration."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ferry.pki.dh_params import ffdhe2048_pem


def test_openssl_reads_it_as_the_named_group_ffdhe2048(tmp_path: Path) -> None:
    pem = ffdhe2048_pem()
    assert pem.startswith(b"-----BEGIN DH PARAMETERS-----\n")  # GnuTLS reads no other header
    path = tmp_path / "dh-params.pem"
    path.write_bytes(pem)
    # OpenSSL carries RFC 7919's primes itself: a wrong digit would not be named.
    shown = subprocess.run(
        ["openssl", "dhparam", "-in", str(path), "-noout", "-text"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "GROUP: ffdhe2048" in shown
