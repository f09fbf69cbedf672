"""The exported Hugging Face folder, loaded the way the ecosystem loads it: ``AutoModelForCausalLM``
with remote code, ``generate`` and lm-evaluation-harness give what our ``HybridLM`` gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from titan_hybrid.export import load_exported, save_hf
from titan_hybrid.hf.state_dict_adapter import HybridStateDictAdapter
from titan_hybrid.models.hybrid import HybridLM, HybridModelArgs

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "assets" / "tokenizer" / "starcoder2_think"
# Every mixer letter, GQA, each attention option (sink, partial RoPE, sliding window, XSA, score
# soft-cap), depth-scaled norms and depth recurrence (blocks 1..2 twice).
ARGS = HybridModelArgs(
    dim=32, n_layers=5, pattern="gAd2k", n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=128,
    attn_sink=True, rope_dims=8, attn_window=5, xsa=True, attn_softcap=4.0, ln_scale=True, recur_layers=[1, 2],
)  # fmt: skip


@pytest.fixture(scope="module")
def ours() -> HybridLM:
    """A random model whose every parameter (norm gains, biases, sinks too) is away from its init."""
    torch.manual_seed(0)
    model = HybridLM(ARGS)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def exported(ours, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "export"
    save_hf(ours, str(out), str(TOKENIZER), flavor="test", step=7)
    return out


@pytest.fixture(scope="module")
def hf_model(exported):
    model, info = AutoModelForCausalLM.from_pretrained(str(exported), trust_remote_code=True, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    return model.eval()


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_folder_loads_with_auto_classes_and_remote_code(exported, hf_model, ours):
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "titan_hybrid" and config["architectures"] == ["TitanHybridForCausalLM"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_titan_hybrid.TitanHybridConfig",
        "AutoModelForCausalLM": "modeling_titan_hybrid.TitanHybridForCausalLM",
    }
    assert {"model.safetensors", "configuration_titan_hybrid.py", "modeling_titan_hybrid.py", "tokenizer.json"} <= {
        p.name for p in exported.iterdir()
    }
    assert (config["flavor"], config["step"], config["pattern"]) == ("test", 7, "gAd2k")
    # The class came from the folder's code, not from this process's titan_hybrid.hf.
    assert type(hf_model).__module__.startswith("transformers_modules.")
    assert hf_model.config.max_position_embeddings == ARGS.max_seq_len  # the name lm-eval reads
    # Tied: one tensor is the embedding and the output projection, as in ours; nothing else to tie.
    assert hf_model.get_input_embeddings() is hf_model.model.tok_embeddings
    assert sum(p.numel() for p in hf_model.parameters()) == sum(p.numel() for p in ours.parameters())
    # HF's own parameter names are the adapter's mapping of ours.
    assert HybridStateDictAdapter(ARGS, None).to_hf(ours.state_dict()).keys() == hf_model.state_dict().keys()


def test_logits_equal_ours(hf_model, ours, exported):
    x = tokens(2, 40)
    with torch.no_grad():
        expected = ours(x)
        diff = (hf_model(input_ids=x).logits - expected).abs().max().item()
        assert diff <= 1e-5, diff
        assert torch.equal(load_exported(str(exported))(x), expected)


def test_padding_and_labels(hf_model, ours):
    x = tokens(1, 24, seed=1)
    pad = torch.zeros(1, 5, dtype=torch.long)
    ones, zeros = torch.ones(1, 24, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)
    with torch.no_grad():
        expected = ours(x)
        left = hf_model(input_ids=torch.cat([pad, x], 1), attention_mask=torch.cat([zeros, ones], 1)).logits[:, 5:]
        right = hf_model(input_ids=torch.cat([x, pad], 1), attention_mask=torch.cat([ones, zeros], 1)).logits[:, :24]
        assert (left - expected).abs().max().item() <= 1e-5
        assert (right - expected).abs().max().item() <= 1e-5

        labels = x.clone()
        labels[0, :4] = -100
        out = hf_model(input_ids=x, labels=labels)
        assert out.loss.item() == pytest.approx(F.cross_entropy(expected[0, :-1], labels[0, 1:]).item(), rel=1e-6)

        with pytest.raises(ValueError, match="contiguous"):
            hf_model(input_ids=x, attention_mask=torch.cat([ones[:, :10], zeros, ones[:, :9]], 1))


def _left_padded(prompts: list[torch.Tensor], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    return ids, mask


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_greedy_equals_our_argmax_loop(hf_model, ours, use_cache):
    """``generate`` with the decoding state (prefill, then one token per step through
    ``decode_step``) and without it (every step reruns the sequence): a left-padded batch of
    prompts of different lengths continues each prompt as it would alone."""
    prompts = [tokens(1, 6, seed=2)[0], tokens(1, 3, seed=3)[0]]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            seq = prompt[None]
            for _ in range(4):
                seq = torch.cat([seq, ours(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
            expected.append(seq[0, len(prompt) :])
        ids, mask = _left_padded(prompts, 6)
        out = hf_model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=use_cache
        )
    assert torch.equal(out[:, 6:], torch.stack(expected))


def test_cached_generate_returns_the_state_and_matches_in_beam_search(hf_model):
    ids, mask = _left_padded([tokens(1, 5, seed=4)[0], tokens(1, 2, seed=5)[0]], 5)
    beams = dict(num_beams=3, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = hf_model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **beams)
        recomputed = hf_model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **beams)
        out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                pad_token_id=0, return_dict_in_generate=True)  # fmt: skip
    assert torch.equal(cached, recomputed)
    assert out.cache.positions.tolist() == [5 + 2, 2 + 2]  # prompt + 3 new tokens, the last not yet fed


def test_cached_generate_refuses_right_padding(hf_model):
    ids, mask = _left_padded([tokens(1, 4, seed=6)[0], tokens(1, 2, seed=7)[0]], 4)
    with pytest.raises(ValueError, match="left-padded"):
        hf_model(input_ids=ids.flip(1), attention_mask=mask.flip(1), use_cache=True)


def test_lm_eval_loglikelihoods_equal_ours(exported, ours, tmp_path):
    """``lm_eval --model hf`` on the export and the repo's local task: each request's loglikelihood
    is the one our model gives the same text, tokenized with the export's tokenizer.json."""
    env = {
        **os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    out = tmp_path / "lm_eval"
    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={exported},trust_remote_code=True,dtype=float32",
        "--include_path", str(ROOT / "eval_tasks"), "--tasks", "hybrid_smoke",
        "--device", "cpu", "--batch_size", "2", "--log_samples", "--output_path", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "|hybrid_smoke|" in proc.stdout

    samples = [json.loads(line) for path in out.rglob("samples_hybrid_smoke_*.jsonl") for line in open(path)]
    docs = (ROOT / "eval_tasks" / "hybrid_smoke" / "docs.jsonl").read_text().splitlines()
    assert len(samples) == len(docs)
    tokenizer = Tokenizer.from_file(str(exported / "tokenizer.json"))
    for sample in samples:
        args = sample["arguments"]["gen_args_0"]
        context, continuation = args["arg_0"], args["arg_1"]
        assert (context, continuation) == (sample["doc"]["context"], sample["doc"]["continuation"])
        whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
        context_ids = tokenizer.encode(context, add_special_tokens=False).ids
        n_context = len(context_ids)
        assert whole[:n_context] == context_ids  # the docs split cleanly at a token boundary
        ids = torch.tensor([whole])
        with torch.no_grad():
            logprobs = F.log_softmax(ours(ids[:, :-1]).double(), dim=-1)[0]
        targets = ids[0, n_context:]
        ours_ll = logprobs[n_context - 1 :].gather(1, targets[:, None]).sum().item()
        theirs_ll = float(sample["resps"][0][0][0])
        assert theirs_ll == pytest.approx(ours_ll, rel=1e-6), (context, continuation)
