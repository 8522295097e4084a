"""``alphanet extract``: from a trained network's checkpoint and its images to the
features its classifier sees, in the folder layout ``alphanet fit --train`` reads.

The features are the *input* of the classifier layer, captured by a forward
pre-hook with the model in ``eval()`` mode, so features and classifier match by
construction. Each split is written into a memory-mapped ``SPLIT_x.npy``
(``SPLIT_y.npy`` holds its labels) chunk by chunk; ``SPLIT.progress.json``
records the rows finished, so a killed run continues where it stopped and a
finished split is not redone. Needs torchvision and pillow (``pip install
'alphanet_ext[extract]'``); nothing is downloaded: weights come from the
checkpoint only.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .apply import read_checkpoint
from .io import (CHECKPOINT_KEYS, InputError, locate_classifier, save_classifier, shard_suffix, split_shards,
                 write_atomic)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ROWS_PER_CHUNK = 4096  # rows between progress records: at most what a killed run redoes


def _vision():
    try:
        import torchvision  # noqa: F401
        from PIL import Image  # noqa: F401
    except ImportError as error:
        raise InputError(f"alphanet extract needs torchvision and pillow ({error}); pip install "
                         "'alphanet_ext[extract]'") from None
    import torchvision
    return torchvision


# ----------------------------------------------------------------------------- the model


def state_dict_of(checkpoint: Any, path: str) -> dict:
    """The model's state dict inside a checkpoint: the dict itself, or its
    ``state_dict``/``model`` entry; a ``module.`` prefix (DataParallel, DDP) is removed."""
    if not hasattr(checkpoint, "keys"):
        raise InputError(f"{path}: expected a state dict or a training checkpoint, found a {type(checkpoint).__name__}")
    state = checkpoint
    for name in CHECKPOINT_KEYS:
        if hasattr(checkpoint.get(name), "keys") and not any(str(k).endswith("weight") for k in checkpoint):
            state = checkpoint[name]
            break
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if tensors and all(key.startswith("module.") for key in tensors):
        tensors = {key[len("module."):]: value for key, value in tensors.items()}
    if not tensors:
        raise InputError(f"{path}: holds no tensors to load into a model")
    return tensors


def build_model(spec: str, num_classes: int) -> torch.nn.Module:
    """``torchvision:NAME``, ``timm:NAME`` or ``module:package.module.factory``, with
    ``num_classes`` outputs and no pretrained weights."""
    kind, _, name = spec.partition(":")
    if not name:
        raise InputError(f"--model {spec}: expected torchvision:NAME, timm:NAME or module:package.module.factory")
    if kind == "torchvision":
        torchvision = _vision()
        try:
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        except (ValueError, KeyError) as error:
            raise InputError(f"--model {spec}: torchvision has no model {name!r} ({error})") from None
    if kind == "timm":
        try:
            import timm
        except ImportError:
            raise InputError(f"--model {spec}: timm is not installed (pip install timm)") from None
        if not timm.is_model(name):
            raise InputError(f"--model {spec}: timm has no model {name!r}")
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    if kind == "module":
        module_name, _, factory = name.rpartition(".")
        try:
            made = getattr(importlib.import_module(module_name), factory)(num_classes=num_classes)
        except (ImportError, AttributeError) as error:
            raise InputError(f"--model {spec}: cannot make the model ({type(error).__name__}: {error})") from None
        if not isinstance(made, torch.nn.Module):
            raise InputError(f"--model {spec}: the factory returned a {type(made).__name__}, not a torch.nn.Module")
        return made
    raise InputError(f"--model {spec}: unknown kind {kind!r} (torchvision, timm or module)")


def _check_loaded(result, path: str) -> None:
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise InputError(f"{path}: does not fit the model: missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
                         f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    classifier_name: str      # the classifier layer's module name
    weight: torch.Tensor      # [C, d]
    bias: torch.Tensor | None


def load_model(spec: str, checkpoint_path: str, classifier_key: str | None = None) -> LoadedModel:
    """The model of ``spec`` with the checkpoint's weights, its classifier found as
    ``fit`` finds it (or named by ``classifier_key``), and its class count taken from it."""
    state = state_dict_of(read_checkpoint(checkpoint_path), checkpoint_path)
    _, weight_key, bias_key = locate_classifier(state, checkpoint_path, classifier_key)
    weight = state[weight_key]
    model = build_model(spec, weight.shape[0])
    _check_loaded(model.load_state_dict(state, strict=False), checkpoint_path)
    name = weight_key[:-len(".weight")] if weight_key.endswith(".weight") else ""
    if not isinstance(model.get_submodule(name), torch.nn.Module):
        raise InputError(f"{checkpoint_path}: {name} is not a layer of {spec}")
    return LoadedModel(model.eval(), name, weight, state.get(bias_key) if bias_key else None)


class FeatureHook:
    """Captures the input of the classifier layer on each forward pass."""

    def __init__(self, layer: torch.nn.Module):
        self.features: torch.Tensor | None = None
        self.handle = layer.register_forward_pre_hook(self._capture)

    def _capture(self, module, inputs) -> None:
        self.features = inputs[0].flatten(1)

    def close(self) -> None:
        self.handle.remove()


# ----------------------------------------------------------------------------- the data


def read_list(path: str, root: str | None) -> list[tuple[str, int]]:
    """A list file of ``path label`` lines (paths relative to ``root``, default the file's folder)."""
    base = root if root is not None else os.path.dirname(os.path.abspath(path))
    items = []
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, 1):
            fields = line.strip().rsplit(None, 1)
            if not fields:
                continue
            if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
                raise InputError(f"{path}:{number}: expected 'PATH LABEL', got {line.strip()[:80]!r}")
            items.append((os.path.join(base, fields[0]), int(fields[1])))
    return items


def read_image_folder(folder: str) -> list[tuple[str, int]]:
    """An ImageFolder tree: one sub-folder per class, classes numbered in sorted order."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise InputError(f"{folder}: no class sub-folders (an ImageFolder tree has one folder per class)")
    items = []
    for label, name in enumerate(classes):
        for current, _, files in sorted(os.walk(os.path.join(folder, name))):
            items += [(os.path.join(current, file), label) for file in sorted(files)
                      if file.lower().endswith(IMAGE_SUFFIXES)]
    return items


def read_split(path: str, root: str | None) -> list[tuple[str, int]]:
    if os.path.isdir(path):
        return read_image_folder(path)
    if os.path.isfile(path):
        return read_list(path, root)
    raise InputError(f"{path}: no such image folder or list file")


def eval_transform(resize: int, crop: int, mean, std) -> Callable:
    transforms = _vision().transforms
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop), transforms.ToTensor(),
                               transforms.Normalize(mean, std)])


def default_preprocessing(spec: str, model: torch.nn.Module) -> tuple[int, int, tuple, tuple]:
    """(resize, crop, mean, std) from the model's own pretrained config where torchvision or
    timm gives one (read from metadata, nothing downloaded); else 256/224 and ImageNet's."""
    kind, _, name = spec.partition(":")
    try:
        if kind == "torchvision":
            weights = _vision().models.get_model_weights(name).DEFAULT.transforms()
            return (int(weights.resize_size[0]), int(weights.crop_size[0]), tuple(weights.mean), tuple(weights.std))
        if kind == "timm":
            from timm.data import resolve_data_config
            config = resolve_data_config({}, model=model)
            crop = int(config["input_size"][-1])
            return int(round(crop / config.get("crop_pct", 0.875))), crop, tuple(config["mean"]), tuple(config["std"])
    except Exception:  # noqa: BLE001  (no config known for this model: the usual ImageNet one)
        pass
    return 256, 224, IMAGENET_MEAN, IMAGENET_STD


class ImageRows(torch.utils.data.Dataset):
    """Images of a split by row; an unreadable image gives a flag instead of raising
    in the worker, so the main process can name it."""

    def __init__(self, items: list[tuple[str, int]], transform: Callable, begin: int, end: int, shape):
        self.items, self.transform, self.begin, self.end, self.shape = items, transform, begin, end, shape

    def __len__(self) -> int:
        return self.end - self.begin

    def __getitem__(self, index: int):
        from PIL import Image
        row = self.begin + index
        path = self.items[row][0]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB")), row, ""
        except Exception as error:  # noqa: BLE001  (corrupt, truncated or missing images)
            return torch.zeros(self.shape), row, f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"


# ----------------------------------------------------------------------------- extraction


@dataclass
class Options:
    resize: int
    crop: int
    mean: tuple
    std: tuple
    dtype: str = "float16"
    batch_size: int = 64
    workers: int = 4
    amp: str = "off"
    skip_bad: bool = False
    progress: bool = True


def _fingerprint(spec: str, checkpoint: str, items: list, options: Options) -> str:
    h = hashlib.sha256(json.dumps([spec, os.path.abspath(checkpoint), os.path.getsize(checkpoint), options.resize,
                                   options.crop, list(options.mean), list(options.std), options.dtype,
                                   options.amp]).encode())
    for path, label in items:
        h.update(f"{path}\t{label}\n".encode())
    return h.hexdigest()[:32]


def _write_json(path: str, data: dict) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "w") as stream:
            json.dump(data, stream, indent=1)
    write_atomic(path, write)


@dataclass(frozen=True)
class Part:
    """The rows of a split one process extracts: ``rank`` of ``world`` takes items
    ``begin:end``, whole batches of the one-process run, so that every image goes through
    the network in the same batch as there (the shards are then bit-identical to it)."""
    rank: int = 0
    world: int = 1
    begin: int = 0
    end: int | None = None

    @classmethod
    def of(cls, rank: int, world: int, items: int, batch_size: int) -> "Part":
        batches = -(-items // batch_size)
        first, last = batches * rank // world, batches * (rank + 1) // world
        return cls(rank, world, min(first * batch_size, items), min(last * batch_size, items))


def _write_empty(path: str, dtype, shape: tuple[int, ...]) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "wb") as stream:
            np.save(stream, np.zeros(shape, dtype=dtype))
    write_atomic(path, write)


def extract_split(loaded: LoadedModel, spec: str, checkpoint: str, name: str, items: list[tuple[str, int]],
                  out: str, options: Options, device: torch.device, say: Callable[[str], None],
                  part: Part = Part()) -> dict:
    """Writes ``out/NAME_x.npy`` and ``NAME_y.npy`` (``NAME_x-RRRRR-of-WWWWW.npy`` for rank R of
    W when ``part`` is one rank's share); resumes from ``NAME[-R-of-W].progress.json``."""
    from numpy.lib.format import open_memmap
    if not items:
        raise InputError(f"split {name}: no images")
    split_fingerprint = _fingerprint(spec, checkpoint, items, options)
    suffix = shard_suffix(part.rank, part.world)
    split_rows = len(items)
    first_row, end_row = part.begin, split_rows if part.end is None else part.end
    items = items[first_row:end_row]
    progress_path = os.path.join(out, f"{name}{suffix}.progress.json")
    x_path, y_path = os.path.join(out, f"{name}_x{suffix}.npy"), os.path.join(out, f"{name}_y{suffix}.npy")
    fingerprint = hashlib.sha256(f"{split_fingerprint}:{part.rank}:{part.world}:{first_row}:{end_row}".encode()
                                 ).hexdigest()[:32]
    state = {"fingerprint": fingerprint, "split_fingerprint": split_fingerprint, "rows": len(items), "done": 0,
             "bad": [], "rank": part.rank, "world": part.world, "first_row": first_row, "end_row": end_row,
             "split_rows": split_rows}
    if os.path.exists(progress_path):
        with open(progress_path) as stream:
            saved = json.load(stream)
        if saved.get("fingerprint") == fingerprint and os.path.exists(x_path):
            state = saved
        else:
            say(f"{name}: the earlier extraction in {out} used other inputs or options; starting over")
    if state.get("finished"):
        say(f"{name}{suffix}: already extracted ({state['rows']} rows)")
        return state
    if not items:  # a rank with no whole batch of this split: an empty shard
        dim = loaded.weight.shape[1]
        _write_empty(x_path, np.float16 if options.dtype == "float16" else np.float32, (0, dim))
        _write_empty(y_path, np.int64, (0,))
        state.update(finished=True, images_per_second=None)
        _write_json(progress_path, state)
        return state
    transform = eval_transform(options.resize, options.crop, options.mean, options.std)
    hook = FeatureHook(loaded.model.get_submodule(loaded.classifier_name))
    model = loaded.model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    dim = loaded.weight.shape[1]
    dtype = np.float16 if options.dtype == "float16" else np.float32
    features = (open_memmap(x_path, mode="r+") if state["done"] else
                open_memmap(x_path, mode="w+", dtype=dtype, shape=(len(items), dim)))
    if not state["done"]:
        labels = np.array([label for _, label in items], dtype=np.int64)

        def write_labels(temporary: str) -> None:
            with open(temporary, "wb") as stream:
                np.save(stream, labels)
        write_atomic(y_path, write_labels)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.amp)
    from .training.progress import bar as progress_bar, wanted
    bar = progress_bar(wanted(options.progress), total=len(items), initial=state["done"],
                       desc=f"extract {name}{suffix}",
                       unit="img")
    tic, seen = time.perf_counter(), 0
    rows = ImageRows(items, transform, state["done"], len(items), (3, options.crop, options.crop))
    loader = torch.utils.data.DataLoader(rows, batch_size=options.batch_size, num_workers=options.workers,
                                         pin_memory=device.type == "cuda", shuffle=False)
    try:
        for images, row_ids, errors in loader:  # in row order: the rows before `end` are all written
            for row, error in zip(row_ids.tolist(), errors):
                if error:
                    if not options.skip_bad:
                        raise InputError(f"{items[row][0]}: cannot read the image ({error}); --skip-bad lists "
                                         "unreadable images instead of stopping")
                    state["bad"].append({"row": row, "path": items[row][0], "error": error})
            images = images.to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                model(images)
            end = row_ids[-1].item() + 1
            features[row_ids[0].item():end] = hook.features.float().cpu().numpy()
            bar.update(len(row_ids))
            seen += len(row_ids)
            if end - state["done"] >= ROWS_PER_CHUNK or end == len(items):
                features.flush()  # the rows first, then the record that they are there
                state["done"] = end
                _write_json(progress_path, state)
    finally:
        hook.close()
        bar.close()
    elapsed = time.perf_counter() - tic
    state["images_per_second"] = seen / elapsed if elapsed > 0 else None
    if state["bad"]:
        _drop_rows(x_path, y_path, {entry["row"] for entry in state["bad"]})
    state["finished"] = True
    _write_json(progress_path, state)
    say(f"{name}{suffix}: {state['rows'] - len(state['bad'])} rows of {dim} features"
        + (f", {len(state['bad'])} unreadable images skipped" if state["bad"] else "")
        + (f", {state['images_per_second']:.0f} images/s" if state["images_per_second"] else ""))
    return state


def _drop_rows(x_path: str, y_path: str, bad: set[int]) -> None:
    """Rewrites a split without the rows of unreadable images (a copy, chunk by chunk)."""
    from numpy.lib.format import open_memmap
    features, labels = np.load(x_path, mmap_mode="r"), np.load(y_path)
    keep = np.array([row for row in range(len(labels)) if row not in bad], dtype=np.int64)

    def write_features(temporary: str) -> None:
        out = open_memmap(temporary, mode="w+", dtype=features.dtype, shape=(len(keep), features.shape[1]))
        for begin in range(0, len(keep), 65536):
            out[begin:begin + 65536] = features[keep[begin:begin + 65536]]
        out.flush()
        del out
    write_atomic(x_path, write_features)

    def write_labels(temporary: str) -> None:
        with open(temporary, "wb") as stream:
            np.save(stream, labels[keep])
    write_atomic(y_path, write_labels)


def _check_layout(out: str, names: list[str], world: int) -> None:
    """Refuses an ``out`` that already holds a split extracted with another number of
    processes: the two layouts would be read as one dataset (nothing is written yet)."""
    for name in names:
        plain = os.path.join(out, f"{name}_x.npy")
        others = [path for path in split_shards(out, name) if not path.endswith(f"-of-{world:05d}.npy")]
        if world > 1 and os.path.exists(plain):
            others.insert(0, plain)
        if others:
            raise InputError(f"--out {out}: already holds {name} features of another extraction "
                             f"({os.path.basename(others[0])}) with a different number of processes than this one "
                             f"({world}); use another --out or remove them")


def extract(spec: str, checkpoint: str, splits: dict[str, str], out: str, options: Options, root: str | None = None,
            classifier_key: str | None = None, device: str | None = None,
            say: Callable[[str], None] = logging.getLogger("alphanet_ext").info, shard: Any = None) -> dict:
    """Extracts every split into ``out`` and writes the classifier beside the features.

    With ``shard`` (a :class:`~alphanet_ext.training.sharding.Shard` of a torchrun job), each
    rank extracts its whole-batch slice of every split into its own shard files
    (``SPLIT_x-RRRRR-of-WWWWW.npy``), which ``fit`` reads as one dataset; rank 0 writes the
    classifier and, once every rank has finished, ``extract.json``."""
    loaded = load_model(spec, checkpoint, classifier_key)
    rank, world = (shard.rank, shard.world) if shard is not None else (0, 1)
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    listed = {name: read_split(path, root) for name, path in splits.items()}
    _check_layout(out, list(listed), world)
    if shard is not None:
        shard.check_agreement({"model": spec, "classifier": classifier_key, "options": _fingerprint(
            spec, checkpoint, [], options), "batch size": options.batch_size, "skip-bad": options.skip_bad,
            **{f"{name} images": _fingerprint(spec, checkpoint, items, options) for name, items in listed.items()}}, {})
    os.makedirs(out, exist_ok=True)
    if rank == 0:
        bias = loaded.bias if loaded.bias is not None else torch.zeros(loaded.weight.shape[0])
        save_classifier(os.path.join(out, "classifier.pt"), loaded.weight.float(), bias.float(),
                        {"source": os.path.abspath(checkpoint), "model": spec, "layer": loaded.classifier_name})
    results = {name: extract_split(loaded, spec, checkpoint, name, items, out, options, device_, say,
                                   Part.of(rank, world, len(items), options.batch_size))
               for name, items in listed.items()}
    every = shard.all_gather_object(results, "the end of the extraction") if shard is not None else [results]
    summary = {"model": spec, "checkpoint": os.path.abspath(checkpoint), "classifier_layer": loaded.classifier_name,
               "num_classes": int(loaded.weight.shape[0]), "dim": int(loaded.weight.shape[1]),
               "resize": options.resize, "crop": options.crop, "mean": list(options.mean), "std": list(options.std),
               "dtype": options.dtype, "amp": options.amp, "world_size": world,
               "splits": {name: _split_summary(name, [ranks[name] for ranks in every], world) for name in listed}}
    if rank == 0:
        _write_json(os.path.join(out, "extract.json"), summary)
    return summary


def _split_summary(name: str, parts: list[dict], world: int) -> dict:
    bad = [dict(entry, row=entry["row"] + part["first_row"]) for part in parts for entry in part["bad"]]
    summary = {"rows": sum(part["rows"] - len(part["bad"]) for part in parts), "bad_images": bad}
    if world > 1:
        summary["shards"] = [{"features": f"{name}_x{shard_suffix(rank, world)}.npy",
                              "rows": part["rows"] - len(part["bad"]), "images": [part["first_row"], part["end_row"]]}
                             for rank, part in enumerate(parts)]
    return summary
