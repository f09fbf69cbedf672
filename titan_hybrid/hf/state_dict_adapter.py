"""TorchTitan's ``StateDictAdapter`` between ``HybridLM`` and its Hugging Face model.

The Hugging Face model holds ``HybridLM`` itself as ``model`` (``base_model_prefix``), so the
Hugging Face names are ours under ``model.``: no renaming, no permutation. The output
projection is the input embedding in both models (one tensor, no ``lm_head.weight``), so
tying needs no handling either.
"""

from __future__ import annotations

from typing import Any

from torchtitan.protocols.state_dict_adapter import StateDictAdapter

from .modeling_titan_hybrid import TitanHybridForCausalLM

PREFIX = TitanHybridForCausalLM.base_model_prefix + "."


class HybridStateDictAdapter(StateDictAdapter):
    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return {PREFIX + key: value for key, value in state_dict.items()}

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        foreign = sorted(key for key in hf_state_dict if not key.startswith(PREFIX))
        if foreign:
            raise KeyError(f"not titan-hybrid Hugging Face weights (no '{PREFIX}' prefix): {foreign[:3]}")
        return {key.removeprefix(PREFIX): value for key, value in hf_state_dict.items()}
