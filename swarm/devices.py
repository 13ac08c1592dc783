"""The --device argument of the commands: a device this machine has, checked before anything loads."""

from __future__ import annotations

import argparse

import torch


def device_argument(text: str) -> str:
    """argparse type: cpu, cuda or cuda:N, where the GPU exists; else a clear error instead of a traceback from
    deep inside loading."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if not count:
            raise argparse.ArgumentTypeError(f"{text}: torch {torch.__version__} finds no CUDA GPU on this machine; "
                                             "use cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text}: nodes and clients run on cpu or cuda")
    return text
