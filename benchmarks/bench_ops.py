"""Each op against its torch-native equivalent, same process, three sizes.

    python benchmarks/bench_ops.py [--threads N] [--device cpu|cuda] [--sizes small,medium,large]

Peers: class means -> index_add_ + bincount; kNN -> cdist + topk and mm
expansion + topk (the faster of the two is the ratio's denominator);
alpha combine -> index_select + einsum (rows of W) and advanced indexing +
einsum (columns of a logits matrix); on a GPU, the fit's upload of host
features (chunks through a pinned buffer) -> one tensor.to from pageable
memory; the fit's training step (`step`) at a training batch of 256 rows ->
its first layer's gradient as one mm (ours, as the op runs it on a GPU from
2,048 few classes: products over parts of the few classes, summed), and on a
GPU the whole step run eagerly (ours: replayed as a CUDA graph, whose results
must come out identical). On a GPU with cupy installed, cupy's equivalents are
second peers (scatter_add, mm + argpartition, indexing + einsum).
"""
from __future__ import annotations

import argparse

import torch

import alphanet_ext
from alphanet_ext import ops as alphanet_ops
from alphanet_ext.data import iter_row_chunks
from alphanet_ext.training.step import CoefficientNets, FusedAdamW, ReplayedStep, network_inputs
from common import compare, machine, mib, peak_extra_memory, setup_threads

SIZES = {
    # class means: rows, dims, classes | knn: queries, keys, dims, k | combine: lines, dims, few, k, logit rows
    "small": dict(means=(20_000, 64, 100), knn=(30, 70, 64, 5), combine=(100, 64, 30, 5, 10_000)),
    "medium": dict(means=(115_846, 2048, 1000), knn=(136, 864, 2048, 5), combine=(1000, 2048, 136, 5, 20_000)),
    "large": dict(means=(353_237, 2048, 8142), knn=(4515, 3627, 2048, 5), combine=(8142, 2048, 4515, 5, 24_426)),
    "huge": dict(knn=(100_000, 100_000, 512, 5)),  # GPU only: kNN at scale
    # one class-sharded rank of four at 200,000 classes: its block's columns and few classes
    "rank": dict(combine=(65_000, 256, 40_560, 5, 4096)),
}


def peer_class_means(x, labels, classes):
    sums = torch.zeros(classes, x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, labels, x if x.dtype == torch.float32 else x.float())
    counts = torch.bincount(labels, minlength=classes)
    return sums / counts.clamp_min(1).unsqueeze(1), counts


def peer_knn_cdist(queries, keys, k):
    return torch.cdist(queries, keys).topk(k, dim=1, largest=False)


def peer_knn_mm(queries, keys, k):
    squared = (queries * queries).sum(1, keepdim=True) - 2 * queries @ keys.T + (keys * keys).sum(1)
    values, indices = squared.topk(k, dim=1, largest=False)
    return values.clamp_min(0).sqrt(), indices


def peer_combine_rows(source, targets, neighbors, alphas):
    weights = alphas / alphas.abs().sum(1, keepdim=True)
    gathered = source.index_select(0, neighbors.reshape(-1)).view(*neighbors.shape, source.shape[1])
    return source.index_select(0, targets) + torch.einsum("ck,ckd->cd", weights, gathered)


def peer_combine_columns(logits, targets, neighbors, alphas):
    weights = alphas / alphas.abs().sum(1, keepdim=True)
    return logits[:, targets] + torch.einsum("ck,nck->nc", weights, logits[:, neighbors])


def array_combine(xp, source, targets, neighbors, alphas, dim):
    """peer_combine_rows / peer_combine_columns in an array module ``xp`` (cupy)."""
    weights = alphas / xp.abs(alphas).sum(1, keepdims=True)
    if dim == 0:
        return source[targets] + xp.einsum("ck,ckd->cd", weights, source[neighbors])
    return source[:, targets] + xp.einsum("ck,nck->nc", weights, source[:, neighbors])


def free_bytes(device):
    """Free memory of a GPU; a CPU's peers are not limited here."""
    return torch.cuda.mem_get_info()[0] if device.startswith("cuda") else float("inf")


def card_rates(device):
    """Measured copy bandwidth (bytes/s, read + write) and fp32 matmul rate (FLOP/s) of a GPU."""
    if not device.startswith("cuda"):
        return None
    source = torch.empty(1 << 28, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    t_copy, _ = compare(lambda: target.copy_(source), lambda: None, device, 10)
    a = torch.randn(8192, 8192, device=device)
    t_mm, _ = compare(lambda: a @ a, lambda: None, device, 5)
    rates = {"bandwidth": 2 * source.numel() * 4 / t_copy, "matmul": 2 * 8192**3 / t_mm, "int8": None}
    codes = torch.randint(-127, 128, (8192, 8192), dtype=torch.int8, device=device)
    try:
        t_int8, _ = compare(lambda: torch._int_mm(codes, codes.t()), lambda: None, device, 5)
        rates["int8"] = 2 * 8192**3 / t_int8
        int8_text = f"int8 matmul {rates['int8'] / 1e12:.0f} TOP/s"
    except RuntimeError as error:  # knn then ranks with float matmuls too
        int8_text = f"int8 matmul unavailable ({str(error).splitlines()[0]})"
    print(f"card: copy bandwidth {rates['bandwidth'] / 1e9:.0f} GB/s, fp32 matmul "
          f"{rates['matmul'] / 1e12:.1f} TFLOP/s (tf32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}), "
          f"{int8_text}")
    return rates


def screening_counts(queries, keys, k, label):
    """How much of knn's work its screening left to float64 (CUDA: queries ranked again; CPU: keys ranked)."""
    if queries.is_cuda:
        before = torch.ops.alphanet._knn_rechecked_queries()
        alphanet_ext.knn(queries, keys, k)
        return (f"(int8 screening{label}: {torch.ops.alphanet._knn_rechecked_queries() - before} of "
                f"{queries.shape[0]} queries ranked again in float64)")
    before = torch.ops.alphanet._knn_screened_candidates()
    alphanet_ext.knn(queries, keys, k)
    ranked = torch.ops.alphanet._knn_screened_candidates() - before
    return f"(int16 screening{label}: {ranked / max(queries.shape[0], 1):.1f} keys per query ranked in float64)"


def row(name, size, ours, peer, device, repeats, peer_name, rates=None, moved_bytes=None, flops=None, int8_ops=None,
        uploaded_bytes=None):
    t_ours, t_peer = compare(ours, peer, device, repeats)
    mem_ours, mem_peer = peak_extra_memory(ours, device), peak_extra_memory(peer, device)
    fraction = ""
    if uploaded_bytes:
        fraction = f"{uploaded_bytes / t_ours / 1e9:.1f} GB/s host to device (peer {uploaded_bytes / t_peer / 1e9:.1f})"
    elif rates and moved_bytes:
        fraction = f"{moved_bytes / t_ours / 1e9:.0f} GB/s = {moved_bytes / t_ours / rates['bandwidth']:.0%} of copy"
    elif rates and flops:
        fraction = f"{flops / t_ours / 1e12:.1f} TFLOP/s = {flops / t_ours / rates['matmul']:.0%} of matmul"
        if int8_ops and rates["int8"]:  # the int8 screening's own work: three int8 products of depth d per pair
            fraction += f"; int8 {int8_ops / t_ours / 1e12:.0f} TOP/s = {int8_ops / t_ours / rates['int8']:.0%} of int8 matmul"
    print(f"| {name} | {size} | {t_ours * 1e3:.2f} | {peer_name} {t_peer * 1e3:.2f} | {t_peer / t_ours:.2f}x "
          f"| {mib(mem_ours)} | {mib(mem_peer)} | {fraction} |", flush=True)


def knn_rows(q, m, dims, k, device, repeats, rates, cupy_modules, generator):
    """kNN against the faster torch peer that fits, the int8 and float rankings, and cupy."""
    queries = torch.randn(q, dims, generator=generator).to(device)
    keys = torch.randn(m, dims, generator=generator).to(device)
    # the peers' q x m float32 temporaries: cdist holds one at a time, the mm expansion three
    peers = [(name, fn) for name, fn, copies in (("cdist+topk", peer_knn_cdist, 1), ("mm+topk", peer_knn_mm, 3))
             if copies * q * m * 4 < free_bytes(device)]
    if len(peers) == 2:
        t_cdist, t_mm = compare(lambda: peer_knn_cdist(queries, keys, k), lambda: peer_knn_mm(queries, keys, k),
                                device, repeats)
        peers = peers[:1] if t_cdist <= t_mm else peers[1:]
    if not peers:
        print(f"| knn euclidean | {q}x{m}x{dims}, k={k} | | torch peers: skipped, need "
              f"{q * m * 4 / 2**30:.0f} GiB | | | | |")
        return
    peer_name, best_peer_of = peers[0]
    best_peer = lambda: best_peer_of(queries, keys, k)  # noqa: E731
    int8_ops = 6 * q * m * dims if device.startswith("cuda") else None
    row("knn euclidean", f"{q}x{m}x{dims}, k={k}", lambda: alphanet_ext.knn(queries, keys, k), best_peer,
        device, repeats, peer_name, rates, flops=2 * q * m * dims, int8_ops=int8_ops)
    # a large shared offset, as post-ReLU features and their class means have (the screenings centre it out)
    shifted_queries, shifted_keys = queries + 10, keys + 10
    row("knn euclidean, rows offset by 10", f"{q}x{m}x{dims}, k={k}",
        lambda: alphanet_ext.knn(shifted_queries, shifted_keys, k),
        lambda: best_peer_of(shifted_queries, shifted_keys, k), device, repeats, peer_name, rates,
        flops=2 * q * m * dims, int8_ops=int8_ops)
    for label, (rows_q, rows_k) in (("", (queries, keys)), (", offset 10", (shifted_queries, shifted_keys))):
        print(screening_counts(rows_q, rows_k, k, label))
    if device.startswith("cuda"):  # A/B: float matmul tiles instead of the int8 screening
        row("knn euclidean, float matmul ranking", f"{q}x{m}x{dims}, k={k}",
            lambda: alphanet_ext.knn(queries, keys, k, ranking="matmul"),
            best_peer, device, repeats, peer_name, rates, flops=2 * q * m * dims)
    # the cupy peer holds three q x m float32 temporaries at once
    if cupy_modules and 3 * q * m * 4 > free_bytes(device):
        print(f"| knn euclidean | {q}x{m}x{dims}, k={k} | | cupy mm+argpartition: skipped, needs "
              f"{3 * q * m * 4 / 2**30:.0f} GiB | | | | |")
    elif cupy_modules:
        cupy, _ = cupy_modules
        q_cp, k_cp = cupy.from_dlpack(queries), cupy.from_dlpack(keys)
        def cupy_knn():
            squared = (q_cp * q_cp).sum(1)[:, None] - 2 * q_cp @ k_cp.T + (k_cp * k_cp).sum(1)[None]
            return cupy.argpartition(squared, k, axis=1)[:, :k]
        row("knn euclidean", f"{q}x{m}x{dims}, k={k}", lambda: alphanet_ext.knn(queries, keys, k), cupy_knn,
            device, repeats, "cupy mm+argpartition", rates, flops=2 * q * m * dims)


def training_step(classes, dims, few, k, device, generator, trials=1, hidden=(32, 32, 32), batch=256):
    """The fit's training step on random inputs of its shapes, as ``fit`` runs it: ``(step, batch, parameters)``."""
    nets = CoefficientNets([(k + 1) * dims, *hidden, k], [torch.Generator().manual_seed(t) for t in range(trials)],
                            torch.device(device))
    inputs = network_inputs(torch.randn(few, (k + 1) * dims, generator=generator).to(device), nets.first.shape[1])
    few_bias = torch.zeros(trials, few, device=device)
    optimizer = FusedAdamW(nets.parameters() + [few_bias], lr=1e-3, weight_decay=5e-4)
    offsets = torch.arange(trials)[:, None] * classes
    few_ids = torch.randperm(classes, generator=generator)[:few]
    targets = (offsets + few_ids).reshape(-1).to(device)
    neighbors = (offsets[:, :, None] + torch.randint(0, classes, (few, k), generator=generator)).reshape(-1, k).to(device)
    loss_sum = torch.zeros(trials, device=device)

    def step(raw, base_lse, target_few, target_base):
        losses, grads = alphanet_ops.coefficient_grads(inputs, nets.first, nets.rest, nets.biases, few_bias, raw,
                                                       targets, neighbors, base_lse, target_few, target_base, 1.0)
        optimizer.step(grads)
        loss_sum.add_(losses * raw.shape[0])

    values = (torch.randn(batch, trials * classes, generator=generator), torch.randn(batch, trials, generator=generator),
              torch.randint(-1, few, (batch, trials), generator=generator), torch.randn(batch, trials, generator=generator))
    return step, [t.to(device) for t in values], nets.parameters() + [few_bias, loss_sum]


def first_layer_grad_by_parts(inputs, grad):
    """inputs [D, C_f] @ grad [C_f, N] as products over parts of 1,024 or more few classes, summed
    (csrc/coefficient_grads.cpp's CUDA path)."""
    few = inputs.shape[1]
    parts = few // 1024
    per_part = few // parts
    split = parts * per_part
    out = torch.bmm(inputs.as_strided((parts, inputs.shape[0], per_part), (per_part, few, 1)),
                    grad[:split].view(parts, per_part, grad.shape[1])).sum(0)
    return out.addmm_(inputs[:, split:], grad[split:]) if split < few else out


def gathered_step_row(classes, dims, few, k, device, repeats, generator, size):
    """The training op with its input gathered from a table of rows (what a class-sharded
    rank holds: each class's row ids, and distinct rows about half as many as the classes'
    rows here) against the same input whole: packed on an AVX2 CPU (the one-process fit's),
    ``[D, C_f]`` elsewhere."""
    nets = CoefficientNets([(k + 1) * dims, 32, 32, 32, k], [torch.Generator().manual_seed(0)], torch.device(device))
    table = torch.randn(few * (k + 1) // 2, dims, generator=generator).to(device)
    ids = torch.randint(0, table.shape[0], (few, k + 1), generator=generator).to(device)
    whole = network_inputs(table[ids].reshape(few, -1), nets.first.shape[1])
    values = (torch.zeros(1, few), torch.randn(256, classes, generator=generator),
              torch.randperm(classes, generator=generator)[:few], torch.randint(0, classes, (few, k), generator=generator),
              torch.randn(256, 1, generator=generator), torch.randint(-1, few, (256, 1), generator=generator),
              torch.randn(256, 1, generator=generator))
    common = (nets.rest, nets.biases, *[t.to(device) for t in values], 1.0)
    row("step: op, input gathered", size, lambda: alphanet_ops.coefficient_grads(table, nets.first, *common, ids),
        lambda: alphanet_ops.coefficient_grads(whole, nets.first, *common), device, repeats,
        f"{'packed' if whole.dim() == 3 else 'whole'} ({whole.numel() * 4 / 2**20:.0f} MiB against "
        f"{table.numel() * 4 / 2**20:.0f} MiB of rows)")


def step_rows(classes, dims, few, k, device, repeats, rates, generator):
    """The training step's first-layer gradient (from 2,048 few classes: by parts against one mm), and on
    a GPU the whole step replayed as a CUDA graph against the eager step, with a check that both give the
    same values."""
    size = f"C={classes}, d={dims}, n={few}, k={k}, 256 rows"
    if few >= 2048:
        inputs = torch.randn((k + 1) * dims, few, generator=generator).to(device)
        grad = torch.randn(few, 32, generator=generator).to(device)
        row("step: first-layer gradient by parts", size, lambda: first_layer_grad_by_parts(inputs, grad),
            lambda: torch.mm(inputs, grad), device, repeats, "mm", rates, flops=2 * few * (k + 1) * dims * 32)
    gathered_step_row(classes, dims, few, k, device, repeats, generator, size)
    if not device.startswith("cuda"):
        return
    step, batch, _ = training_step(classes, dims, few, k, device, generator)
    replayed = ReplayedStep(step)
    row("step: whole, CUDA graph", size, lambda: replayed(1e-3, *batch), lambda: step(*batch), device, repeats, "eager")
    states = []
    for graphs in (False, True):  # the same 20 steps from the same start, eagerly and replayed
        seeded = torch.Generator().manual_seed(1)
        step, batch, parameters = training_step(classes, dims, few, k, device, seeded)
        run = ReplayedStep(step) if graphs else (lambda lr, *values: step(*values))
        for _ in range(20):
            run(1e-3, *batch)
        states.append(parameters)
    difference = max((a - b).abs().max().item() for a, b in zip(*states))
    print(f"(training step, {size}: after 20 steps the replayed and eager parameters differ by at most {difference:g})")


def cupy_peers():
    try:
        import cupy
        import cupyx
    except ImportError:
        return None
    return cupy, cupyx


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="small,medium,large")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ops", default="class_means,knn,alpha_combine,upload,step",
                        help="upload: host features to a GPU in the fit's chunks, against one tensor.to; "
                             "step: the fit's training step")
    args = parser.parse_args()
    threads = setup_threads(args.threads)
    device = args.device
    print(f"machine: {machine()}; device {device}; torch {torch.__version__}; threads {threads}")
    rates = card_rates(device)
    cupy_modules = cupy_peers() if device.startswith("cuda") else None
    print("| op | size | ours ms | peer ms | speed-up | our peak extra mem | peer peak extra mem | hardware fraction |")
    print("|---|---|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    ops = args.ops.split(",")
    for size_name in args.sizes.split(","):
        size = SIZES[size_name]
        if "class_means" in ops and "means" in size:
            rows, dims, classes = size["means"]
            x = torch.randn(rows, dims, generator=generator).to(device)
            labels = torch.randint(0, classes, (rows,), generator=generator).to(device)
            moved = x.numel() * 4 + classes * dims * 4
            row("class_means fp32", f"{rows}x{dims}, C={classes}", lambda: alphanet_ext.class_means(x, labels, classes),
                lambda: peer_class_means(x, labels, classes), device, args.repeats, "index_add_", rates, moved)
            if cupy_modules:
                cupy, cupyx = cupy_modules
                x_cp, labels_cp = cupy.from_dlpack(x), cupy.from_dlpack(labels)
                def cupy_means():
                    sums = cupy.zeros((classes, dims), dtype=cupy.float32)
                    cupyx.scatter_add(sums, labels_cp, x_cp)
                    return sums / cupy.maximum(cupy.bincount(labels_cp, minlength=classes), 1)[:, None]
                row("class_means fp32", f"{rows}x{dims}, C={classes}", lambda: alphanet_ext.class_means(x, labels, classes),
                    cupy_means, device, args.repeats, "cupyx.scatter_add", rates, moved)
            half = x.to(torch.bfloat16)
            row("class_means bf16", f"{rows}x{dims}, C={classes}", lambda: alphanet_ext.class_means(half, labels, classes),
                lambda: peer_class_means(half, labels, classes), device, args.repeats, "index_add_", rates,
                x.numel() * 2 + classes * dims * 4)
            del x, half
        if "knn" in ops and "knn" in size:
            knn_rows(*size["knn"], device, args.repeats, rates, cupy_modules, generator)
        if "alpha_combine" in ops and "combine" in size:
            lines, dims, few, k, logit_rows = size["combine"]
            source = torch.randn(lines, dims, generator=generator).to(device)
            targets = torch.randint(0, lines, (few,), generator=generator).to(device)
            neighbors = torch.randint(0, lines, (few, k), generator=generator).to(device)
            alphas = torch.randn(few, k, generator=generator).to(device)
            row("alpha_combine rows", f"W {lines}x{dims}, n={few}, k={k}",
                lambda: torch.ops.alphanet.alpha_combine(source, targets, neighbors, alphas, 0),
                lambda: peer_combine_rows(source, targets, neighbors, alphas), device, args.repeats, "index_select+einsum",
                rates, few * (k + 2) * dims * 4)
            logits = torch.randn(logit_rows, lines, generator=generator).to(device)
            row("alpha_combine columns", f"L {logit_rows}x{lines}, n={few}, k={k}",
                lambda: torch.ops.alphanet.alpha_combine(logits, targets, neighbors, alphas, 1),
                lambda: peer_combine_columns(logits, targets, neighbors, alphas), device, args.repeats, "indexing+einsum",
                rates, logit_rows * few * (k + 2) * 4)
            if cupy_modules:
                cupy, _ = cupy_modules
                arrays = [cupy.from_dlpack(t) for t in (source, logits, targets, neighbors, alphas)]
                source_cp, logits_cp, targets_cp, neighbors_cp, alphas_cp = arrays
                row("alpha_combine rows", f"W {lines}x{dims}, n={few}, k={k}",
                    lambda: torch.ops.alphanet.alpha_combine(source, targets, neighbors, alphas, 0),
                    lambda: array_combine(cupy, source_cp, targets_cp, neighbors_cp, alphas_cp, 0), device,
                    args.repeats, "cupy indexing+einsum", rates, few * (k + 2) * dims * 4)
                row("alpha_combine columns", f"L {logit_rows}x{lines}, n={few}, k={k}",
                    lambda: torch.ops.alphanet.alpha_combine(logits, targets, neighbors, alphas, 1),
                    lambda: array_combine(cupy, logits_cp, targets_cp, neighbors_cp, alphas_cp, 1), device,
                    args.repeats, "cupy indexing+einsum", rates, logit_rows * few * (k + 2) * 4)
            alphas_grad = alphas.clone().requires_grad_()
            grad_rows = torch.randn(few, dims, generator=generator).to(device)
            def ours_backward():
                return torch.autograd.grad(torch.ops.alphanet.alpha_combine(source, targets, neighbors, alphas_grad, 0),
                                           alphas_grad, grad_rows)
            def peer_backward():
                return torch.autograd.grad(peer_combine_rows(source, targets, neighbors, alphas_grad), alphas_grad,
                                           grad_rows)
            row("alpha_combine rows fwd+bwd", f"W {lines}x{dims}, n={few}, k={k}", ours_backward, peer_backward,
                device, args.repeats, "autograd of peer", rates, 2 * few * (k + 2) * dims * 4)
            grad_columns = torch.randn(logit_rows, few, generator=generator).to(device)
            def ours_columns_backward():  # the training step's pattern: the gradient of alphas only
                return torch.autograd.grad(torch.ops.alphanet.alpha_combine(logits, targets, neighbors, alphas_grad, 1),
                                           alphas_grad, grad_columns)
            def peer_columns_backward():
                return torch.autograd.grad(peer_combine_columns(logits, targets, neighbors, alphas_grad), alphas_grad,
                                           grad_columns)
            row("alpha_combine columns fwd+bwd", f"L {logit_rows}x{lines}, n={few}, k={k}", ours_columns_backward,
                peer_columns_backward, device, args.repeats, "autograd of peer", rates,
                2 * logit_rows * few * (k + 2) * 4)
        if "upload" in ops and "means" in size and device.startswith("cuda"):  # the fit's feature upload
            rows, dims, _ = size["means"]
            host = torch.ones(rows, dims).numpy()  # values do not matter to a copy; ones are quick to make
            def ours_upload():
                for _ in iter_row_chunks(host, "x", torch.device(device)):
                    pass
            row("upload host rows", f"{rows}x{dims} numpy float32", ours_upload,
                lambda: torch.from_numpy(host).to(device), device, args.repeats, "tensor.to (pageable)",
                uploaded_bytes=host.nbytes)
            del host
        if "step" in ops and "combine" in size:
            classes, dims, few, k, _ = size["combine"]
            step_rows(classes, dims, few, k, device, args.repeats, rates, generator)


if __name__ == "__main__":
    main()
