"""Device, mixed precision, threads and seeding for training and inference.

Everything here is a small, explicit function: the trainer and the predictor call them in
that order (threads → seed → device → AMP) and nothing else touches global torch state.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import numpy as np
import torch

from landmark3d.errors import ConfigError

_AMP_ON = {"on", "true", "yes", "1"}
_AMP_OFF = {"off", "false", "no", "0"}


def select_device(pref: str = "auto") -> torch.device:
    """Return the torch device to run on.

    Args:
        pref: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        ConfigError: the preference is unknown, or CUDA was asked for but is not available.
    """
    text = str(pref).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {pref!r} was requested but CUDA is not available.",
                fix="use device 'auto' or 'cpu', or install a CUDA build of torch.",
            )
        dev = torch.device(text)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {pref!r} does not exist ({torch.cuda.device_count()} CUDA device(s)).",
                fix="choose an index below the device count, or 'cuda'.",
            )
        return dev
    raise ConfigError(f"unknown device {pref!r}.", fix="use 'auto', 'cpu', 'cuda' or 'cuda:N'.")


def amp_enabled(device: torch.device, pref: str | bool = "auto") -> bool:
    """Whether to use automatic mixed precision (float16 autocast + GradScaler).

    AMP is only ever used on CUDA: on CPU this returns False whatever ``pref`` says, so a
    config written for a GPU still runs (in float32) on a laptop.

    Args:
        device: the device training runs on.
        pref: ``"auto"`` (on for CUDA), ``"on"``/True, ``"off"``/False.

    Raises:
        ConfigError: ``pref`` is not one of the accepted values.
    """
    if isinstance(pref, bool):
        wanted = pref
    else:
        text = str(pref).strip().lower()
        if text == "auto" or text in _AMP_ON:
            wanted = True
        elif text in _AMP_OFF:
            wanted = False
        else:
            raise ConfigError(f"unknown amp setting {pref!r}.", fix="use 'auto', 'on' or 'off'.")
    return wanted and device.type == "cuda"


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """A context running its body under float16 autocast on ``device`` when ``enabled``.

    When disabled this is a no-op context (not ``torch.autocast(enabled=False)``, which
    would also switch off an autocast region the caller is already inside).
    """
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=True)


def set_num_threads(n: int | None) -> None:
    """Set the number of intra-op CPU threads torch uses; ``None`` keeps torch's default.

    Raises:
        ConfigError: ``n`` is not a positive integer.
    """
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"num_threads must be a positive integer, got {n!r}.", fix="use e.g. 4.")
    torch.set_num_threads(n)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python ``random``, numpy's global generator and torch (CPU and CUDA).

    With ``deterministic`` torch is asked for deterministic algorithms (``warn_only`` so an
    op without a deterministic kernel warns instead of failing) and cuDNN autotuning is off;
    on CPU this makes the same seed and config give the same numbers.

    Args:
        seed: a non-negative integer.
        deterministic: also switch torch to deterministic algorithms.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}.", fix="use e.g. 0.")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic and not torch.are_deterministic_algorithms_enabled():
        # (the first call imports torch._dynamo: ~3 s, paid once per process)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
