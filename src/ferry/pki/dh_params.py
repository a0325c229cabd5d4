"""The Diffie-Hellman group QEMU's TLS server is given: RFC 7919's ffdhe2048, a constant.

A ``tls-creds-x509`` server object whose directory has no ``dh-params.pem``
generates a fresh 2048-bit group at ``object-add``: 0.1 to 0.7 s of the
target's CPU inside every migration's prepare (measured here: 428 ms for that
one QMP command, 2.5 ms with this file). A published, vetted group costs
nothing and is what RFC 7919 recommends over ad hoc ones; with ferry's ECDSA
certificates GnuTLS negotiates ECDHE anyway, so the group is only a fallback.
"""

from __future__ import annotations

import base64

# RFC 7919, appendix A.1 (generator 2).
FFDHE2048_PRIME = int(
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1"
    "D8B9C583CE2D3695A9E13641146433FBCC939DCE249B3EF9"
    "7D2FE363630C75D8F681B202AEC4617AD3DF1ED5D5FD6561"
    "2433F51F5F066ED0856365553DED1AF3B557135E7F57C935"
    "984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE735"
    "30ACCA4F483A797ABC0AB182B324FB61D108A94BB2C8E3FB"
    "B96ADAB760D7F4681D4F42A3DE394DF4AE56EDE76372BB19"
    "0B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61"
    "9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD73"
    "3BB5FCBC2EC22005C58EF1837D1683B2C6F34A26C1B2EFFA"
    "886B423861285C97FFFFFFFFFFFFFFFF",
    16,
)
FFDHE2048_GENERATOR = 2


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _der_integer(value: int) -> bytes:
    raw = value.to_bytes(value.bit_length() // 8 + 1, "big")  # a leading 0: never negative
    return b"\x02" + _der_length(len(raw)) + raw


def ffdhe2048_pem() -> bytes:
    """PKCS #3 ``DH PARAMETERS``, the form GnuTLS reads (cryptography writes only X9.42)."""
    body = _der_integer(FFDHE2048_PRIME) + _der_integer(FFDHE2048_GENERATOR)
    der = b"\x30" + _der_length(len(body)) + body
    text = base64.b64encode(der).decode()
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return "\n".join(
        ["-----BEGIN DH PARAMETERS-----", *lines, "-----END DH PARAMETERS-----", ""]
    ).encode()
