"""Reading a transformers checkpoint piece by piece, for nodes (a span of layers) and clients (the rest).

The model is built with every parameter on the meta device and real buffers (rotary tables are computed
on the CPU as the family defines them), then only the wanted tensors are read from the safetensors files
and loaded through transformers' own conversion path, which maps checkpoint names to 5.x module names
(fused MoE experts and the like). The whole model is never materialized.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.modeling_utils import LoadStateDictConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING


class CheckpointError(RuntimeError):
    """The checkpoint is missing, unreadable, or does not hold what the model needs."""


def load_config(path: str | Path) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read a transformers config from {path}: {e}") from e


def model_name(path: str | Path) -> str:
    """The name a model is known by in the swarm: its folder name, as in an HF repo id's last part."""
    return Path(str(path).rstrip("/")).name


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def causal_lm_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise CheckpointError(f"{config.model_type} is not a causal language model family known to transformers")
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def supports_attention_interface(config: PretrainedConfig) -> bool:
    """Whether the family dispatches attention through transformers' AttentionInterface."""
    return getattr(causal_lm_class(config), "_supports_attention_backend", False)


def build_empty_model(config: PretrainedConfig, dtype: torch.dtype, attn_implementation: str,
                      model_class: type[PreTrainedModel] | None = None) -> PreTrainedModel:
    """The family's CausalLM (or model_class) with parameters on meta (no memory) and buffers computed for real."""
    model_class = model_class or causal_lm_class(config)
    with _parameters_on_meta():
        model = model_class._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval().requires_grad_(False)


def find_layers(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """The qualified name and module of the decoder layer stack (model.layers, transformer.h, ...)."""
    num_layers = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return name, module
    raise CheckpointError(f"{type(model).__name__} has no list of {num_layers} decoder layers")


def layer_index(tensor_name: str, layers_prefix: str) -> int | None:
    """Which decoder layer a checkpoint tensor belongs to, or None for tensors outside the layers."""
    match = re.match(re.escape(layers_prefix) + r"\.(\d+)\.", tensor_name)
    return int(match.group(1)) if match else None


def tensor_files(path: str | Path) -> dict[str, Path]:
    """Map every tensor name of a safetensors checkpoint (single file or sharded index) to its file."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), "pt") as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(f"{path} has neither model.safetensors nor model.safetensors.index.json")


def load_weights(model: PreTrainedModel, path: str | Path, wanted: Callable[[str], bool],
                 device: torch.device | str, dtype: torch.dtype, what: str = "weights") -> None:
    """Read the wanted checkpoint tensors (and only those) into the model, converting names as transformers does.

    A progress bar (on a terminal) counts the bytes read; `what` names them in it.
    """
    by_file: dict[Path, list[str]] = {}
    for name, file in tensor_files(path).items():
        if wanted(name):
            by_file.setdefault(file, []).append(name)
    state_dict = {}
    with tqdm(desc=f"reading {what}", unit="B", unit_scale=True, disable=None) as progress:
        for file, names in by_file.items():
            with safe_open(str(file), "pt", device="cpu") as f:
                for name in names:
                    state_dict[name] = f.get_tensor(name)
                    progress.update(state_dict[name].nbytes)
    load_config = LoadStateDictConfig(device_map={"": device}, dtype=dtype,
                                      weight_mapping=get_model_conversion_mapping(model))
    convert_and_load_state_dict_in_model(model, state_dict, load_config)


def meta_parameters(module: nn.Module) -> list[str]:
    """Names of parameters that were not loaded."""
    return [name for name, p in module.named_parameters() if p.device.type == "meta"]
