"""The benchmark engine: latency, throughput, peak memory, size and energy of a
build's model and of the teacher's alternatives, measured in one run so that
their ratios are meaningful. Used at the end of `compress build` and by `compress bench`.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import inspect
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

from compress.errors import BenchError

logger = logging.getLogger(__name__)

# Watts one fully busy core draws, for estimating energy where no meter exists.
# Rough figures per device class; the profile used is named in every estimate.
POWER_PROFILES = {
    "x86-64-server": 10.0,
    "x86-64-laptop": 5.0,
    "arm64-edge": 1.5,
}

# ONNX Runtime lets intra-op threads spin after each run unless told otherwise;
# the option is then absent from the session config, so this is what we record.
ORT_ALLOW_SPINNING_DEFAULT = "1"

RAPL_ENERGY_FILE = "/sys/class/powercap/intel-rapl:0/energy_uj"
RAPL_RANGE_FILE = "/sys/class/powercap/intel-rapl:0/max_energy_range_uj"

# CPU features that decide which kernels a runtime can use (int8 dot products,
# bf16, AMX tiles on x86; dot-product and i8mm on ARM).
RELEVANT_CPU_FLAGS = (
    "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
    "asimd", "asimddp", "i8mm", "bf16", "sve", "sve2",
)

# [CLS] and [SEP] of BERT-style vocabularies; ordinary tokens are drawn above
# the range where such vocabularies keep their special and unused tokens.
CLS_ID = 101
SEP_ID = 102
FIRST_ORDINARY_ID = 1000

KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")
ONNX_INT_TYPES = {"tensor(int64)": "int64", "tensor(int32)": "int32"}

THROUGHPUT_WARMUP = 3
CHILD_RUNS = 5


@dataclass(frozen=True)
class BenchModel:
    """One model to time: an .onnx file ("onnx") or a Hugging Face model directory
    ("torch-hf": its base model; "torch-hf-lm": a causal LM with its LM head)."""

    name: str
    kind: str
    path: str
    # Everything the model needs on the target (model + tokenizer files);
    # empty means just `path`, recursively if it is a directory.
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class Conditions:
    """The fixed point every model is measured at (BENCHMARKING.md's default point)."""

    batch: int = 1
    seq_len: int = 128
    threads: int = 2
    warmup: int = 10
    runs: int = 100  # timed runs per model in total, split over `rounds` blocks
    rounds: int = 4  # blocks per model, alternated A B C A B C ...
    throughput_batch: int = 8
    throughput_runs: int = 20
    measure_rss: bool = True
    vocab_size: int = 30522
    # Image models: [channels, height, width] of pixel_values (then seq_len and vocab_size are unused).
    image_shape: tuple[int, ...] | None = None


KINDS = ("onnx", "torch-hf", "torch-hf-lm", "torch-image")


# ---------------------------------------------------------------- inputs


def make_inputs(batch: int, seq_len: int, vocab_size: int, image_shape: tuple[int, ...] | None = None) -> dict:
    """Deterministic token ids framed by [CLS] ... [SEP], a full mask and zero segment ids;
    with image_shape, deterministic pixel_values in [0, 1] beside them."""
    import numpy as np

    if image_shape is not None:
        pixels = np.random.RandomState(0).rand(batch, *image_shape).astype(np.float32)
        return {**make_inputs(batch, seq_len, vocab_size), "pixel_values": pixels}

    rng = np.random.RandomState(0)
    input_ids = rng.randint(FIRST_ORDINARY_ID, vocab_size, size=(batch, seq_len)).astype(np.int64)
    input_ids[:, 0] = CLS_ID
    input_ids[:, -1] = SEP_ID
    return {
        "input_ids": input_ids,
        "attention_mask": np.ones((batch, seq_len), dtype=np.int64),
        "token_type_ids": np.zeros((batch, seq_len), dtype=np.int64),
    }


# ---------------------------------------------------------------- runners


class _OrtRunner:
    """An ONNX Runtime session configured the way BENCHMARKING.md fixes it."""

    def __init__(self, name: str, path: str, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise BenchError(
                f"cannot benchmark {name}: ONNX Runtime could not load {path}: {_first_line(exc)}; "
                f"check the file with onnx.checker.check_model"
            ) from exc
        self.name = name
        self.path = path

    def prepare(self, inputs: dict) -> dict:
        # Feed only what the graph declares, in the integer type it declares.
        feed = {}
        for declared in self.session.get_inputs():
            if declared.name not in inputs:
                raise BenchError(
                    f"cannot benchmark {self.name}: {self.path} declares input {declared.name!r}, "
                    f"expected only {', '.join(KNOWN_INPUTS)}; export the model with those inputs"
                )
            if declared.name == "pixel_values" and declared.type == "tensor(float)":
                feed[declared.name] = inputs[declared.name]
                continue
            dtype = ONNX_INT_TYPES.get(declared.type)
            if dtype is None:
                raise BenchError(
                    f"cannot benchmark {self.name}: input {declared.name!r} of {self.path} is "
                    f"{declared.type}, expected tensor(int64); export token inputs as int64"
                )
            feed[declared.name] = inputs[declared.name].astype(dtype)
        return feed

    def __call__(self, feed: dict) -> None:
        self.session.run(None, feed)

    def close(self) -> None:
        # Drop the only reference so the session and its spinning threads go away.
        self.session = None


class _TorchRunner:
    """A Hugging Face model in fp32, eager PyTorch (no compile), under inference_mode."""

    def __init__(self, name: str, path: str, threads: int, causal_lm: bool = False):
        import torch
        from transformers import AutoModel, AutoModelForCausalLM

        self.torch = torch
        self.previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        # transformers draws a progress bar on every load; a run loads the model
        # once per block, and the caller shows its own progress.
        from transformers.utils import logging as hf_logging

        bar_was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            auto = AutoModelForCausalLM if causal_lm else AutoModel
            self.model = auto.from_pretrained(path, dtype=torch.float32)
        except Exception as exc:
            torch.set_num_threads(self.previous_threads)
            raise BenchError(
                f"cannot benchmark {name}: transformers could not load {path}: {_first_line(exc)}; "
                f"pass a directory written by save_pretrained"
            ) from exc
        finally:
            if bar_was_enabled:
                hf_logging.enable_progress_bar()
        self.model.eval()
        self.causal_lm = causal_lm
        self.accepts = set(inspect.signature(self.model.forward).parameters)

    def prepare(self, inputs: dict) -> dict:
        # Convert once, outside the timed loop.
        tensors = {}
        # a causal LM's export takes ids and mask only (GPT-2 would embed token_type_ids as tokens)
        keys = ("input_ids", "attention_mask") if self.causal_lm else KNOWN_INPUTS
        for key in keys:
            if key in self.accepts:
                tensors[key] = self.torch.from_numpy(inputs[key])
        if self.causal_lm:
            tensors["use_cache"] = False  # one forward over the whole sequence, as the ONNX graph
        return tensors

    def __call__(self, tensors: dict) -> None:
        with self.torch.inference_mode():
            self.model(**tensors)

    def close(self) -> None:
        self.model = None
        self.torch.set_num_threads(self.previous_threads)


class _TorchImageRunner:
    """An image model directory of compress.vision in fp32, eager PyTorch, under inference_mode."""

    def __init__(self, name: str, path: str, threads: int):
        import torch

        from compress import vision
        from compress.errors import SourceError

        self.torch = torch
        self.previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            self.model = vision.load_model(path, where=f"bench {name}")
        except SourceError as exc:
            torch.set_num_threads(self.previous_threads)
            raise BenchError(f"cannot benchmark {name}: {exc}") from exc

    def prepare(self, inputs: dict) -> dict:
        if "pixel_values" not in inputs:
            raise BenchError("cannot benchmark an image model without image inputs; set Conditions.image_shape")
        return {"pixel_values": self.torch.from_numpy(inputs["pixel_values"])}

    def __call__(self, tensors: dict) -> None:
        with self.torch.inference_mode():
            self.model(tensors["pixel_values"])

    def close(self) -> None:
        self.model = None
        self.torch.set_num_threads(self.previous_threads)


def _open(model_kind: str, name: str, path: str, threads: int):
    if model_kind == "onnx":
        return _OrtRunner(name, path, threads)
    if model_kind == "torch-image":
        return _TorchImageRunner(name, path, threads)
    return _TorchRunner(name, path, threads, causal_lm=model_kind == "torch-hf-lm")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------- energy


def _rapl_readable() -> bool:
    try:
        with open(RAPL_ENERGY_FILE) as f:
            int(f.read())
    except (OSError, ValueError):
        return False
    return True


def _read_rapl_uj() -> int:
    with open(RAPL_ENERGY_FILE) as f:
        return int(f.read())


def _rapl_delta_uj(start: int, end: int) -> int:
    # The counter wraps at max_energy_range_uj.
    if end >= start:
        return end - start
    with open(RAPL_RANGE_FILE) as f:
        wrap = int(f.read())
    return end + wrap - start


def power_profile() -> str:
    """The power profile used for energy estimates on this machine."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "arm64-edge"
    return "x86-64-server"


def _energy(totals: dict, use_rapl: bool) -> dict:
    runs = totals["runs"]
    if use_rapl:
        millijoules = totals["rapl_uj"] / 1000.0 / runs
        return {
            "value": millijoules,
            "method": "measured: RAPL package energy (whole CPU package, includes everything else running)",
        }
    profile = power_profile()
    watts = POWER_PROFILES[profile]
    cpu_seconds = totals["cpu_s"] / runs
    return {
        "value": cpu_seconds * watts * 1000.0,
        "method": f"estimated: {cpu_seconds:.3g} CPU s per inference x {watts} W per busy core (profile {profile})",
    }


# ---------------------------------------------------------------- machine


def _cpu_info() -> tuple[str, list[str]]:
    name = None
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                # Every core repeats these lines; the first is enough.
                if key == "model name" and name is None:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    if name is None:
        name = platform.processor() or platform.machine()
    present = [flag for flag in RELEVANT_CPU_FLAGS if flag in flags]
    return name, present


def _package_version(package: str) -> str | None:
    # Read from metadata so that recording a version never imports torch.
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _record_conditions(cond: Conditions) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    try:
        allow_spinning = options.get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:
        allow_spinning = ORT_ALLOW_SPINNING_DEFAULT
    cpu, cpu_flags = _cpu_info()
    return {
        "batch": cond.batch,
        "seq_len": cond.seq_len,
        "image_shape": list(cond.image_shape) if cond.image_shape else None,
        "threads": cond.threads,
        "warmup": cond.warmup,
        "runs": cond.runs,
        "rounds": cond.rounds,
        "throughput_batch": cond.throughput_batch,
        "throughput_runs": cond.throughput_runs,
        "allow_spinning": allow_spinning,
        "inter_op_threads": 1,
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "onnxruntime": ort.__version__,
        "torch": _package_version("torch"),
        "transformers": _package_version("transformers"),
        "cpu": cpu,
        "cpu_flags": cpu_flags,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# ---------------------------------------------------------------- checks


def _check(models: list[BenchModel], cond: Conditions, reference: str | None) -> None:
    if not models:
        raise BenchError("cannot benchmark: no models given; pass at least one BenchModel")
    limits = [
        ("batch", cond.batch, 1),
        ("seq_len", cond.seq_len, 2),  # room for [CLS] and [SEP]
        ("threads", cond.threads, 1),
        ("warmup", cond.warmup, 0),
        ("rounds", cond.rounds, 1),
        ("runs", cond.runs, cond.rounds),  # at least one timed run per round
        ("throughput_batch", cond.throughput_batch, 1),
        ("throughput_runs", cond.throughput_runs, 1),
        ("vocab_size", cond.vocab_size, FIRST_ORDINARY_ID + 1),
    ]
    for field, value, minimum in limits:
        if value < minimum:
            raise BenchError(
                f"bench conditions: {field} is {value}, expected at least {minimum}; raise {field}"
            )
    seen = set()
    for model in models:
        if model.name in seen:
            raise BenchError(f"cannot benchmark: model name {model.name!r} given twice; give each model its own name")
        seen.add(model.name)
        if model.kind not in KINDS:
            raise BenchError(
                f"cannot benchmark {model.name}: kind is {model.kind!r}, expected one of {', '.join(KINDS)}; "
                f"set kind to 'onnx' for an .onnx file, 'torch-hf' for a Hugging Face model directory "
                f"or 'torch-hf-lm' for a causal LM's directory"
            )
        if not os.path.exists(model.path):
            raise BenchError(
                f"cannot benchmark {model.name}: {model.path} does not exist; "
                f"pass the path of an existing .onnx file or Hugging Face model directory"
            )
        for file in model.files:
            if not os.path.exists(file):
                raise BenchError(
                    f"cannot benchmark {model.name}: listed file {file} does not exist; "
                    f"remove it from files or build it first"
                )
    if reference is not None and reference not in seen:
        raise BenchError(
            f"cannot benchmark: reference {reference!r} is not among the models ({', '.join(sorted(seen))}); "
            f"name one of them as the reference"
        )


# ---------------------------------------------------------------- measuring


def _runs_per_round(cond: Conditions) -> list[int]:
    # Spread cond.runs over the rounds so the total is exactly cond.runs.
    base, extra = divmod(cond.runs, cond.rounds)
    return [base + 1 if r < extra else base for r in range(cond.rounds)]


def _latency_block(model: BenchModel, cond: Conditions, inputs: dict, runs: int, use_rapl: bool) -> dict:
    """Open the model, warm up, time `runs` runs, and close it again."""
    runner = _open(model.kind, model.name, model.path, cond.threads)
    try:
        feed = runner.prepare(inputs)
        _call(runner, feed, model)  # fail on the first run with a clear error
        for _ in range(cond.warmup):
            runner(feed)
        times_ns = []
        cpu_start = time.process_time()
        rapl_start = _read_rapl_uj() if use_rapl else 0
        for _ in range(runs):
            start = time.perf_counter_ns()
            runner(feed)
            times_ns.append(time.perf_counter_ns() - start)
        rapl_uj = _rapl_delta_uj(rapl_start, _read_rapl_uj()) if use_rapl else 0
        cpu_s = time.process_time() - cpu_start
    finally:
        runner.close()
        del runner
        gc.collect()
    return {"times_ns": times_ns, "cpu_s": cpu_s, "rapl_uj": rapl_uj}


def _throughput_block(model: BenchModel, cond: Conditions, inputs: dict) -> float:
    runner = _open(model.kind, model.name, model.path, cond.threads)
    try:
        feed = runner.prepare(inputs)
        _call(runner, feed, model)
        for _ in range(THROUGHPUT_WARMUP):
            runner(feed)
        start = time.perf_counter_ns()
        for _ in range(cond.throughput_runs):
            runner(feed)
        elapsed_s = (time.perf_counter_ns() - start) / 1e9
    finally:
        runner.close()
        del runner
        gc.collect()
    return cond.throughput_batch * cond.throughput_runs / elapsed_s


def _call(runner, feed: dict, model: BenchModel) -> None:
    try:
        runner(feed)
    except BenchError:
        raise
    except Exception as exc:
        raise BenchError(
            f"cannot benchmark {model.name}: running {model.path} on the benchmark inputs failed: "
            f"{_first_line(exc)}; check its inputs are token ids [batch, seq] and vocab_size fits the model"
        ) from exc


def _latency_summary(times_ns: list[int]) -> dict:
    import numpy as np

    ms = np.asarray(times_ns, dtype=np.float64) / 1e6
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(ms.mean()),
        "min": float(ms.min()),
        "runs": int(ms.size),
    }


def _median_ms(times_ns: list[int]) -> float:
    return statistics.median(times_ns) / 1e6


def size_bytes(model: BenchModel) -> int:
    """Bytes on disk of everything the model needs on the target."""
    paths = model.files or (model.path,)
    total = 0
    for path in paths:
        if os.path.isdir(path):
            for root, _, names in os.walk(path):
                for file_name in names:
                    total += os.path.getsize(os.path.join(root, file_name))
        else:
            total += os.path.getsize(path)
    return total


def peak_rss_bytes(model: BenchModel, cond: Conditions) -> int:
    """Peak RSS of a fresh process that loads the model and runs it at the conditions' point."""
    # The child must import this package even when it is not installed.
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "compress.bench",
        "--child", model.kind, model.path,
        "--threads", str(cond.threads),
        "--seq-len", str(cond.seq_len),
        "--batch", str(cond.batch),
        "--runs", str(CHILD_RUNS),
        "--vocab-size", str(cond.vocab_size),
        *(["--image-shape", ",".join(str(d) for d in cond.image_shape)] if cond.image_shape else []),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        stderr_lines = completed.stderr.strip().splitlines()
        last = stderr_lines[-1] if stderr_lines else "(no stderr)"
        raise BenchError(
            f"cannot measure peak RSS of {model.name}: child process exited {completed.returncode}: {last}; "
            f"run `{' '.join(command)}` to see the whole error"
        )
    stdout_lines = completed.stdout.strip().splitlines()
    try:
        return int(json.loads(stdout_lines[-1])["peak_rss_bytes"])
    except (IndexError, ValueError, KeyError, TypeError) as exc:
        raise BenchError(
            f"cannot measure peak RSS of {model.name}: child printed {completed.stdout.strip()[-200:]!r}, "
            f"expected one JSON line with peak_rss_bytes; run `{' '.join(command)}` to see why"
        ) from exc


def run(
    models: list[BenchModel],
    cond: Conditions,
    reference: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Measure every model at `cond`, alternating per-model blocks, and return a JSON-able result.

    Ratios compare each model with `reference` round by round (same machine state),
    which is what stays comparable across machines; absolute times do not.
    """
    # Every block ends with gc.collect(), which walks every object of the process:
    # ~380k once transformers' models are imported, 0.7-1.1 s per collect on a 2-core
    # machine (15 s of a small image build's 27). What exists before the first block
    # is not the models'; frozen, it is left out of those walks.
    gc.freeze()
    try:
        return _run(models, cond, reference, progress)
    finally:
        gc.unfreeze()


def _run(models: list[BenchModel], cond: Conditions, reference: str | None,
         progress: Callable[[str], None] | None) -> dict:
    _check(models, cond, reference)

    def report(message: str) -> None:
        logger.info(message)
        if progress is not None:
            progress(message)

    conditions = _record_conditions(cond)
    use_rapl = _rapl_readable()
    latency_inputs = make_inputs(cond.batch, cond.seq_len, cond.vocab_size, cond.image_shape)
    throughput_inputs = make_inputs(cond.throughput_batch, cond.seq_len, cond.vocab_size, cond.image_shape)

    # One block per model per round, A B C A B C ...: each model runs alone, as
    # deployed, and slow drifts of the machine hit every model alike.
    times_ns = {model.name: [] for model in models}
    round_p50_ms = {model.name: [] for model in models}
    totals = {model.name: {"runs": 0, "cpu_s": 0.0, "rapl_uj": 0} for model in models}
    for round_index, runs in enumerate(_runs_per_round(cond)):
        for model in models:
            report(f"latency {model.name} round {round_index + 1}/{cond.rounds}")
            block = _latency_block(model, cond, latency_inputs, runs, use_rapl)
            times_ns[model.name].extend(block["times_ns"])
            round_p50_ms[model.name].append(_median_ms(block["times_ns"]))
            totals[model.name]["runs"] += runs
            totals[model.name]["cpu_s"] += block["cpu_s"]
            totals[model.name]["rapl_uj"] += block["rapl_uj"]
            logger.debug("%s round %d p50 %.3f ms", model.name, round_index + 1, round_p50_ms[model.name][-1])

    throughput = {}
    for model in models:
        report(f"throughput {model.name} batch {cond.throughput_batch}")
        throughput[model.name] = _throughput_block(model, cond, throughput_inputs)

    # Children run one at a time after all timing, so they never compete with it.
    peak_rss = {}
    for model in models:
        if cond.measure_rss:
            report(f"peak RSS {model.name}")
            peak_rss[model.name] = peak_rss_bytes(model, cond)
        else:
            peak_rss[model.name] = None

    results = {}
    for model in models:
        results[model.name] = {
            "kind": model.kind,
            "latency_ms": _latency_summary(times_ns[model.name]),
            "round_p50_ms": round_p50_ms[model.name],
            "throughput_per_s": throughput[model.name],
            "peak_rss_bytes": peak_rss[model.name],
            "size_bytes": size_bytes(model),
            "energy_mj_per_inference": _energy(totals[model.name], use_rapl),
            "flops": None,
        }

    ratios = {}
    if reference is not None:
        for model in models:
            if model.name == reference:
                continue
            per_round = [
                mine / theirs
                for mine, theirs in zip(round_p50_ms[model.name], round_p50_ms[reference])
            ]
            ratios[f"{model.name}/{reference}"] = {
                "p50": statistics.median(per_round),
                "spread": [min(per_round), max(per_round)],
                "throughput": throughput[model.name] / throughput[reference],
            }

    return {"conditions": conditions, "models": results, "ratios": ratios}


# ---------------------------------------------------------------- baselines


def compare_to_baseline(result: dict, baseline: dict, tolerance: float = 0.10) -> list[str]:
    """Regressions of `result` against `baseline`, one message each; empty means none.

    Only ratios are compared: absolute times move between machines, a ratio of two
    models timed in the same run does not (much).
    """
    if tolerance < 0:
        raise BenchError(f"baseline comparison: tolerance is {tolerance}, expected >= 0; pass e.g. 0.10")
    _warn_on_different_conditions(result, baseline)

    messages = []
    result_models = result.get("models", {})
    for name in baseline.get("models", {}):
        if name not in result_models:
            messages.append(f"model {name} is in the baseline but missing from the result")

    result_ratios = result.get("ratios", {})
    for key, base in baseline.get("ratios", {}).items():
        if key not in result_ratios:
            messages.append(f"{key} ratio is in the baseline (p50 {base['p50']:.2f}) but missing from the result")
            continue
        now = result_ratios[key]["p50"]
        was = base["p50"]
        if now > was * (1 + tolerance):
            change = (now / was - 1) * 100
            messages.append(
                f"{key} p50 ratio {now:.2f} > baseline {was:.2f} "
                f"(+{change:.0f}%, tolerance {tolerance * 100:.0f}%)"
            )
    return messages


def _warn_on_different_conditions(result: dict, baseline: dict) -> None:
    # Ratios still compare across different points, but less meaningfully.
    mine = result.get("conditions", {})
    theirs = baseline.get("conditions", {})
    for key in ("batch", "seq_len", "threads"):
        if key in mine and key in theirs and mine[key] != theirs[key]:
            logger.warning("baseline was measured at %s=%s, this result at %s=%s", key, theirs[key], key, mine[key])


# ---------------------------------------------------------------- child process


def _child_main(argv: list[str] | None = None) -> int:
    """Load and run one model in this fresh process, then print its peak RSS as one JSON line."""
    parser = argparse.ArgumentParser(
        prog="python -m compress.bench",
        description="Child process of compress bench: measures the peak RSS of loading and running one model.",
    )
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=CHILD_RUNS)
    parser.add_argument("--vocab-size", type=int, default=30522)
    parser.add_argument("--image-shape", default=None, help="channels,height,width of pixel_values (image models)")
    args = parser.parse_args(argv)
    image_shape = tuple(int(d) for d in args.image_shape.split(",")) if args.image_shape else None

    kind, path = args.child
    model = BenchModel(name=os.path.basename(path), kind=kind, path=path)
    try:
        _check([model], Conditions(batch=args.batch, seq_len=args.seq_len, threads=args.threads), None)
        runner = _open(kind, model.name, path, args.threads)
        feed = runner.prepare(make_inputs(args.batch, args.seq_len, args.vocab_size, image_shape))
        for _ in range(args.runs):
            _call(runner, feed, model)
    except BenchError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2

    print(json.dumps({"peak_rss_bytes": _own_peak_rss_bytes()}))
    return 0


def _own_peak_rss_bytes() -> int:
    """Peak RSS of this process's own address space.

    On Linux, ru_maxrss of a freshly spawned child starts at the parent's peak
    (exec keeps the high-water mark of the address space it replaces), so a child
    spawned from a 460 MB parent reports 460 MB whatever it loads. VmHWM belongs
    to the new address space only.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    kilobytes = int(line.split()[1])
                    return kilobytes * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    if sys.platform != "darwin":
        peak *= 1024
    return peak


if __name__ == "__main__":
    sys.exit(_child_main())
