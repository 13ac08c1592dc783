import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from local_swarm import LocalSwarm  # noqa: E402
from make_tiny_model import make_tiny_model  # noqa: E402


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
        yield swarm
