"""A straightforward PyTorch AlphaNet trainer with the structure of the authors'
public code (SPEC §5), written here as a speed anchor: class means by a loop
over samples, neighbours by cdist + a per-class heap, coefficients by a Python
loop over few classes at every step, the full corrected matrix built per step,
and validation recomputing every score from features each epoch."""
from __future__ import annotations

import heapq
import time

import torch
import torch.nn.functional as F


def naive_epochs(train_x, train_y, weight, bias, val_x, val_y, few, base, k=5, rho=1.0, epochs=1, batch_size=64,
                 seed=0, mean_loop_rows=None):
    """Runs ``epochs`` epochs; returns seconds per stage (class means may be timed on a prefix and scaled)."""
    generator = torch.Generator().manual_seed(seed)
    times = {}
    num_classes, dim = weight.shape

    tic = time.perf_counter()
    rows = train_x.shape[0] if mean_loop_rows is None else min(mean_loop_rows, train_x.shape[0])
    sums = torch.zeros(num_classes, dim)
    counts = torch.zeros(num_classes)
    for i in range(rows):
        sums[train_y[i]] += train_x[i]
        counts[train_y[i]] += 1
    times["class_means"] = (time.perf_counter() - tic) * train_x.shape[0] / rows
    sums = torch.zeros(num_classes, dim).index_add_(0, train_y, train_x)
    means = sums / torch.bincount(train_y, minlength=num_classes).clamp_min(1)[:, None]

    tic = time.perf_counter()
    distances = torch.cdist(means[few], means[base])
    neighbors = []
    for row in distances:
        best = heapq.nsmallest(k, range(base.numel()), key=lambda j: row[j].item())
        neighbors.append(base[best])
    neighbors = torch.stack(neighbors)
    times["neighbors"] = time.perf_counter() - tic

    layers = torch.nn.Sequential(torch.nn.Linear((k + 1) * dim, 32), torch.nn.LeakyReLU(0.01),
                                 torch.nn.Linear(32, 32), torch.nn.LeakyReLU(0.01), torch.nn.Linear(32, 32),
                                 torch.nn.LeakyReLU(0.01), torch.nn.Linear(32, k))
    few_bias = bias[few].clone().requires_grad_()
    optimizer = torch.optim.AdamW(list(layers.parameters()) + [few_bias], lr=1e-3, weight_decay=0.01)
    counts = torch.bincount(train_y, minlength=num_classes).double()
    is_few = torch.zeros(num_classes, dtype=torch.bool)
    is_few[few] = True
    few_rows = torch.nonzero(is_few[train_y]).flatten()
    base_rows = torch.nonzero(~is_few[train_y]).flatten()
    sample_weights = 1.0 / counts[train_y[base_rows]]

    def corrected():
        rows = []
        for c in range(few.numel()):  # one small network call per few class, as in the authors' code
            inputs = torch.cat([weight[few[c]], weight[neighbors[c]].reshape(-1)])
            alpha = layers(inputs)
            alpha = alpha / alpha.abs().sum()
            rows.append(weight[few[c]] + alpha @ weight[neighbors[c]])
        full = weight.clone()
        full[few] = torch.stack(rows)
        full_bias = bias.clone()
        full_bias[few] = few_bias
        return full, full_bias

    train_time = val_time = 0.0
    for _ in range(epochs):
        tic = time.perf_counter()
        drawn = base_rows[torch.multinomial(sample_weights, int(rho * few_rows.numel()), True, generator=generator)]
        order = torch.cat([few_rows, drawn])[torch.randperm(few_rows.numel() + drawn.numel(), generator=generator)]
        for begin in range(0, order.numel(), batch_size):
            batch = order[begin:begin + batch_size]
            full, full_bias = corrected()
            loss = F.cross_entropy(train_x[batch] @ full.T + full_bias, train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        train_time += time.perf_counter() - tic
        tic = time.perf_counter()
        with torch.no_grad():
            full, full_bias = corrected()
            (val_x @ full.T + full_bias).argmax(1).eq(val_y).float().mean()
        val_time += time.perf_counter() - tic
    times["train_per_epoch"] = train_time / epochs
    times["val_per_epoch"] = val_time / epochs
    return times
