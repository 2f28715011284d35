"""Latency and retention of one student in fp32, dynamic int8, static int8 and
pruned + static int8, measured in one run against the teacher's ONNX Runtime
dynamic int8 (BENCHMARKING.md: ratios in one run, one session alive at a time).

Each variant is a compress build of the base recipe (default: the embedded
example) with its stages swapped, so the distilled student is shared through
the cache and only quantization (and pruning) differ:

    python benchmarks/quantization_modes.py [-r base.yaml] [--out results.json] [--cache DIR]

Writes a JSON result and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

VARIANTS = ("fp32", "dynamic-int8", "static-int8", "pruned-static-int8")


def variant_recipes(base) -> dict:
    """The base recipe with its stages replaced per variant; distill is kept as is."""
    from compress import recipe as recipes

    data = base.model_dump(mode="json", exclude_none=True)
    stages = {next(iter(e)): next(iter(e.values())) for e in data["stages"]}
    distill = [{"distill": stages["distill"]}] if "distill" in stages else []
    prune = [{"prune": stages.get("prune", {})}]
    quant = {k: v for k, v in stages.get("quantize", {}).items() if k not in ("mode", "candidates")}
    plans = {
        "fp32": distill,
        "dynamic-int8": distill + [{"quantize": {**quant, "mode": "dynamic"}}],
        "static-int8": distill + [{"quantize": {**quant, "mode": "static"}}],
        "pruned-static-int8": distill + prune + [{"quantize": {**quant, "mode": "static"}}],
    }
    return {name: recipes.parse({**data, "stages": plan, "gates": {}}, origin=f"variant {name}")
            for name, plan in plans.items()}


def run(base, cache_root: Path, out_root: Path, echo=lambda m: None) -> dict:
    from compress import bench, sources
    from compress.pipeline import Builder, BuildOptions, REFERENCE, bench_conditions, load_inputs

    reports = {}
    for name, recipe in variant_recipes(base).items():
        echo(f"building {name}")
        opts = BuildOptions(targets=["cpu"], out_root=out_root / name, cache_root=cache_root, progress=sys.stderr.isatty(),
                            bench=False, echo=echo)
        reports[name] = Builder(recipe, opts).build()[0]

    builder = Builder(base, BuildOptions(targets=["cpu"], cache_root=cache_root, progress=False))
    builder.inputs = load_inputs(base)
    builder.teacher = sources.teacher_artifact(base.teacher.source, base.teacher.tokenizer, builder.cache, base.task)
    reference = next(m for m in builder.reference_models(base.bench.threads) if m.name == REFERENCE)
    models = [bench.BenchModel(name, "onnx", str(out_root / name / "cpu" / "model.onnx")) for name in reports]
    cond = bench_conditions(base.bench, reports["fp32"]["stages"][-1]["meta"].get("vocab_size", 30522), rss=False)
    echo(f"timing {len(models) + 1} models, {cond.runs} runs each in {cond.rounds} alternating blocks")
    timing = bench.run(models + [reference], cond, reference=REFERENCE)

    rows = {}
    for name, rep in reports.items():
        s = rep["summary"]
        ratio = timing["ratios"][f"{name}/{REFERENCE}"]
        rows[name] = {"p50_ms": timing["models"][name]["latency_ms"]["p50"], "ratio_to_teacher_int8": ratio["p50"],
                      "spread": ratio["spread"], "retention": s["retention"], "retention_min": s["retention_min"],
                      "fidelity": s["fidelity"]["cosine"], "int8_flop_share": s["int8_flop_share"],
                      "size_bytes": s["size_bytes"], "params": rep["final"]["params"]}
    return {"conditions": timing["conditions"], "reference_p50_ms": timing["models"][REFERENCE]["latency_ms"]["p50"],
            "variants": rows, "recipe": base.model_dump(mode="json", exclude_none=True)}


def table(result: dict) -> str:
    lines = ["| variant | p50 ms | p50 / teacher ORT int8 (spread) | retention min | fidelity | int8 FLOP share | size MB |",
             "|---|---|---|---|---|---|---|"]
    for name, r in result["variants"].items():
        share = "n/a" if r["int8_flop_share"] is None else f"{r['int8_flop_share']:.1%}"
        lines.append(f"| {name} | {r['p50_ms']:.2f} | {r['ratio_to_teacher_int8']:.3f} ({r['spread'][0]:.2f}-{r['spread'][1]:.2f}) | "
                     f"{r['retention_min']:.3f} | {r['fidelity']:.3f} | {share} | {r['size_bytes'] / 1e6:.1f} |")
    lines.append(f"\nteacher ORT dynamic int8 p50 {result['reference_p50_ms']:.2f} ms in the same run; "
                 f"batch {result['conditions']['batch']}, sequence {result['conditions']['seq_len']}, "
                 f"{result['conditions']['threads']} threads, allow_spinning {result['conditions'].get('allow_spinning')}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    import os

    from compress import recipe as recipes
    from compress.cli import _quiet_libraries

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-r", "--recipe", help="base recipe (default: the embedded example)")
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--cache", default=os.environ.get("COMPRESS_CACHE", ".compress/cache"))
    args = p.parse_args(argv)
    _quiet_libraries()
    base = recipes.load(args.recipe)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(base, Path(args.cache), Path(tmp), echo=lambda m: print(f"quantization_modes: {m}", file=sys.stderr))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
