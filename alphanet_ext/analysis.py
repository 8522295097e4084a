"""Why a correction helps: prediction changes, neighbour views, semantic
closeness over a class hierarchy, and the distance correlation."""
from __future__ import annotations

import os
import warnings
from typing import Mapping, Sequence, Union

import torch
from torch import Tensor

from . import ops
from .metrics import accuracy_by_split

__all__ = ["Hierarchy", "neighbor_views", "prediction_changes", "semantic_accuracy",
           "pearson_with_interval"]

Node = Union[int, str]


class Hierarchy:
    """A tree over the classes: class ``c`` is the leaf named ``c`` (or ``"c"``),
    every other node has any other name. Build it from parent links
    (:meth:`from_parents`, :meth:`read`).

    Class ``p`` is *within h levels* of class ``t`` when they share an ancestor
    at most ``h`` levels above ``t`` (h=1: same parent; the paper's WordNet
    analysis used 4).
    """

    def __init__(self, chains: list[list[str]], num_classes: int):
        # chains[c]: the names of c's ancestors, parent first, root last
        names = sorted({name for chain in chains for name in chain})
        node_id = {name: num_classes + i for i, name in enumerate(names)}
        children: dict[int, list[int]] = {}
        linked: set[int] = set()
        roots: dict[int, None] = {}  # ordered set
        for c, chain in enumerate(chains):
            path = [c] + [node_id[name] for name in chain]
            for child, parent in zip(path, path[1:]):
                if child not in linked:
                    linked.add(child)
                    children.setdefault(parent, []).append(child)
            roots[path[-1]] = None
        total = num_classes + len(names)
        enter, leave = torch.zeros(total, dtype=torch.long), torch.zeros(total, dtype=torch.long)
        clock = 0
        for root in roots:  # iterative depth-first walk: [enter, leave) holds exactly the descendants
            stack = [(root, False)]
            while stack:
                node, done = stack.pop()
                if done:
                    leave[node] = clock
                    continue
                enter[node] = clock
                clock += 1
                stack.append((node, True))
                stack.extend((child, False) for child in reversed(children.get(node, [])))
        self.num_classes = num_classes
        self._enter, self._leave = enter, leave
        self._ancestors = [[c] + [node_id[name] for name in chain] for c, chain in enumerate(chains)]

    @classmethod
    def from_parents(cls, parents: Mapping[Node, Node] | Sequence[Node] | Tensor, num_classes: int) -> "Hierarchy":
        """``parents``: a mapping child -> parent over node names (classes by their
        index), or a sequence with one parent id per class (a one-level tree;
        those ids are their own namespace, not class ids)."""
        if not isinstance(parents, Mapping):
            values = parents.tolist() if isinstance(parents, Tensor) else list(parents)
            if len(values) != num_classes:
                raise ValueError(f"hierarchy: got {len(values)} parent ids for {num_classes} classes")
            parents = {c: f"parent {value}" for c, value in enumerate(values)}
        links = {str(child): str(parent) for child, parent in parents.items()}
        class_names = {str(c) for c in range(num_classes)}
        for parent in links.values():
            if parent in class_names:
                raise ValueError(f"hierarchy: node {parent!r} is used as a parent but names class {parent}; classes "
                                 "are leaves, so give inner nodes names that are not class indices (e.g. 'g" +
                                 parent + "')")
        inner = set(links.values())
        for child in links:
            if child not in class_names and child not in inner:
                raise ValueError(f"hierarchy: {child!r} has a parent but is neither a class (0 to {num_classes - 1}) "
                                 "nor the parent of another node; are the class ids 0-based?")
        chains = []
        for c in range(num_classes):
            chain, node = [], str(c)
            while node in links:
                node = links[node]
                if node in chain:
                    raise ValueError(f"hierarchy: the parent links of class {c} form a cycle through {node!r}")
                chain.append(node)
            chains.append(chain)
        orphans = [c for c in range(num_classes) if str(c) not in links]
        if len(orphans) == num_classes:
            raise ValueError(f"hierarchy: none of the {num_classes} classes has a parent")
        if orphans:
            shown = ", ".join(map(str, orphans[:5])) + (", ..." if len(orphans) > 5 else "")
            warnings.warn(f"hierarchy: {len(orphans)} of {num_classes} classes have no parent ({shown}); "
                          "a prediction is close to them only when it is exact", stacklevel=2)
        return cls(chains, num_classes)

    @classmethod
    def read(cls, path: str | os.PathLike, num_classes: int) -> "Hierarchy":
        """A text file of parent links, one ``CHILD PARENT`` pair a line
        (whitespace or comma separated; ``#`` starts a comment)."""
        links = {}
        try:
            with open(path, encoding="utf-8") as stream:
                lines = stream.read().splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a text file of 'CHILD PARENT' lines") from None
        for number, line in enumerate(lines, 1):
            fields = line.split("#", 1)[0].replace(",", " ").split()
            if not fields:
                continue
            if len(fields) != 2:
                raise ValueError(f"{path}:{number}: expected 'CHILD PARENT', got {line.strip()[:60]!r}")
            if fields[0] in links and links[fields[0]] != fields[1]:
                raise ValueError(f"{path}:{number}: {fields[0]!r} already has parent {links[fields[0]]!r}")
            links[fields[0]] = fields[1]
        return cls.from_parents(links, num_classes)

    def close(self, truth: Tensor, predicted: Tensor, levels: int) -> Tensor:
        """Whether each ``predicted`` class is within ``levels`` levels of its
        ``truth`` class (a class is always within any number of levels of itself)."""
        if levels < 0:
            raise ValueError(f"hierarchy: levels must be at least 0, got {levels}")
        # the ancestor `levels` above each class (its root if the tree is shallower there)
        top = torch.tensor([chain[min(levels, len(chain) - 1)] for chain in self._ancestors], dtype=torch.long)
        anchor = top[truth.cpu()]
        position = self._enter[predicted.cpu()]
        return (self._enter[anchor] <= position) & (position < self._leave[anchor])


def neighbor_views(class_means: Tensor, splits: Mapping[str, Tensor], k: int = 5,
                   metric: str = "euclidean", few_neighbors: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """The paper's three groupings (Fig. 5 and its appendix): ``"few"`` (each few
    class with its k nearest base classes), ``"base"`` (each base class with its
    k nearest few classes) and ``"all"`` (every class with its k nearest other
    classes). Each value is ``(classes [n], neighbors [n, k])``. ``few_neighbors``
    (a fit's ``neighbors``, in the order of ``splits["few"]``) is the few view as
    the fit found it, so it is not searched again. The searches run where
    ``class_means`` lives; the views come back on the CPU."""
    few = torch.as_tensor(splits["few"], dtype=torch.long)
    base = torch.cat([torch.as_tensor(splits[name], dtype=torch.long) for name in ("many", "medium")]).sort().values
    every = torch.cat([few, base]).sort().values
    views = {}
    for name, classes, candidates in (("few", few, base), ("base", base, few), ("all", every, every)):
        if name == "few" and few_neighbors is not None and few_neighbors.shape == (classes.numel(), k):
            views[name] = (classes, few_neighbors.cpu())
            continue
        if classes.numel() == 0 or candidates.numel() <= (name == "all"):
            views[name] = (classes, torch.empty(classes.numel(), 0, dtype=torch.long))
            continue
        extra = 1 if name == "all" else 0  # the class itself comes back among its own neighbours
        count = min(k + extra, candidates.numel())
        on = class_means.device
        _, nearest = ops.knn(class_means[classes.to(on)], class_means[candidates.to(on)], count, metric)
        neighbors = candidates[nearest.cpu()]
        if extra:
            keep = neighbors != classes[:, None]
            keep &= keep.cumsum(1) <= count - 1
            neighbors = neighbors[keep].view(classes.numel(), count - 1)
        views[name] = (classes, neighbors)
    return views


def prediction_changes(before: Tensor, after: Tensor, labels: Tensor, classes: Tensor,
                       neighbors: Tensor | Hierarchy, levels: int = 4,
                       candidates: Tensor | None = None) -> dict[str, dict[str, int]]:
    """For samples whose true class is in ``classes``, how many predictions are
    correct, on one of the class's neighbours, or elsewhere — ``before`` and
    ``after`` a correction (predicted labels, e.g. ``evaluate(...)["predictions"]``).

    ``neighbors`` is ``[len(classes), k]`` (row i belongs to ``classes[i]``,
    e.g. from :func:`neighbor_views`), or a :class:`Hierarchy`: then the
    neighbours of a class are the ``candidates`` classes (default: all) within
    ``levels`` levels of it (paper Fig. 6)."""
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    classes = torch.as_tensor(classes, dtype=torch.long).cpu()
    before = torch.as_tensor(before, dtype=torch.long).cpu()
    after = torch.as_tensor(after, dtype=torch.long).cpu()
    if not before.shape == after.shape == labels.shape:
        raise ValueError(f"prediction_changes: before {tuple(before.shape)}, after {tuple(after.shape)} and labels "
                         f"{tuple(labels.shape)} must have the same shape")
    num_classes = 1 + max([int(t.max()) for t in (labels, before, after, classes) if t.numel()], default=0)
    if isinstance(neighbors, Hierarchy):
        num_classes = max(num_classes, neighbors.num_classes)
    in_view = torch.zeros(num_classes, dtype=torch.bool)
    in_view[classes] = True
    selected = in_view[labels]
    truth = labels[selected]
    table = {}
    for name, predicted in (("before", before), ("after", after)):
        guess = predicted[selected]
        if isinstance(neighbors, Hierarchy):
            is_neighbor = neighbors.close(truth, guess, levels)
            if candidates is not None:
                allowed = torch.zeros(num_classes, dtype=torch.bool)
                allowed[torch.as_tensor(candidates, dtype=torch.long)] = True
                is_neighbor &= allowed[guess]
        else:
            row_of = torch.full((num_classes,), -1, dtype=torch.long)
            row_of[classes] = torch.arange(classes.numel())
            is_neighbor = (neighbors.cpu()[row_of[truth]] == guess[:, None]).any(dim=1)
        correct = guess == truth
        table[name] = {"correct": int(correct.sum()), "as_neighbor": int((is_neighbor & ~correct).sum()),
                       "elsewhere": int((~is_neighbor & ~correct).sum())}
    return table


def semantic_accuracy(predicted: Tensor, labels: Tensor, splits: Mapping[str, Tensor], hierarchy: Hierarchy,
                      levels: int = 4) -> dict[str, float]:
    """Top-1 per split (percent) counting a prediction within ``levels`` levels of
    the true class as correct (the paper's WordNet accuracy, Table C3)."""
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    correct = hierarchy.close(labels, torch.as_tensor(predicted, dtype=torch.long).cpu(), levels)
    return accuracy_by_split(correct, labels, splits, hierarchy.num_classes)


BOOTSTRAP_VALUES = 1 << 20  # resampled values drawn at a time by pearson_with_interval


def pearson_with_interval(x: Tensor, y: Tensor, resamples: int = 10_000, seed: int = 0,
                          device: torch.device | str = "cpu") -> dict[str, float]:
    """Pearson r and its bootstrap 95 % interval (percentile method); all NaN
    when r is undefined (a constant series). The resamples are drawn and scored
    on ``device`` (a GPU's generator draws other resamples than the CPU's: the
    interval is deterministic per device)."""
    device = torch.device(device)
    x = torch.as_tensor(x).double().flatten().to(device)
    y = torch.as_tensor(y).double().flatten().to(device)
    if x.numel() != y.numel() or x.numel() < 3:
        raise ValueError("pearson_with_interval: need two series of the same length, at least 3")
    if not bool(torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("pearson_with_interval: the series contain NaN or inf (drop those pairs first)")

    def r(a: Tensor, b: Tensor) -> Tensor:
        a, b = a - a.mean(dim=-1, keepdim=True), b - b.mean(dim=-1, keepdim=True)
        # clamped: rounding put a resample of three points at -1.0000000000000002
        return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).clamp(-1.0, 1.0)

    generator = torch.Generator(device).manual_seed(seed)
    block = max(1, BOOTSTRAP_VALUES // x.numel())  # resamples at a time: all at once take resamples * n values
    samples = []
    for begin in range(0, resamples, block):
        picks = torch.randint(x.numel(), (min(block, resamples - begin), x.numel()), generator=generator,
                              device=device)
        samples.append(r(x[picks], y[picks]))
    samples = torch.cat(samples)
    samples = samples[~torch.isnan(samples)]
    if samples.numel() == 0:  # a constant series: r is undefined
        return {"r": float("nan"), "low": float("nan"), "high": float("nan")}
    low, high = torch.quantile(samples.cpu(), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"r": float(r(x, y)), "low": low, "high": high}
