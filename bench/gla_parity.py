"""GPU check: fla's chunk_gla kernel against the CPU PyTorch path, same inputs and weights.

Prints one line per case with the relative error ||gpu - cpu|| / ||cpu|| of the
outputs and of the input gradients, and exits non-zero if any exceeds the
tolerance (fp32 kernel, which uses TF32 dots: 2e-3; bf16: 2e-2). Needs a CUDA GPU and fla.
    python -m bench.gla_parity
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from titan_hybrid.models.hybrid import HybridLM, hybrid_flavors
from titan_hybrid.ops.gla import chunk_gla, chunk_gla_torch

TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 2e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def op_case(B, T, H, K, V, dtype, with_resets) -> dict[str, float]:
    gen = torch.Generator().manual_seed(B * T + H)
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen)) / 4
    do = torch.randn(B, T, H, V, generator=gen)
    resets = None
    if with_resets:
        resets = torch.zeros(B, T, dtype=torch.bool)
        resets[:, [T // 3, T // 3 + 1, T // 2 + 7]] = True
    cpu_in = [x.clone().requires_grad_() for x in (q, k, v, g)]
    o_cpu = chunk_gla_torch(*cpu_in, resets=resets)
    (o_cpu * do).sum().backward()
    gpu_in = [x.to("cuda", dtype if i < 3 else torch.float32).requires_grad_() for i, x in enumerate((q, k, v, g))]
    o_gpu = chunk_gla(*gpu_in, resets=None if resets is None else resets.cuda())
    (o_gpu.float() * do.cuda()).sum().backward()
    errs = {"o": rel_err(o_gpu, o_cpu)}
    for name, a, b in zip("qkvg", gpu_in, cpu_in):
        errs[f"d{name}"] = rel_err(a.grad, b.grad)
    return errs


def model_case(dtype) -> dict[str, float]:
    # Head dims 64, as in the 308M model, so the kernels' tuned configs are shared.
    args = hybrid_flavors["debug"].replace(dim=256, n_heads=4, n_kv_heads=2, vocab_size=1024)
    torch.manual_seed(0)
    model = HybridLM(args)
    model.init_weights()
    tokens = torch.randint(0, args.vocab_size, (2, 300))
    positions = torch.cat([torch.arange(120), torch.arange(180)]).expand(2, -1)
    ref = model(tokens, positions)
    gpu_model = HybridLM(args).cuda()
    gpu_model.load_state_dict(model.state_dict())
    gpu_model.rope = gpu_model._rope(device="cuda")
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = gpu_model(tokens.cuda(), positions.cuda())
    return {"logits": rel_err(out, ref)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--shapes", nargs="+", default=["2,4096,16,64,64", "1,1000,4,64,64"],
                        help="B,T,H,K,V per case (each new K/V/dtype costs a Triton autotune)")
    cli = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    worst_ok = True
    cases = []
    shapes = [tuple(int(x) for x in s.split(",")) for s in cli.shapes]
    for dtype in (getattr(torch, d) for d in cli.dtypes):
        for shape in shapes:
            for resets in (False, True):
                cases.append((f"op {shape} {dtype} resets={resets}", dtype, lambda s=shape, d=dtype, r=resets: op_case(*s, d, r)))
        cases.append((f"debug model {dtype}", dtype, lambda d=dtype: model_case(d)))
    for name, dtype, run in cases:
        errs = run()
        ok = max(errs.values()) <= TOLERANCE[dtype]
        worst_ok &= ok
        print(f"{'OK  ' if ok else 'FAIL'} {name}: " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()), flush=True)
    return 0 if worst_ok else 1


if __name__ == "__main__":
    sys.exit(main())
