"""Node records in the DHT: what a node serves and how it is doing.

All nodes serving a model store their record under one DHT key derived from the model's name, each under
its own subkey (its peer id), so one lookup gives a client the whole swarm of that model. Records expire
unless their node refreshes them. Every record is signed by its node's Ed25519 identity, and every peer
(nodes, clients, bootstrap peers) runs SignedRecordValidator, so nobody can forge or overwrite another
node's record, or replay an old one past its expiration.
"""

from __future__ import annotations

import asyncio
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
    num_blocks: int = 0  # blocks of the whole model; 0 from nodes older than this field
    throughput: float = 0.0  # decode tokens/s through the whole span at batch 1 (throughput probe or --throughput)
    prefill_throughput: float = 0.0  # prefill tokens/s through the whole span
    sessions: int = 0  # sessions open now
    queued: int = 0  # sessions waiting for KV cache room
    rtts: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds to peers serving the next blocks
    relayed: bool = False  # reachable only through a libp2p relay
    public_name: str = ""
    host: str = ""  # the machine and network namespace of a node that takes direct streams (swarm/direct.py)
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
        numbers = (record.throughput, record.prefill_throughput, record.sessions, record.queued, record.free_pages,
                   record.num_blocks)
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in numbers):
            raise ValueError("throughputs, sessions, queued and free_pages must be non-negative numbers")
        if not (isinstance(record.rtts, dict) and all(isinstance(k, str) and isinstance(v, (int, float)) and v >= 0
                                                       for k, v in record.rtts.items())):
            raise ValueError("rtts must map peer ids to seconds")
        if not isinstance(record.host, str):
            raise ValueError("host must be a string")
        return record

    @property
    def label(self) -> str:
        """A short name for logs: the public name, else the end of the peer id."""
        return self.public_name or self.peer_id[-6:]


def model_key(model_name: str, swarm_key: SwarmKey | None = None) -> str:
    return f"swarm-inference/{swarm_key.dht_name(model_name) if swarm_key else model_name}/nodes"


def models_key(swarm_key: SwarmKey | None = None) -> str:
    """Where every node also says which model it serves, so `swarm status` can list the swarm's models."""
    return f"swarm-inference/{swarm_key.dht_name('models') if swarm_key else 'models'}"


def _seal_context(key: str, peer_id: str) -> bytes:
    """What a sealed record is bound to: it opens only under the DHT key and subkey it was sealed for."""
    return f"{key}/{peer_id}".encode()


async def _store(dht: DHT, key: str, peer_id: str, value: bytes, ttl: float, swarm_key: SwarmKey | None) -> bool:
    if swarm_key is not None:
        value = swarm_key.seal(value, _seal_context(key, peer_id))
    return await dht.store(key, subkey=peer_id, value=value, expiration_time=get_dht_time() + ttl, return_future=True)


async def _fetch(dht: DHT, key: str, swarm_key: SwarmKey | None) -> dict[str, bytes]:
    """Every live value under key by the peer id that stored it; values that fail to open are skipped."""
    found = await dht.get(key, latest=True, return_future=True)
    if found is None or not isinstance(found.value, dict):
        return {}
    values = {}
    for subkey, entry in found.value.items():
        try:
            values[subkey] = swarm_key.open(entry.value, _seal_context(key, subkey)) if swarm_key else entry.value
        except Exception as e:  # a peer may publish anything; one bad record must not hide the others
            logger.debug("skipping a record under %s/%s that does not open: %s", key, subkey, e)
    return values


async def announce(dht: DHT, model_name: str, record: NodeRecord, ttl: float, swarm_key: SwarmKey | None = None) -> bool:
    """Store the node's record under its model, and the model's name and size in the swarm's list of models."""
    served = msgpack.packb({"model": model_name, "num_blocks": record.num_blocks}, use_bin_type=True)
    stored = await asyncio.gather(_store(dht, model_key(model_name, swarm_key), record.peer_id, record.to_bytes(), ttl,
                                         swarm_key),
                                  _store(dht, models_key(swarm_key), record.peer_id, served, ttl, swarm_key))
    return all(stored)


async def fetch_records(dht: DHT, model_name: str, swarm_key: SwarmKey | None = None) -> list[NodeRecord]:
    """Every live record of the model; records that fail to decode (or to open, in a private swarm) are skipped."""
    records = []
    for subkey, value in (await _fetch(dht, model_key(model_name, swarm_key), swarm_key)).items():
        try:
            record = NodeRecord.from_bytes(value)
        except Exception as e:
            logger.debug("skipping an undecodable record under %s: %s", subkey, e)
            continue
        if record.peer_id == subkey:
            records.append(record)
    return records


async def fetch_models(dht: DHT, swarm_key: SwarmKey | None = None) -> dict[str, int]:
    """The models nodes serve now: name -> number of blocks (the largest any node announced)."""
    models: dict[str, int] = {}
    for value in (await _fetch(dht, models_key(swarm_key), swarm_key)).values():
        try:
            served = msgpack.unpackb(value, raw=False)
            name, num_blocks = served["model"], served["num_blocks"]
        except Exception:
            continue
        if isinstance(name, str) and isinstance(num_blocks, int) and not isinstance(num_blocks, bool):
            models[name] = max(models.get(name, 0), num_blocks)
    return models


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
