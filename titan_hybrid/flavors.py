"""``python -m titan_hybrid.flavors``: the named model flavors (``[model] flavor``) and their sizes.

Parameters are counted on the meta device, so even the largest flavor costs no memory.
"""

from __future__ import annotations

import torch

from titan_hybrid.models.hybrid import HybridLM, hybrid_flavors


def parameter_count(flavor: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in HybridLM(hybrid_flavors[flavor]).parameters())


def table() -> str:
    rows = [("flavor", "parameters", "pattern", "dim", "layers", "heads", "vocab")]
    for name, args in hybrid_flavors.items():
        pattern = args.pattern if len(args.pattern) <= 24 else args.pattern[:21] + "..."
        rows.append((name, f"{parameter_count(name):,}", pattern, str(args.dim), str(args.n_layers),
                     str(args.n_heads), f"{args.vocab_size:,}"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


if __name__ == "__main__":
    print(table())
