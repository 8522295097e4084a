"""Reading features and classifiers from files, and writing results atomically.

Features: ``.npz`` (keys ``x``/``y`` or ``features``/``labels``), ``.npy`` pairs
(``NAME_x.npy`` + ``NAME_y.npy`` or ``features.npy`` + ``labels.npy``, opened
memory-mapped), ``.pt`` / ``.pth`` (same keys, or an ``(x, y)`` pair),
``.safetensors`` (same keys), or a folder: ``ROLE_x.npy`` pairs as
``alphanet synth`` writes them, per-rank shards ``ROLE_x-RRRRR-of-WWWWW.npy`` as a
torchrun ``alphanet extract`` writes them (read as one :class:`~alphanet_ext.data.RowShards`
dataset), or the authors' layout
(``splits/{many,medium,few}.txt``, ``train*.pkl``, ``val*.pkl``, ``test*.pkl``
with ``feats`` / ``labels``; a pickled list of such dicts is an ensemble whose
features are concatenated).
Classifiers: ``.pt`` / ``.pth`` state dict or dict with ``weight`` / ``bias``
(a list of them is an ensemble), ``.npz``, ``.safetensors``.
"""
from __future__ import annotations

import errno
import glob
import importlib.util
import json
import os
import pickle
import re
import stat
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from . import safe_pickle
from .classifier import combine_experts
from .data import RowShards

FEATURE_KEYS = (("x", "y"), ("features", "labels"), ("feats", "labels"))

# torch.load(weights_only=True) was exploitable by crafted files before these
# releases (CVE-2025-32434, fixed in 2.6.0; CVE-2026-24747, fixed in 2.10.0).
SAFE_TORCH = (2, 10)
TEMPORARY_PREFIX = ".alphanet-tmp-"


class InputError(ValueError):
    """A file that cannot be used, with a one-line reason."""


@dataclass
class Features:
    x: Any           # numpy array (possibly memory-mapped) or tensor, [N, d]
    y: np.ndarray    # [N]
    source: str


def _pick_keys(data: Any, path: str) -> tuple[Any, Any]:
    if isinstance(data, (list, tuple)) and len(data) == 2:  # torch.save((x, y), path)
        return data[0], data[1]
    keys = set(data.keys()) if hasattr(data, "keys") else set()
    for feature_key, label_key in FEATURE_KEYS:
        if feature_key in keys and label_key in keys:
            return data[feature_key], data[label_key]
    found = sorted(map(str, keys)) if keys else f"a {type(data).__name__}"
    raise InputError(f"{path}: expected keys x/y or features/labels (or an (x, y) pair), found {found}")


def _labels(values: Any, path: str) -> np.ndarray:
    labels = np.asarray(values.numpy() if isinstance(values, torch.Tensor) else values)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{path}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    return labels


def _check_pair(x: Any, y: np.ndarray, path: str) -> Features:
    if len(x.shape) != 2:
        raise InputError(f"{path}: features must be 2-D [samples, dims], got shape {tuple(x.shape)}")
    if x.shape[0] != y.shape[0]:
        raise InputError(f"{path}: {x.shape[0]} feature rows but {y.shape[0]} labels")
    return Features(x, y, path)


def _authors_pickle(path: str, trust: bool = False) -> Features:
    try:
        data = safe_pickle.load(path, trust)
    except safe_pickle.RefusedPickle as refused:
        raise InputError(f"{path}: refused to unpickle {refused} (a features pickle holds only arrays, tensors and "
                         "plain containers; loading anything else could run code). If you trust where this file "
                         "came from, pass --trust-pickle") from None
    entries = data if isinstance(data, list) else [data]
    xs, labels = [], None
    for entry in entries:
        x, y = _pick_keys(entry, path)
        xs.append(torch.as_tensor(x).float())
        y = _labels(np.asarray(y), path)
        if labels is not None and not np.array_equal(labels, y):
            raise InputError(f"{path}: the ensemble members have different labels")
        labels = y
    return _check_pair(torch.cat(xs, dim=1) if len(xs) > 1 else xs[0], labels, path)


def shard_suffix(rank: int, world: int) -> str:
    """What rank ``rank`` of ``world`` adds to its file names (``train_x-00001-of-00003.npy``);
    nothing for one process, whose files are the plain layout."""
    return "" if world == 1 else f"-{rank:05d}-of-{world:05d}"


_SHARD = re.compile(r"-(\d{5})-of-(\d{5})$")


def split_shards(folder: str, role: str) -> list[str]:
    """The paths of ``role``'s sharded feature files in ``folder`` (``ROLE_x-RRRRR-of-WWWWW.npy``),
    in rank order; empty if there are none."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(role)}_x-*-of-*.npy")):
        match = _SHARD.search(os.path.basename(path)[len(role) + 2:-len(".npy")])
        if match and os.path.basename(path) == f"{role}_x-{match.group(1)}-of-{match.group(2)}.npy":
            found.append((int(match.group(2)), int(match.group(1)), path))
    return [path for _, _, path in sorted(found)]


def folder_features(folder: str, role: str) -> str | None:
    """The file of ``role``'s features in ``folder``: ``ROLE_x.npy`` (the layout
    ``alphanet synth`` and a one-process ``alphanet extract`` write), the first of its
    shards ``ROLE_x-00000-of-WWWWW.npy`` (``alphanet extract`` under torchrun), or the one
    ``ROLE*.pkl`` (the authors'); None if none."""
    synth = os.path.join(folder, f"{role}_x.npy")
    shards = split_shards(folder, role)
    if os.path.exists(synth) and shards:
        raise InputError(f"{folder}: holds both {role}_x.npy and {len(shards)} shard file(s) such as "
                         f"{os.path.basename(shards[0])} (two extractions into one folder); remove the ones "
                         "you do not want")
    if os.path.exists(synth) or shards:
        return synth if os.path.exists(synth) else shards[0]
    matches = sorted(glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(role)}*.pkl")))
    if len(matches) > 1:
        raise InputError(f"{folder}: expected one {role}*.pkl in the authors' layout, found {len(matches)}")
    return matches[0] if matches else None


def _progress_of(folder: str, role: str, suffix: str) -> dict | None:
    """What ``alphanet extract`` recorded of a split (or one rank's shard of it), if anything."""
    path = os.path.join(folder, f"{role}{suffix}.progress.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as stream:
            progress = json.load(stream)
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read the extraction's progress record ({_reason(error)})") from None
    if not isinstance(progress, dict) or not isinstance(progress.get("bad", []), list) or any(
            not isinstance(progress.get(field, 0), int) or isinstance(progress.get(field, 0), bool)
            for field in ("first_row", "end_row", "split_rows", "done", "rows")):
        raise InputError(f"{path}: not an extraction progress record (a field of the wrong type)")
    if not progress.get("finished"):
        raise InputError(f"{path}: the extraction of {role}{suffix} did not finish ({progress.get('done', 0)} of "
                         f"{progress.get('rows', '?')} rows); rerun the same alphanet extract command to finish it")
    return progress


def _load_shards(folder: str, role: str, paths: list[str]) -> Features:
    """One dataset from the shards a torchrun ``alphanet extract`` wrote, in rank order,
    memory-mapped (no merged copy): the set must be whole, of one run, and cover the split's rows."""
    worlds = {int(_SHARD.search(os.path.basename(p)[:-len(".npy")]).group(2)) for p in paths}
    if len(worlds) > 1:
        raise InputError(f"{folder}: holds {role} shards of {len(worlds)} extractions (world sizes "
                         f"{', '.join(map(str, sorted(worlds)))}); remove the ones you do not want")
    world = worlds.pop()
    ranks = {int(_SHARD.search(os.path.basename(p)[:-len(".npy")]).group(1)) for p in paths}
    missing = sorted(set(range(world)) - ranks)
    if missing or len(ranks) != world:
        named = missing or sorted(ranks - set(range(world)))
        raise InputError(f"{folder}: {role} shard{'s' if len(named) > 1 else ''} "
                         f"{', '.join(map(str, named))} of {world} {'are' if len(named) > 1 else 'is'} "
                         f"{'missing' if missing else 'out of range'} ({role}_x{shard_suffix(named[0], world)}.npy)")
    parts, labels, progress = [], [], []
    for rank, path in enumerate(paths):
        part = load_features(path, role)
        if parts and (part.x.shape[1:] != parts[0].shape[1:] or part.x.dtype != parts[0].dtype):
            raise InputError(f"{path}: {part.x.dtype} rows of shape {tuple(part.x.shape[1:])}, but "
                             f"{os.path.basename(paths[0])} holds {parts[0].dtype} rows of shape "
                             f"{tuple(parts[0].shape[1:])}")
        parts.append(part.x)
        labels.append(part.y)
        progress.append(_progress_of(folder, role, shard_suffix(rank, world)))
    if any(p is not None for p in progress):
        _check_shard_ranges(folder, role, world, progress, [len(y) for y in labels])
    source = os.path.join(folder, f"{role}_x-*-of-{world:05d}.npy")
    return Features(RowShards(parts), np.concatenate(labels), source)


def _check_shard_ranges(folder: str, role: str, world: int, progress: list, rows: list[int]) -> None:
    """The shards' recorded item ranges are one extraction's and tile the split with no gap or overlap."""
    expected_begin = 0
    for rank, record in enumerate(progress):
        name = f"{role}{shard_suffix(rank, world)}.progress.json"
        if record is None:
            raise InputError(f"{os.path.join(folder, name)}: missing, while other shards of {role} have one")
        if record.get("split_fingerprint") != progress[0].get("split_fingerprint"):
            raise InputError(f"{os.path.join(folder, name)}: this shard comes from another extraction than "
                             f"shard 0 (other images, model or options); rerun the extraction")
        begin, end = record.get("first_row"), record.get("end_row")
        if begin != expected_begin or not isinstance(end, int) or end < begin:
            raise InputError(f"{os.path.join(folder, name)}: covers images {begin}:{end}, but the shards before it "
                             f"end at {expected_begin} (a gap or an overlap); rerun the extraction")
        kept = end - begin - len(record.get("bad", []))
        if kept != rows[rank]:
            raise InputError(f"{os.path.join(folder, role)}_x{shard_suffix(rank, world)}.npy: {rows[rank]} rows, "
                             f"but its extraction recorded {kept}")
        expected_begin = end
    if expected_begin != progress[0].get("split_rows"):
        raise InputError(f"{folder}: the {role} shards cover {expected_begin} of the split's "
                         f"{progress[0].get('split_rows')} images")


def load_tensors_only(path: str, what: str) -> Any:
    """``torch.load`` of tensors and plain containers only; any other file raises a
    ValueError ``PATH: WHAT (torch.load raised ...)`` (OSErrors pass through)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001  (corrupt, truncated or foreign files)
        raise ValueError(f"{os.fspath(path)}: {what} (torch.load raised {type(error).__name__})") from None


def torch_version() -> tuple[int, int]:
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def check_safe_torch(path: str) -> None:
    """Refuses to read a ``.pt`` file with a torch whose tensors-only loader has known exploits."""
    if torch_version() < SAFE_TORCH:
        raise InputError(f"{path}: not read with torch {torch.__version__}: its tensors-only loader can be exploited "
                         f"by a crafted file (CVE-2025-32434, CVE-2026-24747); upgrade to torch >= "
                         f"{'.'.join(map(str, SAFE_TORCH))}, or use .safetensors or .npz files")


def check_input_file(path: str, folder_ok: bool = False) -> None:
    """Refuses a missing path, and a FIFO, device or socket (reading one could block forever)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{path}: no such file" + (" or folder" if folder_ok else "")) from None
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror})") from None
    if stat.S_ISDIR(mode) and folder_ok:
        return
    if stat.S_ISDIR(mode):
        raise InputError(f"{path}: is a folder; give a file")
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: not a regular file (a FIFO, device or socket); give a file")


def _load_tensors(path: str, saving_hint: str, **options: Any) -> Any:
    """``torch.load`` of tensors and containers only. A file of other pickled
    objects (a whole model) is refused with what to save instead."""
    check_safe_torch(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **options)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):  # not pickled objects: a corrupt or foreign file
            raise ValueError("not a torch file, or corrupt or truncated") from None
        raise InputError(f"{path}: holds pickled Python objects, which are not loaded because unpickling can run "
                         f"code; save tensors instead: {saving_hint}") from None


def load_features(path: str, role: str = "train", trust_pickle: bool = False) -> Features:
    """Features and labels from a file or a folder (``role`` picks its train, val or test file).
    ``.pkl`` files are read with a restricted unpickler unless ``trust_pickle``."""
    check_input_file(path, folder_ok=True)
    try:
        if os.path.isdir(path):
            found = folder_features(path, role)
            if found is None:
                raise InputError(f"{path}: no {role}_x.npy (alphanet synth's layout), {role}_x-*-of-*.npy shards "
                                 f"(alphanet extract under torchrun) or {role}*.pkl (the authors' layout) in this folder")
            shards = split_shards(path, role)
            if shards:
                return _load_shards(path, role, shards)
            if found.endswith("_x.npy"):
                _progress_of(path, role, "")
            return load_features(found, role, trust_pickle)
        lower = path.lower()
        if lower.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                x, y = _pick_keys(data, path)
                return _check_pair(np.asarray(x), _labels(y, path), path)
        if lower.endswith(".npy"):
            folder, name = os.path.split(path)
            shard = _SHARD.search(name[:-len(".npy")])
            if shard and name[:shard.start()].endswith("_x"):  # one rank's shard: NAME_x-R-of-W.npy
                label_path = os.path.join(folder, name[:shard.start() - 2] + "_y" + name[shard.start():])
            elif name.endswith("_x.npy"):
                label_path = os.path.join(folder, name[:-len("_x.npy")] + "_y.npy")
            elif name == "features.npy":
                label_path = os.path.join(folder, "labels.npy")
            else:
                raise InputError(f"{path}: a .npy feature file must be NAME_x.npy (labels in NAME_y.npy), a shard "
                                 "NAME_x-R-of-W.npy (labels in NAME_y-R-of-W.npy) or features.npy (labels in labels.npy)")
            if not os.path.exists(label_path):
                raise InputError(f"{path}: labels file {label_path} is missing")
            check_input_file(label_path)
            return _check_pair(np.load(path, mmap_mode="r"), _labels(np.load(label_path), label_path), path)
        if lower.endswith((".pt", ".pth")):
            data = _load_tensors(path, "torch.save({'x': features, 'y': labels}, PATH)", mmap=True)
            x, y = _pick_keys(data, path)
            return _check_pair(x, _labels(y, path), path)
        if lower.endswith(".safetensors"):
            from safetensors.torch import load_file
            data = load_file(path)
            x, y = _pick_keys(data, path)
            return _check_pair(x, _labels(y, path), path)
        if lower.endswith(".pkl"):
            return _authors_pickle(path, trust_pickle)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001  (truncated or corrupt files surface here)
        raise InputError(f"{path}: cannot read features ({_reason(error)})") from None
    raise InputError(f"{path}: unknown feature format (use .npz, .npy, .pt, .safetensors or an authors' folder)")


CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")


def _reason(error: BaseException) -> str:
    """One line saying why a file could not be read."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else "corrupt or truncated"
    if isinstance(error, EOFError) or "EOF" in text or "central directory" in text or "zip archive" in text:
        text = "the file is truncated or corrupt: " + text
    return f"{type(error).__name__}: {text[:300]}"


def _pair_classifier(data: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A classifier saved as a ``(weight, bias)`` tuple or ``[weight, bias]`` list, else None."""
    if not isinstance(data, (list, tuple)) or len(data) != 2 or hasattr(data[0], "keys"):
        return None
    weight, bias = data
    if len(getattr(weight, "shape", ())) != 2 or not (bias is None or len(getattr(bias, "shape", ())) == 1):
        return None
    return _as_tensor(weight), None if bias is None else _as_tensor(bias)


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


def locate_classifier(data: Any, path: str, key: str | None = None,
                      shape: tuple[int, ...] | None = None) -> tuple[str | None, str, str | None]:
    """Where the classifier is in a dict or state dict: ``(nested entry or None,
    weight key, bias key or None)``. ``KEY.weight`` with ``key``, else the only
    2-D ``*weight`` entry (a whole model's state dict has one 2-D weight when its
    last layer is its only linear one), or the only one of ``shape``. A training
    checkpoint's ``state_dict``/``model`` entry is looked into."""
    nested = [name for name in CHECKPOINT_KEYS if hasattr(data.get(name), "keys")] if hasattr(data, "get") else []
    entry = None
    if nested and not any(isinstance(name, str) and name.endswith("weight") for name in data.keys()):
        entry = nested[0]
        data = data[entry]
    keys = [name for name in data.keys() if isinstance(name, str)]
    if key is not None:
        weight_key = f"{key}.weight" if key else "weight"
        if weight_key not in keys:
            raise InputError(f"{path}: no entry {weight_key!r} (--classifier-key {key}); 2-D weights there: "
                             f"{_describe(data, _matrices(data, keys)) or 'none'}")
    else:
        candidates = [name for name in keys if name == "weight" or name.endswith(".weight")]
        if len(candidates) > 1:
            candidates = _matrices(data, candidates)
        if len(candidates) > 1 and shape is not None:  # the one of a known shape (apply knows it)
            matching = [name for name in candidates if tuple(data[name].shape) == tuple(shape)]
            candidates = matching if len(matching) == 1 else candidates
        if len(candidates) != 1:
            hint = f"; choose one with --classifier-key (e.g. {candidates[-1][:-len('.weight')]!r})" if candidates else ""
            raise InputError(f"{path}: expected one 'weight' entry (a [classes, dims] matrix), found "
                             f"{_describe(data, candidates) or 'none'}{hint}")
        weight_key = candidates[0]
    if len(getattr(data[weight_key], "shape", ())) != 2:
        raise InputError(f"{path}: {weight_key} must be 2-D [classes, dims], got shape "
                         f"{tuple(getattr(data[weight_key], 'shape', ()))}")
    bias_key = weight_key[:-len("weight")] + "bias"
    return entry, weight_key, bias_key if bias_key in keys else None


def _classifier_from_mapping(data: Any, path: str, key: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``weight``/``bias`` pair of a dict or state dict (see :func:`locate_classifier`)."""
    entry, weight_key, bias_key = locate_classifier(data, path, key)
    layer = data if entry is None else data[entry]
    return _as_tensor(layer[weight_key]), None if bias_key is None else _as_tensor(layer[bias_key])


def _matrices(data: Any, keys: list[str]) -> list[str]:
    return [name for name in keys if name.endswith("weight") and len(getattr(data[name], "shape", ())) == 2]


def _describe(data: Any, keys: list[str]) -> str:
    shown = ", ".join(f"{name} {list(getattr(data[name], 'shape', []))}" for name in keys[:6])
    return shown + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def load_classifier(path: str, key: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [C, d], bias [C] or None)``; an ensemble (list) becomes one ``[C, E*d]`` classifier.
    ``key`` names the layer in a whole model's state dict (``"fc"`` reads
    ``fc.weight`` and ``fc.bias``)."""
    check_input_file(path)
    lower = path.lower()
    try:
        if lower.endswith((".pt", ".pth")):
            data = _load_tensors(path, "for a whole model, torch.save(model.state_dict(), PATH), or only the last "
                                 "layer's: torch.save(model.fc.state_dict(), PATH)")
        elif lower.endswith(".npz"):
            with np.load(path, allow_pickle=False) as archive:
                data = {name: archive[name] for name in archive.files}
        elif lower.endswith(".safetensors"):
            from safetensors.torch import load_file
            data = load_file(path)
        else:
            raise InputError(f"{path}: unknown classifier format (use .pt/.pth, .npz or .safetensors)")
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001
        raise InputError(f"{path}: cannot read classifier ({_reason(error)})") from None
    pair = _pair_classifier(data)
    if pair is not None:
        if pair[1] is not None and pair[1].shape[0] != pair[0].shape[0]:
            raise InputError(f"{path}: the (weight, bias) pair has {pair[0].shape[0]} weight rows but "
                             f"{pair[1].shape[0]} biases")
        return pair
    if isinstance(data, (list, tuple)):
        if not all(hasattr(entry, "keys") for entry in data):
            raise InputError(f"{path}: expected a dict with weight/bias, a (weight, bias) pair or a list of dicts "
                             "(an ensemble)")
        parts = [_classifier_from_mapping(entry, path, key) for entry in data]
        biases = None if any(b is None for _, b in parts) else [b for _, b in parts]
        return combine_experts([w for w, _ in parts], biases)
    if not hasattr(data, "keys"):
        raise InputError(f"{path}: expected a dict with weight/bias or a list of them")
    return _classifier_from_mapping(data, path, key)


def load_author_splits(folder: str) -> dict[str, torch.Tensor] | None:
    """``splits/{many,medium,few}.txt`` of an authors'-layout folder, if present."""
    if not os.path.isdir(os.path.join(folder, "splits")):
        return None
    splits = {}
    for name in ("many", "medium", "few"):
        path = os.path.join(folder, "splits", f"{name}.txt")
        check_input_file(path)
        ids = []
        try:
            with open(path, encoding="utf-8") as stream:
                for number, line in enumerate(stream, 1):
                    if not line.strip():
                        continue
                    try:
                        ids.append(int(line))
                    except ValueError:
                        raise InputError(f"{path}:{number}: expected a class id (an integer), got "
                                         f"{line.strip()[:40]!r}") from None
        except UnicodeDecodeError:
            raise InputError(f"{path}: not a text file of class ids") from None
        splits[name] = torch.tensor(ids, dtype=torch.long)
    return splits


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Calls ``write(temporary_path)`` then renames it onto ``path``: readers never see half a file."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; give the path of a file to write")
    directory = os.path.dirname(os.path.abspath(path)) or "."
    try:
        os.makedirs(directory, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=f"{TEMPORARY_PREFIX}{os.getpid()}-",
                                             suffix=os.path.splitext(path)[1])
    except OSError as error:
        raise type(error)(f"cannot write {path}: {error.strerror}") from None
    os.close(handle)
    try:
        write(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(temporary, path)
    except BaseException as error:
        if os.path.exists(temporary):
            os.unlink(temporary)
        if isinstance(error, (OSError, RuntimeError)) and _out_of_space(error, directory):
            raise OSError(f"cannot write {path}: no space left on device") from None
        raise


def _out_of_space(error: BaseException, directory: str) -> bool:
    """Whether a failed write ran out of space: ENOSPC, or a writer (numpy's, torch's)
    that reports a short write in its own words while the disk is full."""
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error):
        return True
    try:
        usage = os.statvfs(directory)
    except OSError:
        return False
    return usage.f_bavail * usage.f_frsize < 64 * 1024


CLASSIFIER_FORMATS = (".pt", ".pth", ".npz", ".safetensors")


def classifier_format(path: str) -> str:
    """The extension naming ``path``'s output format; refuses one we cannot write."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in CLASSIFIER_FORMATS:
        raise InputError(f"{path}: unknown output format (use {', '.join(CLASSIFIER_FORMATS[:-1])} or "
                         f"{CLASSIFIER_FORMATS[-1]})")
    if extension == ".safetensors" and importlib.util.find_spec("safetensors") is None:
        raise InputError(f"{path}: writing .safetensors needs the safetensors package (pip install safetensors)")
    return extension


def check_writable(path: str, folder: bool = False) -> None:
    """Refuses, before any work, an output file (or, with ``folder``, an output
    folder) that could not be written: a folder where a file goes or the reverse,
    a missing parent that cannot be made, no write permission."""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is a file; give a folder to write into")
    if not folder and os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; give the path of a file to write")
    existing = os.path.abspath(path) if folder else os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"cannot write {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: {existing} is not writable")


def save_classifier(path: str, weight: torch.Tensor, bias: torch.Tensor, metadata: dict) -> None:
    """Writes ``{weight, bias}`` in the format ``path``'s extension names, with ``metadata``.

    ``.pt``/``.pth`` files load straight into ``torch.nn.Linear.load_state_dict``
    (metadata rides in the state dict's ``_metadata``); ``.npz`` adds a
    ``metadata`` JSON string; ``.safetensors`` keeps it in the header.
    """
    extension = classifier_format(path)
    text = json.dumps(metadata)
    if extension in (".pt", ".pth"):
        state = OrderedDict(weight=weight.contiguous(), bias=bias.contiguous())
        state._metadata = OrderedDict({"": {"version": 1}, "alphanet": {"json": text}})
        write_atomic(path, lambda temporary: save_torch(state, temporary))
    elif extension == ".npz":
        def write(temporary: str) -> None:
            with open(temporary, "wb") as stream:
                np.savez(stream, weight=weight.numpy(), bias=bias.numpy(), metadata=np.array(text))
        write_atomic(path, write)
    else:
        from safetensors.torch import save_file
        write_atomic(path, lambda temporary: save_file({"weight": weight.contiguous(), "bias": bias.contiguous()},
                                                       temporary, metadata={"alphanet": text}))


def save_torch(data: object, path: str) -> None:
    """``torch.save`` through a stream: given a file name, torch names the archive's
    records after it, and refuses names such as ``.tmp-x`` that leave nothing to use."""
    with open(path, "wb") as stream:
        torch.save(data, stream)


def read_metadata(path: str) -> dict | None:
    """The metadata :func:`save_classifier` wrote, or None."""
    lower = path.lower()
    try:
        if lower.endswith((".pt", ".pth")):
            state = torch.load(path, map_location="cpu", weights_only=True)
            meta = getattr(state, "_metadata", None) or {}
            return json.loads(meta["alphanet"]["json"]) if "alphanet" in meta else None
        if lower.endswith(".npz"):
            with np.load(path, allow_pickle=False) as archive:
                return json.loads(str(archive["metadata"])) if "metadata" in archive.files else None
        if lower.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(path, "pt") as handle:
                meta = handle.metadata() or {}
            return json.loads(meta["alphanet"]) if "alphanet" in meta else None
    except Exception:  # noqa: BLE001
        return None
    return None
