"""Sealed channels: AEAD on every payload, and names derived from the channel key.

The key is 32 random bytes, carried in the join URL's fragment (``#k=``), which never reaches the
broker. From it come, by HMAC-SHA256 with distinct labels, an AEAD key (ChaCha20-Poly1305) and a
naming key: topic levels and client ids are keyed hashes, so the broker and other clients learn
nothing from names and cannot guess a channel's topics or take over a peer's session by client id.
A sealed payload is ``0x01 | nonce (12) | ciphertext+tag``, with the topic bound as associated
data, so a payload copied to another topic (another peer's, another channel's) does not open; the
plaintext is padded to a size bucket first (:func:`padded`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from ._errors import BadJoinURL

KEY_BYTES = 32
_VERSION = b"\x01"
_NONCE = 12
PAD_MIN = 256  # bytes: the smallest size bucket of a sealed payload's plaintext
PAD_STEP = 64 * 1024  # past this, buckets are multiples of it


class Seal:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise BadJoinURL("the channel key (#k=) is not valid", "copy the whole join URL from `mqttalk create`")
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        self._key = key
        self._aead = ChaCha20Poly1305(_derive(key, b"mqttalk aead v1"))
        self._names = _derive(key, b"mqttalk names v1")
        self._named: dict[tuple[str, int], str] = {}  # every topic name is derived on every publish: keep them

    @classmethod
    def new(cls) -> Seal:
        return cls(os.urandom(KEY_BYTES))

    @classmethod
    def from_token(cls, token: str) -> Seal:
        try:
            key = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            raise BadJoinURL(
                "the channel key (#k=) is not valid base64url", "copy the whole join URL from `mqttalk create`"
            ) from None
        return cls(key)

    @property
    def token(self) -> str:
        """The key as it goes in the URL fragment."""
        return base64.urlsafe_b64encode(self._key).decode().rstrip("=")

    def name(self, label: str, length: int = 26) -> str:
        """A keyed, topic- and client-id-safe name for ``label`` (lowercase base32)."""
        name = self._named.get((label, length))
        if name is None:
            digest = hmac.new(self._names, label.encode(), hashlib.sha256).digest()
            name = self._named[(label, length)] = base64.b32encode(digest).decode().lower()[:length]
        return name

    def seal(self, topic: str, data: bytes) -> bytes:
        """``data`` sealed for ``topic``, padded first to a size bucket (see :func:`padded`)."""
        nonce = os.urandom(_NONCE)
        return _VERSION + nonce + self._aead.encrypt(nonce, padded(data), topic.encode())

    def open(self, topic: str, payload: bytes) -> bytes | None:
        """The plaintext, or None if the payload was not sealed for this topic with this key."""
        if len(payload) < 1 + _NONCE + 16 or payload[:1] != _VERSION:
            return None
        from cryptography.exceptions import InvalidTag

        try:
            return self._aead.decrypt(payload[1 : 1 + _NONCE], payload[1 + _NONCE :], topic.encode()).rstrip(b" ")
        except InvalidTag:
            return None


def padded(data: bytes) -> bytes:
    """``data`` with trailing spaces up to the next size bucket (256 bytes, then powers of two up to
    64 KiB, then multiples of 64 KiB), so a snooper learns a message's size only roughly: a status
    line, a note and a spec of a few hundred bytes all look alike. What mqttalk seals is JSON or a
    hex token: trailing spaces are whitespace to every JSON reader (older mqttalk included), and
    :meth:`Seal.open` takes them off."""
    size = len(data)
    bucket = PAD_MIN
    while bucket < size and bucket < PAD_STEP:
        bucket *= 2
    if size > bucket:
        bucket = -(-size // PAD_STEP) * PAD_STEP
    return data + b" " * (bucket - size)


def _derive(key: bytes, label: bytes) -> bytes:
    return hmac.new(key, label, hashlib.sha256).digest()
