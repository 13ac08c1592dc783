"""Node records in the DHT: what a node serves and how it is doing.

All nodes serving a model store their record under one DHT key derived from the model's name, each under
its own subkey (its peer id), so one lookup gives a client the whole swarm of that model. Records expire
unless their node refreshes them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from enum import Enum

import msgpack
from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from swarm.protocol import PROTOCOL_VERSION

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


def model_key(model_name: str) -> str:
    return f"swarm-inference/{model_name}/nodes"


async def announce(dht: DHT, model_name: str, record: NodeRecord, ttl: float) -> bool:
    return await dht.store(model_key(model_name), subkey=record.peer_id, value=record.to_bytes(),
                           expiration_time=get_dht_time() + ttl, return_future=True)


async def fetch_records(dht: DHT, model_name: str) -> list[NodeRecord]:
    """Every live record of the model; records that fail to decode are skipped."""
    found = await dht.get(model_key(model_name), latest=True, return_future=True)
    if found is None or not isinstance(found.value, dict):
        return []
    records = []
    for subkey, entry in found.value.items():
        try:
            record = NodeRecord.from_bytes(entry.value)
        except Exception as e:  # a peer may publish anything; one bad record must not hide the others
            logger.debug("skipping an undecodable record under %s: %s", subkey, e)
            continue
        if record.peer_id == subkey:
            records.append(record)
    return records
