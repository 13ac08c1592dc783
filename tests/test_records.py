"""Signed node records: only a node can write its own record, and old records cannot come back."""

import tempfile
import time
from pathlib import Path

import msgpack
import pytest
from hivemind.dht import DHT
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time

from client.remote import SwarmConnection, run_coroutine
from swarm.identity import create_identity, peer_id_of, public_key
from swarm.records import NodeRecord, NodeState, SignedRecordValidator, model_key


def keypair():
    return create_identity(Path(tempfile.mkdtemp()) / "id.key")


def record_bytes(peer_id, throughput=100.0):
    return NodeRecord(peer_id=peer_id, start=0, end=4, state=NodeState.ONLINE, max_length=64, free_pages=10,
                      page_size=16, dtype="float32", throughput=throughput).to_bytes()


def dht_record(owner, value, expiration=1000.0):
    return DHTRecord(b"key", msgpack.packb(owner), value, expiration)


def test_only_the_owner_can_sign_its_record():
    alice, mallory = keypair(), keypair()
    a, m = peer_id_of(alice), peer_id_of(mallory)
    assert public_key(a) is not None and public_key("not a peer id") is None
    signed = SignedRecordValidator(alice).sign_value(dht_record(a, b"payload"))
    anyone = SignedRecordValidator()
    assert anyone.validate(dht_record(a, signed)) and anyone.strip_value(dht_record(a, signed)) == b"payload"
    assert not anyone.validate(dht_record(m, signed))  # moved under another node's subkey
    assert not anyone.validate(dht_record(a, signed, expiration=2000.0))  # replayed with a later expiration
    assert not anyone.validate(dht_record(a, signed.replace(b"payload", b"paylOad")))  # tampered
    assert not anyone.validate(dht_record(a, b"payload"))  # unsigned
    assert SignedRecordValidator(mallory).sign_value(dht_record(a, b"payload")) == b"payload"  # won't sign for alice
    forged = SignedRecordValidator(mallory).sign_value(dht_record(m, b"payload"))
    assert not anyone.validate(dht_record(a, forged))


def test_forged_and_replayed_records_are_rejected_in_a_real_swarm(tiny_model, local_swarm):
    path = tiny_model("llama")
    [node] = local_swarm.start_nodes(path, [(0, 4)], "--throughput", "100", "--announce-period", "1")
    key = model_key(path.name)
    outsider = DHT(initial_peers=local_swarm.initial_peers, start=True)  # no validators: it can store anything
    client = SwarmConnection(local_swarm.initial_peers)
    try:
        def victim():
            [record] = [r for r in run_coroutine(client.records(path.name)) if r.peer_id == node.peer_id]
            return record

        assert victim().throughput == 100
        # a forged record for the node's id: unsigned, and signed by the outsider's own key
        mallory = keypair()
        forged = record_bytes(node.peer_id, throughput=9999.0)
        expiration = get_dht_time() + 600
        signed_by_mallory = SignedRecordValidator(mallory).sign_value(
            DHTRecord(b"", msgpack.packb(peer_id_of(mallory)), msgpack.packb(forged), expiration))
        for value in (forged, msgpack.unpackb(signed_by_mallory)):  # stored as the DHT would carry them
            outsider.store(key, subkey=node.peer_id, value=value, expiration_time=expiration)
        # an old genuine record, replayed once the node has announced a newer one
        old = outsider.get(key, latest=True).value[node.peer_id]
        old_timestamp = victim().timestamp
        time.sleep(2.5)
        for expiration in (old.expiration_time, get_dht_time() + 600):
            outsider.store(key, subkey=node.peer_id, value=old.value, expiration_time=expiration)
        record = victim()
        assert record.throughput == 100 and record.timestamp > old_timestamp
    finally:
        client.shutdown()
        outsider.shutdown()


@pytest.mark.parametrize("bad", [b"\x00" * 40, b"garbage"])
def test_identity_files_must_hold_ed25519_keys(tmp_path, bad):
    from swarm.identity import load_identity

    (tmp_path / "id.key").write_bytes(bad)
    with pytest.raises(Exception):
        load_identity(tmp_path / "id.key")
