"""Teacher outputs on disk: computed once per (teacher, tokenized inputs, settings)
and reused by every epoch, every rebuild and prune's recovery.

Sits under distill.train(), classify.train() (class logits beside the
features) and, for causal-LM teachers (top-k logits, obtain_topk),
lm_distill.train(). An entry is <cache root>/teacher-outputs/<key>/, a
directory of memory-mapped arrays (fp16; a classifier's logits fp32) published
like a stage cache entry (compress/cache.py: temporary directory, meta.json
written last, rename, a file lock per key). Variable-length rows are stored per
input, packed back to back with offsets, so how a later run groups inputs into
batches does not matter.
In a distributed build each rank runs the teacher on its share of the inputs
and writes its rows into the one entry (compute_sharded, compute_topk_sharded).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from compress.artifact import META_FILE
from compress.cache import Cache, make_key
from compress.errors import RecipeError

log = logging.getLogger(__name__)

# Bump when what an entry holds, or how it is computed, changes.
VERSION = 1
DIRNAME = "teacher-outputs"
# The teacher pass groups inputs by length in batches of this size whatever the
# training batch size is, so an entry's bytes depend on its key alone (padding
# width changes fp32 rounding, which can flip an fp16 value).
TEACHER_BATCH = 32
# Log-relation written at padded key positions: exp() of it is 0, as it is for
# the teacher's own -10000 additive mask, so the KL ignores them.
PAD_LOG = -1e4


@dataclass(frozen=True)
class TeacherSource:
    """Where a run's teacher outputs come from. cache_root None keeps them in
    memory for this run only; `load` gives the teacher model when an entry must
    be computed and no model was passed (so a cached entry never loads it)."""

    cache_root: Path | None
    digest: str
    load: Callable[[], Any] | None = None


def teacher_model(teacher, source: TeacherSource | None, desc: str, caller: str):
    """The teacher to run when an entry must be computed: the one given, else the
    source's loader's; a CacheError when there is neither."""
    from compress.errors import CacheError

    if teacher is None and source is not None and source.load is not None:
        teacher = source.load()
    if teacher is None:
        raise CacheError(f"{desc}: teacher outputs are not cached under {getattr(source, 'cache_root', None)} "
                         f"and no teacher model was given; pass the teacher model to {caller}")
    return teacher


def ids_digest(encoded: Sequence[Sequence[int]]) -> str:
    """sha256 of the token ids: covers the texts, the tokenizer and truncation."""
    h = hashlib.sha256()
    for row in encoded:
        h.update(len(row).to_bytes(8, "little"))  # the length first: rows cannot run into each other
        h.update(np.asarray(row, dtype=np.int64).tobytes())
    return h.hexdigest()


def entry_key(teacher_digest: str, encoded: Sequence[Sequence[int]], settings: dict) -> str:
    return make_key(DIRNAME, teacher_digest, ids_digest(encoded), settings, VERSION)


# -- packed rows ---------------------------------------------------------------

class Packed:
    """Rows of different lengths stored back to back: data[offsets[i]:offsets[i+1]] is row i."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data, self.offsets = data, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> np.ndarray:
        return self.data[self.offsets[i]:self.offsets[i + 1]]

    @classmethod
    def open(cls, directory: Path, name: str) -> "Packed":
        return cls(np.load(directory / f"{name}.npy", mmap_mode="r"),
                   np.load(directory / f"{name}.offsets.npy"))


class PackedWriter:
    """Preallocates a packed array for known row lengths (as an .npy memory map
    when there is a directory, in memory otherwise) and fills it row by row."""

    def __init__(self, directory: Path | None, name: str, lengths: Sequence[int], tail: tuple[int, ...], dtype,
                 mode: str = "w+"):
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(np.asarray(lengths, dtype=np.int64), out=self.offsets[1:])
        shape = (int(self.offsets[-1]), *tail)
        if directory is None:
            self.data = np.zeros(shape, dtype=dtype)
        else:
            if mode == "r+":  # another rank of a sharded run created it
                self.data = np.lib.format.open_memmap(directory / f"{name}.npy", mode="r+")
                if self.data.shape != shape:
                    raise AssertionError(f"{name}: shape {self.data.shape} on disk, {shape} expected")
            else:
                self.data = np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
                np.save(directory / f"{name}.offsets.npy", self.offsets)

    def put(self, i: int, row: np.ndarray) -> None:
        start, end = self.offsets[i], self.offsets[i + 1]
        if row.shape[0] != end - start:
            raise AssertionError(f"row {i} has {row.shape[0]} entries, its slot {end - start}")
        self.data[start:end] = row

    def finish(self) -> Packed:
        if isinstance(self.data, np.memmap):
            self.data.flush()
        return Packed(self.data, self.offsets)


# -- top-k logits (for language-model teachers) -------------------------------

def topk_rows(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest logits of each position, largest first: (fp16 values, int32 token ids)."""
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise RecipeError(f"stages.distill.teacher_topk {k} is outside 1..{vocab} (the vocabulary); "
                          f"pick k between 1 and {vocab}")
    idx = np.argpartition(-logits, k - 1, axis=-1)[..., :k]
    vals = np.take_along_axis(logits, idx, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return (np.take_along_axis(vals, order, axis=-1).astype(np.float16),
            np.take_along_axis(idx, order, axis=-1).astype(np.int32))


@dataclass
class TopK:
    """Stored top-k logits: per input, [positions, k] values and token ids.
    key, cached, forwards and path describe the cache entry they came from."""

    values: Packed
    indices: Packed
    k: int
    key: str | None = None
    cached: bool = False
    forwards: int = 0
    path: Path | None = None

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.values.row(i), self.indices.row(i)

    def size_bytes(self) -> int:
        if self.path is None:
            return 0
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    def stats(self) -> dict:
        return {"key": self.key, "cached": self.cached, "bytes": self.size_bytes(), "k": self.k}

    def batch(self, indices: Sequence[int], width: int):
        """The rows of these inputs padded to `width` positions, as torch tensors:
        (values [b, width, k] float32, token ids [b, width, k] int64). Padded
        positions hold value 0 at token 0; the caller's mask leaves them out."""
        import torch

        values = np.zeros((len(indices), width, self.k), dtype=np.float32)
        ids = np.zeros((len(indices), width, self.k), dtype=np.int64)
        for j, i in enumerate(indices):
            v, ix = self.row(i)
            values[j, :len(v)] = v
            ids[j, :len(ix)] = ix
        return torch.from_numpy(values), torch.from_numpy(ids)


def save_topk(directory: Path, logits_rows: Sequence[np.ndarray], k: int, name: str = "logits") -> TopK:
    """Store the top-k of each input's [positions, vocab] logits: disk is
    positions x k x 6 bytes instead of positions x vocab x 2."""
    lengths = [r.shape[0] for r in logits_rows]
    values = PackedWriter(directory, f"{name}.values", lengths, (k,), np.float16)
    indices = PackedWriter(directory, f"{name}.indices", lengths, (k,), np.int32)
    for i, logits in enumerate(logits_rows):
        v, ix = topk_rows(np.asarray(logits, dtype=np.float32), k)
        values.put(i, v)
        indices.put(i, ix)
    (directory / f"{name}.topk.json").write_text(json.dumps({"k": k}))
    return TopK(values.finish(), indices.finish(), k)


def load_topk(directory: Path, name: str = "logits") -> TopK:
    k = json.loads((directory / f"{name}.topk.json").read_text())["k"]
    return TopK(Packed.open(directory, f"{name}.values"), Packed.open(directory, f"{name}.indices"), k)


# run_logits(rows of token ids) -> logits [len(rows), width, vocab] (torch or numpy), row i's real positions first
RunLogits = Callable[[list], Any]


def _topk_writers(directory: Path | None, lengths: Sequence[int], k: int, name: str, mode: str = "w+"):
    return (PackedWriter(directory, f"{name}.values", lengths, (k,), np.float16, mode),
            PackedWriter(directory, f"{name}.indices", lengths, (k,), np.int32, mode))


def _topk_pass(values: PackedWriter, indices: PackedWriter, encoded: Sequence[Sequence[int]], groups: list[list[int]],
               k: int, run_logits: RunLogits, bar) -> None:
    """The teacher over `groups` of inputs, the top-k of each real position into the writers."""
    for group in groups:
        logits = run_logits([list(encoded[i]) for i in group])
        logits = np.asarray(logits.float().numpy() if hasattr(logits, "numpy") else logits, dtype=np.float32)
        for j, i in enumerate(group):
            v, ix = topk_rows(logits[j, :len(encoded[i])], k)
            values.put(i, v)
            indices.put(i, ix)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def compute_topk(directory: Path | None, encoded: Sequence[Sequence[int]], k: int, run_logits: RunLogits, progress,
                 desc: str, name: str = "logits") -> TopK:
    """Run a language-model teacher over every input once (groups of
    TEACHER_BATCH by length) and keep the top-k logits of each real position."""
    from compress.distill import _batches

    lengths = [len(e) for e in encoded]
    groups = _batches(lengths, TEACHER_BATCH)
    values, indices = _topk_writers(directory, lengths, k, name)
    bar = progress(total=len(groups), desc=f"{desc}: teacher top-{k} logits") if progress else None
    _topk_pass(values, indices, encoded, groups, k, run_logits, bar)
    if directory is not None:
        (directory / f"{name}.topk.json").write_text(json.dumps({"k": k}))
    return TopK(values.finish(), indices.finish(), k, forwards=len(groups), path=directory)


def compute_topk_sharded(directory: Path, encoded: Sequence[Sequence[int]], k: int, runner: Callable[[], RunLogits],
                         progress, desc: str, name: str = "logits") -> int:
    """compute_topk() split across the ranks of a distributed run, as
    compute_sharded(): rank r runs the teacher on every world-th group of
    inputs from group r and writes its rows into the one entry in `directory`.
    The arrays' shapes follow from the input lengths and k, so the main rank
    allocates them before any teacher forward. Returns this rank's forwards;
    a rank left without a group never calls runner() (never loads the teacher)."""
    from compress import distributed
    from compress.distill import _batches

    w = distributed.world()
    lengths = [len(e) for e in encoded]
    mine = _batches(lengths, TEACHER_BATCH)[w.rank::w.size]
    if w.main:
        values, indices = _topk_writers(directory, lengths, k, name)
        (directory / f"{name}.topk.json").write_text(json.dumps({"k": k}))
    distributed.barrier()  # the files exist
    if not w.main:
        try:
            values, indices = _topk_writers(directory, lengths, k, name, mode="r+")
        except FileNotFoundError:
            raise _unseen(w, directory) from None
    if mine:
        bar = progress(total=len(mine), desc=f"{desc}: teacher top-{k} logits (rank {w.rank}/{w.size})") \
            if progress else None
        _topk_pass(values, indices, encoded, mine, k, runner(), bar)
    values.finish()
    indices.finish()
    distributed.barrier()  # every rank's rows are on disk
    return len(mine)


def _unseen(w, directory: Path):
    from compress.errors import CompressError

    return CompressError(f"distributed build: rank {w.rank} cannot see {directory}; every rank needs the "
                         "same cache directory (--cache on a filesystem all nodes share)")


def obtain_topk(source: TeacherSource | None, encoded: Sequence[Sequence[int]], settings: dict, k: int,
                runner: Callable[[], RunLogits], progress, desc: str) -> TopK:
    """A language-model teacher's top-k logits for these inputs and settings:
    from the cache when a complete entry exists (runner never called, so the
    teacher need not be loaded), else computed once, stored and published like
    obtain()'s entries. Without a cache root they are kept in memory for this run."""
    from compress import distributed

    if source is None or source.cache_root is None:  # in memory: each rank computes all it may need
        return compute_topk(None, encoded, k, runner(), progress, desc)
    key = entry_key(source.digest, encoded, {**settings, "k": k})
    cache = Cache(Path(source.cache_root) / DIRNAME)
    if distributed.collective():
        def fill(work: Path) -> tuple[int, dict]:
            forwards = compute_topk_sharded(work, encoded, k, runner, progress, desc)
            return forwards, {"kind": "teacher-topk-logits", "key": key, "teacher": source.digest,
                              "inputs": len(encoded), "positions": sum(len(e) for e in encoded),
                              "settings": settings, "k": k, "version": VERSION}

        path, hit, forwards = _produce_sharded(cache, key, fill)
        out = load_topk(path)
        out.key, out.cached, out.forwards, out.path = key, hit, forwards, path
        log.info("%s: teacher top-%d logits %s (%s on rank %d, %d forwards here)", desc, k, key[:12],
                 "cached" if hit else "computed", distributed.world().rank, forwards)
        return out
    made = {}

    def make(work: Path) -> None:
        out = compute_topk(work, encoded, k, runner(), progress, desc)
        made["forwards"] = out.forwards
        meta = {"kind": "teacher-topk-logits", "key": key, "teacher": source.digest, "inputs": len(encoded),
                "positions": int(out.values.offsets[-1]), "settings": settings, "k": k, "version": VERSION,
                "forwards": out.forwards}
        (work / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))  # last: marks it complete

    path, hit = cache.produce(key, make)
    out = load_topk(path)
    if out.k != k or len(out.values) != len(encoded):
        raise AssertionError(f"teacher-output entry {key} holds {len(out.values)} inputs at k {out.k}, "
                             f"expected {len(encoded)} at k {k}")
    out.key, out.cached, out.forwards, out.path = key, hit, made.get("forwards", 0), path
    log.info("%s: teacher top-%d logits %s (%s, %.1f MB)", desc, k, key[:12], "cached" if hit else "computed",
             out.size_bytes() / 1e6)
    return out


# -- embedding-teacher outputs ----------------------------------------------------

class TeacherOutputs:
    """A complete set of teacher targets for a list of inputs: pooled embedding
    [n, hidden], hidden states per input [len_i, hidden] for each target layer,
    optionally the two log-relations per input [heads, len_i, len_i], and for a
    classifier its class logits [n, num_labels]. What a run's losses do not
    need is not computed: pooled and logits may be None, states and relations empty."""

    def __init__(self, pooled: np.ndarray | None, states: list[Packed], relations: list[Packed], heads: int,
                 key: str | None = None, cached: bool = False, forwards: int = 0, path: Path | None = None,
                 logits: np.ndarray | None = None):
        self.pooled, self.states, self.relations, self.heads = pooled, states, relations, heads
        self.logits = logits
        self.key, self.cached, self.forwards, self.path = key, cached, forwards, path

    def layout(self) -> dict:
        """What the entry holds, as its meta.json records it (open_entry reads it back)."""
        return {"pooled": 0 if self.pooled is None else int(self.pooled.shape[-1]), "states": len(self.states),
                "relations": len(self.relations), "logits": 0 if self.logits is None else int(self.logits.shape[-1])}

    def size_bytes(self) -> int:
        if self.path is None:
            return 0
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    def stats(self) -> dict:
        return {"key": self.key, "cached": self.cached, "bytes": self.size_bytes()}

    def batch(self, indices: Sequence[int], width: int):
        """Targets of these inputs padded to `width`, as float32 torch tensors:
        (pooled [b, h] or None, [states [b, width, h]], [relations [b, heads, width, width]])."""
        import torch

        pooled = None
        if self.pooled is not None:
            pooled = torch.from_numpy(np.asarray(self.pooled[list(indices)], dtype=np.float32))
        states = []
        for packed in self.states:
            out = np.zeros((len(indices), width, packed.data.shape[-1]), dtype=np.float32)
            for j, i in enumerate(indices):
                row = packed.row(i)
                out[j, :len(row)] = row
            states.append(torch.from_numpy(out))
        relations = []
        for packed in self.relations:
            out = np.full((len(indices), self.heads, width, width), PAD_LOG, dtype=np.float32)
            for j, i in enumerate(indices):
                flat = packed.row(i)
                s = int(round((len(flat) / self.heads) ** 0.5))
                out[j, :, :s, :s] = flat.reshape(self.heads, s, s)
            relations.append(torch.from_numpy(out))
        return pooled, states, relations

    def batch_logits(self, indices: Sequence[int]):
        """The class logits of these inputs, [b, num_labels] float32 (as the teacher gave them)."""
        import torch

        return torch.from_numpy(np.asarray(self.logits[list(indices)], dtype=np.float32))


# run_batch(ids, mask) -> (pooled [b, h] or None, [states [b, s, h]], [relations [b, heads, s, s]],
# logits [b, num_labels] or None) as torch tensors
RunBatch = Callable[[Any, Any], tuple]


class _Writers:
    """Where compute() puts each batch's outputs: the pooled and logits arrays and
    one packed writer per hidden state and relation, allocated (or, on the other
    ranks of a sharded run, opened) once the output shapes are known."""

    def __init__(self, directory: Path | None, n: int, lengths: list[int], heads: int, shapes: dict,
                 mode: str = "w+"):
        self.lengths = lengths
        self.pooled = self.logits = None
        if shapes["pooled"]:
            self.pooled = _alloc(directory, "pooled", (n, shapes["pooled"]), np.float16, mode)
        if shapes["logits"]:
            # Class logits stay fp32: the logit loss reads them as they are, and at
            # num_labels floats per input full precision costs next to nothing.
            self.logits = _alloc(directory, "logits", (n, shapes["logits"]), np.float32, mode)
        self.states = [PackedWriter(directory, f"states_{k}", lengths, (shapes["hidden"],), np.float16, mode)
                       for k in range(shapes["states"])]
        self.relations = [PackedWriter(directory, f"relations_{k}", [heads * m * m for m in lengths], (),
                                       np.float16, mode) for k in range(shapes["relations"])]

    def put(self, group: list[int], t_pooled, t_states, t_rel, t_logits) -> None:
        lengths = self.lengths
        # fp16 halves the disk and memory of the targets at no cost in signal
        if self.pooled is not None:
            self.pooled[group] = t_pooled.half().numpy()
        if self.logits is not None:
            self.logits[group] = t_logits.float().numpy()
        for writer, batch in zip(self.states, t_states):
            batch = batch.half().numpy()
            for j, i in enumerate(group):
                writer.put(i, batch[j, :lengths[i]])
        for writer, batch in zip(self.relations, t_rel):
            batch = batch.half().numpy()
            for j, i in enumerate(group):
                writer.put(i, batch[j, :, :lengths[i], :lengths[i]].reshape(-1))

    def finish(self, directory: Path | None, heads: int, forwards: int) -> TeacherOutputs:
        for array in (self.pooled, self.logits):
            if isinstance(array, np.memmap):
                array.flush()
        return TeacherOutputs(self.pooled, [w.finish() for w in self.states], [w.finish() for w in self.relations],
                              heads, forwards=forwards, path=directory, logits=self.logits)


def compute(directory: Path | None, encoded: Sequence[Sequence[int]], pad_id: int, heads: int,
            run_batch: RunBatch, progress, desc: str) -> TeacherOutputs:
    """Run the teacher over every input once and store its outputs per input."""
    from compress.distill import _batches, _pad

    lengths = [len(e) for e in encoded]
    groups = _batches(lengths, TEACHER_BATCH)
    writers = None
    bar = progress(total=len(groups), desc=f"{desc}: teacher outputs")
    for group in groups:
        ids, mask = _pad([encoded[i] for i in group], pad_id)
        out = run_batch(ids, mask)
        if writers is None:  # shapes are known once the teacher has run
            writers = _Writers(directory, len(encoded), lengths, heads, _shapes(out))
        writers.put(group, *out)
        bar.update(1)
    bar.close()
    return writers.finish(directory, heads, len(groups))


def _shapes(out) -> dict:
    """What one batch of run_batch's outputs says the entry will hold (widths; 0: absent)."""
    t_pooled, t_states, t_rel, t_logits = out
    return {"pooled": 0 if t_pooled is None else int(t_pooled.shape[-1]),
            "hidden": int(t_states[0].shape[-1]) if t_states else 0, "states": len(t_states),
            "relations": len(t_rel), "logits": 0 if t_logits is None else int(t_logits.shape[-1])}


def compute_sharded(directory: Path, encoded: Sequence[Sequence[int]], pad_id: int, heads: int,
                    runner: Callable[[], RunBatch], progress, desc: str) -> tuple[int, dict]:
    """compute() split across the ranks of a distributed run: rank r runs the
    teacher on every world-th group of inputs from group r, and writes its rows
    into the one entry in `directory` (on a filesystem every rank sees).
    Returns the teacher forwards this rank ran and the entry's layout (TeacherOutputs.layout)."""
    from compress import distributed
    from compress.distill import _batches, _pad

    w = distributed.world()
    lengths = [len(e) for e in encoded]
    groups = _batches(lengths, TEACHER_BATCH)
    mine = groups[w.rank::w.size]
    run_batch = runner()
    first = None
    if w.main:  # the main rank's first batch gives the shapes; it allocates the files
        ids, mask = _pad([encoded[i] for i in mine[0]], pad_id)
        first = run_batch(ids, mask)
        writers = _Writers(directory, len(encoded), lengths, heads, _shapes(first))
    shapes = distributed.broadcast(_shapes(first) if w.main else None)
    if not w.main:
        try:
            writers = _Writers(directory, len(encoded), lengths, heads, shapes, mode="r+")
        except FileNotFoundError:
            raise _unseen(w, directory) from None
    bar = progress(total=len(mine), desc=f"{desc}: teacher outputs (rank {w.rank}/{w.size})")
    for n, group in enumerate(mine):
        if n == 0 and first is not None:
            out = first
        else:
            ids, mask = _pad([encoded[i] for i in group], pad_id)
            out = run_batch(ids, mask)
        writers.put(group, *out)
        bar.update(1)
    bar.close()
    layout = writers.finish(directory, heads, len(mine)).layout()
    distributed.barrier()  # every rank's rows are on disk
    return len(mine), layout


def _alloc(directory: Path | None, name: str, shape: tuple, dtype, mode: str = "w+") -> np.ndarray:
    if directory is None:
        return np.zeros(shape, dtype=dtype)
    return np.lib.format.open_memmap(directory / f"{name}.npy", mode=mode, dtype=dtype, shape=shape)


def open_entry(path: Path) -> TeacherOutputs:
    meta = json.loads((path / META_FILE).read_text())
    states = [Packed.open(path, f"states_{k}") for k in range(meta["states"])]
    relations = [Packed.open(path, f"relations_{k}") for k in range(meta["relations"])]
    # Entries written before classifier logits existed have no "pooled" field, and always a pooled array.
    pooled = np.load(path / "pooled.npy", mmap_mode="r") if meta.get("pooled", 1) else None
    logits = np.load(path / "logits.npy", mmap_mode="r") if meta.get("logits", 0) else None
    return TeacherOutputs(pooled, states, relations, meta["heads"], key=meta["key"], path=path, logits=logits)


def obtain(source: TeacherSource | None, encoded: Sequence[Sequence[int]], settings: dict, pad_id: int,
           heads: int, runner: Callable[[], RunBatch], progress, desc: str) -> TeacherOutputs:
    """The teacher outputs for these inputs and settings: from the cache when a
    complete entry exists (no teacher forward, `runner` never called), else
    computed once, stored and published. runner() gives the batch function,
    loading the teacher model if it must."""
    from compress import distributed

    if source is None or source.cache_root is None:  # in memory: each rank computes all it may need
        return compute(None, encoded, pad_id, heads, runner(), progress, desc)
    key = entry_key(source.digest, encoded, settings)
    cache = Cache(Path(source.cache_root) / DIRNAME)
    if distributed.collective():
        return _obtain_sharded(cache, key, source, encoded, settings, pad_id, heads, runner, progress, desc)
    made = {}

    def make(work: Path) -> None:
        outputs = compute(work, encoded, pad_id, heads, runner(), progress, desc)
        made["forwards"] = outputs.forwards
        meta = {"kind": "teacher-outputs", "key": key, "teacher": source.digest, "inputs": len(encoded),
                "settings": settings, "version": VERSION, **outputs.layout(), "heads": heads,
                "forwards": outputs.forwards}
        (work / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))  # last: marks it complete

    path, hit = cache.produce(key, make)
    outputs = open_entry(path)
    outputs.cached, outputs.forwards = hit, made.get("forwards", 0)
    log.info("%s: teacher outputs %s (%s, %.1f MB)", desc, key[:12], "cached" if hit else "computed",
             outputs.size_bytes() / 1e6)
    return outputs



def _obtain_sharded(cache: Cache, key: str, source: TeacherSource, encoded, settings: dict, pad_id: int, heads: int,
                    runner, progress, desc: str) -> TeacherOutputs:
    """obtain() on every rank of a distributed run (_produce_sharded, compute_sharded)."""
    from compress import distributed

    def fill(work: Path) -> tuple[int, dict]:
        forwards, layout = compute_sharded(work, encoded, pad_id, heads, runner, progress, desc)
        return forwards, {"kind": "teacher-outputs", "key": key, "teacher": source.digest, "inputs": len(encoded),
                          "settings": settings, "version": VERSION, **layout, "heads": heads}

    path, hit, forwards = _produce_sharded(cache, key, fill)
    outputs = open_entry(path)
    outputs.cached, outputs.forwards = hit, forwards
    log.info("%s: teacher outputs %s (%s on rank %d, %d forwards here)", desc, key[:12],
             "cached" if hit else "computed", distributed.world().rank, forwards)
    return outputs


def _produce_sharded(cache: Cache, key: str, fill: Callable[[Path], tuple[int, dict]]) -> tuple[Path, bool, int]:
    """Cache.produce() for every rank of a distributed run: the main rank
    decides hit or miss; on a miss every rank fills its share of one work
    directory (fill(work) gives this rank's teacher forwards and the entry's
    meta), and the main rank writes meta.json (with every rank's forwards) last
    and publishes it. Returns the entry's path, whether it was a hit, and this
    rank's forwards."""
    import os
    import time

    from compress import distributed
    from compress.errors import CompressError

    w = distributed.world()
    found = cache.get(key) if w.main else None
    work = None
    if w.main and found is None:
        work = cache.tmp / f"{key}.{os.getpid()}.{time.time_ns()}"
        work.mkdir()
    found, work = distributed.broadcast((str(found) if found else None, str(work) if work else None))
    hit, forwards = found is not None, 0
    if not hit:
        work = Path(work)
        try:
            forwards, meta = fill(work)
            total = sum(distributed.gather(forwards))
            if w.main:
                meta = {**meta, "forwards": total, "ranks": w.size}
                (work / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))  # last: marks it complete
                found = str(cache.publish(key, work))
        except BaseException:
            if w.main:
                import shutil
                shutil.rmtree(work, ignore_errors=True)
            raise
        found = distributed.broadcast(found)
    path = Path(found)
    if not (path / META_FILE).is_file():
        raise CompressError(f"distributed build: rank {w.rank} cannot see the teacher outputs in {path}; every rank "
                            "needs the same cache directory (--cache on a filesystem all nodes share)")
    return path, hit, forwards
