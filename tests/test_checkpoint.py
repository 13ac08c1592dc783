"""A node's span loads from a sharded checkpoint and holds only its own blocks' parameters."""

import safetensors
import torch

from node.span import Span
from swarm.checkpoint import layer_index, tensor_files


def test_span_from_sharded_checkpoint_holds_only_its_blocks(tiny_model, monkeypatch):
    path = tiny_model("llama", shard_size="40KB")
    files = tensor_files(path)
    assert len(set(files.values())) > 2, "the checkpoint should be sharded"

    read = []
    original = safetensors.safe_open

    class RecordingSafeOpen:
        def __init__(self, *args, **kwargs):
            self.inner = original(*args, **kwargs)

        def __enter__(self):
            handle = self.inner.__enter__()
            get_tensor = handle.get_tensor

            class Handle:
                def __getattr__(self, name):
                    return getattr(handle, name)

                def get_tensor(self, name):
                    read.append(name)
                    return get_tensor(name)

            return Handle()

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    monkeypatch.setattr("swarm.checkpoint.safe_open", RecordingSafeOpen)
    span = Span(path, 1, 3)

    in_span = sorted(name for name in files if layer_index(name, "model.layers") in (1, 2))
    assert sorted(read) == in_span  # no tensor outside blocks 1 and 2 was read
    held = sum(p.numel() for layer in span.layers for p in layer.parameters())
    expected = 0
    for name in in_span:
        with safetensors.safe_open(str(files[name]), "pt") as f:
            expected += torch.Size(f.get_slice(name).get_shape()).numel()
    assert held == expected
    assert all(p.device.type == "cpu" for layer in span.layers for p in layer.parameters())
