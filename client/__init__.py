"""The client library. Its names load on first use, so that `swarm status` (client.status) starts without
importing transformers, seconds of a command that only reads the DHT."""

import importlib

_EXPORTS = {"DistributedModelForCausalLM": "client.model", "InferenceSession": "client.session",
            "NodeError": "client.session"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
