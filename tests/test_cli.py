"""The commands' arguments: a bad --device, or no peer to join the swarm through, is refused with a clear message
before anything loads."""

import argparse

import pytest
import torch

from client.cli import add_model_arguments
from client.status import add_arguments as add_status_arguments
from node.cli import add_arguments as add_node_arguments
from swarm.bootstrap import PUBLIC_INITIAL_PEERS


def parse(add_arguments, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--model", "/models/m", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x", *argv])


@pytest.mark.parametrize("add_arguments", [add_node_arguments, add_model_arguments], ids=["node", "client"])
def test_device_must_be_one_this_machine_has(add_arguments, capsys):
    missing_gpu = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU; on a machine without any, the first
    for device, reason in [("gpu", "'gpu' is not a device"), ("meta", "run on cpu or cuda"), (missing_gpu, "CUDA GPU")]:
        with pytest.raises(SystemExit):
            parse(add_arguments, ["--device", device])
        assert reason in capsys.readouterr().err
    assert parse(add_arguments, ["--device", "cpu"]).device == "cpu"


@pytest.mark.skipif(bool(PUBLIC_INITIAL_PEERS), reason="the public swarm's bootstrap peers are the default")
@pytest.mark.parametrize("add_arguments, argv", [(add_model_arguments, ["--model", "/models/m"]),
                                                 (add_status_arguments, [])], ids=["client", "status"])
def test_a_client_command_without_initial_peers_is_told_to_pass_them(add_arguments, argv, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert "required: --initial-peers" in capsys.readouterr().err
    peer = "/ip4/127.0.0.1/tcp/1/p2p/x"
    assert parser.parse_args([*argv, "--initial-peers", peer]).initial_peers == [peer]
