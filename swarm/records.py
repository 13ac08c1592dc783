"""Node records in the DHT: what a node serves and how it is doing.

All nodes serving a model store their record under one DHT key derived from the model's name, each under
its own subkey (its peer id), so one lookup gives a client the whole swarm of that model. Records expire
unless their node refreshes them. Every record is signed by its node's Ed25519 identity, and every peer
(nodes, clients, bootstrap peers) runs SignedRecordValidator, so nobody can forge or overwrite another
node's record, or replay an old one past its expiration.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from dataclasses import dataclass
from enum import Enum

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht import DHT
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time

from swarm import identity
from swarm.protocol import PROTOCOL_VERSION
from swarm.swarm_key import SwarmKey

logger = logging.getLogger(__name__)

SOFTWARE_VERSION = "0.1.0"


class NodeState(str, Enum):
    JOINING = "joining"
    ONLINE = "online"
    DRAINING = "draining"
    OFFLINE = "offline"


@dataclass(frozen=True)
class NodeRecord:
    peer_id: str  # base58 libp2p peer id; also the record's DHT subkey
    start: int
    end: int
    state: NodeState
    max_length: int  # the longest session (tokens per sequence) this node admits
    free_pages: int
    page_size: int
    dtype: str  # dtype of hidden states on the wire
    throughput: float = 0.0  # decode tokens/s through the whole span at batch 1 (throughput probe or --throughput)
    prefill_throughput: float = 0.0  # prefill tokens/s through the whole span
    sessions: int = 0  # sessions open now
    queued: int = 0  # sessions waiting for KV cache room
    rtts: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds to peers serving the next blocks
    relayed: bool = False  # reachable only through a libp2p relay
    public_name: str = ""
    timestamp: float = 0.0  # DHT time of the announcement
    version: str = SOFTWARE_VERSION
    protocol: int = PROTOCOL_VERSION

    def to_bytes(self) -> bytes:
        fields = dataclasses.asdict(self)
        fields["state"] = self.state.value
        return msgpack.packb(fields, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> NodeRecord:
        fields = msgpack.unpackb(data, raw=False)
        if not isinstance(fields, dict):
            raise ValueError("a node record must be a map")
        known = {f.name for f in dataclasses.fields(cls)}
        record = cls(**{k: v for k, v in fields.items() if k in known})
        record = dataclasses.replace(record, state=NodeState(record.state))
        if not (isinstance(record.start, int) and isinstance(record.end, int) and 0 <= record.start < record.end):
            raise ValueError(f"bad span {record.start}:{record.end}")
        numbers = (record.throughput, record.prefill_throughput, record.sessions, record.queued, record.free_pages)
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in numbers):
            raise ValueError("throughputs, sessions, queued and free_pages must be non-negative numbers")
        if not (isinstance(record.rtts, dict) and all(isinstance(k, str) and isinstance(v, (int, float)) and v >= 0
                                                       for k, v in record.rtts.items())):
            raise ValueError("rtts must map peer ids to seconds")
        return record

    @property
    def label(self) -> str:
        """A short name for logs: the public name, else the end of the peer id."""
        return self.public_name or self.peer_id[-6:]


def model_key(model_name: str, swarm_key: SwarmKey | None = None) -> str:
    return f"swarm-inference/{swarm_key.dht_name(model_name) if swarm_key else model_name}/nodes"


def _seal_context(key: str, peer_id: str) -> bytes:
    """What a sealed record is bound to: it opens only under the DHT key and subkey it was sealed for."""
    return f"{key}/{peer_id}".encode()


async def announce(dht: DHT, model_name: str, record: NodeRecord, ttl: float, swarm_key: SwarmKey | None = None) -> bool:
    key = model_key(model_name, swarm_key)
    value = record.to_bytes()
    if swarm_key is not None:
        value = swarm_key.seal(value, _seal_context(key, record.peer_id))
    return await dht.store(key, subkey=record.peer_id, value=value, expiration_time=get_dht_time() + ttl,
                           return_future=True)


async def fetch_records(dht: DHT, model_name: str, swarm_key: SwarmKey | None = None) -> list[NodeRecord]:
    """Every live record of the model; records that fail to decode (or to open, in a private swarm) are skipped."""
    key = model_key(model_name, swarm_key)
    found = await dht.get(key, latest=True, return_future=True)
    if found is None or not isinstance(found.value, dict):
        return []
    records = []
    for subkey, entry in found.value.items():
        try:
            value = entry.value
            if swarm_key is not None:
                value = swarm_key.open(value, _seal_context(key, subkey))
            record = NodeRecord.from_bytes(value)
        except Exception as e:  # a peer may publish anything; one bad record must not hide the others
            logger.debug("skipping an undecodable record under %s: %s", subkey, e)
            continue
        if record.peer_id == subkey:
            records.append(record)
    return records


class SignedRecordValidator(RecordValidatorBase):
    """Accepts a record only if the peer whose id is its subkey signed it. The signature covers the DHT key,
    subkey, value and expiration time: it cannot be moved to another key or replayed with a later expiration
    (and the DHT keeps the latest expiration, so an old record cannot replace a newer one).

    A node passes its key to sign its own records; clients and bootstrap peers only validate."""

    def __init__(self, key: Ed25519PrivateKey | None = None):
        self.key = key
        self.peer_id = identity.peer_id_of(key) if key is not None else None

    @staticmethod
    def _signed_bytes(record: DHTRecord, payload: bytes) -> bytes:
        return b"".join([record.key, record.subkey, struct.pack(">d", record.expiration_time), payload])

    @staticmethod
    def _owner(record: DHTRecord) -> str | None:
        try:
            owner = msgpack.unpackb(record.subkey, raw=False)
        except Exception:
            return None
        return owner if isinstance(owner, str) else None

    @staticmethod
    def _envelope(record: DHTRecord) -> tuple[bytes, bytes] | None:
        try:
            envelope = msgpack.unpackb(record.value, raw=False)
            payload, signature = envelope["payload"], envelope["signature"]
        except Exception:
            return None
        return (payload, signature) if isinstance(payload, bytes) and isinstance(signature, bytes) else None

    def sign_value(self, record: DHTRecord) -> bytes:
        if self.key is None or self._owner(record) != self.peer_id:
            return record.value  # not ours to sign: other peers will refuse it
        signature = self.key.sign(self._signed_bytes(record, record.value))
        return msgpack.packb({"payload": record.value, "signature": signature}, use_bin_type=True)

    def validate(self, record: DHTRecord) -> bool:
        owner, envelope = self._owner(record), self._envelope(record)
        if owner is None or envelope is None:
            return False
        payload, signature = envelope
        return identity.verify(owner, signature, self._signed_bytes(record, payload))

    def strip_value(self, record: DHTRecord) -> bytes:
        return self._envelope(record)[0]
