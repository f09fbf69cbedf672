"""Hybrid decoder LM: a pattern string picks each layer's sequence mixer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from torchtitan.protocols.model import ModelProtocol

from titan_hybrid.ops.common import HostDocuments
from titan_hybrid.ops.decode_linear import PreNormed
from titan_hybrid.ops.linear_cross_entropy import linear_cross_entropy

from .args import MIXERS, MLPS, HybridModelArgs
from .attention import Attention, flex_block_mask, rope_cache
from .decode_state import DecodeState, KVCache, Prompt, RecurrentState
from .fused import LinearGroup, apply, project
from .delta import GatedDeltaNet, GatedDeltaNet2, KaczmarzGDN2
from .gla import GatedLinearAttention

# Pattern letter -> mixer layer. Attention takes (x, rope, positions, doc_ids), the others (x, resets).
MIXER_LAYERS: dict[str, type[nn.Module]] = {
    "g": GatedLinearAttention,
    "A": Attention,
    "d": GatedDeltaNet,
    "2": GatedDeltaNet2,
    "k": KaczmarzGDN2,
}
assert MIXER_LAYERS.keys() == MIXERS.keys(), "args.MIXERS and model.MIXER_LAYERS disagree"


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w13_group: LinearGroup | None = None  # fuse_projections()
        self.w2_group: LinearGroup | None = None

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.trunc_normal_(self.w1.weight, std=std)
        nn.init.trunc_normal_(self.w3.weight, std=std)
        nn.init.trunc_normal_(self.w2.weight, std=out_std)

    def fuse_projections(self) -> None:
        """Inference: W1 and W3 as one GEMM; both GEMMs the decode ones."""
        self.w13_group = LinearGroup([self.w1, self.w3])
        self.w2_group = LinearGroup([self.w2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = project(x, [self.w1, self.w3], self.w13_group)
        return apply(F.silu(a) * b, self.w2, self.w2_group)


class ReLU2(nn.Module):
    """Squared LeakyReLU(0.5) MLP: ``W2 leaky_relu(W1 x, 0.5)^2``; two matrices instead of SwiGLU's three."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.trunc_normal_(self.w1.weight, std=std)
        nn.init.trunc_normal_(self.w2.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.leaky_relu(self.w1(x), 0.5).square())


MLP_LAYERS: dict[str, type[nn.Module]] = {"swiglu": SwiGLU, "relu2": ReLU2}
assert MLP_LAYERS.keys() == MLPS.keys(), "args.MLPS and model.MLP_LAYERS disagree"


class HybridBlock(nn.Module):
    """Pre-norm residual block: mixer then MLP.

    ``norm_scale`` (``ln_scale``: ``1 / sqrt(l + 1)`` at unrolled depth ``l``) multiplies both
    pre-norm outputs; it is an argument, not a weight, because a recurrent block runs at two depths.
    """

    def __init__(self, layer: int, args: HybridModelArgs):
        super().__init__()
        self.mixer_kind = mixer_kind = args.pattern[layer]
        self.mixer_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.mixer = Attention(args, xsa=args.xsa_on(layer)) if mixer_kind == "A" else MIXER_LAYERS[mixer_kind](args)
        self.mlp_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.mlp = MLP_LAYERS[args.mlp](args.dim, args.ffn_dim)

    def init_weights(self, std: float, out_std: float) -> None:
        self.mixer_norm.reset_parameters()
        self.mlp_norm.reset_parameters()
        self.mixer.init_weights(std, out_std)
        self.mlp.init_weights(std, out_std)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        positions: torch.Tensor,
        doc_ids: torch.Tensor | None,
        resets: torch.Tensor | None,
        block_mask: BlockMask | None = None,
        norm_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self._scaled(self.mixer_norm(x), norm_scale)
        if self.mixer_kind == "A":
            x = x + self.mixer(h, rope, positions, doc_ids, block_mask)
        else:
            x = x + self.mixer(h, resets)
        return self._mlp(x, norm_scale)

    @staticmethod
    def _scaled(h: torch.Tensor, norm_scale: torch.Tensor | None) -> torch.Tensor:
        return h if norm_scale is None else h * norm_scale

    def _mlp(self, x: torch.Tensor, norm_scale: torch.Tensor | None) -> torch.Tensor:
        return x + self.mlp(self._scaled(self.mlp_norm(x), norm_scale))

    def prefill(
        self, x: torch.Tensor, prompt: Prompt, norm_scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RecurrentState | KVCache]:
        h, state = self.mixer.prefill(self._scaled(self.mixer_norm(x), norm_scale), prompt)
        return self._mlp(x + h, norm_scale), state

    def step(
        self,
        x: torch.Tensor,
        state: RecurrentState | KVCache,
        positions: torch.Tensor,
        rope: torch.Tensor,
        norm_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self._scaled(self.mixer_norm(x), norm_scale)
        if self.mixer_kind == "A":
            x = x + self.mixer.step(h, state, positions, rope)
        else:
            x = x + self.mixer.step(h, state)
        return self._mlp(x, norm_scale)

    @property
    def fused_decode(self) -> bool:
        """Whether ``fused_step`` can run: the mixer's and the SwiGLU's projections are fused (GLA
        and attention blocks after ``fuse_projections``; the delta-rule mixers keep their GEMMs)."""
        return getattr(self.mixer, "output_group", None) is not None and getattr(self.mlp, "w13_group", None) is not None

    def fused_step(
        self,
        x: PreNormed,
        state: RecurrentState | KVCache,
        positions: torch.Tensor,
        rope: torch.Tensor,
        next_norm: nn.RMSNorm | None,
    ) -> torch.Tensor | PreNormed:
        """``step`` (without ``norm_scale``) with both pre-norms, both residual adds and SwiGLU's
        gate inside the decode GEMMs: 4 kernels a block fewer, each ~2-3 us of a latency-bound step.
        ``next_norm``: the next block's pre-norm, when that block is fused too, for ``PreNormed``."""
        if self.mixer_kind == "A":
            heads = self.mixer.step_heads(x, state, positions, rope)
        else:
            heads = self.mixer.step_heads(x, state)
        x = self.mixer.output_group.residual(heads, x.x, self.mlp_norm)
        return self.mlp.w2_group.residual(self.mlp.w13_group.swiglu(x), x.x, next_norm)


class HybridLM(ModelProtocol):
    """Decoder-only LM with tied input/output embeddings.

    ``forward(tokens, positions=None)``: ``positions`` restart at 0 where a packed
    document starts; with ``document_masking`` they keep attention, the recurrent
    states and the short convolutions inside each document. Without them every
    row is one sequence.

    ``recurrence_on``: run the ``recur_layers`` segment twice (depth recurrence). A new
    model has it on when ``recur_start`` is 0; the trainer switches it on at its step.
    """

    def __init__(self, model_args: HybridModelArgs):
        super().__init__(model_args)
        self.model_args = model_args
        self.recurrence_on = bool(model_args.recur_layers) and model_args.recur_start == 0
        self.tok_embeddings = nn.Embedding(model_args.vocab_size, model_args.dim)
        self.layers = nn.ModuleDict({str(i): HybridBlock(i, model_args) for i in range(model_args.n_layers)})
        self.norm = nn.RMSNorm(model_args.dim, eps=model_args.norm_eps)
        self.register_buffer("rope", self._rope(), persistent=False)
        self.register_buffer("ln_scales", self._ln_scales(), persistent=False)

    def _rope(self, device=None) -> torch.Tensor:
        a = self.model_args
        return rope_cache(a.rotary_dims, a.max_seq_len, a.rope_theta, device=device)

    def _ln_scales(self, device=None) -> torch.Tensor:
        """``1 / sqrt(l + 1)`` for every unrolled depth ``l`` (used with ``ln_scale``)."""
        depth = len(self.model_args.depth_order(recurrence_on=True))
        return torch.arange(1, depth + 1, device=device, dtype=torch.float32).rsqrt()

    def unrolled(self) -> list[tuple[HybridBlock, torch.Tensor | None]]:
        """The blocks in the order the forward runs them, each with its ``norm_scale``."""
        blocks = list(self.layers.values())
        order = self.model_args.depth_order(self.recurrence_on)
        scales = list(self.ln_scales) if self.model_args.ln_scale else [None] * len(order)
        return [(blocks[i], scale) for i, scale in zip(order, scales)]

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """Small-std init; residual output projections scaled by 1/sqrt(2 * n_layers)."""
        device = buffer_device or self.rope.device
        self.rope = self._rope(device=device)
        self.ln_scales = self._ln_scales(device=device)
        std = 0.02
        out_std = std / math.sqrt(2 * self.model_args.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for block in self.layers.values():
            block.init_weights(std, out_std)
        self.norm.reset_parameters()

    def get_attention_masks(
        self, input_batch: torch.Tensor, tokenizer: object, extra_inputs: dict[str, torch.Tensor] | None = None
    ) -> BlockMask | None:
        """TorchTitan's trainer calls this once per micro-batch when ``attn_type = "flex"``: the
        FlexAttention block mask of the batch's documents (from ``positions``) and window. None
        (attention takes the SDPA path) on CPU, and for plain causal attention, where SDPA's
        causal flash kernel needs no mask."""
        _, doc_ids = self._documents((extra_inputs or {}).get("positions"))
        if input_batch.device.type != "cuda" or (doc_ids is None and not self.model_args.attn_window):
            return None
        return flex_block_mask(doc_ids, self.model_args.attn_window, input_batch.shape[1])

    def _documents(self, positions: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(resets, doc_ids)`` of packed documents (a document starts where its position is 0),
        or ``(None, None)`` without positions or document masking."""
        if positions is None or not self.model_args.document_masking:
            return None, None
        resets = positions == 0
        return resets, resets.cumsum(dim=1)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        attention_masks: BlockMask | None = None,
        documents: HostDocuments | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, T, vocab]``; with ``labels``, the summed loss of the fused output projection
        instead (``loss_chunk_tokens`` tokens at a time; 0 = all at once). ``attention_masks``:
        ``get_attention_masks``' block mask (``attn_type = "flex"``). ``documents``: the batch's
        documents as the host found them from ``positions`` (the trainer's), so that no mixer
        copies ``positions`` back to find them."""
        B, T = tokens.shape
        resets, doc_ids = self._documents(positions)
        if resets is not None and documents is not None:
            documents.bind(resets)
        if resets is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        h = self.tok_embeddings(tokens)
        for block, norm_scale in self.unrolled():
            h = block(h, self.rope, positions, doc_ids, resets, attention_masks, norm_scale)
        h = self.norm(h)
        cap = self.model_args.output_softcap
        if labels is not None:
            chunk_tokens = self.model_args.loss_chunk_tokens or labels.numel()
            return linear_cross_entropy(h, self.tok_embeddings.weight, labels, chunk_tokens, cap)
        return self._logits(h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, self.tok_embeddings.weight)
        cap = self.model_args.output_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    # Inference: O(1)-state decoding for the recurrent mixers, a KV cache for attention.

    @torch.no_grad()
    def prefill(
        self, tokens: torch.Tensor, lengths: torch.Tensor, capacity: int, all_logits: bool = False
    ) -> tuple[torch.Tensor, DecodeState]:
        """Run left-padded prompts ``tokens [B, T]`` (row ``b``'s ``lengths[b]`` tokens at its end)
        through the chunked training kernels, keeping every layer's state for ``decode_step``.

        ``capacity``: longest prompt + tokens to generate (what a KV cache must hold). Returns the
        logits of each prompt's last token ``[B, vocab]`` (every position's with ``all_logits``)
        and the decoding state. The padding never reaches a prompt's logits or state.
        """
        a = self.model_args
        rope = rope_cache(a.rotary_dims, capacity, a.rope_theta, device=tokens.device)
        prompt = Prompt.left_padded(lengths, tokens.shape[1], capacity, rope)
        h = self.tok_embeddings(tokens)
        layer_states = []
        for block, norm_scale in self.unrolled():
            h, layer_state = block.prefill(h, prompt, norm_scale)
            layer_states.append(layer_state)
        h = self.norm(h if all_logits else h[:, -1])
        state = DecodeState(layers=layer_states, positions=lengths.clone(), rope=rope)
        return self._logits(h), state

    def fuse_projections(self) -> None:
        """Inference: the linears that share an input (GLA's q/k/v/gates, attention's q/k/v,
        SwiGLU's W1/W3) as one GEMM each, weights as views (``fused.LinearGroup``). Call after
        moving the model to its device and dtype; the delta-rule mixers keep separate GEMMs.
        ``decode_step`` then runs the fused blocks' norms and residual adds in those GEMMs too
        (``HybridBlock.fused_step``)."""
        for block in self.layers.values():
            for part in (block.mixer, block.mlp):
                if hasattr(part, "fuse_projections"):
                    part.fuse_projections()

    def empty_decode_state(self, batch: int, capacity: int, dtype: torch.dtype | None = None) -> DecodeState:
        """Zero states for ``batch`` rows at position 0 (``bench.decode`` fills them to a length)."""
        device = self.tok_embeddings.weight.device
        dtype = dtype or self.tok_embeddings.weight.dtype
        a = self.model_args
        return DecodeState(
            layers=[block.mixer.empty_state(batch, capacity, dtype, device) for block, _ in self.unrolled()],
            positions=torch.zeros(batch, dtype=torch.long, device=device),
            rope=rope_cache(a.rotary_dims, capacity, a.rope_theta, device=device),
        )

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Logits ``[B, vocab]`` after one more token per row ``tokens [B]``; ``state`` advances in
        place (each row's position too). No host sync, so the step can be captured in a CUDA graph;
        a full KV cache is not checked here (``titan_hybrid.generate`` sizes it)."""
        h = self.tok_embeddings(tokens.unsqueeze(1))
        blocks = self.unrolled()
        fused = [block.fused_decode and norm_scale is None for block, norm_scale in blocks]
        for i, ((block, norm_scale), layer_state) in enumerate(zip(blocks, state.layers, strict=True)):
            if fused[i]:
                if not isinstance(h, PreNormed):
                    h = PreNormed.of(h, block.mixer_norm)
                next_norm = blocks[i + 1][0].mixer_norm if i + 1 < len(blocks) and fused[i + 1] else None
                h = block.fused_step(h, layer_state, state.positions, state.rope, next_norm)
            else:
                h = block.step(h, layer_state, state.positions, state.rope, norm_scale)
        state.positions += 1
        return self._logits(self.norm(h[:, 0]))
