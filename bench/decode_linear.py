"""The decode step's GEMMs at batch 1 and 16: cuBLAS (``F.linear``) against ``decode_linear_kernel``
over a sweep of its tilings, each timed as a CUDA graph of ``--layers`` calls on as many distinct
weights (a model's layers: nothing stays in L2), and the 308M layer's four GEMMs in sequence.

    python -m bench.decode_linear [--out decode_linear.jsonl]
    python -m bench.decode_linear --check                              # on the GPU
    TRITON_INTERPRET=1 python -m bench.decode_linear --check --device cpu  # without one (fp32)

Prints, per shape and batch, cuBLAS, the best tiling and its bandwidth (weight bytes / time), and
the residual GEMMs' best tilings (split-K; GLA's gated heads in the output projection's prologue).
``--check`` runs every decode kernel (segments, pre-norm, log-decay, residual, split-K, gated
heads, SwiGLU, one K tile a CTA; bf16 and fp32) against its PyTorch path and exits non-zero on a
mismatch.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F

from bench.decode_attention import timed
from titan_hybrid.ops.decode_linear import (
    SUMSQ_BLOCK,
    PreNormed,
    decode_linear_residual_torch,
    decode_linear_torch,
    decode_swiglu_torch,
    launch_decode_linear,
    launch_decode_residual,
    launch_decode_swiglu,
    residual_tiling,
    rstd_of,
    segment_bounds,
)

# (name, N, K) of the 308M model's decode GEMMs (dim 1024, GLA expand 1, SwiGLU 2048).
SHAPES = [
    ("GLA q/k/v/gates/decay", 5120, 1024),
    ("attention q/k/v", 1536, 1024),
    ("output projection", 1024, 1024),
    ("SwiGLU W1/W3", 4096, 1024),
    ("SwiGLU W2", 1024, 2048),
    ("tied output head", 49152, 1024),
]
# (name, N, K, gated heads) of the residual GEMMs.
RESIDUAL_SHAPES = [("output projection", 1024, 1024, True), ("output projection", 1024, 1024, False),
                   ("SwiGLU W2", 1024, 2048, False)]  # fmt: skip
RESIDUAL_TILINGS = [
    dict(block_k=k, num_warps=w, num_stages=s, split_k=split)
    for k, w, s, split in itertools.product((128, 256), (2, 4), (3, 5), (1, 2, 4, 8))
]
TILINGS = [
    dict(block_n=n, block_k=k, num_warps=w, num_stages=s)
    for n, k, w, s in itertools.product((16, 32, 64), (128, 256), (2, 4), (3, 5))
]


def graph_ms(calls) -> float:
    """Milliseconds per CUDA-graph replay of ``calls``, each run once."""
    return timed(lambda: [call() for call in calls])


def check_kernels(device: str) -> list[str]:
    """Each kernel against its PyTorch path at 1, 5 and 16 rows, in bf16 and fp32 (``--check``):
    the mismatches, as lines to print (none: all agree). On the CPU fp32 only: Triton 3.6's
    interpreter has no bf16 arithmetic."""
    failures = []
    K, widths = 256, [64, 32, 64, 48]
    dtypes = (torch.float32,) if device == "cpu" else (torch.bfloat16, torch.float32)
    for dtype, M in itertools.product(dtypes, (1, 5, 16)):
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        rand = lambda *shape: torch.randn(*shape, device=device).to(dtype)  # noqa: E731
        norm = torch.nn.RMSNorm(K, eps=1e-6, device=device, dtype=dtype)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        stream = PreNormed.of(rand(M, 1, K), norm)
        x, scaled = stream.x.view(M, K), stream.scaled.view(M, K)
        rstd = rstd_of(stream.sumsq, K, stream.eps)
        weight, bias, bounds = rand(sum(widths), K) / K**0.5, rand(widths[-1]), segment_bounds(widths, device)
        hidden, w2, residual = rand(M, 2 * K), rand(K, 2 * K) / (2 * K) ** 0.5, rand(M, K)
        gated = (rand(M, 2 * K), torch.rand(64, device=device).to(dtype) + 0.5, 1e-6)  # GLA's gate, 64-wide heads
        arrivals = torch.zeros(K // SUMSQ_BLOCK, dtype=torch.int32, device=device)
        whole_k = dict(block_n=16, block_k=K, num_warps=4, num_stages=1)
        cases = {
            "segments": (launch_decode_linear(x, weight, bounds), decode_linear_torch(x, weight, widths)),
            "pre-norm + log-decay": (
                launch_decode_linear(scaled, weight, bounds, stream.sumsq, stream.eps, (bias, 0.5)),
                decode_linear_torch(scaled, weight, widths, rstd, (bias, 0.5)),
            ),
            "residual": (launch_decode_residual(hidden, w2, residual, None),
                         decode_linear_residual_torch(hidden, w2, residual, None)),  # fmt: skip
            "residual + next norm": (launch_decode_residual(hidden, w2, residual, norm.weight),
                                     decode_linear_residual_torch(hidden, w2, residual, norm.weight)),  # fmt: skip
            "split-K residual + next norm": (
                launch_decode_residual(hidden, w2, residual, norm.weight, arrivals=arrivals, split_k=2),
                decode_linear_residual_torch(hidden, w2, residual, norm.weight),
            ),
            "gated heads + split-K residual": (
                launch_decode_residual(hidden, w2, residual, None, gated, arrivals, split_k=4, block_k=128),
                decode_linear_residual_torch(hidden, w2, residual, None, gated),
            ),
            "gated heads + residual + next norm": (
                launch_decode_residual(hidden, w2, residual, norm.weight, gated),
                decode_linear_residual_torch(hidden, w2, residual, norm.weight, gated),
            ),
            "SwiGLU": ((launch_decode_swiglu(scaled, weight[:200], stream.sumsq, stream.eps),),
                       (decode_swiglu_torch(scaled, weight[:200], rstd),)),  # fmt: skip
            # One K tile a CTA: all of its weights loaded before it waits for the kernel before it.
            "pre-norm + log-decay, one K tile": (
                launch_decode_linear(scaled, weight, bounds, stream.sumsq, stream.eps, (bias, 0.5), **whole_k),
                decode_linear_torch(scaled, weight, widths, rstd, (bias, 0.5)),
            ),
            "SwiGLU, one K tile": ((launch_decode_swiglu(scaled, weight[:200], stream.sumsq, stream.eps, **whole_k),),
                                   (decode_swiglu_torch(scaled, weight[:200], rstd),)),  # fmt: skip
            "split-K residual + next norm, one K tile a split": (
                launch_decode_residual(hidden, w2, residual, norm.weight, arrivals=arrivals, split_k=2, block_k=K,
                                       num_warps=4, num_stages=1),  # fmt: skip
                decode_linear_residual_torch(hidden, w2, residual, norm.weight),
            ),
            "gated heads + residual + next norm, one K tile": (
                launch_decode_residual(hidden, w2, residual, norm.weight, gated, block_k=2 * K, num_warps=8,
                                       num_stages=1),  # fmt: skip
                decode_linear_residual_torch(hidden, w2, residual, norm.weight, gated),
            ),
        }
        if arrivals.any():
            failures.append(f"split-K {dtype} M={M}: arrival counters not left at zero")
        for name, (got, want) in cases.items():
            for g, w in zip(got, want, strict=True):
                error = ((g.float() - w.float()).norm() / w.float().norm()).item() if w.numel() else 0.0
                if g.shape != w.shape or not error <= tol:
                    failures.append(f"{name} {dtype} M={M}: relative error {error:.2e}, shapes {g.shape} / {w.shape}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--check", action="store_true", help="check the kernels against their PyTorch paths, then exit")
    parser.add_argument("--residual", action="store_true", help="only the residual GEMMs' sweep")
    parser.add_argument("--device", default="cuda", help="--check on this device (cpu: under TRITON_INTERPRET=1)")
    cli = parser.parse_args()
    torch.manual_seed(0)
    if cli.check:
        failures = check_kernels(cli.device)
        print("\n".join(failures) or "decode kernels match their PyTorch paths", flush=True)
        return 1 if failures else 0
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    records = []
    best = {}
    for (name, N, K), M in itertools.product([] if cli.residual else SHAPES, (16, 1)):
        copies = 4 if N * K > 2**26 else cli.layers  # the head: 4 x 100 MB already spill L2
        weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5 for _ in range(copies)]
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        bounds = torch.zeros(1, dtype=torch.int32, device="cuda")
        expected = F.linear(x, weights[0]).float()
        cublas = graph_ms([lambda w=w: F.linear(x, w) for w in weights]) / copies
        timed = []
        for tiling in TILINGS:
            got = launch_decode_linear(x, weights[0], bounds, **tiling)[0].view(M, N).float()
            error = ((got - expected).norm() / expected.norm()).item()
            if error > 1e-2:
                raise SystemExit(f"{name} M={M} {tiling}: relative error {error:.2e} against F.linear")
            ms = graph_ms([lambda w=w: launch_decode_linear(x, w, bounds, **tiling) for w in weights]) / copies
            timed.append((ms, tiling))
        ms, tiling = min(timed, key=lambda t: t[0])
        best[(name, M)] = tiling
        gbytes = N * K * 2 / 1e9
        record = {"shape": name, "N": N, "K": K, "M": M, "cublas_us": cublas * 1e3, "kernel_us": ms * 1e3,
                  "tiling": tiling, "kernel_TBps": gbytes / ms, "cublas_TBps": gbytes / cublas, **env}  # fmt: skip
        records.append(record)
        print(f"{name:24} M={M:<2} cuBLAS {cublas * 1e3:6.2f} us ({gbytes / cublas:4.2f} TB/s)  kernel "
              f"{ms * 1e3:6.2f} us ({gbytes / ms:4.2f} TB/s)  {tiling}", flush=True)  # fmt: skip
    # The residual GEMMs (output projection, W2: 1024 columns, 64 column blocks): split-K and
    # tiling, the output projection also with GLA's gated heads in its prologue.
    for (name, N, K, gated), M in itertools.product(RESIDUAL_SHAPES, (16, 1)):
        weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5 for _ in range(cli.layers)]
        rand = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16)  # noqa: E731
        x, residual = rand(M, K), rand(M, N)
        gate = (rand(M, K), torch.ones(64, device="cuda", dtype=torch.bfloat16), 1e-6) if gated else None
        arrivals = torch.zeros(N // SUMSQ_BLOCK, dtype=torch.int32, device="cuda")
        timed = []
        for tiling in RESIDUAL_TILINGS:
            run = lambda w, t=tiling: launch_decode_residual(x, w, residual, None, gate, arrivals, **t)  # noqa: E731
            timed.append((graph_ms([lambda w=w: run(w) for w in weights]) / cli.layers, tiling))
        kept = [t for t in timed if t[1] == residual_tiling(K, gated)]
        for ms, tiling in sorted(timed, key=lambda t: t[0])[:3] + kept:
            record = {"shape": f"{name} + residual", "gated_heads": gated, "N": N, "K": K, "M": M, "tiling": tiling,
                      "kernel_us": ms * 1e3, "kernel_TBps": N * K * 2 / 1e9 / ms, **env}  # fmt: skip
            records.append(record)
            print(f"{name + (' (gated)' if gated else '') + ' + residual':36} M={M:<2} {ms * 1e3:6.2f} us "
                  f"({record['kernel_TBps']:4.2f} TB/s)  {tiling}", flush=True)  # fmt: skip
    # One GLA layer's four GEMMs, in sequence over the layers, each with its best tiling.
    layer = [s for s in SHAPES if s[0] not in ("attention q/k/v", "tied output head")]
    for M in () if cli.residual else (16, 1):
        mats = [[torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _, N, K in layer] for _ in range(cli.layers)]
        xs = {K: torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for K in {K for _, _, K in layer}}
        bounds = torch.zeros(1, dtype=torch.int32, device="cuda")
        shapes = [(name, K) for name, _, K in layer]
        cublas = graph_ms([lambda w=w, K=K: F.linear(xs[K], w) for ws in mats for w, (_, K) in zip(ws, shapes)])
        ours = graph_ms([lambda w=w, K=K, t=best[(n, M)]: launch_decode_linear(xs[K], w, bounds, **t)
                         for ws in mats for w, (n, K) in zip(ws, shapes)])  # fmt: skip
        record = {"shape": f"GLA layer's 4 GEMMs x {cli.layers}", "M": M, "cublas_us": cublas * 1e3,
                  "kernel_us": ours * 1e3, **env}  # fmt: skip
        records.append(record)
        print(f"GLA layer's 4 GEMMs x{cli.layers} M={M}: cuBLAS {cublas * 1e3:.1f} us, kernel {ours * 1e3:.1f} us")
    if cli.out:
        with open(cli.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
