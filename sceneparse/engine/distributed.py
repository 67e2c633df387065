"""Multi-GPU and multi-node training with PyTorch's own machinery: torchrun + DDP + SyncBatchNorm.

Launch with `torchrun --nproc-per-node N -m sceneparse train CFG` (see docs/distributed.md).
torchrun starts one process per device and exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; `init_from_env` reads them. Without WORLD_SIZE (a plain `sceneparse train`) every
function here is a single-process no-op, so the training loop has one code path.

Conventions: the config's batch_size is *per process*; the global batch is
batch_size x world_size. Only rank 0 (`is_main()`) writes logs and checkpoints.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sceneparse.errors import SceneparseError

__all__ = [
    "DistInfo",
    "init_from_env",
    "resolve_device",
    "wrap_model",
    "sync_batchnorm",
    "unwrap",
    "all_reduce_",
    "reduce_mean",
    "barrier",
    "broadcast_object",
    "all_gather_object",
    "broadcast_buffers",
    "run_on_main",
    "process_group",
    "cleanup",
    "is_initialized",
    "is_main",
    "shard",
    "rank_seed",
    "loader_generator",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job. A single-process run is rank 0 of world size 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    local_world_size: int = 1  # processes on this machine (torchrun's --nproc-per-node)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise SceneparseError(
            f"environment variable {name}={value!r} is not an integer",
            "launch with torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK itself",
        ) from None


# What train.device and every --device may be (config load checks the form alone, so that a config
# written on a CPU machine for a GPU one loads; resolve_device checks that the device exists).
# No mps: nothing here runs or tests on Apple's backend, which would fail later with torch's errors.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
DEVICE_FORMS = "use auto (CUDA when available), cpu, cuda or cuda:N (N: the GPU's index)"


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda when available, else cpu; a CUDA device without CUDA is a user error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, torch.device) and not DEVICE_PATTERN.fullmatch(str(device)):
        raise SceneparseError(f"{str(device)!r} is not a device", DEVICE_FORMS)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SceneparseError(
            f"device {str(device)!r} requested but CUDA is not available",
            "use cpu or auto (--device, or train.device in a config), or install a CUDA build of torch",
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SceneparseError(f"device {str(device)!r} requested but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)",
                              "use cuda:0 .. cuda:N-1 (nvidia-smi lists them), or cuda")
    return device


def init_from_env(device: str | torch.device = "auto") -> DistInfo:
    """Join the process group torchrun set up, or return a single-process `DistInfo`.

    On CUDA each process uses GPU LOCAL_RANK and the NCCL backend; on CPU the gloo backend.
    Calling it again after the group is up returns the same answer without re-initialising.
    """
    requested = resolve_device(device)
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        if requested.type == "cuda":
            if requested.index is None:
                requested = torch.device("cuda", torch.cuda.current_device())
            # The current device is what the CUDA RNG state saved in checkpoints, new streams
            # and NCCL's object collectives use: make it the one the model runs on (cuda:N).
            torch.cuda.set_device(requested)
        return DistInfo(device=requested)

    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:  # it would wait forever for a rank that never comes
        raise SceneparseError(f"RANK={rank} with WORLD_SIZE={world_size}: ranks are 0 .. {world_size - 1}",
                              "start distributed runs with torchrun, which sets both")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise SceneparseError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} is not set",
            "start distributed runs with torchrun (e.g. torchrun --nproc-per-node 2 -m sceneparse train CFG)",
        )

    if requested.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SceneparseError(
                f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s)",
                "set --nproc-per-node to at most the number of GPUs per machine",
            )
        # One GPU per process, chosen by LOCAL_RANK (torchrun's per-machine index).
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"

    if not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev,
                    local_world_size=_env_int("LOCAL_WORLD_SIZE", world_size))


def wrap_model(
    model: nn.Module,
    info: DistInfo,
    sync_bn: bool = True,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """Move `model` to `info.device` and, when distributed, wrap it in DDP.

    Distributed means launched on several processes, or a process group already up (also one of
    a single process: that is how one GPU exercises the DDP, SyncBatchNorm and NCCL code paths).
    With `sync_bn` and CUDA, BatchNorm layers become SyncBatchNorm so their batch statistics are
    computed over the global batch (what a single big-batch run would see). torch's SyncBatchNorm
    only runs on GPU-like devices (it raises on CPU tensors), so on CPU/gloo plain BatchNorm is
    kept: each process normalises with the statistics of its own share of the batch.
    Memory format (channels-last) must be set before this: DDP lays out its gradient buckets
    from the parameters' strides at construction.
    """
    model = model.to(info.device)
    if not (info.distributed or _active()):
        return model
    unreached = parameters_without_gradient(model)
    if unreached:
        # DDP waits for every trainable parameter's gradient: these would stop the second step.
        for name in unreached:
            model.get_parameter(name).requires_grad_(False)
        if is_main():
            print(f"sceneparse: {len(unreached)} parameters never reach the model's output (e.g. "
                  f"{', '.join(unreached[:2])}; an encoder stage that encoder_options.out_indices leaves "
                  "out?): frozen, as DDP would wait for their gradients", file=sys.stderr)
    if sync_bn and info.device.type == "cuda":
        model = sync_batchnorm(model)
    device_ids = None
    if info.device.type == "cuda":
        device_ids = [torch.cuda.current_device() if info.device.index is None else info.device.index]
    return DistributedDataParallel(
        model,
        device_ids=device_ids,
        output_device=device_ids[0] if device_ids else None,
        find_unused_parameters=find_unused_parameters,
    )


def parameters_without_gradient(model: nn.Module, size: tuple[int, int] = (128, 128)) -> list[str]:
    """Names of the trainable parameters that a training-mode forward pass never reaches, found by
    one forward and backward on the meta device (shapes only: no memory, no compute, the model's
    own tensors untouched). [] when the meta device cannot run the model."""
    named = [*model.named_parameters(), *model.named_buffers()]
    tensors = {name: torch.empty_like(t, device="meta") for name, t in named}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    for name in trainable:
        tensors[name].requires_grad_(True)
    was_training = model.training
    try:
        model.train()
        out = torch.func.functional_call(model, tensors, (torch.empty(2, 3, *size, device="meta"),))
        outputs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        grads = torch.autograd.grad(sum(o.sum() for o in outputs), [tensors[n] for n in trainable], allow_unused=True)
    except Exception:  # noqa: BLE001 - an op without a meta kernel: leave the model to DDP as it is
        return []
    finally:
        model.train(was_training)
    return [name for name, grad in zip(trainable, grads) if grad is None]


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """`model` with every BatchNorm layer a SyncBatchNorm, keeping timm's fused norm + activation
    layers whole. torch's `SyncBatchNorm.convert_sync_batchnorm` turns timm's `BatchNormAct2d`
    (MobileNetV2's, EfficientNet's, ...) into a plain SyncBatchNorm whose forward never calls the
    activation it still holds: the network silently loses its ReLU6s. timm's converter makes
    `SyncBatchNormAct` for those and plain SyncBatchNorm for the rest."""
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and/or torch.compile wrappers (what checkpoints store)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_initialized() -> bool:
    """Whether a process group is up (a caller that starts one owns its `cleanup()`)."""
    return _active()


def is_main() -> bool:
    """True on rank 0 and in single-process runs: the process that logs and saves."""
    return not _active() or dist.get_rank() == 0


def all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce across processes (no-op in a single process); returns `tensor`.

    NCCL needs CUDA tensors, gloo CPU tensors: reduce on the device the backend expects.
    ReduceOp.AVG is NCCL-only; use `reduce_mean` for a portable mean.
    """
    if _active():
        dist.all_reduce(tensor, op=op)
    return tensor


def reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over processes, as a new tensor (e.g. the loss to log on rank 0)."""
    out = tensor.detach().clone()
    if _active():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def barrier() -> None:
    if _active():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable `obj` on every process (e.g. a run directory chosen on rank 0)."""
    if not _active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj) -> list:
    """Every rank's picklable `obj`, in rank order, on every process (`[obj]` in a single process)."""
    if not _active():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Give every rank rank `src`'s buffers (BatchNorm running statistics).

    Plain BatchNorm (CPU runs) updates its running statistics from each rank's own images, and
    DDP only re-sends rank 0's at the start of the next forward: without this, ranks evaluating
    between steps would use slightly different models (rank 0's is the one saved).
    """
    if _active():
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer, src=src)


def run_on_main(fn: Callable[[], object], info: DistInfo):
    """Run `fn` on rank 0 alone and return its result there (None elsewhere); if it fails, every
    rank raises (none is left waiting in its next collective).

    A user error reaches every rank as the same SceneparseError; any other exception is re-raised
    on rank 0 and reported on the others as a pointer to rank 0's traceback."""
    problem, error, result = None, None, None
    if info.is_main:
        try:
            result = fn()
        except SceneparseError as err:
            problem = (err.message, err.hint)
        except Exception as err:  # noqa: BLE001 - re-raised below, after the others are told
            problem, error = (f"rank 0 failed ({type(err).__name__}: {err}); see its traceback", None), err
    problem = broadcast_object(problem)
    if error is not None:
        raise error
    if problem is not None:
        raise SceneparseError(*problem)
    return result


@contextlib.contextmanager
def process_group(device: str | torch.device = "auto") -> Iterator[DistInfo]:
    """`with process_group(device) as info:` a command's body, under torchrun or alone. The group
    this starts is destroyed on the way out; one set up by the caller is left to the caller."""
    owns_group = not is_initialized()
    info = init_from_env(device)
    try:
        yield info
    except BaseException:
        if owns_group:
            cleanup()  # no barrier: the other ranks may never reach one (torchrun stops them)
        raise
    if owns_group:
        # Every rank done before any tears the group down: a rank that finished early (nothing
        # to write) would otherwise close its gloo/NCCL connections while rank 0 still holds them.
        barrier()
        cleanup()


def cleanup() -> None:
    if _active():
        dist.destroy_process_group()


def shard(dataset: torch.utils.data.Dataset, info: DistInfo) -> torch.utils.data.Dataset:
    """This rank's share of an evaluation set: items rank, rank + W, rank + 2W, ...

    Unlike DistributedSampler it never pads with repeated items, so per-rank confusion matrices
    summed with all_reduce count every image exactly once.
    """
    if not info.distributed:
        return dataset
    return torch.utils.data.Subset(dataset, range(info.rank, len(dataset), info.world_size))


def mix_seed(stream: str, *numbers: int) -> int:
    """A 32-bit seed mixing the given non-negative ints (numpy's SeedSequence hashing), for one
    named stream of random numbers. The name and the count of numbers are mixed in too: SeedSequence
    ignores trailing zeros, so without them (seed, 0) of one stream would equal (seed,) or
    (seed, 0, 0) of another, and e.g. rank 0's dropout would draw what epoch 0's shuffle draws."""
    return int(np.random.SeedSequence([zlib.crc32(stream.encode()), len(numbers), *(int(n) for n in numbers)])
               .generate_state(1)[0])


def rank_seed(seed: int, rank: int) -> int:
    """A 32-bit seed derived from (seed, rank): different per rank, the same on every rerun."""
    return mix_seed("rank", seed, rank)


def loader_generator(seed: int, rank: int = 0) -> torch.Generator:
    """The `generator=` for a training DataLoader: different on every rank, the same on every rerun.

    torch seeds worker w of a loader (torch, `random` and NumPy) with a base seed drawn from this
    generator plus w, so every (rank, worker) pair gets its own reproducible augmentation stream;
    no `worker_init_fn` is needed for that.
    """
    return torch.Generator().manual_seed(rank_seed(seed, rank))
