"""PEM certificate and key files: read them, name a key's type, and say why a pair
cannot be served. The lowest floor, so that config validation (`forkproxy check`) and
the TLS contexts share one answer. cryptography and ssl are imported inside the functions:
they cost ~7 and ~3.5 MiB (ssl initialises libcrypto) that a proxy without TLS never needs,
and config.py, which every process imports, imports this module."""

from __future__ import annotations

import os


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


def load_certs(path: str, what: str) -> tuple[list, str]:
    """The PEM certificates in ``path``, or ([], why not) for ``forkproxy check``."""
    from cryptography import x509

    try:
        data = read_file(path)
    except OSError as e:
        return [], f"cannot read {what} {path}: {e.strerror}"
    try:
        return x509.load_pem_x509_certificates(data), ""
    except ValueError:
        return [], f"{path} holds no PEM certificate"


def check_cert_key(cert_path: str, key_path: str) -> str | None:
    """Why this pair cannot be served (for ``forkproxy check``), or None if it can."""
    import ssl

    from cryptography.hazmat.primitives import serialization

    certs, err = load_certs(cert_path, "certificate")
    if err:
        return err
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


def check_ca(path: str) -> str | None:
    """Why a CA file cannot be used to verify servers, or None if it can."""
    import ssl

    certs, err = load_certs(path, "CA file")
    if err:
        return err
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, ValueError, OSError) as e:
        return f"OpenSSL refuses the CA file {path}: {e}"
    if not any(_is_ca(c) for c in certs):
        return f"{path} holds no CA certificate (basicConstraints CA:TRUE)"
    return None


def _is_ca(cert) -> bool:
    from cryptography import x509

    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return True  # a v1 root: OpenSSL accepts it as a trust anchor


def check_system_ca() -> str | None:
    """Why the system store cannot verify servers (no CA bundle where OpenSSL looks)."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_default_certs()
    paths = ssl.get_default_verify_paths()
    if ctx.cert_store_stats()["x509_ca"] or (paths.capath and _has_files(paths.capath)):
        return None
    return (f"the system store is empty (OpenSSL looks in {paths.cafile} and "
            f"{paths.capath}): install ca-certificates or set ca")


def _has_files(directory: str) -> bool:
    try:
        return any(True for _ in os.scandir(directory))
    except OSError:
        return False


def check_ciphers(ciphers: str) -> list[str]:
    """OpenSSL's complaint about a TLS 1.2 cipher list, if any."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).set_ciphers(ciphers)
    except ssl.SSLError:
        return [f"OpenSSL knows no cipher in {ciphers!r}"]
    return []


def cert_not_after(cert_path: str) -> tuple[float, str]:
    """(Unix time the leaf of ``cert_path`` expires, its first DNS name or else its common
    name); raises OSError/ValueError on bad files."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    leaf = x509.load_pem_x509_certificates(read_file(cert_path))[0]
    try:
        names = leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return leaf.not_valid_after_utc.timestamp(), names[0] if names else ""
