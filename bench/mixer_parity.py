"""GPU check: fla's kernels against the CPU PyTorch paths, same inputs (and same model weights).

Training kernels: for each sequence mixer (gla, gated_delta, gdn2, gdn2_kla), kernel input dtype
(log decays stay fp32, as the layers pass them) and with/without packed
documents (``resets`` -> fla ``cu_seqlens``), runs the op on CUDA and on CPU in
fp32 and reports the relative error ||gpu - cpu|| / ||cpu|| of the output and
of every input gradient; then the hybrid model's logits per layer pattern
(bf16 autocast or fp32 on GPU vs fp32 on CPU, forward only). A ``*_compiled`` mixer runs the op
(fla's kernels as ``torch.library`` custom ops) under ``torch.compile(fullgraph=True)``, which fails
if anything breaks the graph, and also reports its errors against fla's own public function (its
autograd Function, eager) on the same GPU inputs, as ``o_fla``, ``dq_fla``, ...: the same kernels.

Decoding kernels (``decode`` cases): the chunk kernel's prefill with its final state, then
fla's ``fused_recurrent_*`` kernels one token at a time, against the CPU paths (outputs and final
state); and per pattern the model's prefill + CUDA-graph decode steps (``titan_hybrid.generate``'s
``DecodeStep``, weights cast to the dtype and projections fused as ``generate`` does) against CPU fp32 logits. Prints a Markdown
table, writes one JSON line per case to ``--out``, and exits non-zero if an
error exceeds the tolerance (fp32 kernels use TF32 dots: 2e-3; bf16: 2e-2).

Gated DeltaNet gradients that fla refuses on Hopper with Triton >= 3.4, < 3.7.1
(fla issue #640) are reported as refused, not as failures. Each new (mixer,
dtype, head size) costs a Triton autotune of minutes; keep TRITON_CACHE_DIR.
Needs a CUDA GPU and fla.
    python -m bench.mixer_parity --out parity.jsonl [--mixers ...] [--dtypes ...] [--shapes ...] [--patterns ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import traceback
from collections.abc import Callable

import fla
import torch
import torch.nn.functional as F
import triton
from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gated_delta_rule
from fla.ops.gdn2 import chunk_gdn2 as fla_chunk_gdn2
from fla.ops.gla import chunk_gla as fla_chunk_gla

from titan_hybrid.models.hybrid import HybridLM, hybrid_flavors
from titan_hybrid.generate import DecodeStep
from titan_hybrid.ops.common import call_fla
from titan_hybrid.ops.gated_delta import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from titan_hybrid.ops.gdn2 import (
    chunk_gdn2,
    chunk_gdn2_kla,
    fused_recurrent_gdn2,
    fused_recurrent_gdn2_kla,
    kaczmarz_gates,
)
from titan_hybrid.ops.gla import chunk_gla, fused_recurrent_gla

TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 2e-2}
REFUSED = "refused (fla #640)"
# Inputs that stay fp32 on the GPU whatever the kernel dtype: the log decays.
FP32_INPUTS = {"g"}


def _decay(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return F.logsigmoid(torch.randn(*shape, generator=gen)) / 4


def _gate(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).sigmoid()


def _inputs(mixer: str, B: int, T: int, H: int, K: int, V: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Named fp32 CPU inputs, in the op's argument order."""
    x = {"q": torch.randn(B, T, H, K, generator=gen), "k": torch.randn(B, T, H, K, generator=gen),
         "v": torch.randn(B, T, H, V, generator=gen)}
    if mixer == "gla":
        return {**x, "g": _decay(B, T, H, K, gen=gen)}
    if mixer == "gated_delta":
        return {**x, "g": _decay(B, T, H, gen=gen), "beta": _gate(B, T, H, gen=gen)}
    x = {**x, "g": _decay(B, T, H, K, gen=gen), "b": _gate(B, T, H, K, gen=gen), "w": _gate(B, T, H, V, gen=gen)}
    if mixer == "gdn2":
        return x
    return {**x, "eta": _gate(B, T, H, gen=gen)}  # gdn2_kla: raw keys, as the layer feeds them


# The public ops dispatch on device: fla on CUDA tensors, the PyTorch path on CPU ones.
# The delta-rule layers L2-normalise q and k, so the ops run that way here too.
OPS: dict[str, Callable[..., torch.Tensor]] = {
    "gla": chunk_gla,
    "gated_delta": functools.partial(chunk_gated_delta_rule, use_qk_l2norm=True),
    "gdn2": functools.partial(chunk_gdn2, use_qk_l2norm=True),
    "gdn2_kla": chunk_gdn2_kla,
}
# fla's kernels are torch.library custom ops: each training call compiles as one graph.
OPS |= {f"{mixer}_compiled": op for mixer, op in OPS.items()}


def _fla_kla(*x: torch.Tensor, resets: torch.Tensor | None = None) -> torch.Tensor:
    """``chunk_gdn2_kla`` through fla's public ``chunk_gdn2``."""
    q, k, v, g, b, w, eta = x
    return call_fla(fla_chunk_gdn2, q, k, v, g, *kaczmarz_gates(k, b, w, eta), resets=resets)


# fla's public functions (their own autograd Functions, kept out of torch.compile) on the same inputs.
FLA_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "gla": functools.partial(call_fla, fla_chunk_gla),
    "gated_delta": functools.partial(call_fla, fla_chunk_gated_delta_rule, use_qk_l2norm_in_kernel=True),
    "gdn2": functools.partial(call_fla, fla_chunk_gdn2, use_qk_l2norm_in_kernel=True),
    "gdn2_kla": _fla_kla,
}


# (prefill with final state, one-token decode from that state) per mixer.
DECODE_OPS: dict[str, tuple[Callable[..., tuple[torch.Tensor, torch.Tensor]], Callable[..., torch.Tensor]]] = {
    "gla": (functools.partial(chunk_gla, output_final_state=True), fused_recurrent_gla),
    "gated_delta": (
        functools.partial(chunk_gated_delta_rule, use_qk_l2norm=True, output_final_state=True),
        functools.partial(fused_recurrent_gated_delta_rule, use_qk_l2norm=True),
    ),
    "gdn2": (
        functools.partial(chunk_gdn2, use_qk_l2norm=True, output_final_state=True),
        functools.partial(fused_recurrent_gdn2, use_qk_l2norm=True),
    ),
    "gdn2_kla": (functools.partial(chunk_gdn2_kla, output_final_state=True), fused_recurrent_gdn2_kla),
}
DECODE_STEPS = 16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def op_case(mixer: str, B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype, with_resets: bool) -> dict:
    base = mixer.removesuffix("_compiled")
    gen = torch.Generator().manual_seed(B * T + H)
    inputs = _inputs(base, B, T, H, K, V, gen)
    do = torch.randn(B, T, H, V, generator=gen)
    resets = None
    if with_resets:
        resets = torch.zeros(B, T, dtype=torch.bool)
        resets[:, [T // 3, T // 3 + 1, T // 2 + 7]] = True
    op = OPS[mixer]
    cpu_in = {n: x.clone().requires_grad_() for n, x in inputs.items()}
    o_cpu = op(*cpu_in.values(), resets=resets)
    (o_cpu * do).sum().backward()

    def on_gpu(op: Callable[..., torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        x = {n: t.to("cuda", torch.float32 if n in FP32_INPUTS else dtype).requires_grad_() for n, t in inputs.items()}
        return x, op(*x.values(), resets=None if resets is None else resets.cuda())

    compiled = mixer != base
    if compiled:
        torch._dynamo.reset()  # past its recompile limit Dynamo would quietly run the op eagerly
    gpu_in, o_gpu = on_gpu(torch.compile(op, fullgraph=True) if compiled else op)
    # What the GPU run is compared with: the CPU path, and for a compiled op fla's own function.
    refs = {"": (cpu_in, o_cpu)} | ({"_fla": on_gpu(FLA_OPS[base])} if compiled else {})
    errs: dict[str, float | str] = {f"o{suffix}": rel_err(o_gpu, o) for suffix, (_, o) in refs.items()}
    gpu_outputs = [o_gpu] + [out for suffix, (_, out) in refs.items() if suffix]  # the CPU backward ran above
    try:
        for o in gpu_outputs:
            (o.float() * do.cuda()).sum().backward()
    except RuntimeError as e:
        if "#640" not in str(e):
            raise
        return errs | {f"d{n}{suffix}": REFUSED for suffix in refs for n in inputs}
    return errs | {f"d{n}{suffix}": rel_err(gpu_in[n].grad, x[n].grad) for suffix, (x, _) in refs.items() for n in x}


def decode_case(mixer: str, B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype, with_resets: bool) -> dict:
    """Prefill T - 16 tokens (left-padded rows as documents with ``resets``), decode 16."""
    gen = torch.Generator().manual_seed(B * T + H + 1)
    inputs = _inputs(mixer, B, T, H, K, V, gen)
    split = T - DECODE_STEPS
    resets = None
    if with_resets:  # row b's prompt starts at 37 * b: the padding before it is its own document
        resets = torch.zeros(B, split, dtype=torch.bool)
        resets[torch.arange(B), 37 * torch.arange(B)] = True
    prefill, step = DECODE_OPS[mixer]

    def run(device: str, kernel_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        x = [t.to(device, torch.float32 if n in FP32_INPUTS else kernel_dtype) for n, t in inputs.items()]
        o, state = prefill(*(t[:, :split] for t in x), resets=None if resets is None else resets.to(device))
        outs = [o] + [step(*(t[:, i : i + 1] for t in x), state) for i in range(split, T)]
        return torch.cat(outs, dim=1), state

    with torch.no_grad():
        o_gpu, state_gpu = run("cuda", dtype)
        o_cpu, state_cpu = run("cpu", torch.float32)
    return {
        "o_prefill": rel_err(o_gpu[:, :split], o_cpu[:, :split]),
        "o_decode": rel_err(o_gpu[:, split:], o_cpu[:, split:]),
        "state": rel_err(state_gpu, state_cpu),
    }


def model_decode_case(pattern: str, dtype: torch.dtype) -> dict:
    """Two left-padded prompts (300 and 170 tokens), 16 decoded tokens: logits GPU vs CPU fp32."""
    args = hybrid_flavors["debug"].replace(
        dim=256, n_heads=4, n_kv_heads=2, vocab_size=1024, pattern=pattern, n_layers=len(pattern),
        attn_sink=True, rope_dims=32, attn_window=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model = HybridLM(args)
    model.init_weights()
    model.eval()
    lengths = torch.tensor([300, 170])
    tokens = torch.randint(0, args.vocab_size, (2, 300 + DECODE_STEPS))
    prompts = tokens[:, :300].clone()
    prompts[1] = torch.cat([torch.zeros(130, dtype=torch.long), tokens[1, :170]])
    new = torch.stack([tokens[0, 300:], tokens[1, 170 : 170 + DECODE_STEPS]], dim=1)  # [steps, B]

    def run(m: HybridLM, device: str, graph: bool) -> torch.Tensor:
        logits, state = m.prefill(prompts.to(device), lengths.to(device), capacity=300 + DECODE_STEPS)
        step = DecodeStep(m, state, cuda_graph=graph)
        return torch.stack([logits] + [step(t.to(device)).clone() for t in new[:-1]])

    ref = run(model, "cpu", graph=False)
    gpu_model = HybridLM(args).cuda()
    gpu_model.load_state_dict(model.state_dict())
    gpu_model = gpu_model.to(dtype).eval()
    gpu_model.rope = gpu_model._rope(device="cuda")
    gpu_model.fuse_projections()  # as generate does: the decode GEMMs with the blocks' norms and residuals
    out = run(gpu_model, "cuda", graph=True)
    return {"logits_prefill": rel_err(out[0], ref[0]), "logits_decode": rel_err(out[1:], ref[1:])}


def model_case(pattern: str, dtype: torch.dtype) -> dict:
    # Head dims 64, as in the 308M model, so the kernels' tuned configs are shared.
    args = hybrid_flavors["debug"].replace(
        dim=256, n_heads=4, n_kv_heads=2, vocab_size=1024, pattern=pattern, n_layers=len(pattern)
    )
    torch.manual_seed(0)
    model = HybridLM(args)
    model.init_weights()
    tokens = torch.randint(0, args.vocab_size, (2, 300))
    positions = torch.cat([torch.arange(120), torch.arange(180)]).expand(2, -1)
    with torch.no_grad():
        ref = model(tokens, positions)
        gpu_model = HybridLM(args).cuda()
        gpu_model.load_state_dict(model.state_dict())
        gpu_model.rope = gpu_model._rope(device="cuda")
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = gpu_model(tokens.cuda(), positions.cuda())
    return {"logits": rel_err(out, ref)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixers", nargs="*", default=list(OPS), choices=list(OPS),
                        help="mixers whose training kernels (forward + backward) to compare (none: skip)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--shapes", nargs="+", default=["2,1000,4,64,64"],
                        help="B,T,H,K,V per op case (each new K/V/dtype costs a Triton autotune)")
    parser.add_argument("--patterns", nargs="*", default=["gggA", "dddA", "222A", "kkkA"],
                        help="hybrid-model layer patterns to compare (none: skip the model cases)")
    parser.add_argument("--decode", nargs="*", default=list(DECODE_OPS), choices=list(DECODE_OPS),
                        help="mixers whose prefill + recurrent decode kernels to compare (none: skip)")
    parser.add_argument("--decode-patterns", nargs="*", default=["gggA", "222A", "kkkA"],
                        help="patterns whose model prefill + CUDA-graph decoding to compare (none: skip)")
    parser.add_argument("--out", help="append one JSON line per case to this file")
    cli = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench.mixer_parity compares fla's CUDA kernels with the CPU paths: it needs a CUDA GPU, "
                 "and torch.cuda.is_available() is False here")  # fmt: skip
    env = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fla": fla.__version__,
    }
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    shapes = [tuple(int(x) for x in s.split(",")) for s in cli.shapes]
    cases = []  # (record without results, thunk)
    for dtype in (getattr(torch, d) for d in cli.dtypes):
        for mixer in cli.mixers:
            for shape in shapes:
                for resets in (False, True):
                    record = {"case": "op", "mixer": mixer, "shape": shape, "dtype": str(dtype)[6:], "resets": resets}
                    cases.append((record, dtype, functools.partial(op_case, mixer, *shape, dtype, resets)))
        for pattern in cli.patterns:
            record = {"case": "model", "mixer": pattern, "shape": (2, 300), "dtype": str(dtype)[6:], "resets": True}
            cases.append((record, dtype, functools.partial(model_case, pattern, dtype)))
        for mixer in cli.decode:
            for shape in shapes:
                for resets in (False, True):
                    record = {"case": "decode", "mixer": mixer, "shape": shape, "dtype": str(dtype)[6:], "resets": resets}
                    cases.append((record, dtype, functools.partial(decode_case, mixer, *shape, dtype, resets)))
        for pattern in cli.decode_patterns:
            record = {"case": "model_decode", "mixer": pattern, "shape": (2, 300), "dtype": str(dtype)[6:], "resets": True}
            cases.append((record, dtype, functools.partial(model_decode_case, pattern, dtype)))

    out = open(cli.out, "a") if cli.out else None
    rows, all_ok = [], True
    for record, dtype, run in cases:
        try:
            errs = run()
            numbers = [e for e in errs.values() if isinstance(e, float)]
            status = "OK" if max(numbers) <= TOLERANCE[dtype] else "FAIL"
            status = "refused" if status == "OK" and REFUSED in errs.values() else status
        except Exception as e:  # one broken case must not hide the others' results
            traceback.print_exc()
            errs, status = {"error": f"{type(e).__name__}: {str(e)[:300]}"}, "ERROR"
        all_ok &= status in ("OK", "refused")
        record = record | env | {"status": status, "rel_err": errs}
        rows.append(record)
        print(f"{status:7} {_label(record)}: " + " ".join(f"{k}={_fmt(v)}" for k, v in errs.items()), flush=True)
        if out:
            out.write(json.dumps(record) + "\n")
            out.flush()
    if out:
        out.close()
    print()
    print(markdown_table(rows))
    return 0 if all_ok else 1


def _label(r: dict) -> str:
    if r["case"] in ("model", "model_decode"):
        what = "prefill + decode" if r["case"] == "model_decode" else "forward"
        return f"hybrid model `{r['mixer']}` {what} {r['dtype']}"
    B, T, H, K, V = r["shape"]
    what = "prefill + decode " if r["case"] == "decode" else ""
    return f"{r['mixer']} {what}B{B} T{T} H{H} K{K} V{V} {r['dtype']}{', resets' if r['resets'] else ''}"


def _fmt(v: float | str) -> str:
    return f"{v:.2e}" if isinstance(v, float) else v


def markdown_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r["rel_err"]))
    lines = ["| case | status | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 2)]
    for r in rows:
        cells = [_fmt(r["rel_err"][c]) if c in r["rel_err"] else "" for c in columns]
        lines.append(f"| {_label(r)} | {r['status']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
