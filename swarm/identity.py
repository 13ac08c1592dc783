"""A peer's Ed25519 identity: one key, which is both its libp2p identity and the key that signs its records.

The key file is libp2p's own format (a protobuf PrivateKey), so p2pd uses it as the peer's identity. An
Ed25519 peer id embeds the public key itself (an identity multihash), so anyone can check a signature
against the peer id alone, with no key directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2

_IDENTITY_MULTIHASH = 0x00


def create_identity(path: str | Path) -> Ed25519PrivateKey:
    """Write a new Ed25519 identity to path (readable by its owner only)."""
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes_raw()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    data = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=seed + public).SerializeToString()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return key


def load_identity(path: str | Path) -> Ed25519PrivateKey:
    """The Ed25519 key in a libp2p key file; created if the file does not exist."""
    if not Path(path).exists():
        return create_identity(path)
    key = crypto_pb2.PrivateKey.FromString(Path(path).read_bytes())
    if key.key_type != crypto_pb2.KeyType.Ed25519:
        raise ValueError(f"{path} holds a {crypto_pb2.KeyType.Name(key.key_type)} key; nodes need an Ed25519 "
                         "identity (remove the file to have one created)")
    return Ed25519PrivateKey.from_private_bytes(key.data[:32])


def public_key(peer_id: str) -> Ed25519PublicKey | None:
    """The Ed25519 public key inside a peer id, or None if the peer id does not embed one."""
    try:
        multihash = PeerID.from_base58(peer_id).to_bytes()
    except Exception:  # not base58, or not a multihash
        return None
    if len(multihash) < 2 or multihash[0] != _IDENTITY_MULTIHASH or multihash[1] != len(multihash) - 2:
        return None
    try:
        key = crypto_pb2.PublicKey.FromString(multihash[2:])
        return Ed25519PublicKey.from_public_bytes(key.data) if key.key_type == crypto_pb2.KeyType.Ed25519 else None
    except Exception:  # a malformed protobuf or key
        return None


def verify(peer_id: str, signature: bytes, data: bytes) -> bool:
    key = public_key(peer_id)
    if key is None:
        return False
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def peer_id_of(key: Ed25519PrivateKey) -> str:
    """The libp2p peer id of an Ed25519 key: an identity multihash of its public key."""
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.Ed25519, data=public).SerializeToString()
    return PeerID(bytes([_IDENTITY_MULTIHASH, len(encoded)]) + encoded).to_base58()
