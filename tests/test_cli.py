"""The commands' arguments: a bad --device is refused with a clear message before anything loads."""

import argparse

import pytest
import torch

from client.cli import add_model_arguments
from node.cli import add_arguments as add_node_arguments


def parse(add_arguments, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--model", "/models/m", *argv])


@pytest.mark.parametrize("add_arguments", [add_node_arguments, add_model_arguments], ids=["node", "client"])
def test_device_must_be_one_this_machine_has(add_arguments, capsys):
    missing_gpu = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU; on a machine without any, the first
    for device, reason in [("gpu", "'gpu' is not a device"), ("meta", "run on cpu or cuda"), (missing_gpu, "CUDA GPU")]:
        with pytest.raises(SystemExit):
            parse(add_arguments, ["--device", device])
        assert reason in capsys.readouterr().err
    assert parse(add_arguments, ["--device", "cpu"]).device == "cpu"
