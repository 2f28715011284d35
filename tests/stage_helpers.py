"""Run single stages on tiny models without the pipeline (tests only)."""

from __future__ import annotations

from pathlib import Path

from compress.artifact import Artifact, digest_files
from compress.pipeline import Progress, StageContext


def teacher_artifact(path: Path) -> Artifact:
    return Artifact(path=path, kind="torch", digest=digest_files(path), meta={"task": "embedding"})


def context(out: Path, train: list[str], validation: list[str] | None = None) -> StageContext:
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(out=out, train_texts=train, validation_texts=validation or train[:8], max_length=64,
                        progress=lambda total, desc: Progress(False, total, desc))


def narrowed_student(teacher: Path, out: Path, train: list[str]) -> Artifact:
    """A briefly distilled student of hidden 16 (the tiny teacher has 32): one
    head, with an output projection back to width 32."""
    from compress.distill import distill
    from compress.recipe import DistillConfig, StudentConfig

    cfg = DistillConfig(student=StudentConfig(hidden=16), max_steps=4, batch_size=16, max_length=32)
    return distill(teacher_artifact(teacher), cfg, context(out, train))
