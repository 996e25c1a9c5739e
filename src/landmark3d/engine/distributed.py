"""Multi-process training: ranks, process groups, batch sharding, gradient sync, prefetch.

``torchrun --nproc_per_node=K -m landmark3d train ...`` starts K processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment;
:func:`init_distributed` turns them into a process group (NCCL on CUDA, device
``cuda:LOCAL_RANK``; gloo on CPU). Without those variables everything here is a no-op and a
single process runs exactly as before.

How a step is distributed (the same optimisation as one process with the global batch):

* every rank draws the epoch's batches from the same seeded generator, so all ranks see the
  same global batch of B samples; rank r keeps the contiguous slice :func:`shard_range` of it
  (``B // K`` samples, the first ``B % K`` ranks one more). Augmentation of the whole global
  batch runs on every rank — the price of keeping the random stream of a single-process run
  unchanged; the prefetch thread (:class:`Prefetcher`) hides it behind compute;
* each rank scales its loss by ``n_r / B`` and :func:`sync_gradients` sums the gradients of
  all ranks in one flat all-reduce (with the step loss, which parameters got a gradient, and
  whether any rank received a stop signal). For losses that are means over samples this is
  exactly the gradient of the global batch. We do not wrap the models in
  ``DistributedDataParallel``: a stage calls one model per landmark or per group, and a
  group absent from one rank's share would never run its DDP forward there, which
  deadlocks DDP's gradient hooks; one explicit all-reduce after backward has no such trap;
* batch-norm statistics are per rank (local batch of ``B / K``); buffers are broadcast from
  rank 0 at the end of every epoch, before validation and checkpointing.

Rank 0 alone validates, writes files and decides; :func:`on_main` runs a function on rank 0
and shares its result (or its failure, as the same error type) with every rank, so a failure
on rank 0 never leaves the others waiting in a collective.
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from landmark3d import errors
from landmark3d.engine import batching
from landmark3d.errors import ConfigError, Landmark3dError

T = TypeVar("T")

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
TIMEOUT_ENV = "LANDMARK3D_DIST_TIMEOUT_S"
"""Seconds a rank waits in a collective (e.g. while rank 0 validates); default 3600."""

_ERROR_TYPES: dict[str, type[Landmark3dError]] = {
    cls.__name__: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, Landmark3dError)
}


@dataclass(frozen=True)
class DistContext:
    """Where this process stands among the training processes.

    Attributes:
        rank: global rank (0 = the process that writes files).
        world_size: number of processes.
        local_rank: rank on this node (selects ``cuda:LOCAL_RANK``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: writes logs, metrics, checkpoints and every other file."""
        return self.rank == 0


SINGLE = DistContext()


def env_context(environ: Mapping[str, str] | None = None) -> DistContext:
    """The rank layout torchrun put into the environment (single process when absent).

    Raises:
        ConfigError: the variables are not integers or are inconsistent.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return SINGLE
    try:
        rank, world, local = (int(env.get(k, "0")) for k in _ENV)
    except ValueError:
        raise ConfigError(
            f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got {[env.get(k) for k in _ENV]}.",
            fix="start distributed training with torchrun, which sets them.",
        ) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(
            f"inconsistent distributed environment RANK={rank} WORLD_SIZE={world} "
            f"LOCAL_RANK={local}.",
            fix="start distributed training with torchrun, which sets them.",
        )
    return DistContext(rank, world, local)


def current() -> DistContext:
    """The context of the initialised process group, or the single-process context."""
    if dist.is_available() and dist.is_initialized():
        ctx = env_context()
        return DistContext(dist.get_rank(), dist.get_world_size(), ctx.local_rank)
    return SINGLE


def backend_for(device: torch.device) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device_pref: str = "auto") -> DistContext:
    """Initialise the process group when torchrun's environment asks for more than one process.

    Idempotent; with ``WORLD_SIZE`` unset or 1 nothing happens. On CUDA the process uses
    ``cuda:LOCAL_RANK`` (``torch.cuda.set_device``) and NCCL, else gloo. The collective
    timeout is ``$LANDMARK3D_DIST_TIMEOUT_S`` seconds (default 3600: ranks wait while rank 0
    validates or calibrates).

    Args:
        device_pref: the training device preference (``"auto"``, ``"cpu"``, ``"cuda"``).
    """
    from landmark3d.engine.device import select_device

    ctx = env_context()
    if not ctx.is_distributed or (dist.is_available() and dist.is_initialized()):
        return current() if ctx.is_distributed else ctx
    if not dist.is_available():
        raise ConfigError(
            "WORLD_SIZE > 1 but this torch build has no torch.distributed.",
            fix="install a torch build with distributed support, or run one process.",
        )
    device = select_device(device_pref, local_rank=ctx.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "3600")))
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend_for(device), timeout=timeout, **kwargs)
    return current()


def shutdown() -> None:
    """Destroy the process group if one is initialised (after a final barrier)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(device_pref: str = "auto") -> Iterator[DistContext]:
    """``with distributed_session(cfg.device) as ctx:`` — init on entry, destroy on exit."""
    ctx = init_distributed(device_pref)
    try:
        yield ctx
    except BaseException:
        if ctx.is_distributed and dist.is_initialized():  # no barrier: others may be gone
            dist.destroy_process_group()
        raise
    if ctx.is_distributed:
        shutdown()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in a single process)."""
    if ctx.is_distributed:
        dist.barrier()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: T, ctx: DistContext) -> T:
    """Rank 0's ``obj`` on every rank (pickled; only for small, trusted in-process objects)."""
    if not ctx.is_distributed:
        return obj
    box: list[Any] = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def agree(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when ``flag`` is True on any rank."""
    if not ctx.is_distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(t)
    return bool(t.item() > 0)


def on_main(fn: Callable[[], T], ctx: DistContext) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result or raises its error.

    A :class:`~landmark3d.errors.Landmark3dError` is re-raised on the other ranks as the same
    type with the same problem, path and fix; any other exception as ``RuntimeError``.
    """
    if not ctx.is_distributed:
        return fn()
    payload: tuple[str, Any] = ("ok", None)
    failure: BaseException | None = None
    if ctx.is_main:
        try:
            payload = ("ok", fn())
        except BaseException as exc:
            failure = exc
            if isinstance(exc, Landmark3dError):
                info = (type(exc).__name__, exc.problem, exc.path, exc.line, exc.fix)
                payload = ("error", info)
            else:
                payload = ("error", ("", f"{type(exc).__name__}: {exc}", None, None, None))
    status, value = broadcast_object(payload, ctx)
    if failure is not None:
        raise failure
    if status == "error":
        name, problem, path, line, fix = value
        cls = _ERROR_TYPES.get(name)
        if cls is None:
            raise RuntimeError(f"rank 0 failed: {problem}")
        raise cls(problem, path=path, line=line, fix=fix)
    return value


# ----------------------------------------------------------------------------- sharding
def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Half-open ``[start, stop)`` of rank ``rank``'s contiguous share of ``n`` samples.

    Shares differ by at most one sample (the first ``n % world`` ranks get one more); a rank
    may get an empty share when ``n < world``.
    """
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def has_batch_norm(models: Mapping[str, nn.Module]) -> bool:
    """Whether any of ``models`` contains a batch-norm layer."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        for model in models.values()
        for m in model.modules()
    )


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device (shapes only: no weights copied, no memory)."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def fails_on_one_sample(model: nn.Module, sample_shape: Sequence[int] | None) -> bool:
    """Whether training ``model`` on a batch of one sample of ``sample_shape`` (without the
    batch axis, e.g. ``(1, 64, 64, 64)``) fails in batch norm.

    Batch norm fails only where a layer sees a single value per channel — one sample *and* a
    1x1x1 feature map (e.g. a ResNet's last stage on a 32³ input; a 64³ input leaves 2x2x2
    there and trains on one sample). Found by a forward pass on the meta device (shapes only,
    no computation). Without a shape it cannot be told, and the answer is True (refuse rather
    than crash mid-epoch); a probe that fails for another reason answers False (training would
    then fail with torch's own error, as it would without this check).
    """
    if not has_batch_norm({"m": model}):
        return False
    if sample_shape is None:
        return True
    probe = _meta_copy(model).train()
    try:
        probe(torch.empty((1, *(int(s) for s in sample_shape)), device="meta"))
    except ValueError as e:
        return "Expected more than 1 value per channel" in str(e)
    except Exception:  # an operation without a meta kernel: cannot be told here
        return False
    return False


def _gives_a_single(size: int, world: int) -> bool:
    return any(
        shard_range(size, r, world)[1] - shard_range(size, r, world)[0] == 1 for r in range(world)
    )


def check_batch_norm_shares(
    stage: str,
    models: Mapping[str, nn.Module],
    sample_shapes: Mapping[str, Sequence[int]],
    batch_sizes: Sequence[int],
    world: int,
) -> None:
    """Refuse, before training, a split that gives a process exactly one sample of a batch
    when one of the stage's networks cannot train on one sample (batch norm seeing a single
    value per channel: torch would fail mid-epoch with "Expected more than 1 value per
    channel"; see :func:`fails_on_one_sample`).

    Args:
        stage: the stage name (the config section, e.g. "coarse").
        models: the stage's networks.
        sample_shapes: per network, the shape of one training input without the batch axis
            (networks missing here are assumed to fail on one sample if they use batch norm).
        batch_sizes: the sizes of the epoch's global batches, in order.
        world: number of processes.

    Raises:
        ConfigError: naming the batch sizes and a setting that avoids them.
    """
    if world < 2:
        return
    bad = sorted({b for b in batch_sizes if _gives_a_single(b, world)})
    if not bad:
        return
    failing = [k for k, m in models.items() if fails_on_one_sample(m, sample_shapes.get(k))]
    if not failing:
        return
    n, current = sum(batch_sizes), max(batch_sizes)
    fixes = [
        b
        for b in range(world * max(2, -(-current // world)), n + 1, world)
        if not any(_gives_a_single(s, world) for s in batching.batch_sizes(n, b))
    ]
    options = [f"--set {stage}.batch_size={fixes[0]}"] if fixes else []
    if current % world == 0 and current >= 2 * world:  # only the epoch's last batch is short
        options.append(f"--set {stage}.samples_per_epoch={-(-n // current) * current}")
    options.append("fewer processes")
    raise ConfigError(
        f"the {stage} stage's batches of {', '.join(map(str, bad))} sample(s) (of {n} "
        f"per epoch) split over {world} processes give a process a single sample, and the "
        f"{stage} network ({', '.join(failing)}) cannot train on one sample: its batch norm "
        "would see one value per channel.",
        fix="use " + "; or ".join(options) + ".",
    )


def _leaves(batch: Any) -> Iterator[torch.Tensor | np.ndarray]:
    if isinstance(batch, torch.Tensor | np.ndarray):
        yield batch
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from _leaves(v)
    elif isinstance(batch, list | tuple):
        for v in batch:
            yield from _leaves(v)


def batch_length(batch: Any) -> int:
    """Samples in ``batch``: the largest leading dimension of its tensors/arrays (0 if none)."""
    return max((int(t.shape[0]) for t in _leaves(batch) if t.ndim > 0), default=0)


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor | np.ndarray):
        return batch[start:stop] if batch.ndim > 0 else batch
    if isinstance(batch, Mapping):
        return {k: _slice(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_slice(v, start, stop) for v in batch)
    if isinstance(batch, list):
        return [_slice(v, start, stop) for v in batch]
    return batch


def shard_batch(batch: Any, rank: int, world: int) -> tuple[Any | None, float]:
    """Rank ``rank``'s share of a global batch and the weight of its loss.

    ``batch`` is a tensor, array, or a tuple/list/dict tree of them that all have the same
    leading (sample) dimension B. Returns ``(local_batch, n_r / B)``, or ``(None, 0.0)`` when
    the share is empty. Summing ``weight × mean loss`` over ranks gives the global mean loss.

    Raises:
        ValueError: the tensors disagree on the sample dimension (the stage must define its
            own ``shard_batch``).
    """
    sizes = {int(t.shape[0]) for t in _leaves(batch) if t.ndim > 0}
    if len(sizes) != 1:
        raise ValueError(
            f"cannot shard a batch whose tensors have leading dimensions {sorted(sizes)}; "
            "give the stage a shard_batch(batch, rank, world) method"
        )
    (n,) = sizes
    start, stop = shard_range(n, rank, world)
    if stop <= start:
        return None, 0.0
    return _slice(batch, start, stop), (stop - start) / n


# ----------------------------------------------------------------------------- gradients
def unique_parameters(optimizers: Iterable[torch.optim.Optimizer]) -> list[nn.Parameter]:
    """Parameters of ``optimizers`` in a fixed order, each once."""
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def sync_gradients(
    params: Sequence[torch.Tensor], loss: float, stop: bool, ctx: DistContext
) -> tuple[float, bool]:
    """Sum gradients, the weighted step loss and the stop flag over all ranks, in place.

    One flat float32 all-reduce: ``[grads..., has_grad flags..., loss, stop]``. A parameter
    that got no gradient on any rank keeps ``grad = None`` (so optimizers skip it exactly as
    in a single process); one that got a gradient on some rank gets the sum on every rank.

    Args:
        params: the trained parameters, in the same order on every rank.
        loss: this rank's loss already multiplied by its weight ``n_r / B``.
        stop: this rank received a stop signal.

    Returns:
        ``(global loss, any rank asked to stop)``.
    """
    if not ctx.is_distributed:
        return loss, stop
    device = params[0].device if params else _collective_device()
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    flat = torch.zeros(total + len(params) + 2, dtype=torch.float32, device=device)
    offset = 0
    for i, (p, n) in enumerate(zip(params, sizes, strict=True)):
        if p.grad is not None:
            flat[offset : offset + n] = p.grad.detach().reshape(-1)
            flat[total + i] = 1.0
        offset += n
    flat[-2] = loss
    flat[-1] = 1.0 if stop else 0.0
    dist.all_reduce(flat)
    flags = flat[total : total + len(params)].tolist()
    offset = 0
    for p, n, flag in zip(params, sizes, flags, strict=True):
        if flag > 0:
            values = flat[offset : offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = values.clone()
            else:
                p.grad.copy_(values)
        else:
            p.grad = None
        offset += n
    tail = flat[-2:].tolist()
    return float(tail[0]), tail[1] > 0


def broadcast_state(
    models: Mapping[str, nn.Module], ctx: DistContext, buffers_only: bool = False
) -> None:
    """Copy rank 0's parameters (unless ``buffers_only``) and buffers to every rank."""
    if not ctx.is_distributed:
        return
    with torch.no_grad():
        for model in models.values():
            tensors = list(model.buffers())
            if not buffers_only:
                tensors = list(model.parameters()) + tensors
            for t in tensors:
                dist.broadcast(t.data, src=0)


# ----------------------------------------------------------------------------- prefetch
@dataclass
class Fed:
    """One batch as a rank trains on it.

    Attributes:
        local: this rank's share of the batch (None: empty share, nothing to compute).
        weight: loss weight ``n_r / B`` (1.0 in a single process).
        samples: samples in the global batch (for samples/s).
    """

    local: Any | None
    weight: float
    samples: int


def feed(
    batches: Iterable[Any], ctx: DistContext, sharder: Callable[[Any, int, int], Any]
) -> Iterator[Fed]:
    """Turn a stage's global batches into this rank's :class:`Fed` items."""
    for batch in batches:
        n = batch_length(batch)
        if ctx.is_distributed:
            local, weight = sharder(batch, ctx.rank, ctx.world_size)
            yield Fed(local, float(weight), n)
        else:
            yield Fed(batch, 1.0, n)


_DONE = object()


class Prefetcher:
    """Iterate ``items`` in a background thread through a bounded queue.

    The producer thread runs the iterator alone and in order, so the batches (their order
    and content, and every draw from the stage's numpy generator) are exactly those of
    inline iteration; batch construction (resampling, augmentation) overlaps the training
    step. The stage's ``train_batches`` must not use torch's global RNG (the training step
    may). Exceptions of the producer are raised in the consumer. Use as a context manager so
    the thread ends when the consumer stops early.

    Args:
        items: the iterable to prefetch.
        depth: queue size (batches built ahead); ``0`` iterates inline without a thread.
    """

    def __init__(self, items: Iterable[Any], depth: int = 2) -> None:
        self._items = items
        self.depth = int(depth)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(self.depth, 1))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _produce(self) -> None:
        try:
            for item in self._items:
                while not self._stop.is_set():
                    try:
                        self._queue.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._put_final(("done", _DONE))
        except BaseException as exc:
            self._put_final(("error", exc))

    def _put_final(self, msg: tuple[str, Any]) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(msg, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[Any]:
        if self.depth <= 0:
            yield from self._items
            return
        self._thread = threading.Thread(target=self._produce, name="batch-prefetch", daemon=True)
        self._thread.start()
        while True:
            kind, value = self._queue.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    def close(self) -> None:
        """Stop the producer thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
