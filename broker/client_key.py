"""The private key a credential signs its client assertions with (`private_key_jwt`, spec §6.7).

PEM (PKCS#8 or traditional, unencrypted) or a JWK, from a secret reference: a `{ file = … }` is
read again when the file changes (broker/secret_file.py), a literal comes from the admin API
(sealed with the vault document). The key is parsed again only when its text changed; a new text
that is no usable key keeps the key parsed before, with one warning per change, like a secret
file that turns unusable.

RS256 and PS256 take an RSA key of at least 2048 bits (RFC 7518 §3.3, §3.5), ES256 an EC P-256
key. Without a configured `signing_alg` the algorithm follows the key (RSA → RS256, EC → ES256).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import warnings
from dataclasses import dataclass

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwk import ECKey, RSAKey

from broker.secret import Secret

__all__ = [
    "SIGNING_ALGORITHMS",
    "AlgorithmMismatch",
    "ClientKey",
    "KeyProblem",
    "SigningKey",
    "parse_private_key",
]

log = structlog.get_logger("broker.secret")

SIGNING_ALGORITHMS = ("RS256", "PS256", "ES256")
_MIN_RSA_BITS = 2048

PrivateKey = RSAKey | ECKey


class KeyProblem(ValueError):
    """Why a text is not a usable signing key, worded to follow "credentials.NAME.private_key: "."""


class AlgorithmMismatch(KeyProblem):
    """The key cannot sign with the configured algorithm; worded to follow "…signing_alg: "."""


def parse_private_key(text: str) -> PrivateKey:
    """An RSA (≥ 2048 bits) or EC P-256 private key from a PEM or JWK text, else KeyProblem."""
    text = text.strip()
    with warnings.catch_warnings():
        # joserfc warns of an RSA key under 2048 bits: refused below, in a sentence of our own
        warnings.simplefilter("ignore", SecurityWarning)
        if text.startswith("{"):
            key = _from_jwk(text)
        elif text.startswith("-----BEGIN"):
            key = _from_pem(text)
        else:
            raise KeyProblem("is neither a PEM private key (-----BEGIN …) nor a JWK (a JSON object)")
    if isinstance(key, RSAKey):
        bits = key.raw_value.key_size
        if bits < _MIN_RSA_BITS:
            raise KeyProblem(f"is a {bits}-bit RSA key: RS256 and PS256 need at least {_MIN_RSA_BITS} bits")
    elif key.curve_name != "P-256":
        raise KeyProblem(f"is an EC {key.curve_name} key: ES256, the EC algorithm, needs P-256")
    return key


def _from_pem(text: str) -> PrivateKey:
    first = text.splitlines()[0]
    if "PRIVATE KEY" not in first:
        raise KeyProblem(f"holds {first.strip('- ').removeprefix('BEGIN ').lower()}, not a private key")
    try:
        loaded = serialization.load_pem_private_key(text.encode(), password=None)
    except TypeError:
        raise KeyProblem("is encrypted with a passphrase: store it unencrypted (the file is the secret)") from None
    except ValueError:
        raise KeyProblem("is not a readable PEM private key") from None
    if isinstance(loaded, rsa.RSAPrivateKey):
        return RSAKey.import_key(loaded)
    if isinstance(loaded, ec.EllipticCurvePrivateKey):
        return ECKey.import_key(loaded)
    raise KeyProblem(f"is a {type(loaded).__name__.removesuffix('PrivateKey')} key: use an RSA or EC P-256 key")


def _from_jwk(text: str) -> PrivateKey:
    try:
        data = json.loads(text)
    except ValueError:
        raise KeyProblem("starts like a JWK but is not JSON") from None
    if not isinstance(data, dict):
        raise KeyProblem("is not a JWK (a JSON object)")
    kty = data.get("kty")
    if "keys" in data:
        raise KeyProblem("is a JWK Set: give the one private key (a JWK)")
    if kty not in ("RSA", "EC"):
        raise KeyProblem(f"is a JWK of kty {kty!r}: use an RSA or EC P-256 key")
    if "d" not in data:
        raise KeyProblem("is a public JWK: private_key_jwt signs with the private key")
    try:
        return RSAKey.import_key(data) if kty == "RSA" else ECKey.import_key(data)
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise KeyProblem(f"is not a usable {kty} JWK ({type(exc).__name__})") from None


def default_algorithm(key: PrivateKey) -> str:
    return "RS256" if isinstance(key, RSAKey) else "ES256"


def check_algorithm(key: PrivateKey, algorithm: str) -> None:
    """AlgorithmMismatch when `algorithm` cannot sign with `key`."""
    if algorithm in ("RS256", "PS256") and not isinstance(key, RSAKey):
        raise AlgorithmMismatch(f"{algorithm} needs an RSA key, and private_key is an EC key")
    if algorithm == "ES256" and not isinstance(key, ECKey):
        raise AlgorithmMismatch("ES256 needs an EC P-256 key, and private_key is an RSA key")


@dataclass(frozen=True)
class SigningKey:
    """What one client assertion is signed with."""

    key: PrivateKey
    algorithm: str
    key_id: str | None  # the JWS `kid`: the configured key_id, else the JWK's own kid

    def __repr__(self) -> str:
        return f"SigningKey({self.algorithm}, kid={self.key_id!r})"


class ClientKey:
    """A credential's private key with its signing algorithm and key id; `current()` follows the
    key's file. Compares by the key's text (a secret compare), algorithm and key id."""

    __slots__ = ("_reported", "_signing", "_text", "algorithm", "key_id", "secret")

    def __init__(self, secret: Secret, *, algorithm: str | None = None, key_id: str | None = None) -> None:
        """Parses the key now: KeyProblem when it is no usable key, or does not fit `algorithm`."""
        self.secret = secret
        self.algorithm = algorithm  # as configured; None: the key's own (RS256 or ES256)
        self.key_id = key_id
        self._text = secret.reveal()
        self._signing = self._load(self._text)
        self._reported: str | None = None  # fingerprint of the unusable text last warned about

    def _load(self, text: str) -> SigningKey:
        key = parse_private_key(text)
        algorithm = self.algorithm or default_algorithm(key)
        check_algorithm(key, algorithm)
        kid = self.key_id if self.key_id is not None else key.kid
        return SigningKey(key, algorithm, kid)

    def current(self) -> SigningKey:
        """The key to sign with now: parsed again when the secret's text changed."""
        text = self.secret.reveal()
        if hmac.compare_digest(text.encode(), self._text.encode()):
            return self._signing
        seen = hashlib.sha256(text.encode()).hexdigest()
        try:
            signing = self._load(text)
        except KeyProblem as exc:
            if seen != self._reported:
                self._reported = seen
                log.warning(
                    "secret.private_key_unusable",
                    source=self.secret.source,
                    reason=f"signing_alg {exc}" if isinstance(exc, AlgorithmMismatch) else f"the new key {exc}",
                    note="keeping the key read before",
                )
            return self._signing
        self._text, self._signing, self._reported = text, signing, None
        log.info("secret.private_key_changed", source=self.secret.source, algorithm=signing.algorithm)
        return signing

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClientKey):
            return NotImplemented
        return (self.secret, self.algorithm, self.key_id) == (other.secret, other.algorithm, other.key_id)

    def __hash__(self) -> int:
        return hash((self.secret.source, self.algorithm, self.key_id))

    def __repr__(self) -> str:
        return f"ClientKey('**********', source={self.secret.source!r}, algorithm={self.algorithm!r})"

    def __copy__(self) -> ClientKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> ClientKey:
        return self

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("private keys are not picklable")
