"""Export a DCP checkpoint to a Hugging Face folder, and back.

``python -m titan_hybrid.export RUN_DIR [--step N] OUT_DIR``
    RUN_DIR is a run's dump folder (or its checkpoint folder). Reads the newest
    complete checkpoint (or step N) of any world size in a single process and
    writes a Hugging Face folder: ``config.json`` (``model_type = "titan_hybrid"``,
    ``auto_map``), ``model.safetensors``, ``generation_config.json``, the model code
    (``configuration_titan_hybrid.py``, ``modeling_titan_hybrid.py``) and the
    tokenizer files. ``AutoModelForCausalLM.from_pretrained(OUT_DIR,
    trust_remote_code=True)`` loads it (titan-hybrid installed); ``load_exported(OUT_DIR)``
    gives back the ``HybridLM``; no torch.distributed.

``python -m titan_hybrid.export --seed EXPORT_DIR SEED_DIR``
    The reverse: a DCP checkpoint of the model alone, to start a run from with
    ``--checkpoint.initial_load_path SEED_DIR`` (TorchTitan loads it model-only
    and reshards it to the run's world size).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from titan_hybrid.checkpoint import checkpoint_problem, read_marker, step_dirs
from titan_hybrid.hf import TitanHybridConfig, TitanHybridForCausalLM
from titan_hybrid.hf.configuration_titan_hybrid import ARG_NAMES, model_args_from
from titan_hybrid.hf.fla_gla import FlaGLAStateDictAdapter, fla_gla_config
from titan_hybrid.hf.state_dict_adapter import HybridStateDictAdapter
from titan_hybrid.models.hybrid import HybridLM, HybridModelArgs

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def checkpoint_folder(run_dir: str) -> str:
    """The folder holding ``step-N``: RUN_DIR itself, or the ``checkpoint`` folder inside it."""
    if step_dirs(run_dir):
        return run_dir
    return os.path.join(run_dir, "checkpoint")


def find_step_dir(run_dir: str, step: int | None) -> str:
    """The requested (or newest complete) checkpoint; raises with the reason if it is unusable."""
    steps = step_dirs(checkpoint_folder(run_dir))
    if not steps:
        raise FileNotFoundError(f"no step-N checkpoints under {run_dir}")
    if step is None:
        for s in sorted(steps, reverse=True):
            if checkpoint_problem(steps[s]) is None:
                return steps[s]
        raise ValueError(f"no complete checkpoint under {run_dir}")
    if step not in steps:
        raise FileNotFoundError(f"no step-{step} under {run_dir}; have {sorted(steps)}")
    problem = checkpoint_problem(steps[step])
    if problem:
        raise ValueError(f"{steps[step]} cannot be exported: {problem}")
    return steps[step]


def args_at_step(marker: dict[str, Any]) -> HybridModelArgs:
    """The model of a checkpoint marker as it ran at its step: with depth recurrence from the
    start (``recur_start = 0``) if the run had switched it on by then, else without it."""
    args = model_args_from(marker["model"]["args"])
    if not args.recur_layers:
        return args
    if args.recurrence_on_at(marker["step"], marker.get("training_steps", marker["step"])):
        return args.replace(recur_start=0.0)
    return args.replace(recur_layers=[], recur_start=0.0)


def load_checkpoint_model(step_dir: str) -> HybridLM:
    """The model of a DCP checkpoint (saved on any number of ranks), in this process."""
    model = HybridLM(args_at_step(read_marker(step_dir)))
    state = model.state_dict()
    dcp.load(state, checkpoint_id=step_dir)  # reads only the model's keys; no process group needed
    model.load_state_dict(state)
    return model.eval()


def export(run_dir: str, out_dir: str, step: int | None = None, format: str = "titan_hybrid") -> str:
    """``format``: ``titan_hybrid`` (our model code, any pattern) or ``fla`` (fla's GLAForCausalLM)."""
    step_dir = find_step_dir(run_dir, step)
    marker = read_marker(step_dir)
    model, tokenizer_dir = load_checkpoint_model(step_dir), marker.get("hf_assets_path")
    if format == "fla":
        save_fla(model, out_dir, tokenizer_dir)
    else:
        save_hf(model, out_dir, tokenizer_dir, flavor=marker["model"]["flavor"], step=marker["step"])
    return step_dir


def save_hf(model: HybridLM, out_dir: str, tokenizer_dir: str | None = None, **info: Any) -> None:
    """Write ``model`` as a Hugging Face folder (see the module docstring), with the tokenizer files
    of ``tokenizer_dir``; ``info`` (flavor, step) goes into config.json as well."""
    config = TitanHybridConfig(**{k: getattr(model.model_args, k) for k in ARG_NAMES}, **info)
    with torch.device("meta"):  # only the code and config are written from it: no second copy of the weights
        hf_model = TitanHybridForCausalLM(config)
    adapter = HybridStateDictAdapter(model.model_args, None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    hf_model.save_pretrained(out_dir, state_dict=adapter.to_hf(state))
    copy_tokenizer(tokenizer_dir, out_dir)


def save_fla(model: HybridLM, out_dir: str, tokenizer_dir: str | None = None) -> None:
    """Write ``model`` as fla's ``GLAForCausalLM`` (``model_type = "gla"``; needs fla, flash-attn for
    attention layers, and a GPU to run); raises ValueError if the model is not expressible in it."""
    config = fla_gla_config(model.model_args)
    config.architectures = ["GLAForCausalLM"]
    config.save_pretrained(out_dir)
    state = FlaGLAStateDictAdapter(model.model_args).to_hf(model.state_dict())
    save_file(state, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})
    copy_tokenizer(tokenizer_dir, out_dir)


def copy_tokenizer(tokenizer_dir: str | None, out_dir: str) -> None:
    if tokenizer_dir and os.path.isdir(tokenizer_dir):
        for name in os.listdir(tokenizer_dir):
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src) and name != CONFIG and not name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(src, os.path.join(out_dir, name))


def exported_weights(path: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The ``HybridLM`` state dict of an exported folder (Hugging Face names mapped back)."""
    with open(os.path.join(path, CONFIG)) as f:
        config = json.load(f)
    if config.get("model_type") != TitanHybridConfig.model_type:
        raise ValueError(f"{path}: model_type {config.get('model_type')!r} is not a titan_hybrid export")
    adapter = HybridStateDictAdapter(model_args_from(config), None)
    return adapter.from_hf(load_file(os.path.join(path, WEIGHTS), device=str(device)))


def load_exported(path: str, device: str | torch.device = "cpu") -> HybridLM:
    """A ``HybridLM`` from an exported folder, in eval mode; no torch.distributed involved."""
    weights = exported_weights(path, device)
    with open(os.path.join(path, CONFIG)) as f:
        args = model_args_from(json.load(f))
    with torch.device(device):
        model = HybridLM(args)
    model.load_state_dict(weights)
    return model.eval()


def to_seed_checkpoint(export_dir: str, seed_dir: str) -> None:
    """Write the exported weights as a model-only DCP checkpoint (TorchTitan's seed layout)."""
    if os.path.exists(seed_dir):
        raise FileExistsError(f"{seed_dir} exists; choose a new folder")
    dcp.save(exported_weights(export_dir), checkpoint_id=seed_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m titan_hybrid.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="run dump folder (or, with --seed, an exported folder)")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest complete)")
    parser.add_argument("--seed", action="store_true", help="reverse: exported folder -> DCP seed checkpoint")
    parser.add_argument(
        "--format",
        choices=["titan_hybrid", "fla"],
        default="titan_hybrid",
        help="titan_hybrid: our model code (every pattern, CPU and GPU); fla: fla's GLAForCausalLM ('g'/'A' only)",
    )
    args = parser.parse_args(argv)
    if args.seed:
        to_seed_checkpoint(args.src, args.out)
        print(f"wrote a seed checkpoint to {args.out}; start a run with --checkpoint.initial_load_path {args.out}")
    else:
        step_dir = export(args.src, args.out, args.step, args.format)
        print(f"exported {step_dir} to {args.out}")


if __name__ == "__main__":
    main()
