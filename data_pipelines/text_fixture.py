"""Local parquet text shards as a TorchTitan text dataset.

Registers ``fineweb_edu_local``: FineWeb-Edu-schema parquet files (text in
``text``) read from the directory given by ``training.dataset_path``, through
``datasets`` and TorchTitan's own packing loader.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from datasets import load_dataset
from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS

DATASET_NAME = "fineweb_edu_local"
DEFAULT_PATH = os.path.join(os.path.dirname(__file__), "fixtures", "fineweb-edu", "sample", "10BT")


def load_parquet_dir(path: str):
    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    if not files:
        raise FileNotFoundError(f"training.dataset_path: no .parquet files under '{path}'")
    return load_dataset("parquet", data_files=files, split="train")


def text_field(sample: dict[str, Any]) -> str:
    return sample["text"]


def register() -> None:
    DATASETS.setdefault(
        DATASET_NAME,
        DatasetConfig(path=DEFAULT_PATH, loader=load_parquet_dir, sample_processor=text_field),
    )
