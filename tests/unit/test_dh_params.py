"""QEMU's TLS server gets a fixed, well-known DH group, so it never generates one per migration."""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import dh
from cryptography.hazmat.primitives.serialization import load_pem_parameters

from ferry.pki.dh_params import ffdhe2048_pem


def test_the_group_is_pkcs3_pem_with_generator_2() -> None:
    pem = ffdhe2048_pem()
    assert pem.startswith(b"-----BEGIN DH PARAMETERS-----\n")  # GnuTLS reads no other header
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cryptography deprecates finite-field DH
        params = load_pem_parameters(pem)
    assert isinstance(params, dh.DHParameters)
    numbers = params.parameter_numbers()
    assert numbers.g == 2 and numbers.p.bit_length() == 2048


def test_openssl_knows_it_as_the_named_group_ffdhe2048(tmp_path: Path) -> None:
    # OpenSSL carries RFC 7919's primes itself: a wrong digit would not be named.
    path = tmp_path / "dh-params.pem"
    path.write_bytes(ffdhe2048_pem())
    shown = subprocess.run(
        ["openssl", "dhparam", "-in", str(path), "-noout", "-text"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "GROUP: ffdhe2048" in shown
