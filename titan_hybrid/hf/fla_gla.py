"""Our GLA + attention models as fla's own ``GLAForCausalLM`` (``model_type = "gla"``).

Layer by layer the two compute the same function (docs/hf_export.md compares every op), for
the configurations ``fla_mismatches`` lets through. One weight transform is needed: our RoPE
rotates interleaved pairs ``(2i, 2i + 1)``, fla's (``RotaryEmbedding(interleaved=False)``) the
halves ``(i, i + d/2)``; permuting the rows of ``wq`` and ``wk`` within each head turns one
into the other and leaves every ``q . k`` as it was (TorchTitan's Llama adapter does the same).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from torchtitan.protocols.state_dict_adapter import StateDictAdapter

from titan_hybrid.models.hybrid import HybridModelArgs

if TYPE_CHECKING:
    from fla.models import GLAConfig

# fla's GLABlock builds its GLA layer with these defaults (GLAConfig has no field for them).
FLA_GATE_LOW_RANK_DIM = 16
FLA_GATE_LOGIT_NORMALIZER = 16.0

_LAYER = {
    "mixer_norm.weight": "attn_norm.weight",
    "mlp_norm.weight": "mlp_norm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}
_MIXER = {
    "g": {
        "q_proj.weight": "q_proj.weight",
        "k_proj.weight": "k_proj.weight",
        "v_proj.weight": "v_proj.weight",
        "g_proj.weight": "g_proj.weight",
        "gk_down.weight": "gk_proj.0.weight",
        "gk_up.weight": "gk_proj.1.weight",
        "gk_up.bias": "gk_proj.1.bias",
        "o_norm.weight": "g_norm_swish_gate.weight",
        "o_proj.weight": "o_proj.weight",
    },
    "A": {
        "wq.weight": "q_proj.weight",
        "wk.weight": "k_proj.weight",
        "wv.weight": "v_proj.weight",
        "wo.weight": "o_proj.weight",
    },
}
_TOP = {"tok_embeddings.weight": "model.embeddings.weight", "norm.weight": "model.norm.weight"}


def fla_mismatches(args: HybridModelArgs) -> list[str]:
    """What of ``args`` fla's GLAForCausalLM cannot compute; empty when it maps exactly."""
    found = []
    if set(args.pattern) - set("gA"):
        found.append(f"pattern '{args.pattern}': fla's GLA model has only GLA and attention layers ('g', 'A')")
    if args.rope_dims not in (0, args.head_dim):
        found.append(f"rope_dims = {args.rope_dims}: fla rotates the whole head (no partial RoPE)")
    if args.attn_sink:
        found.append("attn_sink: fla's attention has no sink")
    if args.output_softcap:
        found.append("output_softcap: fla's GLA model has no logit soft-cap")
    if args.attn_softcap:
        found.append("attn_softcap: fla's attention has no score soft-cap")
    if args.xsa:
        found.append("xsa: fla's attention has no exclusive self attention")
    if args.ln_scale:
        found.append("ln_scale: fla's blocks do not scale their norms by depth")
    if args.recur_layers:
        found.append("recur_layers: fla's GLA model has no depth recurrence")
    if args.mlp != "swiglu":
        found.append(f"mlp = '{args.mlp}': fla's GatedMLP is SwiGLU (or PowGLU)")
    if args.gla_gate_low_rank_dim != FLA_GATE_LOW_RANK_DIM:
        found.append(f"gla_gate_low_rank_dim = {args.gla_gate_low_rank_dim}: fla's GLA model fixes it at 16")
    if args.gla_gate_logit_normalizer != FLA_GATE_LOGIT_NORMALIZER:
        found.append(f"gla_gate_logit_normalizer = {args.gla_gate_logit_normalizer}: fla's GLA model fixes it at 16")
    return found


def fla_gla_config(args: HybridModelArgs) -> GLAConfig:
    """fla's config of the same model; raises ValueError naming every mismatch. Imports fla
    here, not at the top: ``titan_hybrid.export`` (and ``generate``, through it) loads this
    module, and importing fla costs seconds a process."""
    from fla.models import GLAConfig

    mismatches = fla_mismatches(args)
    if mismatches:
        raise ValueError("not expressible as fla's GLAForCausalLM: " + "; ".join(mismatches))
    attn_layers = [i for i, kind in enumerate(args.pattern) if kind == "A"]
    attn = {
        "layers": attn_layers,
        "num_heads": args.n_heads,
        "num_kv_heads": args.n_kv_heads,
        "window_size": args.attn_window or None,
        "rope_theta": args.rope_theta,
    }
    return GLAConfig(
        hidden_size=args.dim,
        num_hidden_layers=args.n_layers,
        num_heads=args.n_heads,
        expand_k=args.gla_expand_k,
        expand_v=args.gla_expand_v,
        intermediate_size=args.ffn_dim,
        hidden_act="swish",
        norm_eps=args.norm_eps,
        max_position_embeddings=args.max_seq_len,
        vocab_size=args.vocab_size,
        tie_word_embeddings=True,
        attn=attn if attn_layers else None,
    )


class FlaGLAStateDictAdapter(StateDictAdapter):
    """``HybridLM`` names <-> ``GLAForCausalLM`` names, with the RoPE row permutation of ``wq`` / ``wk``.
    The output projection is fla's ``lm_head.weight``, tied to the embedding: not stored."""

    def __init__(self, model_args: HybridModelArgs, hf_assets_path: str | None = None):
        super().__init__(model_args, hf_assets_path)
        self.model_args = model_args
        self.to_hf_map = dict(_TOP)
        for i, kind in enumerate(model_args.pattern):
            names = {**_LAYER, **{f"mixer.{ours}": f"attn.{fla}" for ours, fla in _MIXER[kind].items()}}
            self.to_hf_map.update({f"layers.{i}.{ours}": f"model.layers.{i}.{fla}" for ours, fla in names.items()})
        self.from_hf_map = {fla: ours for ours, fla in self.to_hf_map.items()}

    def _rope_rows(self, key: str, weight: torch.Tensor, inverse: bool) -> torch.Tensor:
        """Rows of an attention q/k projection, per head: interleaved pairs -> halves (or back)."""
        if not re.fullmatch(r"layers\.\d+\.mixer\.w[qk]\.weight", key):
            return weight
        d = self.model_args.head_dim
        pairs = (2, d // 2) if inverse else (d // 2, 2)
        return weight.view(-1, *pairs, weight.shape[1]).transpose(1, 2).reshape(weight.shape).contiguous()

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return {self.to_hf_map[k]: self._rope_rows(k, v, inverse=False) for k, v in state_dict.items()}

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in hf_state_dict.items():
            if key == "lm_head.weight":
                continue  # tied to model.embeddings.weight
            ours = self.from_hf_map[key]
            out[ours] = self._rope_rows(ours, value, inverse=True)
        return out
