"""``alphanet apply``: a user's own checkpoint with its classifier layer replaced
by a corrected one, every other entry and the structure kept."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from .io import InputError, check_input_file, check_safe_torch, load_classifier, locate_classifier, save_torch


def _copy_mapping(mapping: Any) -> Any:
    """A shallow copy of a dict or state dict that keeps its type and its ``_metadata``
    (module versions that ``load_state_dict`` reads)."""
    copy = type(mapping)(mapping) if isinstance(mapping, (dict, OrderedDict)) else dict(mapping)
    if hasattr(mapping, "_metadata"):
        copy._metadata = mapping._metadata
    return copy


def read_checkpoint(path: str) -> Any:
    check_input_file(path)
    check_safe_torch(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise InputError(f"{path}: cannot read the checkpoint with tensors only ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200] if str(error) else 'corrupt'}); save the model's "
                         "state_dict, or a dict of tensors") from None


def corrected_checkpoint(checkpoint: Any, checkpoint_path: str, weight: torch.Tensor, bias: torch.Tensor | None,
                         key: str | None = None) -> tuple[Any, str]:
    """``checkpoint`` with its classifier's weight and bias replaced (in the checkpoint's
    dtypes); returns it and the weight's key. Every other entry is the same object."""
    if not hasattr(checkpoint, "keys"):
        raise InputError(f"{checkpoint_path}: expected a state dict or a training checkpoint (a dict), found a "
                         f"{type(checkpoint).__name__}")
    entry, weight_key, bias_key = locate_classifier(checkpoint, checkpoint_path, key, tuple(weight.shape))
    layer = checkpoint if entry is None else checkpoint[entry]
    old_weight = layer[weight_key]
    if tuple(weight.shape) != tuple(old_weight.shape):
        raise InputError(f"the corrected classifier is {list(weight.shape)} but {checkpoint_path}'s {weight_key} "
                         f"is {list(old_weight.shape)}; correct the classifier of this checkpoint")
    new_layer = _copy_mapping(layer)
    new_layer[weight_key] = weight.detach().to(dtype=old_weight.dtype).contiguous()
    if bias_key is not None:
        if bias is None:
            raise InputError(f"{checkpoint_path} has {bias_key} but the corrected classifier has no bias")
        new_layer[bias_key] = bias.detach().to(dtype=layer[bias_key].dtype).contiguous()
    elif bias is not None and bool((bias != 0).any()):
        raise InputError(f"the corrected classifier has a bias but {checkpoint_path}'s layer {weight_key[:-7] or '.'} "
                         "has none; the correction's few-class biases would be lost")
    if entry is None:
        return new_layer, weight_key
    out = _copy_mapping(checkpoint)
    out[entry] = new_layer
    return out, f"{entry}/{weight_key}"


def apply_correction_file(checkpoint_path: str, corrected_path: str, out_path: str, key: str | None = None) -> str:
    """Writes ``out_path`` (a temporary name the caller moves into place) and returns the replaced key."""
    checkpoint = read_checkpoint(checkpoint_path)
    weight, bias = load_classifier(corrected_path)
    result, replaced = corrected_checkpoint(checkpoint, checkpoint_path, weight, bias, key)
    save_torch(result, out_path)
    return replaced
