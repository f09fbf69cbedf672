"""Export a DCP checkpoint to one ``model.safetensors`` + ``config.json``, and back.

``python -m titan_hybrid.export RUN_DIR [--step N] OUT_DIR``
    RUN_DIR is a run's dump folder (or its checkpoint folder). Reads the newest
    complete checkpoint (or step N) of any world size in a single process and
    writes ``model.safetensors``, ``config.json`` and the tokenizer files.
    ``load_exported(OUT_DIR)`` gives back a ``HybridLM``; no torch.distributed.

``python -m titan_hybrid.export --seed EXPORT_DIR SEED_DIR``
    The reverse: a DCP checkpoint of the model alone, to start a run from with
    ``--checkpoint.initial_load_path SEED_DIR`` (TorchTitan loads it model-only
    and reshards it to the run's world size).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from titan_hybrid.checkpoint import checkpoint_problem, read_marker, step_dirs
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


def model_args_from(config: dict) -> HybridModelArgs:
    names = {f.name for f in dataclasses.fields(HybridModelArgs) if f.init and not f.name.startswith("_")}
    return HybridModelArgs(**{k: v for k, v in config.items() if k in names})


def load_checkpoint_model(step_dir: str) -> HybridLM:
    """The model of a DCP checkpoint (saved on any number of ranks), in this process."""
    args = model_args_from(read_marker(step_dir)["model"]["args"])
    model = HybridLM(args)
    state = model.state_dict()
    dcp.load(state, checkpoint_id=step_dir)  # reads only the model's keys; no process group needed
    model.load_state_dict(state)
    return model.eval()


def export(run_dir: str, out_dir: str, step: int | None = None) -> str:
    step_dir = find_step_dir(run_dir, step)
    marker = read_marker(step_dir)
    model = load_checkpoint_model(step_dir)
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt", "step": str(marker["step"])})
    config = {
        "architectures": ["HybridLM"],
        "model_type": "titan_hybrid",
        "flavor": marker["model"]["flavor"],
        "step": marker["step"],
        "torch_dtype": str(next(iter(state.values())).dtype).removeprefix("torch."),
        **dataclasses.asdict(model.model_args),
    }
    config.pop("_enforced", None)
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    assets = marker.get("hf_assets_path")
    if assets and os.path.isdir(assets):
        for name in os.listdir(assets):
            src = os.path.join(assets, name)
            if os.path.isfile(src) and name != CONFIG and not name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(src, os.path.join(out_dir, name))
    return step_dir


def load_exported(path: str, device: str | torch.device = "cpu") -> HybridLM:
    """A ``HybridLM`` from an exported folder, in eval mode; no torch.distributed involved."""
    with open(os.path.join(path, CONFIG)) as f:
        args = model_args_from(json.load(f))
    with torch.device(device):
        model = HybridLM(args)
    model.load_state_dict(load_file(os.path.join(path, WEIGHTS), device=str(device)))
    return model.eval()


def to_seed_checkpoint(export_dir: str, seed_dir: str) -> None:
    """Write the exported weights as a model-only DCP checkpoint (TorchTitan's seed layout)."""
    if os.path.exists(seed_dir):
        raise FileExistsError(f"{seed_dir} exists; choose a new folder")
    dcp.save(load_file(os.path.join(export_dir, WEIGHTS)), checkpoint_id=seed_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m titan_hybrid.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="run dump folder (or, with --seed, an exported folder)")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest complete)")
    parser.add_argument("--seed", action="store_true", help="reverse: exported folder -> DCP seed checkpoint")
    args = parser.parse_args(argv)
    if args.seed:
        to_seed_checkpoint(args.src, args.out)
        print(f"wrote a seed checkpoint to {args.out}; start a run with --checkpoint.initial_load_path {args.out}")
    else:
        step_dir = export(args.src, args.out, args.step)
        print(f"exported {step_dir} to {args.out}")


if __name__ == "__main__":
    main()
