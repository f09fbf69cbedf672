"""Decode speed and state size against generated length: what recurrent layers buy at inference.

For each model (the 308M hybrid ``gggA x 6``, the same dims all-attention ``A x 24`` and all-GLA
``g x 24``; random bf16 weights), batch and length L, the decoding state is filled as if L tokens
had been generated, then the one-token step (``HybridLM.decode_step`` captured in a CUDA graph,
as ``titan_hybrid.generate`` runs it) is timed with CUDA events. Reported per case: ms per step,
state bytes at L (KV caches + recurrent states), and the memory bandwidth the step achieves,
(weight bytes + state bytes read) / time, against the GPU's (a measured device copy and the
datasheet figure). One JSON line per case to ``--out``; ``--plot`` draws latency and state
memory against length (one line per model and batch) from such a file, on any machine.

    python -m bench.decode --out decode.jsonl [--lengths 1024 4096 16384 65536] [--batches 1 16]
    python -m bench.decode --compile [max-autotune-no-cudagraphs] ...   # the step compiled, then captured
    python -m bench.decode --profile ...   # also where one replayed step's GPU time goes, per kernel family
    python -m bench.decode --blas cublaslt ...   # the GEMMs through cuBLASLt's heuristics
    python -m bench.decode --tilings bench/decode_tilings.json ...   # the step under each variant's GEMM tilings
    python -m bench.decode --plot decode.jsonl [compiled.jsonl ...] --png decode.png

With ``--compile`` each model first runs ``--parity-steps`` steps from one filled state: the eager
bf16 step, the compiled and captured one, and an fp32 copy of the model (the bf16 weights, upcast)
on an fp32 copy of the state, eager and compiled; each step's relative logit error against the fp32
eager one is recorded. Random weights and a random state make the bf16 steps ill-conditioned (GLA's
per-head output norm rescales small outputs; the errors reach tens of percent, eager as compiled),
so the compiled step is judged in fp32, where a wrong state update shows from the second step on.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import time
from unittest import mock

import torch

from titan_hybrid.models.hybrid import HybridLM, hybrid_flavors
from titan_hybrid.ops import decode_linear, gla

MODELS = {
    "hybrid 308M (gggA x6)": "gggA" * 6,
    "all-attention (A x24)": "A" * 24,
    "all-GLA (g x24)": "g" * 24,
}
# Datasheet HBM bandwidth (bytes/s) by device name substring.
DATASHEET_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def build(pattern: str) -> HybridLM:
    args = hybrid_flavors["308M"].replace(pattern=pattern, n_layers=len(pattern))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = HybridLM(args)
        model.init_weights()
    model = model.to(torch.bfloat16).eval()
    model.rope = model._rope(device="cuda")  # fp32, as generate loads it
    model.fuse_projections()
    return model


def fp32_copy(model: HybridLM) -> HybridLM:
    """The same (bf16-rounded) weights in fp32: the reference the bf16 steps are measured against."""
    with torch.device("cuda"):
        ref = HybridLM(model.model_args)
    ref.load_state_dict(model.state_dict())
    ref.eval().fuse_projections()
    return ref


def state_bytes(model: HybridLM, batch: int, length: int) -> int:
    """Bytes of the decoding state after ``length`` tokens (shapes only, on the meta device)."""
    dtype = torch.bfloat16
    states = [block.mixer.empty_state(batch, length, dtype, torch.device("meta")) for block, _ in model.unrolled()]
    return sum(t.numel() * t.element_size() for s in states for t in s.tensors())


def fill(state, length: int) -> None:
    """Random contents, as if ``length`` tokens had been decoded (the values do not change the speed)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for layer in state.layers:
        for t in layer.tensors():
            t.copy_(torch.randn(t.shape, generator=gen, device="cuda", dtype=torch.float32) * 0.1)
    state.positions.fill_(length)


@contextlib.contextmanager
def tilings(variant: dict):
    """The decode step under ``variant``'s tilings: ``{"linear": {"N": tiling}, "residual": {"K" or
    "K gated": tiling}}`` replace the tilings that ``decode_tiling(N)`` / ``residual_tiling(K, gated)``
    give the decode-GEMM launches of 16-bit inputs where named (an fp32 reference model keeps the
    shipped ones; a residual GEMM without split-K counters stays unsplit); ``"gla_step": {"block_v":
    BV}`` launches fla's GLA step kernel on state tiles at most ``BV`` columns wide (64: fla's own
    tiling; the ops' is ``gla.STEP_BLOCK_V``). A captured step keeps the tilings it was captured with."""
    linear = {int(n): t for n, t in variant.get("linear", {}).items()}
    residual = {(int(k.split()[0]), k.endswith("gated")): t for k, t in variant.get("residual", {}).items()}
    launch_linear, launch_swiglu = decode_linear.launch_decode_linear, decode_linear.launch_decode_swiglu
    launch_residual = decode_linear.launch_decode_residual
    block_v = variant.get("gla_step", {}).get("block_v", gla.STEP_BLOCK_V)

    def linear_variant(launch):
        def launch_variant(x, weight, *args, **tiling):
            if x.element_size() == 2:
                tiling = linear.get(weight.shape[0], tiling)
            return launch(x, weight, *args, **tiling)

        return launch_variant

    def residual_variant(x, weight, residual_in, norm_weight, gated=None, arrivals=None, **tiling):
        if x.element_size() == 2 and (x.shape[1], gated is not None) in residual:
            tiling = dict(residual[x.shape[1], gated is not None])
            tiling["split_k"] = tiling["split_k"] if arrivals is not None else 1
        return launch_residual(x, weight, residual_in, norm_weight, gated, arrivals, **tiling)

    with (
        mock.patch.object(decode_linear, "launch_decode_linear", linear_variant(launch_linear)),
        mock.patch.object(decode_linear, "launch_decode_swiglu", linear_variant(launch_swiglu)),
        mock.patch.object(decode_linear, "launch_decode_residual", residual_variant),
        mock.patch.object(gla, "STEP_BLOCK_V", block_v),
    ):
        yield


def copy_bandwidth() -> float:
    """Achieved device-to-device copy bandwidth (bytes read + written per second) on 2 GiB."""
    x = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * x.element_size() * 20 / (start.elapsed_time(end) / 1e3)


def step_parity(model: HybridLM, batch: int, length: int, steps: int, compile_mode: str) -> dict:
    """Per step, the relative logit error against the fp32 copy of the eager and of the compiled step."""
    from titan_hybrid.generate import DecodeStep

    ref = fp32_copy(model)
    state = model.empty_decode_state(batch, capacity=length + steps + 8)
    fill(state, length)
    ref_state = ref.empty_decode_state(batch, capacity=length + steps + 8)
    for dst, src in zip(ref_state.tensors(), state.tensors(), strict=True):
        dst.copy_(src)
    gen = torch.Generator(device="cuda").manual_seed(1)
    tokens = torch.randint(0, model.model_args.vocab_size, (steps, batch), device="cuda", generator=gen)
    saved, saved32 = state.snapshot(), ref_state.snapshot()
    torch._dynamo.reset()  # one compile per case: the models share decode_step's code object
    with torch.no_grad():
        expected = [ref.decode_step(t, ref_state).float() for t in tokens]
        eager = [model.decode_step(t, state).float() for t in tokens]
        state.restore(saved)
        step = DecodeStep(model, state, cuda_graph=True, compile_mode=compile_mode)
        compiled = [step(t).float().clone() for t in tokens]
        # The same in fp32: rounding is ~1e-7 there, so a wrong compiled step cannot hide in it.
        ref_state.restore(saved32)
        torch._dynamo.reset()
        step32 = DecodeStep(ref, ref_state, cuda_graph=True, compile_mode=compile_mode)
        compiled32 = [step32(t).float().clone() for t in tokens]
    rel = lambda a, b: float(f"{((a - b).norm() / b.norm()).item():.3g}")  # noqa: E731
    return {
        "parity_batch": batch, "parity_length": length,
        "eager_vs_fp32": [rel(a, b) for a, b in zip(eager, expected)],
        "compiled_vs_fp32": [rel(a, b) for a, b in zip(compiled, expected)],
        "fp32_compiled_vs_fp32_eager": [rel(a, b) for a, b in zip(compiled32, expected)],
    }  # fmt: skip


def profile_step(step, tokens: torch.Tensor, trace: str) -> str:
    """Prints the kernel families of 20 replayed steps (``bench.kernel_profile`` on a torch.profiler
    trace, saved to ``trace``, whose path it returns)."""
    import os
    from torch.profiler import ProfilerActivity, profile

    from bench import kernel_profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            step(tokens)
        torch.cuda.synchronize()
    os.makedirs(os.path.dirname(trace) or ".", exist_ok=True)
    prof.export_chrome_trace(trace)
    kernel_profile.main([trace, "--top", "15"])
    return trace


def time_steps(model: HybridLM, batch: int, length: int, steps: int, compile_mode: str | None,
               trace: str | None = None) -> dict:  # fmt: skip
    from titan_hybrid.generate import DecodeStep

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    # Room for every step replayed on it: the timed ones, 3 warm-ups and 20 profiled.
    state = model.empty_decode_state(batch, capacity=length + steps + 30)
    fill(state, length)
    tokens = torch.randint(0, model.model_args.vocab_size, (batch,), device="cuda")
    started = time.perf_counter()
    torch._dynamo.reset()
    step = DecodeStep(model, state, cuda_graph=True, compile_mode=compile_mode)
    capture_s = time.perf_counter() - started
    for _ in range(3):
        step(tokens)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step(tokens)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    read = weights + state.nbytes()
    return {
        "ms_per_step": ms,
        "tokens_per_s": batch * 1e3 / ms,
        "state_bytes": state_bytes(model, batch, length),
        "weight_bytes": weights,
        "bytes_read_per_step": read,
        "achieved_bandwidth": read / (ms / 1e3),
        "capture_s": capture_s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    } | ({"profile": profile_step(step, tokens, trace)} if trace else {})


def measure(cli: argparse.Namespace) -> int:
    import fla
    import triton

    device = torch.cuda.get_device_name()
    if cli.blas:
        torch.backends.cuda.preferred_blas_library(cli.blas)
    datasheet = next((bw for name, bw in DATASHEET_BANDWIDTH.items() if name in device), None)
    env = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "fla": fla.__version__,
           "copy_bandwidth": copy_bandwidth(), "datasheet_bandwidth": datasheet,
           "blas": str(torch.backends.cuda.preferred_blas_library()).split(".")[-1].lower()}  # fmt: skip
    print(json.dumps(env), flush=True)
    out = open(cli.out, "a") if cli.out else None
    variants = json.load(open(cli.tilings)) if cli.tilings else {"shipped": {}}
    for name in cli.models:
        model = build(MODELS[name])
        for variant, spec in variants.items() if cli.compile and cli.parity_steps else ():
            with tilings(spec):
                parity = step_parity(model, 16, 1024, cli.parity_steps, cli.compile)
            parity = {"model": name, "compile": cli.compile, **({"variant": variant} if cli.tilings else {}), **parity}
            print(json.dumps(parity), flush=True)
            if out:
                out.write(json.dumps(parity) + "\n")
        for (variant, spec), batch, length in itertools.product(variants.items(), cli.batches, cli.lengths):
            record = {"model": name, "batch": batch, "length": length, "compile": cli.compile, **env}
            record |= {"variant": variant, "tilings": spec} if cli.tilings else {}
            trace = f"{cli.profile}/{name.split()[0]}_B{batch}_L{length}.json" if cli.profile else None
            try:
                with tilings(spec):
                    record |= time_steps(model, batch, length, cli.steps, cli.compile, trace)
            except torch.OutOfMemoryError as e:
                record["error"] = f"out of memory: {str(e)[:200]}"
            bw = record.get("achieved_bandwidth")
            line = f"{name:24} B{batch:<3} L{length:<6} {'compiled ' if cli.compile else ''}" + (
                f"{record['ms_per_step']:.3f} ms/step  state {record['state_bytes'] / 2**20:10.1f} MiB  "
                f"{bw / 1e12:.2f} TB/s ({bw / env['copy_bandwidth']:.0%} of copy"
                + (f", {bw / datasheet:.0%} of datasheet)" if datasheet else ")")
                if bw else record["error"]
            ) + (f"  [{variant}]" if cli.tilings else "")  # fmt: skip
            print(line, flush=True)
            if out:
                out.write(json.dumps(record) + "\n")
                out.flush()
        del model
    if out:
        out.close()
    return 0


def plot(paths: list[str], png: str) -> None:
    """Eager (CUDA graph) rows as lines, the first per case (a sweep's file first); compiled
    (default mode, default BLAS) rows as stars, the newest per case. Rows marked ``"kept": false``
    (an experiment whose code was not kept) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [json.loads(line) for path in paths for line in open(path) if line.strip().startswith('{"model"')]
    timed = [r for r in timed if "ms_per_step" in r and r.get("kept", True)]
    eager: dict[tuple, dict] = {}
    for r in timed:
        if not r.get("compile"):
            eager.setdefault((r["model"], r["batch"], r["length"]), r)
    rows = list(eager.values())
    compiled = {
        (r["model"], r["batch"], r["length"]): r
        for r in timed
        if r.get("compile") == "default" and r.get("blas", "cublas") == "cublas"
    }
    fig, (ax_ms, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = dict(zip(MODELS, ["tab:blue", "tab:red", "tab:green"]))
    for name in MODELS:
        for batch, style in zip(sorted({r["batch"] for r in rows}), ["-o", "--s", ":^"]):
            pts = sorted((r["length"], r) for r in rows if r["model"] == name and r["batch"] == batch)
            if not pts:
                continue
            xs = [length for length, _ in pts]
            label = f"{name}, batch {batch}"
            ax_ms.plot(xs, [r["ms_per_step"] for _, r in pts], style, color=colors[name], label=label)
            ax_mem.plot(xs, [r["state_bytes"] / 2**30 for _, r in pts], style, color=colors[name], label=label)
            stars = sorted((r["length"], r["ms_per_step"]) for (m, b, _), r in compiled.items() if (m, b) == (name, batch))
            if stars:
                ax_ms.plot(*zip(*stars), "*", markersize=13, markeredgecolor="black", color=colors[name],
                           label=f"{label}, compiled step")
    for ax, title, unit in [(ax_ms, "time per decode step", "ms / step"), (ax_mem, "decoding state", "GiB")]:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens generated so far")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_ms.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # 6, not 6 x 10^0
    ax_ms.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax_ms.legend(fontsize=7)
    device = rows[0]["device"] if rows else ""
    fig.suptitle(f"titan-hybrid decoding, 308M dims, bf16, CUDA graph, {device}")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384, 65536])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per case")
    parser.add_argument("--compile", nargs="?", const="default", choices=["default", "max-autotune-no-cudagraphs"],
                        help="torch.compile the step (in this mode) before capturing it")
    parser.add_argument("--blas", choices=["cublas", "cublaslt"],
                        help="torch.backends.cuda.preferred_blas_library for the GEMMs (default: torch's choice)")
    parser.add_argument("--parity-steps", type=int, default=8,
                        help="steps of the compiled-vs-fp32 check, per model and tiling variant (0: none)")
    parser.add_argument("--profile", metavar="DIR", help="also profile 20 replayed steps per case, traces in DIR")
    parser.add_argument("--tilings", metavar="JSON",
                        help="time each case under each variant's decode-GEMM tilings (see tilings())")
    parser.add_argument("--out", help="append one JSON line per case")
    parser.add_argument("--plot", metavar="JSONL", nargs="+", help="draw results files instead of measuring")
    parser.add_argument("--png", default="decode.png")
    cli = parser.parse_args()
    if cli.plot:
        plot(cli.plot, cli.png)
        return 0
    assert torch.cuda.is_available(), "measuring needs a CUDA GPU (--plot does not)"
    return measure(cli)


if __name__ == "__main__":
    sys.exit(main())
