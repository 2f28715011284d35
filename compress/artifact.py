"""Artifacts: the immutable directories that flow between stages.

An artifact is a directory, a kind (torch | onnx) and meta (task, io, precision,
parent digest). Its digest is a hash of its files' content, so two stages that
produce the same bytes produce the same digest, and downstream cache keys agree.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

META_FILE = "meta.json"
# Files every text artifact carries so that the directory alone runs the model.
# vocab.json and merges.txt: byte-level BPE vocabularies (GPT-2) saved without tokenizer.json.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "vocab.json", "merges.txt")


@dataclass(frozen=True)
class Artifact:
    path: Path
    kind: str
    digest: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def model_file(self) -> Path:
        """The ONNX model of an onnx artifact."""
        return self.path / "model.onnx"

    def files(self) -> list[Path]:
        """Every file of the artifact (not meta.json), sorted."""
        return sorted(p for p in self.path.rglob("*") if p.is_file() and p.name != META_FILE)

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files())

    @classmethod
    def load(cls, path: Path) -> "Artifact":
        data = json.loads((path / META_FILE).read_text())
        return cls(path=path, kind=data["kind"], digest=data["digest"], meta=data["meta"])


def digest_files(root: Path, files: list[Path] | None = None) -> str:
    """sha256 over (relative path, content) of files under root."""
    h = hashlib.sha256()
    if files is None:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != META_FILE)
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def seal(path: Path, kind: str, meta: dict[str, Any]) -> Artifact:
    """Compute the digest of a finished directory and write its meta.json (last)."""
    digest = digest_files(path)
    (path / META_FILE).write_text(json.dumps({"kind": kind, "digest": digest, "meta": meta}, indent=2, sort_keys=True))
    return Artifact(path=path, kind=kind, digest=digest, meta=meta)


def copy_tokenizer(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy the tokenizer files that exist in src_dir; return their names.

    Beside a model's config.json, transformers may load another tokenizer class
    than the one tokenizer_config.json names (for some model types, Qwen2 and
    Phi-3 among them, it overrides the file); an ONNX directory has no config.json.
    So a copy that leaves the config behind names the class the source loads
    as, and the model's two directories tokenize alike."""
    import shutil

    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, dst_dir / name)
            copied.append(name)
    if "tokenizer_config.json" in copied and (src_dir / "config.json").is_file() \
            and not (dst_dir / "config.json").is_file():
        _name_tokenizer_class(src_dir, dst_dir / "tokenizer_config.json")
    return copied


def _name_tokenizer_class(src_dir: Path, tokenizer_config: Path) -> None:
    from transformers import AutoTokenizer

    loaded = type(AutoTokenizer.from_pretrained(str(src_dir))).__name__
    config = json.loads(tokenizer_config.read_text())
    if (config.get("tokenizer_class") or "").removesuffix("Fast") != loaded.removesuffix("Fast"):
        config["tokenizer_class"] = loaded
        tokenizer_config.write_text(json.dumps(config, indent=2) + "\n")
