"""The `compress` command: build, bench, inspect, schema.

Turns a CompressError into one line on stderr and its exit status (2; 1 for a
failed gate or a benchmark regression). Heavy imports happen inside commands.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from compress import __version__
from compress.errors import CompressError


def _echo(msg: str) -> None:
    print(f"compress: {msg}", file=sys.stderr, flush=True)


def _quiet_libraries() -> None:
    # Everything runs offline from installed packages; hub look-ups and library
    # progress bars are noise next to ours.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _DropNoise(logging.Filter):
    """onnxruntime's quantizer logs advice about its own pre-processing on every
    call through the root logger; it is not actionable for compress users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def cmd_build(args) -> int:
    from compress import distributed
    from compress import recipe as recipes
    from compress.pipeline import BuildOptions, build

    recipe = recipes.load(args.recipe)  # a bad recipe fails here, once, before any process starts
    distributed.check_nproc(args.nproc)
    if args.nproc > 1:
        distributed.check_recipe(recipe)
        _echo(f"build: {args.nproc} processes (gloo on CPU, nccl on GPUs)")
        return distributed.launch(args.nproc, _without_nproc(args.argv))
    w = distributed.init()
    opts = BuildOptions(targets=args.target or [], out_root=Path(args.out), cache_root=Path(args.cache),
                        progress=w.main and (not args.no_progress and sys.stderr.isatty() or args.progress),
                        bench=not args.no_bench, echo=_echo if w.main else (lambda msg: None))
    try:
        reports = build(recipe, opts)
    finally:
        distributed.shutdown()
    for r in reports:
        print(f"{Path(args.out) / r['target']}: report.json, report.md, provenance.json")
    return 0


def cmd_bench(args) -> int:
    from compress.pipeline import bench_build_dir
    from compress import bench

    result = bench_build_dir(Path(args.build_dir), Path(args.cache), runs=args.runs, teacher=not args.no_teacher,
                             rss=not args.no_rss, echo=_echo)
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps(result, indent=2, sort_keys=True))
    for name, m in result["models"].items():
        lat = m["latency_ms"]
        print(f"{name:22s} p50 {lat['p50']:8.2f} ms  p90 {lat['p90']:8.2f}  p99 {lat['p99']:8.2f}  "
              f"{m['throughput_per_s']:8.1f}/s  {m['size_bytes'] / 1e6:7.1f} MB")
    for name, r in result.get("ratios", {}).items():
        print(f"{name:34s} p50 ratio {r['p50']:.3f} (spread {r['spread'][0]:.3f}-{r['spread'][1]:.3f})")
    if args.baseline:
        path = Path(args.baseline)
        if not path.is_file():
            raise CompressError(f"baseline {path} does not exist; create it with compress bench {args.build_dir} --save {path}")
        regressions = bench.compare_to_baseline(result, json.loads(path.read_text()), tolerance=args.tolerance)
        if regressions:
            for msg in regressions:
                print(f"REGRESSION: {msg}")
            return 1
        print(f"no regression against {path} (tolerance {args.tolerance:.0%})")
    return 0


def cmd_inspect(args) -> int:
    path = Path(args.build_dir) / "report.json"
    if not path.is_file():
        raise CompressError(f"{args.build_dir} is not a compress build (no report.json); run compress build first")
    r = json.loads(path.read_text())
    from compress.report import one_line

    print(one_line(r, args.build_dir))
    print(f"teacher: {r['teacher']['source']} ({r['teacher']['digest'][:12]})")
    for st in r["stages"]:
        q = st["quality"]
        ret = ", ".join(f"{k} {v:.3f}" for k, v in q["retention"].items())
        print(f"  {st['stage']:10s} {st['kind']:6s} {st['digest'][:12]}  fidelity {q['fidelity']['cosine']:.3f}  retention {ret}")
    prov = json.loads((Path(args.build_dir) / "provenance.json").read_text())
    print(f"license: {prov['teacher']['license']}; train data sha256 {prov['data']['train']['sha256'][:12]} "
          f"({prov['data']['train']['inputs']} inputs)")
    return 0


def cmd_schema(args) -> int:
    from compress.recipe import schema

    print(json.dumps(schema(), indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compress", description="Distill, quantize, export and benchmark a model for edge targets.")
    p.add_argument("--version", action="version", version=f"compress {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build one or more targets (the embedded example when no recipe is given)")
    b.add_argument("-r", "--recipe", help="compress.yaml (default: the embedded example)")
    b.add_argument("-t", "--target", action="append", help="target to build (repeatable; default: the recipe's targets)")
    b.add_argument("-o", "--out", default="build", help="build directory root (default: build)")
    b.add_argument("--cache", default=os.environ.get("COMPRESS_CACHE", ".compress/cache"), help="stage cache (default: .compress/cache, or $COMPRESS_CACHE)")
    b.add_argument("--no-bench", action="store_true", help="skip the benchmark at the end")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.add_argument("--progress", action="store_true", help="progress bars even when stderr is not a terminal")
    b.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="distill with N processes on this machine (DistributedDataParallel; default 1)")
    b.set_defaults(func=cmd_build)

    be = sub.add_parser("bench", help="benchmark a build against the teacher's alternatives; gate on a baseline")
    be.add_argument("build_dir")
    be.add_argument("--baseline", help="earlier result (--save output); exit 1 if a ratio regressed beyond --tolerance")
    be.add_argument("--tolerance", type=float, default=0.10, help="allowed relative increase of a ratio (default 0.10)")
    be.add_argument("--save", help="write the result JSON here")
    be.add_argument("--runs", type=int, default=None, help="timed runs per model (default: the build's recipe)")
    be.add_argument("--no-teacher", action="store_true", help="measure only the build's model")
    be.add_argument("--no-rss", action="store_true", help="skip peak-RSS child processes")
    be.add_argument("--cache", default=os.environ.get("COMPRESS_CACHE", ".compress/cache"))
    be.set_defaults(func=cmd_bench)

    i = sub.add_parser("inspect", help="what is in a build and where it came from")
    i.add_argument("build_dir")
    i.set_defaults(func=cmd_inspect)

    s = sub.add_parser("schema", help="print the recipe's JSON Schema")
    s.set_defaults(func=cmd_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _quiet_libraries()
    logging.getLogger().addFilter(_DropNoise())
    try:
        return args.func(args)
    except CompressError as exc:
        print(f"compress: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("compress: interrupted; the cache keeps every finished stage", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
