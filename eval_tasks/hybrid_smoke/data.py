"""The documents of ``hybrid_smoke``: docs.jsonl next to this file, no download."""

import json
from pathlib import Path

import datasets


def load(**metadata) -> datasets.DatasetDict:
    """lm-eval's ``custom_dataset`` hook (it passes the task metadata, unused here)."""
    lines = (Path(__file__).parent / "docs.jsonl").read_text().splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines])})
