"""One attention layer's decode step over a long KV cache: which formulation reads it fastest.

The step is memory-bound (one query per head against the whole cache), so each variant is
reported as the bandwidth it achieves on the cache's bytes, against a device copy. Variants:
``sdpa_gqa`` (``F.scaled_dot_product_attention`` with ``enable_gqa`` and a boolean mask: what
``Attention.step`` runs), ``sdpa_grouped`` (the group's query heads as queries of their KV head)
and ``matmul/N`` (explicit matmuls: GQA groups as one block, softmax, split-K over N-key
slices). One JSON line each.

    python -m bench.decode_attention [--batch 16] [--length 65536] [--out FILE]
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
import torch.nn.functional as F



def split_k_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, split: int):
    """``q [B, H, 1, D]`` over ``k, v [B, KV, S, D]``: one ``[G, D]`` block per KV group, the
    probabilities x values product summed over ``split``-key slices in parallel."""
    B, H, _, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    q = q.reshape(B, KV, H // KV, D) * D**-0.5
    p = (q @ k.transpose(-1, -2)).masked_fill(~valid[:, None, None, :], float("-inf")).softmax(dim=-1)
    n = S // split
    return (p.unflatten(-1, (n, split)).transpose(2, 3) @ v.unflatten(2, (n, split))).float().sum(dim=2)


def timed(fn, reps: int = 50) -> float:
    """Mean ms per call, CUDA-graph replayed (as the decode step runs)."""
    for _ in range(3):
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--out")
    cli = parser.parse_args()
    B, H, KV, D = cli.batch, cli.heads, cli.kv_heads, cli.head_dim
    S = -(-(cli.length + 64) // 4096) * 4096  # capacity, a multiple of every split below
    kw = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(B, H, 1, D, **kw)
    k, v = torch.randn(B, KV, S, D, **kw), torch.randn(B, KV, S, D, **kw)
    valid = torch.arange(S, device="cuda") <= cli.length
    valid = valid.expand(B, S).contiguous()
    cache_bytes = 2 * k.numel() * k.element_size()
    x = torch.empty(2**30, **kw)
    copy_ms = timed(lambda: x.clone())
    copy_bw = 2 * x.numel() * x.element_size() / (copy_ms / 1e3)
    del x

    mask = valid[:, None, None, :]
    variants = {f"matmul/{n}": functools.partial(split_k_attention, q, k, v, valid, n) for n in (256, 512, 1024, 4096)}
    variants["sdpa_gqa"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    grouped = q.reshape(B, KV, H // KV, D)
    variants["sdpa_grouped"] = lambda: F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask)
    ref = variants["sdpa_gqa"]().float().reshape(B, H, D)
    out = open(cli.out, "a") if cli.out else None
    for name, fn in variants.items():
        err = ((fn().float().reshape(B, H, D) - ref).norm() / ref.norm()).item()
        ms = timed(fn)
        record = {"variant": name, "batch": B, "length": cli.length, "slots": S, "ms": ms,
                  "bandwidth": cache_bytes / (ms / 1e3), "copy_bandwidth": copy_bw, "rel_err_vs_sdpa": err,
                  "device": torch.cuda.get_device_name()}  # fmt: skip
        print(f"{name:14} {ms:.3f} ms  {record['bandwidth'] / 1e12:.2f} TB/s ({record['bandwidth'] / copy_bw:.0%} "
              f"of copy)  rel err {err:.1e}", flush=True)  # fmt: skip
        if out:
            out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
