import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from local_swarm import LocalSwarm  # noqa: E402
from make_tiny_model import make_tiny_model  # noqa: E402


def group_ended(pgid: int, timeout: float = 10.0) -> bool:
    """Whether every process of the group pgid is gone within timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server a test starts in another process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family, **options) -> path of a tiny random checkpoint, made once per session."""
    made = {}

    def make(family: str = "llama", **options) -> Path:
        key = (family, tuple(sorted(options.items())))
        if key not in made:
            made[key] = make_tiny_model(tmp_path_factory.mktemp(family) / f"tiny-{family}", family, **options)
        return made[key]

    return make


@pytest.fixture(scope="session")
def bootstrap(tmp_path_factory):
    """A bootstrap peer shared by the whole test session; yields its multiaddrs."""
    with LocalSwarm(tmp_path_factory.mktemp("bootstrap-logs")) as swarm:
        yield swarm.start_bootstrap()


@pytest.fixture
def local_swarm(bootstrap, tmp_path):
    """Nodes started through this swarm join the shared bootstrap peer and are stopped after the test."""
    with LocalSwarm(tmp_path / "logs") as swarm:
        swarm.initial_peers = bootstrap
        # Swarms of many machines stream over libp2p, so that is what tests on loopback exercise; the nodes'
        # direct streams on one machine are tests/test_direct.py's.
        swarm.node_arguments = ["--no-direct-streams"]
        yield swarm


def assert_same_tokens(swarm_tokens, local_tokens, local_model, margin: float = 1e-4):
    """Token-exact, except where the reference's top-2 logits nearly tie at the first difference.

    Packing sequences changes float results slightly (DESIGN.md), so a near-tie may flip; anything else fails.
    """
    if torch.equal(swarm_tokens, local_tokens):
        return
    assert swarm_tokens.shape == local_tokens.shape, f"{swarm_tokens.shape} != {local_tokens.shape}"
    row, col = (swarm_tokens != local_tokens).nonzero()[0].tolist()
    with torch.no_grad():
        logits = local_model(local_tokens[row:row + 1, :col]).logits[0, -1]
    top2 = logits.topk(2).values
    assert (top2[0] - top2[1]).item() < margin, (
        f"row {row} differs at position {col} where the reference margin is {(top2[0] - top2[1]).item():.2e}:\n"
        f"swarm {swarm_tokens[row].tolist()}\nlocal {local_tokens[row].tolist()}")


def reference_hidden_states(model, ids):
    """Inputs of the first decoder layer and outputs of the last one, for one sequence."""
    layers = model.get_decoder().layers if hasattr(model.get_decoder(), "layers") else model.get_decoder().h
    captured, outputs = {}, []
    hooks = [layer.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for layer in layers]
    hooks.append(layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: captured.update(inputs=args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
    with torch.no_grad():
        model(ids[None])
    for hook in hooks:
        hook.remove()
    return captured["inputs"][0], outputs[-1][0]


@pytest.fixture(scope="session", autouse=True)
def throughput_cache(tmp_path_factory):
    """Nodes started by tests cache their throughput probes here, not in the user's home."""
    path = tmp_path_factory.mktemp("swarm-cache")
    previous = os.environ.get("SWARM_CACHE_DIR")
    os.environ["SWARM_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        del os.environ["SWARM_CACHE_DIR"]
    else:
        os.environ["SWARM_CACHE_DIR"] = previous
