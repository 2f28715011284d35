"""Distillation on several processes: `compress build --nproc N`, or torchrun.

`compress build --nproc N` relaunches itself under torchrun (standalone, one
machine); across machines, run torchrun yourself on each one (README). Every
rank runs the build's training stages (distill, prune); the main rank (0) alone
runs the rest, writes the cache and the build directory, and prints.

Within training, each step takes one global batch of `batch_size x world`
inputs (texts sorted by length, or images) and deals it out round-robin, so
every input is seen exactly once per epoch, on exactly one rank, and all ranks
take the same number of steps. The model is wrapped in DistributedDataParallel
(gloo on CPU, nccl on GPUs); each rank's loss is scaled by its share of the
global batch, so the averaged gradient is the gradient of the global batch's
mean loss. Every task trains this way (embedding: distill.train,
classification: classify.train, causal-lm: lm_distill.train, whose on-policy
steps deal out prompts too, image-classification: vision.train, with per-rank
BatchNorm statistics). Teacher outputs are computed sharded too
(compress/teacher_cache.py): each rank runs the teacher on its share of the
inputs and writes it into one shared entry, which is why all ranks must see
the same cache directory; the classifiers' logits are computed per rank, on
its share of each batch.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Sequence

from compress.errors import CompressError, RecipeError

# Stages that train, and so run on every rank.
TRAINING_STAGES = ("distill", "prune")
# Tasks whose training loops deal global batches across the ranks: all of them.
DISTRIBUTED_TASKS = ("embedding", "classification", "causal-lm", "image-classification")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place, from torchrun's environment (one process when unset)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise CompressError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (they are set by torchrun)") from None
    return World(rank, size, local)


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    import torch.distributed as dist

    return world().size > 1 and dist.is_available() and dist.is_initialized()


_collective = False


@contextmanager
def training():
    """Marks a stage that every rank runs: inside it, distill.train() and the
    teacher pass split their work across the ranks. Outside it (quantize's QAT,
    which runs on the main rank alone) training stays local."""
    global _collective
    before, _collective = _collective, active()
    try:
        yield
    finally:
        _collective = before


def collective() -> bool:
    return _collective and active()


def init() -> World:
    """Join the process group torchrun describes (no-op for one process)."""
    w = world()
    if w.size == 1:
        return w
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(w.local_rank)
        dist.init_process_group(backend)
    return w


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (picklable objects)."""
    if not active():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not active():
        return [value]
    import torch.distributed as dist

    out: list = [None] * world().size
    dist.all_gather_object(out, value)
    return out


def deal(batch: Sequence[int], rank: int, size: int) -> list[int]:
    """This rank's share of a global batch: every size-th input from `rank` on.
    The batch is sorted by length, so the shares pad to about the same width."""
    return list(batch[rank::size])


def dealt_steps(batches: Sequence[Sequence[int]], total: int, rng, world: World, seen: list[list[int]]):
    """The steps of a training run: epochs over the global `batches` in an order
    `rng` shuffles (the same on every rank), until `total` steps. Yields
    (batch index, this rank's rows, loss weight). Each rank's loss is weighted by
    its share of the global batch, so the ranks' averaged gradient is that of the
    global batch; a rank dealt nothing (the last, short batch) gets one input at
    weight 0. Appends each epoch's dealt input indices to `seen` (for coverage)."""
    step = 0
    while step < total:
        order = list(range(len(batches)))
        rng.shuffle(order)
        epoch: list[int] = []
        seen.append(epoch)
        for b in order:
            if step >= total:
                break
            mine = deal(batches[b], world.rank, world.size)
            epoch.extend(mine)
            yield b, mine or list(batches[b][:1]), len(mine) * world.size / len(batches[b])
            step += 1


def wrap(module):
    """`module` in DistributedDataParallel when distributed (its parameters are
    broadcast from rank 0 here), else unchanged."""
    if not active():
        return module
    import torch
    from torch.nn.parallel import DistributedDataParallel

    ids = [world().local_rank] if torch.cuda.is_available() else None
    # Parts of a derived student (a pooler, a layer's unused relation head) get no
    # gradient on some losses; DDP must not wait for them.
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


def check_recipe(recipe) -> None:
    """What a distributed build can run: a task whose training loop deals global
    batches across the ranks (DISTRIBUTED_TASKS, every task today; a new task
    is refused here until its loop does)."""
    if recipe.task not in DISTRIBUTED_TASKS:
        raise RecipeError(f"--nproc / torchrun: distributed distillation supports tasks "
                          f"{', '.join(DISTRIBUTED_TASKS)}, and this recipe's task is {recipe.task}; "
                          "build it with one process (drop --nproc)")


def check_nproc(nproc: int) -> None:
    if nproc < 1:
        raise RecipeError(f"--nproc {nproc}: give 1 or more processes")
    if nproc > 1 and world().size > 1:
        raise RecipeError("--nproc: this build already runs under torchrun; drop --nproc "
                          "(torchrun's --nproc_per_node sets the processes)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, argv: list[str]) -> int:
    """Run `compress <argv>` as `nproc` processes on this machine, with the
    environment torchrun would give them (rank, world size, a rendezvous on
    127.0.0.1). Returns rank 0's exit status, or the first failure's; when one
    rank fails the others are stopped, not left waiting on it."""
    port = _free_port()
    threads = str(max(1, (os.cpu_count() or nproc) // nproc))
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nproc)}
        # N processes on N cores, not N x N threads fighting for them.
        env.setdefault("OMP_NUM_THREADS", threads)
        procs.append(subprocess.Popen([sys.executable, "-m", "compress.cli", *argv], env=env))
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c is not None for c in codes):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        failed = [130]
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    return failed[0] if failed else procs[0].returncode
