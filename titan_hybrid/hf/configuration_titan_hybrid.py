"""``HybridModelArgs`` as a Hugging Face ``PreTrainedConfig`` (``model_type = "titan_hybrid"``).

``titan_hybrid.export`` copies this file into every exported folder (``auto_map``), so
``AutoConfig.from_pretrained(folder, trust_remote_code=True)`` finds it. Like fla's configs,
which need fla installed, it imports the installed ``titan_hybrid`` package: the
hyper-parameters and their validation stay in one place, ``HybridModelArgs``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedConfig

from titan_hybrid.models.hybrid import HybridModelArgs

# The fields of HybridModelArgs a config carries (TorchTitan's private ``_enforced`` is not one).
ARG_NAMES = tuple(f.name for f in dataclasses.fields(HybridModelArgs) if f.init and not f.name.startswith("_"))


def model_args_from(config: Mapping[str, Any]) -> HybridModelArgs:
    """The model arguments in ``config`` (a config.json, a checkpoint marker); other keys are ignored."""
    return HybridModelArgs(**{k: config[k] for k in ARG_NAMES if k in config})


class TitanHybridConfig(PreTrainedConfig):
    """Every ``HybridModelArgs`` field, top level in config.json, validated by ``HybridModelArgs``.

    ``attribute_map`` gives the standard names that tools read (lm-eval reads
    ``max_position_embeddings`` for its context length) our values.
    """

    model_type = "titan_hybrid"
    attribute_map = {
        "hidden_size": "dim",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "ffn_dim",
        "max_position_embeddings": "max_seq_len",
        "rms_norm_eps": "norm_eps",
    }
    tie_word_embeddings: bool = True
    """Always true: one tensor is both the input embedding and the output projection."""

    def __post_init__(self, **kwargs: Any) -> None:
        args = model_args_from(kwargs)
        for name in ARG_NAMES:
            kwargs[name] = getattr(args, name)
        super().__post_init__(**kwargs)

    @property
    def model_args(self) -> HybridModelArgs:
        return model_args_from(self.to_dict())
