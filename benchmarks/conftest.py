"""Benchmarks run against a finished build: COMPRESS_BENCH_BUILD (default
build/cpu) and the stage cache that made it (COMPRESS_CACHE, default
.compress/cache). They are not part of the test suite: run them with
`python -m pytest benchmarks --benchmark-json out.json` after `compress build`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def build_dir() -> Path:
    path = Path(os.environ.get("COMPRESS_BENCH_BUILD", "build/cpu"))
    if not (path / "report.json").is_file():
        pytest.skip(f"no build at {path}: run `compress build --target cpu` first (or set COMPRESS_BENCH_BUILD)")
    return path


@pytest.fixture(scope="session")
def report(build_dir) -> dict:
    return json.loads((build_dir / "report.json").read_text())


@pytest.fixture(scope="session")
def reference_models(build_dir, report):
    """The teacher's alternatives, from the cache that made the build."""
    from compress import recipe as recipes
    from compress import sources
    from compress.pipeline import Builder, BuildOptions, load_inputs

    recipe = recipes.parse(report["recipe"])
    builder = Builder(recipe, BuildOptions(targets=[report["target"]], progress=False,
                                           cache_root=Path(os.environ.get("COMPRESS_CACHE", ".compress/cache"))))
    builder.inputs = load_inputs(recipe)
    builder.teacher = sources.teacher_artifact(recipe.teacher.source, recipe.teacher.tokenizer, builder.cache, recipe.task)
    return {m.name: m for m in builder.reference_models(recipe.bench.threads)}
