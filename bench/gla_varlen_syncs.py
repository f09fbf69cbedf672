"""fla's GLA chunk op on packed documents: host syncs and time per micro-batch (forward + backward),
with fla's state-split counts read from the device (its ``.item()``) or counted on the host
(``titan_hybrid.ops.fla_host_splits``, switched by ``TITAN_HYBRID_HOST_SPLITS``), and with the
micro-batch's documents found from the device ``resets`` or handed over from the host
(``HostDocuments``, as the trainer does).

    python -m bench.gla_varlen_syncs [--layers 18] [--batch 8] [--seq 4096] [--mean-doc 1000] [--repeats 5]

One micro-batch of the 308M model's GLA layers (16 heads of 64, bf16, fp32 log decays) through
``titan_hybrid.ops.gla.chunk_gla`` (the training custom op), ``--layers`` calls forward then
backward, as a step runs them. Each run is a new micro-batch (a fresh ``resets`` tensor: nothing
found for the last one is reused). Syncs are counted with ``torch.cuda.set_sync_debug_mode`` (one
warning per synchronising call); outputs and gradients of the modes are compared bit for bit.
Needs a CUDA GPU and fla.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch

from titan_hybrid.ops.common import HostDocuments, host_cu_seqlens
from titan_hybrid.ops.gla import chunk_gla


def documents(batch: int, seq: int, mean: float, gen: torch.Generator) -> torch.Tensor:
    """``resets [batch, seq]``: documents of exponential lengths (mean ``mean`` tokens) packed in rows."""
    resets = torch.zeros(batch, seq, dtype=torch.bool)
    for row in resets:
        at = 0
        while at < seq:
            row[at] = True
            at += 1 + int(torch.empty(1).exponential_(1 / mean, generator=gen))
    return resets


def run(inputs: list[torch.Tensor], resets: torch.Tensor, layers: int, documents: HostDocuments | None) -> list[torch.Tensor]:
    """One micro-batch: ``layers`` forwards, then the backward through all of them; returns outputs
    and input grads. ``documents``: bound to the micro-batch's resets first, as the model's forward does."""
    resets = resets.clone()  # a new micro-batch: its documents are found (or bound) again
    if documents is not None:
        documents.bind(resets)
    outputs = [chunk_gla(*inputs, resets=resets) for _ in range(layers)]
    sum(o.float().square().mean() for o in outputs).backward()
    grads = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    return [outputs[-1].detach(), *grads]


def measure(inputs: list[torch.Tensor], resets: torch.Tensor, layers: int, repeats: int, host_splits: bool,
            documents: HostDocuments | None) -> dict:  # fmt: skip
    os.environ["TITAN_HYBRID_HOST_SPLITS"] = "1" if host_splits else "0"
    run(inputs, resets, layers, documents)  # warm-up (autotuning on the first call)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        result = run(inputs, resets, layers, documents)
        torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(inputs, resets, layers, documents)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"host_splits": host_splits, "host_documents": documents is not None, "syncs": syncs,
            "ms": [round(t * 1e3, 2) for t in times], "ms_median": round(sorted(times)[len(times) // 2] * 1e3, 2),
            "result": result}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--mean-doc", type=float, default=1000.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="append one JSON line per mode")
    cli = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    B, T, H, D = cli.batch, cli.seq, cli.heads, cli.head_dim
    resets = documents(B, T, cli.mean_doc, gen).cuda()
    q, k, v = (torch.randn(B, T, H, D, generator=gen).cuda().bfloat16() for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, generator=gen)).cuda() / 16
    inputs = [x.requires_grad_() for x in (q, k, v, g)]
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "documents": int(resets.sum()),
           "shape": [B, T, H, D], "layers": cli.layers}  # fmt: skip
    host_documents = HostDocuments(host_cu_seqlens(resets.cpu()))  # what the trainer finds from the loader's positions
    results = []
    for host_splits, handed_over in ((False, None), (True, None), (True, host_documents)):  # each row as it is measured
        row = measure(inputs, resets, cli.layers, cli.repeats, host_splits, handed_over)
        results.append(row.pop("result"))
        emit({**env, **row}, cli.out)
    identical = all(torch.equal(a, b) for other in results[1:] for a, b in zip(results[0], other))
    emit({**env, "bitwise_equal_outputs_and_grads": identical}, cli.out)


def emit(record: dict, out: str | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
