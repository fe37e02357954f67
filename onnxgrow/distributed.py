"""Data-parallel training under torchrun: the process group, the batch layout, the wrapped module and
sharded checkpoints. onnxgrow.training drives these; a run outside torchrun is a layout of one rank.

    torchrun --standalone --nproc-per-node 2 -m onnxgrow train model.onnx --data corpus.txt --bytes \\
        --steps 1000 --batch 64 --micro-batch 8 [--fsdp]

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; every rank then runs the same program. The group
speaks nccl on CUDA (each rank on GPU LOCAL_RANK) and gloo on the CPU.

Batches: `--batch` is the global batch. Every rank draws the global batch's windows (and MLM masks)
from the same seeded RNG and trains on its slice, so the windows of a step are the same whatever the
number of ranks, and a 2-rank run takes the steps a 1-rank run takes. A rank's slice is split into
micro-batches of `--micro-batch` windows whose gradients accumulate before the optimiser step.

Gradients: "ddp" replicates the module and averages gradients with DistributedDataParallel. "fsdp"
shards parameters, gradients and optimiser state over the ranks with FSDP2 (fully_shard). The whole
bridge module is one FSDP unit, not one unit per transformer block: FSDP2 gathers a unit's weights in a
pre-forward hook and frees them after its forward, so a unit must be a submodule that is called. The
bridge (onnxgrow.bridge) runs the graph as one interpreter over its nodes; a block is a span of
nodes, not a submodule call, so there is nothing per block to hook. Memory at rest (weights, gradients,
AdamW moments) is divided by the number of ranks; during the forward and backward the whole set of
weights is gathered at once.

Checkpoints: without --fsdp, OUT.ckpt is one file that rank 0 writes (every rank holds the same
state). With --fsdp, OUT.ckpt is a torch.distributed.checkpoint folder: each rank writes its own shard
and rank 0 the metadata and the run's small state (meta.pt). Either resumes under any number of
ranks: the folder is resharded on load, with or without --fsdp. On several nodes the folder must be on
a filesystem every node sees.
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import OnnxgrowError

log = logging.getLogger(__name__)

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
META = "meta.pt"  # the run's non-tensor state, inside a sharded checkpoint folder


# --- the layout ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How one global batch is spread: `world` ranks x `per_rank` windows, each rank's share run as
    micro-batches of `micro` windows. kind: "single" (no process group), "ddp" or "fsdp"."""

    kind: str
    world: int
    rank: int
    batch: int
    micro: int

    @property
    def per_rank(self) -> int:
        return self.batch // self.world

    @property
    def accumulation(self) -> int:
        return self.per_rank // self.micro

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints and writes."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.kind == "fsdp"

    def describe(self) -> str:
        """e.g. "ddp, 2 ranks, global batch 8 = 2 x 4 (2 micro-batches of 2)"."""
        ranks = f"{self.world} rank" + ("s" if self.world != 1 else "")
        text = f"{self.kind}, {ranks}, global batch {self.batch} = {self.world} x {self.per_rank}"
        if self.accumulation > 1:
            text += f" ({self.accumulation} micro-batches of {self.micro})"
        return text

    def share(self, rows: int) -> slice:
        """This rank's rows of a global batch of `rows`."""
        per = rows // self.world
        return slice(self.rank * per, (self.rank + 1) * per)


def plan(batch: int, micro: int | None, fsdp: bool = False) -> Layout:
    """The layout of this process: torchrun's ranks when launched by it, else one."""
    world, rank = (int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])) if launched() else (1, 0)
    kind = "fsdp" if fsdp else ("ddp" if launched() else "single")
    if batch % world:
        raise OnnxgrowError(f"--batch {batch} does not split over {world} ranks; give a multiple of {world}")
    per_rank = batch // world
    micro = per_rank if micro is None else micro
    if micro < 1 or per_rank % micro:
        raise OnnxgrowError(f"--micro-batch {micro} does not divide a rank's share of the batch "
                            f"({batch} / {world} ranks = {per_rank})")
    return Layout(kind, world, rank, batch, micro)


# --- the process group --------------------------------------------------------------------------------


def launched() -> bool:
    """Whether torchrun (or a launcher like it) started this process as one rank of several."""
    return all(name in os.environ for name in ENV)


def start(device: torch.device) -> torch.device:
    """Join torchrun's process group (nccl on CUDA, gloo on the CPU); the device this rank uses."""
    if not launched() or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # a rank that fails leaves the others in a collective; torchrun stops them, the timeout is the backstop
    dist.init_process_group(backend, timeout=timedelta(minutes=10),
                            device_id=device if device.type == "cuda" else None)
    log.debug("rank %d of %d joined (%s on %s)", dist.get_rank(), dist.get_world_size(), backend, device)
    return device


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sum_over_ranks(value: float, device: torch.device) -> float:
    """`value` summed over the ranks (itself with one rank)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0])


# --- the module ---------------------------------------------------------------------------------------


class DataParallel(torch.nn.parallel.DistributedDataParallel):
    """DDP that still answers `initializer` (a headless encoder's tied LM head reads the embedding)."""

    def initializer(self, name: str) -> torch.Tensor:
        return self.module.initializer(name)


def wrap(module: torch.nn.Module, layout: Layout) -> torch.nn.Module:
    """What the training forward runs: `module` itself (single; fsdp, sharded in place) or a DDP wrapper.

    DDP finds unused parameters: graph outputs other than the logits (a pooler) get no gradient.
    """
    if layout.kind == "single" or not dist.is_initialized():
        return module
    if layout.sharded:
        from torch.distributed.fsdp import fully_shard
        fully_shard(module)
        return module
    device_ids = [module.device()] if module.device().type == "cuda" else None
    return DataParallel(module, device_ids=device_ids, find_unused_parameters=True)


def no_sync(runner: torch.nn.Module, last: bool):
    """Context for one micro-batch's backward: gradients are reduced over the ranks on the last only."""
    if isinstance(runner, torch.nn.parallel.DistributedDataParallel):
        return nullcontext() if last else runner.no_sync()
    if hasattr(runner, "set_requires_gradient_sync"):  # an FSDP2 module
        runner.set_requires_gradient_sync(last)
    return nullcontext()


class FullWeights:
    """A sharded bridge module's weights gathered whole, in the shape bridge.write_into reads
    (float_initializers, initializer, onnx_types); on ranks other than 0 it holds nothing."""

    def __init__(self, module):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )
        self.module, self.onnx_types = module, module.onnx_types
        self.state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def float_initializers(self) -> list[str]:
        return self.module.float_initializers()

    def initializer(self, name: str) -> torch.Tensor:
        base, transposed = self.module.tied.get(name, (name, False))
        key = self.module.keys[base]
        t = self.state[key] if key in self.state else getattr(self.module, key)  # buffers are not sharded
        return t.t() if transposed else t


def gathered(module, layout: Layout):
    """What to write the model from: the module, or its weights gathered whole when sharded."""
    return FullWeights(module) if layout.sharded and dist.is_initialized() else module


# --- sharded checkpoints ------------------------------------------------------------------------------


def state_dicts(module, optimizer) -> tuple[dict, dict]:
    """The module's and optimiser's state keyed by parameter name, as shards where the module is sharded."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    return get_state_dict(module, optimizer)


def save_sharded(path: Path, module, optimizer, masters: list, meta: dict, layout: Layout) -> None:
    """Write a torch.distributed.checkpoint folder at `path`; every rank calls this.

    Written beside as .NAME.tmp, then moved into place, so a crash keeps the previous checkpoint."""
    import torch.distributed.checkpoint as dcp
    tmp = path.with_name(f".{path.name}.tmp")
    if layout.main and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    model_state, optim_state = state_dicts(module, optimizer)
    dcp.save({"model": model_state, "optim": optim_state, "master": numbered(masters)},
             checkpoint_id=str(tmp))
    if layout.main:
        torch.save(meta, tmp / META)
        old = path.with_name(f".{path.name}.old")
        if path.exists() or path.is_symlink():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    barrier()


def load_sharded(path: Path, module, optimizer, masters: list) -> dict:
    """Load the folder at `path` into `module`, `optimizer` and the master weights (resharded to this
    run's ranks); returns the run's small state (meta.pt)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    model_state, optim_state = state_dicts(module, optimizer)
    state = {"model": model_state, "optim": optim_state, "master": numbered(masters)}  # loaded in place
    try:
        dcp.load(state, checkpoint_id=str(path))
        meta = torch.load(path / META, map_location="cpu", weights_only=True)
    except Exception as e:
        raise OnnxgrowError(f"{path} is not a readable sharded checkpoint for this model "
                            f"({type(e).__name__}: {e})".splitlines()[0]) from e
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return meta


def numbered(tensors: list) -> dict:
    return {str(i): t for i, t in enumerate(tensors)}


@contextmanager
def session(device: torch.device):
    """The process group for one run: joined on entry (under torchrun), left on a normal exit. After
    an error it is left as it is: the process exits, and torchrun stops the other ranks."""
    device = start(device)
    yield device
    stop()
