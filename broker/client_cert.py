"""The TLS client certificate a credential authenticates with (`tls_client_auth`, spec §6.7,
RFC 8705 §2.1), and the CA the token endpoint's certificate must chain to.

The certificate, its key and the CA are files, read like `{ file = … }` secrets
(broker/secret_file.py): read again when a file changes, at most once a second and only when a
token request uses them. `current()` hands out an SSL context built from the files as they are
now, and a version (a hash of their contents) that changes when the context does, so the upstream
client (broker/upstream/mtls.py) knows when to connect anew. Files that change into something
unusable (a certificate without its key, a key of another certificate) keep the context built
before, with one warning per change.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from dataclasses import dataclass
from datetime import datetime

import httpx
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.secret_file import CHECK_EVERY, FileSecret

__all__ = ["CertificateProblem", "ClientCertificate"]

log = structlog.get_logger("broker.secret")

_PRIVATE_KEY = re.compile(r"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----", re.DOTALL)
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class CertificateProblem(ValueError):
    """What is wrong, and with which of the credential's keys (tls_client_cert, tls_client_key, tls_ca_file)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class _Loaded:
    version: str
    context: ssl.SSLContext
    subject: str  # RFC 4514, as RFC 8705 §2.1.2 registers it (tls_client_auth_subject_dn)
    not_after: datetime


class ClientCertificate:
    """`tls_client_cert` (PEM, the chain after the certificate if any), `tls_client_key` (unless
    the certificate file holds the key too) and `tls_ca_file` (default: the CAs httpx trusts)."""

    __slots__ = ("_ca", "_cert", "_key", "_loaded", "_reported")

    def __init__(
        self,
        cert_file: str,
        key_file: str | None = None,
        ca_file: str | None = None,
        *,
        check_every: float = CHECK_EVERY,
    ) -> None:
        """Reads and checks the files now: CertificateProblem naming the one that is wrong."""
        self._cert = _open("tls_client_cert", cert_file, check_every)
        self._key = _open("tls_client_key", key_file, check_every) if key_file else None
        self._ca = _open("tls_ca_file", ca_file, check_every) if ca_file else None
        self._loaded = self._load(self._texts())
        self._reported: str | None = None

    @property
    def files(self) -> tuple[str, str | None, str | None]:
        """Certificate, key and CA file: which HTTP client (one per certificate) to use."""
        return (self._cert.source.removeprefix("file:"), _path(self._key), _path(self._ca))

    @property
    def subject(self) -> str:
        return self._loaded.subject

    @property
    def not_after(self) -> datetime:
        return self._loaded.not_after

    def _texts(self) -> tuple[str, str | None, str | None]:
        return (
            self._cert.reveal(),
            self._key.reveal() if self._key else None,
            self._ca.reveal() if self._ca else None,
        )

    def current(self) -> tuple[str, ssl.SSLContext]:
        """(version, context) for the files as they are now."""
        texts = self._texts()
        version = _version(texts)
        if version == self._loaded.version:
            return version, self._loaded.context
        try:
            self._loaded = self._load(texts)
        except CertificateProblem as exc:
            if version != self._reported:
                self._reported = version
                log.warning(
                    "secret.tls_client_cert_unusable",
                    source=f"file:{self.files[0]}",
                    reason=f"{exc.field} {exc.message}",
                    note="keeping the certificate read before",
                )
            return self._loaded.version, self._loaded.context
        self._reported = None
        log.info("secret.tls_client_cert_changed", source=f"file:{self.files[0]}", subject=self._loaded.subject)
        return version, self._loaded.context

    def _load(self, texts: tuple[str, str | None, str | None]) -> _Loaded:
        cert_text, key_text, ca_text = texts
        certificate = _check(cert_text, key_text, ca_text)
        cert_file, key_file, ca_file = self.files
        # without a CA file, the CAs the shared HTTP client trusts (httpx's: certifi)
        context = ssl.create_default_context(cafile=ca_file) if ca_file else httpx.create_ssl_context(trust_env=False)
        try:
            context.load_cert_chain(cert_file, key_file)
        except (ssl.SSLError, OSError) as exc:
            # the files were checked a moment ago: changed meanwhile, or something OpenSSL refuses
            raise CertificateProblem("tls_client_cert", f"cannot be used for TLS ({exc})") from None
        subject = certificate.subject.rfc4514_string()
        return _Loaded(_version(texts), context, subject, certificate.not_valid_after_utc)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClientCertificate):
            return NotImplemented
        return self.files == other.files

    def __hash__(self) -> int:
        return hash(self.files)

    def __repr__(self) -> str:
        return f"ClientCertificate(files={self.files!r})"

    def __copy__(self) -> ClientCertificate:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> ClientCertificate:
        return self

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("client certificates are not picklable")


def _open(field: str, path: str, check_every: float) -> FileSecret:
    try:
        return FileSecret(path, check_every=check_every)
    except OSError as exc:
        raise CertificateProblem(field, f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CertificateProblem(field, f"file {path} {exc}") from None


def _path(file: FileSecret | None) -> str | None:
    return file.source.removeprefix("file:") if file is not None else None


def _version(texts: tuple[str | None, ...]) -> str:
    return hashlib.sha256("\0".join(t or "" for t in texts).encode()).hexdigest()[:16]


def _check(cert_text: str, key_text: str | None, ca_text: str | None) -> x509.Certificate:
    """The client certificate, once the files fit together: CertificateProblem otherwise."""
    try:
        certificate = x509.load_pem_x509_certificates(cert_text.encode())[0]
    except ValueError:
        raise CertificateProblem("tls_client_cert", "holds no PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    if key_text is None:
        found = _PRIVATE_KEY.search(cert_text)
        if found is None:
            raise CertificateProblem("tls_client_key", "is required: the tls_client_cert file holds no private key")
        key_field, key_pem = "tls_client_cert", found.group(0)
    else:
        found = _PRIVATE_KEY.search(key_text)
        key_field, key_pem = "tls_client_key", found.group(0) if found else key_text
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except TypeError:
        raise CertificateProblem(key_field, "holds a key encrypted with a passphrase: store it unencrypted") from None
    except ValueError:
        raise CertificateProblem(key_field, "holds no readable PEM private key") from None
    if key.public_key().public_bytes(*_SPKI) != certificate.public_key().public_bytes(*_SPKI):
        raise CertificateProblem(key_field, "holds a key that does not match the certificate in tls_client_cert")
    if ca_text is not None:
        try:
            x509.load_pem_x509_certificates(ca_text.encode())
        except ValueError:
            raise CertificateProblem("tls_ca_file", "holds no PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    return certificate
