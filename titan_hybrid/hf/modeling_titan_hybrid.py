"""A titan-hybrid ``HybridLM`` as a Hugging Face causal LM (``AutoModelForCausalLM``).

``titan_hybrid.export`` copies this file into every exported folder, so
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` works in any
program (``generate``, lm-evaluation-harness, ...). The file wraps the model of the
installed ``titan_hybrid`` package instead of copying it, as fla's Hugging Face models
need fla installed: the same code trains, exports and serves, on CPU (pure-PyTorch
mixers) and on CUDA (fla kernels).

Weights are ``HybridLM``'s own, under ``model.`` (``base_model_prefix``); the output
projection is the input embedding itself, so there is no ``lm_head.weight`` to store or tie.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from titan_hybrid.models.hybrid import HybridLM
from titan_hybrid.models.hybrid.decode_state import DecodeState

from .configuration_titan_hybrid import TitanHybridConfig


def document_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``HybridLM`` positions for a padded batch: each row's tokens are one document from position
    0 and every pad token a document of its own, so neither attention, nor the recurrent states,
    nor the short convolutions reach a pad. Left and right padding; a gap inside a row is refused."""
    mask = attention_mask.bool()
    positions = torch.where(mask, mask.cumsum(dim=1) - 1, 0)
    first = mask.int().argmax(dim=1, keepdim=True)
    contiguous = torch.arange(mask.shape[1], device=mask.device) - first
    if not torch.equal(positions, torch.where(mask, contiguous, 0)):
        raise ValueError("attention_mask: each row's tokens must be contiguous (left or right padding only)")
    return positions


class TitanHybridForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TitanHybridConfig
    base_model_prefix = "model"
    _input_embed_layer = "tok_embeddings"
    _no_split_modules = ["HybridBlock"]

    def __init__(self, config: TitanHybridConfig):
        super().__init__(config)
        # Padding is always kept out of documents (see document_positions), whatever the
        # packed-document setting the model was trained with.
        self.model = HybridLM(config.model_args.replace(document_masking=True))
        self.model.init_weights()  # a new model starts from the training init
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """After ``from_pretrained`` only the non-persistent buffers (the RoPE table, the depth
        scales of ``ln_scale``) are left to compute."""
        if isinstance(module, HybridLM):
            init.copy_(module.rope, module._rope(device=module.rope.device))
            init.copy_(module.ln_scales, module._ln_scales(device=module.ln_scales.device))

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        cache: DecodeState | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits of the whole sequence; with ``labels`` (unshifted, -100 = ignored) also the mean
        next-token loss. With ``use_cache=True`` (``generate``'s default) it also returns the
        decoding state (``cache``: recurrent states, KV caches); given that state, ``input_ids`` is
        one new token per row and the step costs O(1) in the recurrent layers, as in
        ``titan_hybrid.generate``. Other generation kwargs are accepted and ignored."""
        if cache is not None:
            return CausalLMOutputWithPast(logits=self._decode_one_token(input_ids, cache), cache=cache)
        padded = attention_mask is not None and not bool(attention_mask.all())
        if use_cache and labels is None:
            return self._prefill_decode_state(input_ids, attention_mask if padded else None)
        positions = document_positions(attention_mask) if padded else None
        logits = self.model(input_ids, positions=positions)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, num_items_in_batch=num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _prefill_decode_state(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None
    ) -> CausalLMOutputWithPast:
        """Run the prompts (left-padded, as ``generate`` wants them) and keep the decoding state,
        sized for ``max_position_embeddings`` positions (or the prompt, if longer)."""
        B, width = input_ids.shape
        lengths = torch.full((B,), width, device=input_ids.device)
        if attention_mask is not None:
            lengths = attention_mask.sum(dim=1)
            left_padded = torch.arange(width, device=input_ids.device) >= (width - lengths).unsqueeze(1)
            if not torch.equal(attention_mask.bool(), left_padded):
                raise ValueError("use_cache=True needs left-padded prompts (tokenizer padding_side='left')")
        capacity = max(self.config.max_seq_len, width + 1)
        logits, state = self.model.prefill(input_ids, lengths, capacity, all_logits=True)
        return CausalLMOutputWithPast(logits=logits, cache=state)

    def _decode_one_token(self, input_ids: torch.LongTensor, cache: DecodeState) -> torch.Tensor:
        if input_ids.shape[1] != 1:
            raise ValueError(f"with a cache, input_ids is one new token per row; got {input_ids.shape[1]}")
        if int(cache.positions.max()) >= cache.capacity:
            raise ValueError(
                f"the decoding state holds {cache.capacity} positions (max_position_embeddings); "
                "generate fewer tokens, or use python -m titan_hybrid.generate, which sizes it per call"
            )
        return self.model.decode_step(input_ids[:, 0], cache).unsqueeze(1)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # HybridLM keeps its own decoding state (DecodeState), not a key/value Cache

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: DecodeState | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The whole prompt first (or every step, with ``use_cache=False``); then, given the
        state the prefill returned, only the newest token."""
        if cache is not None:
            return {"input_ids": input_ids[:, -1:], "cache": cache, "use_cache": True}
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache}


TitanHybridConfig.register_for_auto_class()
TitanHybridForCausalLM.register_for_auto_class("AutoModelForCausalLM")
