"""Private swarms: one secret key shared by every member, none in a public swarm.

With a swarm key, DHT keys are derived from it (an outsider on the same DHT cannot even find the records),
record payloads are sealed with ChaCha20-Poly1305 (unreadable, and unforgeable, without the key), and every
stream a member opens starts with a ``hello`` frame proving membership for the caller's libp2p peer id, which
the transport authenticates; nodes refuse streams without it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

KEY_BYTES = 32
NONCE_BYTES = 12


class SwarmKeyError(ValueError):
    """Data sealed with another key (or tampered with), or a bad key file."""


class SwarmKey:
    def __init__(self, secret: bytes):
        if len(secret) != KEY_BYTES:
            raise SwarmKeyError(f"a swarm key has {KEY_BYTES} bytes, got {len(secret)}")
        self._secret = secret
        self._aead = ChaCha20Poly1305(self._derive(b"seal"))

    @classmethod
    def create(cls, path: str | Path) -> SwarmKey:
        """Write a new random swarm key to path (readable by its owner only; share it with members only)."""
        secret = os.urandom(KEY_BYTES)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "w") as f:
            f.write(secret.hex() + "\n")
        return cls(secret)

    @classmethod
    def load(cls, path: str | Path) -> SwarmKey:
        try:
            return cls(bytes.fromhex(Path(path).read_text().strip()))
        except ValueError as e:
            raise SwarmKeyError(f"{path} is not a swarm key file (64 hex digits): {e}") from None

    def _derive(self, purpose: bytes) -> bytes:
        return hmac.new(self._secret, b"swarm-inference " + purpose, hashlib.sha256).digest()

    def dht_name(self, name: str) -> str:
        """The DHT name members use for `name`; outsiders cannot compute it."""
        return hmac.new(self._derive(b"dht"), name.encode(), hashlib.sha256).hexdigest()

    def seal(self, data: bytes, context: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, context)

    def open(self, sealed: bytes, context: bytes) -> bytes:
        try:
            return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context)
        except (InvalidTag, ValueError):
            raise SwarmKeyError("sealed with another swarm key, or tampered with") from None

    def proof(self, peer_id: str) -> bytes:
        """Membership proof for a caller: bound to its peer id, so it is useless to anyone else."""
        return hmac.new(self._derive(b"rpc"), peer_id.encode(), hashlib.sha256).digest()

    def check(self, peer_id: str, proof: object) -> bool:
        return isinstance(proof, bytes) and hmac.compare_digest(self.proof(peer_id), proof)
