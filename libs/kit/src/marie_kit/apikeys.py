"""The format of Marie API keys, shared by the auth service (which issues and
stores them) and the gateway (which rejects malformed keys without a round trip).

A key is `mk-` + 43 base62 characters of randomness (256 bits) + 6 base62
characters of CRC32 checksum over the random part. The prefix makes keys easy to
recognise (and to find with secret scanners); the checksum lets typos and
truncated keys be refused locally.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import zlib

KEY_PREFIX = "mk-"
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_RANDOM_BYTES = 32
_RANDOM_CHARS = 43  # ceil(256 / log2(62))
_CHECKSUM_CHARS = 6  # ceil(32 / log2(62))
KEY_LENGTH = len(KEY_PREFIX) + _RANDOM_CHARS + _CHECKSUM_CHARS
_ALPHABET_SET = frozenset(_ALPHABET)


def _base62(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, rem = divmod(number, 62)
        chars.append(_ALPHABET[rem])
    return "".join(reversed(chars))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), _CHECKSUM_CHARS)


def generate_key() -> str:
    """A new random key with prefix and checksum."""
    body = _base62(int.from_bytes(secrets.token_bytes(_RANDOM_BYTES), "big"), _RANDOM_CHARS)
    return KEY_PREFIX + body + _checksum(body)


def is_well_formed(key: str) -> bool:
    """True when `key` has the prefix, length, alphabet and a matching checksum."""
    if len(key) != KEY_LENGTH or not key.startswith(KEY_PREFIX):
        return False
    rest = key[len(KEY_PREFIX) :]
    if not _ALPHABET_SET.issuperset(rest):
        return False
    body, check = rest[:_RANDOM_CHARS], rest[_RANDOM_CHARS:]
    return hmac.compare_digest(_checksum(body), check)


def key_digest(key: str, pepper: bytes = b"") -> str:
    """What is stored instead of the key: HMAC-SHA256 with the server pepper
    when one is configured, plain SHA-256 otherwise (hex)."""
    if pepper:
        return hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()
    return hashlib.sha256(key.encode()).hexdigest()


def display_form(key: str) -> str:
    """How a key is shown to people: prefix and last four characters."""
    return f"{KEY_PREFIX}…{key[-4:]}"
