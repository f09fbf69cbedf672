"""Sample from a trained model with O(1)-state recurrent decoding.

``python -m titan_hybrid.generate --model RUN_DIR_OR_EXPORT --prompt TEXT [--prompt TEXT ...]
[--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--think] [--step N]``

The prompts are prefilled with the chunked training kernels (left-padded into one batch), then
each new token costs one ``HybridLM.decode_step``: the linear-attention layers update a fixed-size
state, attention appends to a KV cache (bounded by its window). On CUDA the step is captured once
in a CUDA graph, so decoding is not bound by Python. ``--temperature 0`` is greedy; sampling draws
from a generator seeded by ``--seed``, so a seed reproduces its text on the same device. One
prompt is streamed as it is made; several are printed when all are done.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchtitan.components.tokenizer import HuggingFaceTokenizer

from titan_hybrid.checkpoint import read_marker, step_dirs
from titan_hybrid.export import checkpoint_folder, find_step_dir, load_checkpoint_model, load_exported
from titan_hybrid.models.hybrid import HybridLM
from titan_hybrid.models.hybrid.decode_state import DecodeState

THINK = "<think>"


@dataclass
class Sampling:
    """How the next token is drawn from the logits; ``temperature = 0`` is greedy."""

    temperature: float = 1.0
    top_k: int = 0
    """Keep the k most likely tokens; 0 = all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p (nucleus); 1 = all."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")

    def __call__(self, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Next token per row ``[B]`` from ``logits [B, vocab]``."""
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits.float() / self.temperature
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # Drop a token when the tokens before it already reach top_p (the first always stays).
            drop = probs.cumsum(dim=-1) - probs >= self.top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


class DecodeStep:
    """``model.decode_step`` on fixed buffers; on CUDA replayed from a CUDA graph.

    Capturing needs a few warm-up steps first (they run fla's Triton autotuning and allocate
    the step's workspace); they change the state, so it is saved before and restored after.
    ``compile_mode`` (None: eager): the step through ``torch.compile(fullgraph=True, mode=...)``
    before capture, so Inductor fuses the norms, gates and residuals between the GEMMs; the
    recurrent mixers' fla kernels are custom ops in that graph (``titan_hybrid.ops.*_step``).
    Shapes are static (a decode run's batch and capacity are fixed); each new one compiles anew.
    """

    def __init__(self, model: HybridLM, state: DecodeState, cuda_graph: bool = True, compile_mode: str | None = None):
        self.state = state
        self.step_fn = (
            model.decode_step if compile_mode is None
            else torch.compile(model.decode_step, fullgraph=True, dynamic=False,
                               mode=None if compile_mode == "default" else compile_mode)
        )  # fmt: skip
        self.tokens = torch.zeros_like(state.positions)
        self.graph = None
        if cuda_graph and state.positions.is_cuda:
            saved = state.snapshot()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.step_fn(self.tokens, state)
            torch.cuda.current_stream().wait_stream(side)
            state.restore(saved)
            del saved
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.step_fn(self.tokens, state)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, vocab]`` after feeding ``tokens [B]`` (the graph's output buffer on CUDA)."""
        if self.graph is None:
            return self.step_fn(tokens, self.state)
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


def generate(
    model: HybridLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling,
    seed: int = 0,
    eos_id: int | None = None,
    on_token: Callable[[list[int]], None] | None = None,
    cuda_graph: bool = True,
    compile_mode: str | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (up to ``max_new_tokens``, ending at ``eos_id`` included).

    ``on_token`` gets each step's new token per row as it is made (for streaming);
    ``compile_mode``: see ``DecodeStep``.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.tok_embeddings.weight.device
    width = max(len(p) for p in prompts)
    tokens = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    logits, state = model.prefill(tokens, lengths, capacity=width + max_new_tokens)
    step = DecodeStep(model, state, cuda_graph=cuda_graph, compile_mode=compile_mode) if max_new_tokens > 1 else None
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for i in range(max_new_tokens):
        next_tokens = sampling(logits, generator)
        new = next_tokens.tolist()
        for row, token in enumerate(new):
            if not done[row]:
                outputs[row].append(token)
                done[row] = token == eos_id
        if on_token:
            on_token(new)
        if all(done) or i == max_new_tokens - 1:
            break
        logits = step(next_tokens)
    return outputs


def load_for_inference(path: str, step: int | None, device: torch.device, dtype: torch.dtype) -> tuple[HybridLM, str]:
    """The model and its tokenizer folder, from an exported folder or a run's newest complete
    (or ``step``) DCP checkpoint."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path!r} is not a folder (a run's dump folder or an exported model)")
    if step_dirs(checkpoint_folder(path)):
        step_dir = find_step_dir(path, step)
        model, tokenizer_dir = load_checkpoint_model(step_dir), read_marker(step_dir).get("hf_assets_path", "")
    else:
        model, tokenizer_dir = load_exported(path), path
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir!r} (the tokenizer of {path})")
    model = model.to(device=device, dtype=dtype)
    model.rope = model._rope(device=device)  # fp32 whatever the weights' dtype
    model.fuse_projections()
    return model.eval(), tokenizer_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m titan_hybrid.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run dump folder (DCP checkpoints) or exported folder")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: newest complete)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--think", action="store_true", help="open a <think> block after the prompt (reasoning data)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on CUDA")
    parser.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly (debugging)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the one-token step before capturing it (a compile per batch shape; "
                             "faster steps for long generations, BENCHMARKS.md)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        parser.error(str(e))
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model, tokenizer_dir = load_for_inference(args.model, args.step, device, dtype)
    tokenizer = HuggingFaceTokenizer(tokenizer_dir)
    # The training documents' layout (data_pipelines.sources): prompt, blank line, <think>.
    texts = [f"{p.strip()}\n\n{THINK}\n" if args.think else p for p in args.prompt]
    prompts = [tokenizer.tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    if any(not p for p in prompts):
        parser.error("a --prompt encodes to no tokens")

    stream = None
    if len(prompts) == 1:
        sys.stdout.write(texts[0])
        made: list[int] = []
        shown = ""

        def stream(new: list[int]) -> None:  # decode everything so far: BPE pieces can split characters
            nonlocal shown
            if tokenizer.eos_id in made:
                return
            made.append(new[0])
            text = tokenizer.tokenizer.decode([t for t in made if t != tokenizer.eos_id], skip_special_tokens=False)
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(shown) :])
                sys.stdout.flush()
                shown = text

    outputs = generate(
        model, prompts, args.max_new_tokens, sampling, seed=args.seed, eos_id=tokenizer.eos_id,
        on_token=stream, cuda_graph=not args.no_cuda_graph, compile_mode="default" if args.compile else None,
    )  # fmt: skip
    if stream:
        sys.stdout.write("\n")
        return
    for i, (text, out) in enumerate(zip(texts, outputs)):
        completion = tokenizer.tokenizer.decode([t for t in out if t != tokenizer.eos_id], skip_special_tokens=False)
        print(f"--- prompt {i}\n{text}{completion}")


if __name__ == "__main__":
    main()
