"""PEM certificate and key files: read them, name a key's type, and say why a pair
cannot be served. The lowest floor, so that config validation (`forkproxy check`) and
the TLS contexts share one answer. cryptography is imported inside the functions: it
costs ~7 MiB that a proxy without TLS listeners never needs."""

from __future__ import annotations

import ssl


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def key_type(key: object) -> str:
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return "rsa"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return "ec"
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(key, ed448.Ed448PublicKey | ed448.Ed448PrivateKey):
        return "ed448"
    if isinstance(key, dsa.DSAPublicKey | dsa.DSAPrivateKey):
        return "dsa"
    return type(key).__name__


def check_cert_key(cert_path: str, key_path: str) -> str | None:
    """Why this pair cannot be served (for ``forkproxy check``), or None if it can."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        data = read_file(cert_path)
    except OSError as e:
        return f"cannot read certificate {cert_path}: {e.strerror}"
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        return f"{cert_path} holds no PEM certificate"
    try:
        key_data = read_file(key_path)
    except OSError as e:
        return f"cannot read key {key_path}: {e.strerror}"
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        return f"key {key_path} is encrypted (a passphrase is not supported)"
    except ValueError:
        return f"{key_path} holds no PEM private key"
    except Exception as e:  # unsupported algorithms and the like
        return f"cannot load key {key_path}: {e}"
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certs[0].public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        return (
            f"key {key_path} does not match certificate {cert_path} "
            f"({key_type(key)} key, {key_type(certs[0].public_key())} certificate)"
        )
    try:  # whatever else OpenSSL refuses (security level, broken chain file...)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as e:
        return f"OpenSSL refuses {cert_path} with {key_path}: {e}"
    return None
