"""The build: recipe -> stages (cached) -> target builds -> eval -> bench -> report.

Stages are plain functions; this module composes them in recipe order, wraps
each with the cache, timing and progress (instruments from outside, not inside
the stages), and writes build/<target>/ atomically at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from compress import data as datamod
from compress import distributed
from compress.artifact import META_FILE, Artifact
from compress.cache import Cache, make_key
from compress.errors import CacheError, GateFailed, RecipeError
from compress.recipe import ExportConfig, FallbackConfig, QuantizeConfig, Recipe

log = logging.getLogger(__name__)

EVAL_VERSION = 1
CALIBRATION_SAMPLES = 256
BENCH_VERSION = 2  # 2: the student's fp32 model is measured beside it
FLOPS_VERSION = 3  # 2: Gemm counted (GPT-2's projections); 3: and the Conv family
REFERENCE = "teacher-ort-int8"
STUDENT_FP32 = "student-fp32"
# quantize mode auto: a short in-run timing of the candidates on their target.
CHOICE_RUNS = 60
CHOICE_ROUNDS = 6


def stage_function(name: str) -> tuple[Callable, int]:
    """A stage is its function; this table names them (no discovery)."""
    if name == "distill":
        from compress import distill as mod
        return mod.distill, mod.VERSION
    if name == "prune":
        from compress import prune as mod
        return mod.prune, mod.VERSION
    if name == "export":
        from compress import export as mod
        return mod.export, mod.VERSION
    if name == "fuse":
        from compress import fuse as mod
        return mod.fuse, mod.VERSION
    if name == "quantize":
        from compress import quantize as mod
        return mod.quantize, mod.VERSION
    raise RecipeError(f"unknown stage '{name}'")


class Progress:
    """A tqdm bar on stderr, or a quiet stand-in when progress is off."""

    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)

    def update(self, n: int = 1, **postfix: float) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix({k: f"{v:.4f}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class StageContext:
    """What a stage may read, and the one directory it may write."""

    out: Path
    train_texts: list[str]
    validation_texts: list[str]
    max_length: int
    progress: Callable[..., Progress]
    teacher: Artifact | None = None
    calibration_texts: list[str] = field(default_factory=list)
    # The build's gates on a candidate ONNX model (tokenizer beside the stage's
    # input): (passed, {"score": margin, >= 0 passes, ...}). None without gates.
    accept: Callable[[Path], tuple[bool, dict]] | None = None
    cache_root: Path | None = None  # where stages keep reusable intermediates (teacher outputs); None: don't
    # The torch artifact the current ONNX model was exported from (quantize mode qat trains it).
    torch_source: Artifact | None = None
    train_labels: dict[str, int] | None = None  # classification: text -> class id, where the data has labels
    images: Any = None  # image-classification: vision.StageImages (the text fields stay empty)


@dataclass
class StageRecord:
    name: str
    key: str
    artifact: Artifact
    cached: bool
    seconds: float
    decision: dict | None = None  # quantize mode auto: what was measured and chosen

    def summary(self) -> dict:
        out = {"stage": self.name, "key": self.key, "digest": self.artifact.digest, "kind": self.artifact.kind,
               "cached": self.cached, "seconds": round(self.seconds, 2), "path": str(self.artifact.path),
               "size_bytes": self.artifact.size_bytes(),
               "meta": {k: v for k, v in self.artifact.meta.items() if k not in ("path",)}}
        if self.decision is not None:
            out["decision"] = self.decision
        return out


@dataclass
class BuildOptions:
    targets: list[str]
    out_root: Path = Path("build")
    cache_root: Path = Path(".compress/cache")
    progress: bool = True
    bench: bool = True
    echo: Callable[[str], None] = lambda msg: None


@dataclass
class Inputs:
    """Data of a build, loaded and checked before any stage runs."""

    train: list[str]
    heldout: list[str]
    eval_sets: list[Any]
    calibration: list[str] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)
    train_labels: dict[str, int] | None = None  # classification: text -> class id, where the data has labels


def load_inputs(recipe: Recipe) -> Inputs:
    if recipe.task == "image-classification":  # vision.Images instead of texts
        from compress import vision

        return vision.load_inputs(recipe)
    if recipe.task == "classification":  # labelled data, read with the teacher's label names
        from compress import classify

        return classify.load_inputs(recipe)
    d = recipe.data
    texts = datamod.load_texts(d.train.source, d.train.field, d.train.samples, where="data.train")
    texts += datamod.extra_texts(d)
    train, heldout = datamod.split_heldout(texts, d.heldout_fraction)
    if len(train) < 2 or len(heldout) < 2:
        raise RecipeError(f"data.train: {len(texts)} distinct inputs leave {len(train)} to train on and {len(heldout)} "
                          "held out; give more inputs (hundreds at least) or raise data.heldout_fraction")
    heldout = heldout[:d.heldout_samples]
    if recipe.task == "causal-lm":  # eval sets are plain texts, scored like the held-out split
        eval_sets = [datamod.load_text_eval(e.source, e.field, e.samples, f"data.eval[{i}]")
                     for i, e in enumerate(d.eval)]
    else:
        eval_sets = [datamod.load_eval(e.source, e.field, e.samples) for e in d.eval]
    if d.calibration is not None:
        calibration = datamod.load_texts(d.calibration.source, d.calibration.field,
                                         d.calibration.samples or CALIBRATION_SAMPLES, where="data.calibration")
    else:  # spread over the train inputs, not just the first ones
        step = max(1, len(train) // CALIBRATION_SAMPLES)
        calibration = train[::step][:CALIBRATION_SAMPLES]
    digests = {"train": datamod.texts_digest(train), "heldout": datamod.texts_digest(heldout),
               "calibration": datamod.texts_digest(calibration),
               **{f"eval:{s.name}": s.digest() for s in eval_sets}}
    return Inputs(train, heldout, eval_sets, calibration, digests)


def image_shape(inputs: Inputs) -> list[int] | None:
    """[c, h, w] of the train images (task image-classification), which an hf: teacher takes."""
    pixels = getattr(inputs.train, "pixels", None)
    return list(pixels.shape[1:]) if pixels is not None else None


def preflight(recipe: Recipe, targets: list[str]):
    """Everything that can be wrong with the request, found before any work."""
    from compress import sources
    from compress import targets as targets_pkg

    configured = recipe.targets.selected()
    chosen = targets or list(configured)
    if not chosen:
        raise RecipeError("no target: pass --target cpu or list one under targets: in the recipe")
    modules = {}
    plan = recipe.stage_plan()
    quantize = [c for n, c in plan if n == "quantize"]
    precision = (quantize[0].dtype if quantize else "fp32")  # int8 | fp16: what the targets must run
    if quantize and quantize[0].fallback.enabled and quantize[0].fallback.metric == "retention" \
            and recipe.gates.retention is None and recipe.gates.fidelity is None:
        raise RecipeError("stages.quantize.fallback.metric: retention checks candidates against the gates, and "
                          "none is set; set gates.retention (or gates.fidelity), or use metric: agreement")
    for name in chosen:
        mod = targets_pkg.get(name)
        cfg = configured.get(name) or _default_target_config(name)
        mod.check(cfg, precision)
        modules[name] = (mod, cfg)
    student_config = next((getattr(getattr(c, "student", None), "config", None) for n, c in plan if n == "distill"), None)
    if isinstance(student_config, str):  # a config.json: there, readable, sane
        from compress.models import student_config_fields

        student_config_fields(student_config)
    if recipe.task == "image-classification":
        from compress import vision

        vision.check_teacher(recipe.teacher.source)
        return modules, plan
    kind, _ = sources.check(recipe.teacher.source, recipe.teacher.tokenizer)
    if recipe.task == "causal-lm":
        from compress.lm_distill import check_teacher

        check_teacher(recipe.teacher.source)
    torch_stages = [n for n, _ in plan if n in ("distill", "prune")]
    if kind == "onnx" and torch_stages:
        raise RecipeError(f"stages: {torch_stages[0]} needs a torch teacher, but {recipe.teacher.source} is ONNX; use hf:<dir>, "
                          "or keep only quantize to build the ONNX model as it is")
    if kind == "onnx" and any(n == "quantize" and c.mode == "qat" for n, c in plan):
        raise RecipeError(f"stages.quantize.mode: qat trains the torch model the ONNX came from, but {recipe.teacher.source} "
                          "is ONNX; use an hf: teacher, or mode: static")
    if kind == "onnx" and any(n == "quantize" and c.mode == "auto" and "qat" in c.candidates for n, c in plan):
        raise RecipeError(f"stages.quantize.candidates: qat trains the torch model the ONNX came from, but "
                          f"{recipe.teacher.source} is ONNX; drop qat from the candidates")
    return modules, plan


def _default_target_config(name: str):
    from compress.recipe import TARGET_CONFIGS
    return TARGET_CONFIGS[name]()


class Builder:
    def __init__(self, recipe: Recipe, opts: BuildOptions):
        self.recipe = recipe
        self.opts = opts
        self._cache: Cache | None = None
        self.records: list[StageRecord] = []
        self.torch_source: Artifact | None = None

    @property
    def cache(self) -> Cache:
        # Created on first use, after the preflight checks: a request that is
        # wrong leaves no trace on disk.
        if self._cache is None:
            self._cache = Cache(self.opts.cache_root)
        return self._cache

    # -- instruments ------------------------------------------------------
    def progress(self, total: int, desc: str) -> Progress:
        return Progress(self.opts.progress, total, desc)

    def run_stage(self, name: str, fn: Callable, version: int, src: Artifact, cfg: Any,
                  extra: dict | None = None, label: str | None = None,
                  accept: Callable[[Path], tuple[bool, dict]] | None = None) -> StageRecord:
        label = label or name
        if src.meta.get("task", "embedding") != "embedding":
            # One model directory compresses differently per task (a classifier's base
            # encoder is an embedding teacher too); embedding keys stay as they were.
            extra = {**(extra or {}), "task": src.meta["task"]}
        key = make_key(src.digest, name, cfg.model_dump(mode="json"), version, extra or {})

        def make(out: Path) -> Artifact:
            self.opts.echo(f"{label}: running")
            if self.recipe.task == "image-classification":
                from compress.vision import StageImages

                images = StageImages(self.inputs.train, self.inputs.heldout[:32], self.inputs.calibration)
                ctx = StageContext(out=out, train_texts=[], validation_texts=[], max_length=self.recipe.teacher.max_length,
                                   progress=self.progress, teacher=self.teacher, accept=accept,
                                   cache_root=self.cache.root, torch_source=self.torch_source, images=images)
                return fn(src, cfg, ctx)
            ctx = StageContext(out=out, train_texts=self.inputs.train,
                               validation_texts=self.inputs.heldout[:32],
                               max_length=self.recipe.teacher.max_length, progress=self.progress,
                               teacher=self.teacher, calibration_texts=self.inputs.calibration, accept=accept,
                               cache_root=self.cache.root, torch_source=self.torch_source,
                               train_labels=self.inputs.train_labels)
            return fn(src, cfg, ctx)

        start = time.perf_counter()
        if distributed.active():
            art, hit = self.run_stage_ranked(name, key, make)
        else:
            art, hit = self.cache.artifact(key, make)
        seconds = time.perf_counter() - start
        self.opts.echo(f"{label}: {'cached' if hit else f'done in {_fmt(seconds)}'} ({art.kind}, {key[:12]})")
        return StageRecord(label, key, art, hit, seconds)

    def run_stage_ranked(self, name: str, key: str, make: Callable[[Path], Artifact]) -> tuple[Artifact, bool]:
        """run_stage on one rank of a distributed build (compress/distributed.py):
        the main rank decides hit or miss and owns the cache; a training stage
        runs on every rank, the others in a scratch directory they then drop;
        every rank continues from the main rank's entry."""
        w = distributed.world()
        hit = distributed.broadcast(self.cache.get(key) is not None if w.main else None)
        trains = name in distributed.TRAINING_STAGES and not hit
        art = None
        with distributed.training() if trains else contextlib.nullcontext():
            if w.main:
                art, hit = self.cache.artifact(key, make)
            elif trains:
                scratch = Path(tempfile.mkdtemp(prefix=f"rank{w.rank}-{key[:12]}.", dir=self.cache.tmp))
                try:
                    make(scratch)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
        path = Path(distributed.broadcast(str(art.path) if w.main else None))
        if not w.main:
            if not (path / META_FILE).is_file():
                raise CacheError(f"distributed build: rank {w.rank} cannot see the cache entry {path}; every rank "
                                 "needs the same cache directory (--cache on a filesystem all nodes share)")
            art = Artifact.load(path)
        return art, hit

    @staticmethod
    def leave_group(w: distributed.World) -> bool:
        """After the last training stage the ranks part: the main rank goes on
        alone (no more collectives), the others are done (True)."""
        distributed.shutdown()
        return not w.main

    # -- the build --------------------------------------------------------
    def build(self) -> list[dict]:
        from compress import sources

        modules, plan = preflight(self.recipe, self.opts.targets)
        w = distributed.world()
        if w.size > 1:
            distributed.check_recipe(self.recipe)
        self.inputs = load_inputs(self.recipe)
        self.teacher = sources.teacher_artifact(self.recipe.teacher.source, self.recipe.teacher.tokenizer,
                                                self.cache, self.recipe.task, echo=self.opts.echo,
                                                image_shape=image_shape(self.inputs))
        src = self.teacher
        auto = None
        # Ranks other than the main one only help train; they stop after the last training stage.
        last_training = max((i for i, (n, _) in enumerate(plan) if n in distributed.TRAINING_STAGES), default=-1)
        for i, (name, cfg) in enumerate(plan):
            if i > last_training and self.leave_group(w):
                return []
            if name == "export" and src.kind == "onnx":
                continue  # an ONNX teacher is already exported
            if name == "quantize" and cfg.mode == "auto" and cfg.dtype == "int8":  # fp16 has no modes
                # Which mode is fastest depends on the target: each target measures its own.
                assert name == plan[-1][0], "quantize must be the last stage for mode auto"
                auto = cfg
                continue
            if src.kind == "torch":  # what a later qat quantize trains
                self.torch_source = src
            record = self.run_stage(name, *stage_function(name), src, cfg, self.stage_extra(name, cfg),
                                    accept=self.stage_accept(name, cfg, src))
            self.records.append(record)
            src = record.artifact

        if self.leave_group(w):
            return []
        reports, target_records = [], []
        for tname, (mod, tcfg) in modules.items():
            stages = list(self.records)
            if auto is not None:  # the chosen candidate's target build is the build
                chosen, record = self.choose_quantization(auto, src, tname, mod, tcfg)
                stages.append(chosen)
                target_records.append(chosen)
            else:
                record = self.run_stage("target", mod.build, mod.VERSION, src, tcfg, label=f"target {tname}")
            target_records.append(record)
            reports.append(self.finish_target(tname, tcfg, record, stages, mod))
        if all(r.cached for r in [*self.records, *target_records]):
            self.opts.echo("no stage work: every stage came from the cache")
        failed = [r for r in reports if r["gates"]["failed"]]
        if failed:
            msgs = "; ".join(f"{r['target']}: {m}" for r in failed for m in r["gates"]["failed"])
            raise GateFailed(f"gate failed: {msgs} (artifacts and report kept in {self.opts.out_root})")
        return reports

    def stage_extra(self, name: str, cfg: Any) -> dict | None:
        """What a stage reads besides its input artifact, for its cache key."""
        if name == "distill" and "train_labels" in self.inputs.digests:  # and their labels (classification)
            return {"train": self.inputs.digests["train"], "train_labels": self.inputs.digests["train_labels"]}
        if name == "distill":  # reads the train inputs (and a student.config file); its input artifact is the teacher
            extra = {"train": self.inputs.digests["train"]}
            config = getattr(getattr(cfg, "student", None), "config", None)
            if isinstance(config, str):
                from compress.models import student_config_fields
                extra["student_config"] = student_config_fields(config)
            return extra
        if name == "prune":  # reads the train inputs and the teacher beside its input
            return {"train": self.inputs.digests["train"], "teacher": self.teacher.digest}
        if name == "quantize" and cfg.dtype == "int8" and cfg.fallback.enabled:
            # sensitivity reads calibration rows, the agreement check held-out inputs,
            # the retention check the gates, eval sets and the teacher's scores
            extra = {"calibration": self.inputs.digests["calibration"], "heldout": self.inputs.digests["heldout"],
                     "max_length": self.recipe.teacher.max_length}
            if cfg.fallback.metric == "retention":
                extra.update(gates=self.recipe.gates.model_dump(mode="json"), teacher=self.teacher.digest,
                             eval={k: v for k, v in self.inputs.digests.items() if k.startswith("eval:")})
            return extra
        if name == "quantize" and cfg.mode == "static":  # reads the calibration inputs, truncated to max_length
            return {"calibration": self.inputs.digests["calibration"], "max_length": self.recipe.teacher.max_length}
        if name == "quantize" and cfg.mode == "qat":  # trains the torch source towards the teacher
            from compress.qat import VERSION as qat_version
            return {"calibration": self.inputs.digests["calibration"], "train": self.inputs.digests["train"],
                    "teacher": self.teacher.digest, "torch_source": self.torch_source.digest, "qat": qat_version,
                    "max_length": self.recipe.teacher.max_length}
        return None

    def stage_accept(self, name: str, cfg: Any, src: Artifact) -> Callable[[Path], tuple[bool, dict]] | None:
        """The quantize fallback's retention check, when the recipe asks for it."""
        if name == "quantize" and cfg.dtype == "int8" and cfg.fallback.enabled and cfg.fallback.metric == "retention":
            return self.candidate_gates(src)
        return None

    def choose_quantization(self, cfg: QuantizeConfig, src: Artifact, tname: str, mod: Any,
                            tcfg: Any) -> tuple[StageRecord, StageRecord]:
        """quantize mode auto: quantize in every candidate mode, build each for the
        target, time them there (interleaved blocks, one session alive at a time)
        and keep the fastest whose quality holds: it passes the recipe's gates and
        keeps fidelity within max_fidelity_drop of the best candidate."""
        from compress import bench
        from compress import report as rep

        fn, version = stage_function("quantize")
        self.teacher_eval = self.evaluate(self.teacher, "teacher")
        records, targets, builds, quality = {}, {}, {}, {}

        def candidate(mode: str) -> None:
            mcfg = cfg.model_copy(update={"mode": mode})
            records[mode] = self.run_stage("quantize", fn, version, src, mcfg, self.stage_extra("quantize", mcfg),
                                           accept=self.stage_accept("quantize", mcfg, src),
                                           label=f"quantize ({mode} candidate)")
            targets[mode] = self.run_stage("target", mod.build, mod.VERSION, records[mode].artifact, tcfg,
                                           label=f"target {tname} ({mode} candidate)")
            builds[mode] = targets[mode].artifact
            quality[mode] = self.quality(builds[mode], f"{tname} {mode} candidate")

        listed = list(dict.fromkeys(cfg.candidates))
        # QAT trains: it is tried last, and only when no post-training candidate passes the gates.
        post_training = [m for m in listed if m != "qat"] or listed
        for mode in post_training:
            candidate(mode)
        not_tried = [m for m in listed if m not in post_training]
        if not_tried and not any(rep.gates(self.recipe, quality[m])["passed"] for m in post_training):
            self.opts.echo(f"quantize: no post-training candidate passes the gates on {tname}; trying qat")
            candidate("qat")
            not_tried = []
        modes = list(builds)
        b = self.recipe.bench
        cond = bench.Conditions(batch=b.batch, seq_len=b.seq_len, threads=tcfg.threads, warmup=b.warmup,
                                runs=CHOICE_RUNS, rounds=CHOICE_ROUNDS, measure_rss=False,
                                vocab_size=src.meta.get("vocab_size", 30522),
                                image_shape=tuple(src.meta["input_shape"]) if src.meta.get("input_shape") else None)
        first = modes[0]
        models = [bench.BenchModel(m, "onnx", str(a.model_file)) for m, a in builds.items()]
        key = make_key([(m, a.digest) for m, a in builds.items()], cond.__dict__, machine_fingerprint(), "choose", 1)
        if len(models) > 1:
            self.opts.echo(f"quantize: timing {', '.join(modes)} on target {tname}")
            timing, _ = self.cache.json(key, lambda: bench.run(models, cond, reference=first))
        else:
            timing = None
        ratios = {m: (1.0 if m == first else timing["ratios"][f"{m}/{first}"]["p50"]) if timing else None
                  for m in modes}
        table, chosen, reason = pick_quantization(
            {m: {"p50_ms": timing["models"][m]["latency_ms"]["p50"] if timing else None, "ratio": ratios[m],
                 "fidelity": quality[m]["fidelity"]["cosine"],
                 "retention_min": min(quality[m]["retention"].values()) if quality[m]["retention"] else None,
                 "gate_failures": rep.gates(self.recipe, quality[m])["failed"]} for m in modes},
            cfg.max_fidelity_drop)
        decision = {"candidates": table, "chosen": chosen, "reason": reason, "target": tname,
                    "conditions": timing["conditions"] if timing else None,
                    "not_tried": {m: "a post-training candidate passed the gates" for m in not_tried}}
        timed = "; " + ", ".join(f"{m} p50 {table[m]['p50_ms']:.2f} ms" for m in modes) if timing else ""
        self.opts.echo(f"quantize: chose {chosen} for {tname} ({reason}{timed})")
        rec, target = records[chosen], targets[chosen]
        return (StageRecord("quantize", rec.key, rec.artifact, all(r.cached for r in records.values()),
                            sum(r.seconds for r in records.values()), decision),
                StageRecord(f"target {tname}", target.key, target.artifact, target.cached, target.seconds))

    # -- eval ---------------------------------------------------------------
    def evaluate(self, art: Artifact, label: str) -> tuple[dict, Any]:
        import numpy as np

        from compress import tasks
        from compress.encoders import open_encoder

        scored = {k: v for k, v in self.inputs.digests.items() if k == "heldout" or k.startswith("eval:")}
        reference = None
        if self.recipe.task == "causal-lm" and art.digest != self.teacher.digest:
            # next-token agreement is with the teacher's tokens: its outputs are an input
            reference = self.evaluate(self.teacher, "teacher")[1]
            scored = {**scored, "reference": self.teacher.digest}
        key = make_key(art.digest, "eval", scored, self.recipe.teacher.max_length, EVAL_VERSION)

        def make(out: Path) -> None:
            self.opts.echo(f"eval {label}: running")
            enc = open_encoder(art, self.recipe.teacher.max_length)
            metrics, heldout = tasks.evaluate(self.recipe.task, enc, self.inputs.eval_sets, self.inputs.heldout,
                                              reference)
            if isinstance(heldout, dict):  # several named arrays (causal-lm)
                np.savez(out / "outputs.npz", **heldout)
            else:
                np.save(out / "heldout.npy", heldout)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
            (out / "meta.json").write_text(json.dumps({"kind": "eval"}))

        path, hit = self.cache.produce(key, make)
        metrics = json.loads((path / "metrics.json").read_text())
        if (path / "outputs.npz").is_file():
            with np.load(path / "outputs.npz") as z:
                return metrics, {k: z[k] for k in z.files}
        return metrics, np.load(path / "heldout.npy")

    def candidate_gates(self, src: Artifact) -> Callable[[Path], tuple[bool, dict]]:
        """The recipe's gates on a candidate ONNX model that runs with src's
        tokenizer (the quantize fallback's check); score = the smallest margin."""
        from compress import evaluate as ev
        from compress.encoders import OnnxEncoder
        from compress.report import gates

        g = self.recipe.gates

        def accept(model: Path) -> tuple[bool, dict]:
            enc = OnnxEncoder(model, src.path, self.recipe.teacher.max_length)
            metrics, emb = ev.run(enc, self.inputs.eval_sets, self.inputs.heldout)
            t_metrics, t_emb = self.evaluate(self.teacher, "teacher")
            quality = {"retention": ev.retention(metrics, t_metrics), "fidelity": ev.fidelity(emb, t_emb)}
            margins = [v - g.retention for v in quality["retention"].values()] if g.retention is not None else []
            if g.fidelity is not None:
                margins.append(quality["fidelity"]["cosine"] - g.fidelity)
            margins = [m if m == m else float("-inf") for m in margins]  # a NaN metric fails, as in the gates
            verdict = gates(self.recipe, quality)
            return verdict["passed"], {"score": min(margins), "retention": quality["retention"],
                                       "fidelity": quality["fidelity"]["cosine"], "failed": verdict["failed"]}
        return accept

    def quality(self, art: Artifact, label: str) -> dict:
        from compress import tasks

        metrics, emb = self.evaluate(art, label)
        t_metrics, t_emb = self.teacher_eval
        return {"metrics": metrics, "retention": tasks.retention(self.recipe.task, metrics, t_metrics),
                "fidelity": tasks.fidelity(self.recipe.task, emb, t_emb)}

    # -- bench ----------------------------------------------------------------
    def reference_models(self, threads: int) -> list:
        """The teacher as a user would deploy it without compress: torch eager,
        ONNX Runtime fp32 with its transformer optimizer, and dynamic int8. An
        alternative that cannot be made for this teacher is left out, with the
        reason in self.skipped_references (the report shows it)."""
        from compress import bench, quantize as q
        from compress.export import VERSION as export_version, export

        t = self.teacher
        if self.recipe.task == "image-classification":
            return self.image_reference_models()
        models = []
        self.skipped_references = {}

        def attempt(names: tuple[str, ...], make: Callable[[], Artifact]) -> Artifact | None:
            try:
                return make()
            except Exception as exc:  # an optional yardstick: say why it is missing, and build on
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                reason = f"{type(exc).__name__}: {first}"
                for name in names:
                    self.skipped_references[name] = reason
                self.opts.echo(f"bench: {', '.join(names)} skipped ({reason})")
                return None

        if t.kind == "torch":
            # a causal LM runs with its LM head (AutoModelForCausalLM), as its ONNX export does
            kind = "torch-hf-lm" if self.recipe.task == "causal-lm" else "torch-hf"
            models.append(bench.BenchModel("teacher-torch-fp32", kind, str(t.path)))
            fp32 = attempt(("teacher-ort-fp32", REFERENCE), lambda: self.run_stage(
                "export", export, export_version, t, ExportConfig(), label="reference: teacher export").artifact)
        else:
            fp32 = t
        if fp32 is None:
            return models
        optimized = attempt(("teacher-ort-fp32",), lambda: self.run_stage(
            "optimize-reference", optimize_reference, 1, fp32, ExportConfig(),
            label="reference: teacher ORT transformer optimizer").artifact)
        # Optimum's dynamic avx512_vnni config: per-tensor int8 weights. Pinned here so
        # the reference does not move when compress's own defaults do.
        int8 = attempt((REFERENCE,), lambda: self.run_stage(
            "quantize", q.quantize, q.VERSION, fp32,
            QuantizeConfig(mode="dynamic", per_channel=False, fallback=FallbackConfig(enabled=False)),
            label="reference: teacher dynamic int8").artifact)
        tok = [str(t.path / n) for n in fp32.meta.get("tokenizer_files", [])]
        if optimized is not None:
            models.append(bench.BenchModel("teacher-ort-fp32", "onnx", str(optimized.model_file),
                                           (str(optimized.model_file), *tok)))
        if int8 is not None:
            models.append(bench.BenchModel(REFERENCE, "onnx", str(int8.model_file), (str(int8.model_file), *tok)))
        return models

    def image_reference_models(self) -> list:
        """An image teacher as deployed without compress: torch eager, its ONNX
        export in fp32 (ONNX Runtime's own optimizations at load), and static QDQ
        int8 of every Conv (dynamic int8 would leave Convs as slow ConvInteger)."""
        from compress import bench, quantize as q
        from compress.export import VERSION as export_version, export

        t = self.teacher
        fp32 = self.run_stage("export", export, export_version, t, ExportConfig(), label="reference: teacher export").artifact
        # Pinned so the reference does not move when compress's own defaults do.
        int8 = self.run_stage("quantize", q.quantize, q.VERSION, fp32,
                              QuantizeConfig(mode="static", calibration="minmax", per_channel=True,
                                             fallback=FallbackConfig(enabled=False)),
                              label="reference: teacher static int8").artifact
        return [bench.BenchModel("teacher-torch-fp32", "torch-image", str(t.path)),
                bench.BenchModel("teacher-ort-fp32", "onnx", str(fp32.model_file)),
                bench.BenchModel(REFERENCE, "onnx", str(int8.model_file))]

    def benchmark(self, final: Artifact, fp32_build: Artifact | None = None) -> dict:
        from compress import bench

        b = self.recipe.bench
        cond = bench_conditions(b, final.meta.get("vocab_size", 30522), image_shape=final.meta.get("input_shape"))
        student = bench.BenchModel("student", "onnx", str(final.model_file), tuple(str(p) for p in final.files()))
        models = [student]
        if fp32_build is not None:  # so the report can say when int8 is slower than fp32
            models.append(bench.BenchModel(STUDENT_FP32, "onnx", str(fp32_build.model_file),
                                           tuple(str(p) for p in fp32_build.files())))
        models += self.reference_models(b.threads) if b.teacher else []
        reference = REFERENCE if any(m.name == REFERENCE for m in models) else None
        key = make_key(final.digest, [(m.name, m.kind, _file_digest(m.path)) for m in models], b.model_dump(),
                       machine_fingerprint(), BENCH_VERSION)

        def make() -> dict:
            self.opts.echo(f"bench: {len(models)} models, {b.runs} timed runs each")
            result = bench.run(models, cond, reference=reference, progress=lambda m: log.info("bench: %s", m))
            if fp32_build is not None:
                result["ratios"].update(fp32_ratio(result))
            return result

        result, hit = self.cache.json(key, make)
        if hit:
            self.opts.echo("bench: cached (same models, conditions and machine)")
        skipped = getattr(self, "skipped_references", {}) if b.teacher else {}
        return {**result, "skipped": skipped} if skipped else result

    # -- compute -----------------------------------------------------------------
    def compute_stats(self, final: Artifact, records: list[StageRecord]) -> dict | None:
        """Matrix-product FLOPs of one forward at the bench point, of the teacher
        and the student, both counted on their ONNX graphs (compress/graphstats.py)
        so the two figures are comparable; the student's graph is the last stage's,
        before the target's runtime fuses MatMuls into ops the count does not know."""
        from compress.export import VERSION as export_version, export
        from compress.graphstats import matmul_flops

        b = self.recipe.bench
        student = next((r.artifact for r in reversed(records) if r.artifact.kind == "onnx"), None)
        teacher = self.teacher
        if teacher.kind == "torch":  # the same cached export the bench reference uses
            teacher = self.run_stage("export", export, export_version, teacher, ExportConfig(),
                                     label="reference: teacher export").artifact

        def flops(art: Artifact) -> int:
            key = make_key(art.digest, "flops", b.batch, b.seq_len, FLOPS_VERSION)
            counted, _ = self.cache.json(key, lambda: matmul_flops(art.model_file, b.batch, b.seq_len))
            return counted["int8"] + counted["float"]

        try:
            counted = {"teacher_flops": flops(teacher), "student_flops": flops(student or teacher)}
        except Exception as exc:  # symbolic shape inference gives up on some graphs: report no count, build on
            log.warning("compute: FLOPs not counted (%s: %s)", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return None
        if teacher.meta.get("input_shape"):  # images: the input is fixed but for the batch
            return {"batch": b.batch, "seq_len": None, "input": [b.batch, *teacher.meta["input_shape"]], **counted}
        return {"batch": b.batch, "seq_len": b.seq_len, **counted}

    # -- per target -------------------------------------------------------------
    def finish_target(self, tname: str, tcfg: Any, record: StageRecord, records: list[StageRecord], mod: Any) -> dict:
        from compress import report as rep

        final = record.artifact
        self.teacher_eval = self.evaluate(self.teacher, "teacher")
        stages = []
        for r in [*records, record]:
            summary = r.summary()
            summary["quality"] = self.quality(r.artifact, r.name)
            stages.append(summary)
        # The same student in fp32 through the same target build: the yardstick for
        # "did quantization keep the runtime's fusions, and is int8 really faster".
        fp32_build, warnings = None, []
        fp32_src = next((r.artifact for r in reversed(records)
                         if r.artifact.kind == "onnx" and r.artifact.meta.get("precision") == "fp32"), None)
        if final.meta.get("precision") == "int8" and fp32_src is not None:
            fp32_build = self.run_stage("target", mod.build, mod.VERSION, fp32_src, tcfg,
                                        label=f"target {tname} (fp32, for comparison)").artifact
            if hasattr(mod, "compare_graphs") and "graph" in final.meta and "graph" in fp32_build.meta:
                warnings += mod.compare_graphs(final.meta["graph"], fp32_build.meta["graph"])
        bench_result = self.benchmark(final, fp32_build) if self.opts.bench else None
        slower = (bench_result or {}).get("ratios", {}).get(f"student/{STUDENT_FP32}")
        if slower and slower["p50"] > 1.0:
            warnings.insert(0, f"the int8 build is SLOWER than its fp32 model: p50 ratio {slower['p50']:.2f} "
                               f"(spread {slower['spread'][0]:.2f}-{slower['spread'][1]:.2f}); "
                               "try quantize.mode: dynamic or drop the quantize stage")
        for w in warnings:
            self.opts.echo(f"WARNING {tname}: {w}")
        report = rep.make_report(self.recipe, tname, tcfg, self.teacher, self.teacher_eval[0], stages,
                                 bench_result, self.inputs, warnings, compute=self.compute_stats(final, records))
        rep.write_build(self.opts.out_root, tname, final, report, rep.provenance(self.recipe, self.teacher, self.inputs, final))
        self.opts.echo(rep.one_line(report, self.opts.out_root / tname))
        return report


def pick_quantization(candidates: dict[str, dict], max_fidelity_drop: float) -> tuple[dict, str, str]:
    """The fastest candidate (lowest `ratio`) among those that pass the gates and
    keep fidelity within max_fidelity_drop of the best; if none does, the one with
    the highest fidelity (the gates then fail the build). Returns (table, chosen, reason)."""
    best = max(c["fidelity"] for c in candidates.values())
    table = {}
    for mode, c in candidates.items():
        close = c["fidelity"] >= best - max_fidelity_drop
        why = "; ".join(c["gate_failures"]) or (None if close else
              f"fidelity {c['fidelity']:.3f} is more than {max_fidelity_drop} below the best candidate's {best:.3f}")
        table[mode] = {**{k: v for k, v in c.items() if k != "gate_failures"},
                       "eligible": not c["gate_failures"] and close, "why_not": why}
    eligible = [m for m in candidates if table[m]["eligible"]]
    if not eligible:
        return table, max(candidates, key=lambda m: table[m]["fidelity"]), \
            "no candidate keeps quality; kept the one with the highest fidelity"
    timed = all(table[m]["ratio"] is not None for m in eligible)
    chosen = min(eligible, key=lambda m: table[m]["ratio"]) if timed else eligible[0]
    if len(eligible) == 1:
        return table, chosen, "the only candidate that keeps quality"
    return table, chosen, "fastest of the candidates that keep quality"


def fp32_ratio(result: dict) -> dict:
    """student / student-fp32 from a result that measured both (in the same blocks)."""
    import statistics

    mine, theirs = result["models"]["student"], result["models"][STUDENT_FP32]
    per_round = [a / b for a, b in zip(mine["round_p50_ms"], theirs["round_p50_ms"])]
    return {f"student/{STUDENT_FP32}": {"p50": statistics.median(per_round), "spread": [min(per_round), max(per_round)],
                                        "throughput": mine["throughput_per_s"] / theirs["throughput_per_s"]}}


def bench_conditions(b, vocab_size: int, runs: int | None = None, rss: bool | None = None,
                     image_shape: list[int] | None = None):
    """The recipe's bench settings as the engine's Conditions (runs/rss overridable)."""
    from compress import bench

    runs = runs or b.runs
    return bench.Conditions(batch=b.batch, seq_len=b.seq_len, threads=b.threads, warmup=b.warmup, runs=runs,
                            rounds=min(b.rounds, runs), measure_rss=b.rss if rss is None else rss,
                            vocab_size=vocab_size, image_shape=tuple(image_shape) if image_shape else None)


def optimize_reference(src: Artifact, cfg: Any, ctx) -> Artifact:
    """ONNX Runtime's transformer optimizer on an fp32 model (the Optimum -O2 path)."""
    from onnxruntime.transformers.optimizer import optimize_model

    from compress.artifact import seal

    # a causal LM's export records its family (gpt2, ...); encoders are BERT-style
    opt = optimize_model(str(src.model_file), model_type=src.meta.get("model_type", "bert"),
                         num_heads=src.meta.get("num_heads", 0),
                         hidden_size=src.meta.get("hidden_size", 0), opt_level=1)
    opt.save_model_to_file(str(ctx.out / "model.onnx"))
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    return seal(ctx.out, "onnx", {**src.meta, "parent": src.digest, "fused_operators": fused})


def _file_digest(path: str) -> str:
    from compress.artifact import digest_files

    p = Path(path)
    return digest_files(p) if p.is_dir() else digest_files(p.parent, [p])


def machine_fingerprint() -> dict:
    import platform

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "node": platform.node()}


def _fmt(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def build(recipe: Recipe, opts: BuildOptions) -> list[dict]:
    return Builder(recipe, opts).build()


def bench_build_dir(build_dir: Path, cache_root: Path, runs: int | None = None, teacher: bool = True,
                    rss: bool = True, echo: Callable[[str], None] = lambda m: None) -> dict:
    """`compress bench`: measure a finished build (always fresh, never cached)."""
    from compress import bench, sources
    from compress import recipe as recipes
    from compress.artifact import digest_files

    report_path = build_dir / "report.json"
    if not report_path.is_file():
        raise CacheError(f"{build_dir} is not a compress build (no report.json); run compress build first")
    report = json.loads(report_path.read_text())
    recipe = recipes.parse(report["recipe"], origin=f"{report_path} recipe")
    b = recipe.bench
    builder = Builder(recipe, BuildOptions(targets=[report["target"]], cache_root=cache_root, progress=False, echo=echo))
    builder.inputs = load_inputs(recipe)
    builder.teacher = sources.teacher_artifact(recipe.teacher.source, recipe.teacher.tokenizer, builder.cache, recipe.task,
                                               image_shape=image_shape(builder.inputs))
    files = tuple(str(p) for p in sorted(build_dir.iterdir())
                  if p.is_file() and p.name not in ("report.json", "report.md", "provenance.json"))
    models = [bench.BenchModel("student", "onnx", str(build_dir / "model.onnx"), files)]
    if teacher:
        models += builder.reference_models(b.threads)
    final_meta = report["stages"][-1]["meta"]
    cond = bench_conditions(b, final_meta.get("vocab_size", 30522), runs=runs, rss=rss,
                            image_shape=final_meta.get("input_shape"))
    echo(f"bench: {len(models)} models, {cond.runs} timed runs each")
    reference = REFERENCE if any(m.name == REFERENCE for m in models) else None
    result = bench.run(models, cond, reference=reference, progress=lambda m: log.info("bench: %s", m))
    skipped = getattr(builder, "skipped_references", {}) if teacher else {}
    return {**result, "skipped": skipped} if skipped else result
