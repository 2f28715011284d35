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
