"""Experiment configuration: what a person *chooses* (epochs, lr, augmentation, widths).

What the data dictates (spacings, coarse grid, intensity window) lives in the plan
(:mod:`landmark3d.planning`). A config is a tree of frozen dataclasses, loaded from YAML
(``yaml.safe_load``) and written as JSON next to every checkpoint.

Loading is strict: an unknown key is a :class:`~landmark3d.errors.ConfigError` naming the key,
the file (and line), and the closest valid key; a value of the wrong type is an error too.
Defaults are the paper's values (Pang et al., MIDL 2023) where the paper states one; the
shipped YAML files say in comments which values are the paper's and which are ours.

Example::

    cfg = load_config("phantom_demo")             # packaged config by name
    cfg = load_config("configs/pddca.yaml")       # or a path
    cfg = apply_overrides(cfg, ["fine.epochs=3", "seed=1"])
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from landmark3d.errors import ConfigError
from landmark3d.io.atomic import atomic_write_text
from landmark3d.naming import closest_match

Optimizer = Literal["sgd", "adam", "adamw"]
Schedule = Literal["cosine", "constant"]


@dataclass(frozen=True)
class CoarseConfig:
    """Coarse stage: a 3D ResNet regressing all landmark coordinates on a whole-volume grid.

    Attributes:
        grid: input grid (i, j, k) voxels; None = derived by the plan from the data.
        widths: ResNet block widths (four stages); (64, 128, 256, 512) = ResNet-34 (paper).
        layers: residual blocks per stage; (3, 4, 6, 3) = ResNet-34 (paper).
        epochs: training epochs (paper: 300 PDDCA, 50 prostate).
        batch_size: volumes per step.
        optimizer: "sgd" (paper), "adam" or "adamw".
        lr: learning rate (paper: 1e-3).
        momentum: SGD momentum (not in the paper; ours).
        weight_decay: L2 weight decay (paper: 1e-8).
        lr_schedule: "cosine" (ours) or "constant".
        samples_per_epoch: samples drawn per epoch; None = every training case once.
        val_every: validate every this many epochs.
    """

    grid: tuple[int, int, int] | None = None
    widths: tuple[int, ...] = (64, 128, 256, 512)
    layers: tuple[int, ...] = (3, 4, 6, 3)
    epochs: int = 300
    batch_size: int = 4
    optimizer: Optimizer = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-8
    lr_schedule: Schedule = "cosine"
    samples_per_epoch: int | None = None
    val_every: int = 1


@dataclass(frozen=True)
class FineConfig:
    """Fine stage: a heatmap U-Net on a patch around each landmark.

    Attributes:
        patch_size: patch voxels (i, j, k) (paper: 48^3).
        spacing_mm: patch voxel spacing in mm; None = derived by the plan (paper: 2 mm PDDCA,
            1 mm prostate).
        sigma_mm: Gaussian heatmap sigma in mm (not stated in the paper; ours).
        jitter_fraction: training patch-centre jitter sigma as a fraction of the patch edge
            (paper: sigma = L/6).
        sharing: "per_landmark" (paper: one U-Net per landmark) or "shared" (one U-Net, one
            output channel per landmark).
        channels: U-Net channels per level (ours; the paper does not state them).
        epochs, batch_size, optimizer, lr, momentum, weight_decay, lr_schedule,
        samples_per_epoch, val_every: as in :class:`CoarseConfig`. The paper prints SGD with
            lr 1e-6 for this stage; the default keeps the paper's optimizer and lr, the shipped
            YAML files use Adam 1e-3 (see their comments).
        decode: "dark" (paper: DARK sub-voxel decoding) or "argmax".
        heatmap_amplitude: peak value of the Gaussian targets (ours; the paper does not say).
            With a peak of 1 the randomly initialised U-Net's O(1) outputs dominate the MSE and
            training stalls: measured on the phantom, one U-Net reached 0.5 mm validation error
            after 50 steps with a peak of 100 but was still at 29 mm with a peak of 1. Decoding
            (argmax, DARK) does not depend on the amplitude. Also used by the correlated stage
            (heatmaps and slice profile alike, so lambda0/lambda1 keep their balance).
    """

    patch_size: tuple[int, int, int] = (48, 48, 48)
    spacing_mm: tuple[float, float, float] | None = None
    sigma_mm: float = 3.0
    jitter_fraction: float = 0.1667
    sharing: Literal["per_landmark", "shared"] = "per_landmark"
    channels: tuple[int, ...] = (16, 32, 64, 128)
    epochs: int = 300
    batch_size: int = 8
    optimizer: Optimizer = "sgd"
    lr: float = 1e-6
    momentum: float = 0.9
    weight_decay: float = 1e-8
    lr_schedule: Schedule = "cosine"
    samples_per_epoch: int | None = None
    val_every: int = 1
    decode: Literal["dark", "argmax"] = "dark"
    heatmap_amplitude: float = 100.0


@dataclass(frozen=True)
class CorrelatedConfig:
    """Fine stage for correlated landmark groups (the paper's contribution).

    Groups come from the plan (``landmark3d prior`` writes them into dataset.json); a dataset
    without groups trains no correlated model. Patches are those of the fine stage (size,
    spacing, heatmap sigma, jitter); their centres are reset onto one shared key slice.

    Attributes:
        discover: when the dataset spec names no groups, find them in the training cases'
            annotations (``landmark3d.prior.discover_groups``) while planning.
        channels: U-Net channels per level of each group member's encoder/decoder (ours).
        shared_encoder: one encoder for all members (paper: one per patch).
        use_fusion, use_axis_attention, use_slice_detection: the paper's three components
            (switching them off one by one gives the ablation rows).
        lambda0, lambda1: weights of the heatmap and slice losses (paper: not stated; lambda1
            0.005 balances a 1D profile MSE against a mostly-zero 3D heatmap MSE, see
            ``landmark3d.networks.correlated.correlated_loss``).
        combine: how the key-slice estimate and the heatmaps make the final coordinates:
            "slice" (ours, default) puts every member on the detected key slice, keeping each
            heatmap's in-slice position; "heatmap" ignores the slice estimate; "mean" averages
            the members' heatmap positions along the axis with the slice estimate.
        epochs, batch_size, optimizer, lr, momentum, weight_decay, lr_schedule,
        samples_per_epoch, val_every: as in :class:`FineConfig`.
    """

    discover: bool = True
    channels: tuple[int, ...] = (16, 32, 64, 128)
    shared_encoder: bool = False
    use_fusion: bool = True
    use_axis_attention: bool = True
    use_slice_detection: bool = True
    lambda0: float = 1.0
    lambda1: float = 0.005
    combine: Literal["slice", "heatmap", "mean"] = "slice"
    epochs: int = 300
    batch_size: int = 4
    optimizer: Optimizer = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-8
    lr_schedule: Schedule = "cosine"
    samples_per_epoch: int | None = None
    val_every: int = 1


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (paper: translation 10 % of the input, scaling 10 %, intensity 0.1).

    Attributes:
        translate: max translation as a fraction of the field of view (paper: 0.1).
        scale: max relative scaling (paper: 0.1).
        rotate_deg: max rotation about each axis in degrees (ours; the paper lists none).
        intensity: max intensity shift and relative scale (paper: 0.1).
        enabled: switch all augmentation off with False.
    """

    translate: float = 0.1
    scale: float = 0.1
    rotate_deg: float = 10.0
    intensity: float = 0.1
    enabled: bool = True


@dataclass(frozen=True)
class IntensityConfig:
    """Intensity normalisation choices.

    Attributes:
        ct_window: [low, high] HU window for CT; None = learned from the training data by the plan.
        mr_percentiles: per-image percentile clip for MR before z-scoring.
    """

    ct_window: tuple[float, float] | None = None
    mr_percentiles: tuple[float, float] = (0.5, 99.5)


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole experiment config.

    Attributes:
        seed: seed of every random choice.
        device: "auto" (CUDA if available), "cpu" or "cuda".
        amp: mixed precision: "auto" (on for CUDA), True or False.
        num_threads: torch CPU threads; None = torch's default.
        coarse, fine, correlated, augment, intensity: the sections.
        source: file this config came from (not serialised; for messages only).
    """

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool | Literal["auto"] = "auto"
    num_threads: int | None = None
    coarse: CoarseConfig = field(default_factory=CoarseConfig)
    fine: FineConfig = field(default_factory=FineConfig)
    correlated: CorrelatedConfig = field(default_factory=CorrelatedConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    source: str | None = field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dict(
        cls, d: dict[str, Any] | None, source: str | Path | None = None
    ) -> ExperimentConfig:
        """Build and validate from a nested dict (missing keys take defaults)."""
        src = None if source is None else str(source)
        cfg = _build(cls, d or {}, (), _Ctx(src))
        cfg = dataclasses.replace(cfg, source=src)
        _check_values(cfg)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> ExperimentConfig:
        """Load a YAML file (``yaml.safe_load``); strict about keys and types."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read config: {exc.strerror or exc}.",
                path=p,
                fix="check the path, or pass a packaged name: " + ", ".join(packaged_configs()),
            ) from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"cannot read config: not UTF-8 text (byte {exc.start}).",
                path=p,
                line=exc.object[: exc.start].count(b"\n") + 1,
                fix="save the config as UTF-8 text.",
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise ConfigError(
                f"not valid YAML: {getattr(exc, 'problem', exc)}.",
                path=p,
                line=None if mark is None else mark.line + 1,
                fix="fix the YAML syntax (indentation, colons, quotes).",
            ) from None
        except (ValueError, OverflowError, RecursionError) as exc:
            # PyYAML lets some constructor errors through, e.g. the date 2001-02-30
            raise ConfigError(
                f"not valid YAML: a value cannot be read ({type(exc).__name__}: {exc}).",
                path=p,
                fix="quote values that are not numbers, and check dates and nesting.",
            ) from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(
                "a config must be a mapping of sections (seed:, coarse:, fine:, ...).",
                path=p,
                fix="start the file with top-level keys such as 'seed: 0'.",
            )
        return cls.from_dict(data, source=p)

    @classmethod
    def from_json(cls, path: str | Path) -> ExperimentConfig:
        """Load a config written by :meth:`save_json`."""
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: JSON / UTF-8 errors
            raise ConfigError(
                f"cannot read config JSON: {exc}.",
                path=p,
                fix="re-save the config or point at the right file.",
            ) from None
        return cls.from_dict(data, source=p)

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly nested dict (tuples become lists; ``source`` is omitted)."""
        return _to_plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save_json(self, path: str | Path) -> Path:
        """Write the config as JSON atomically."""
        return atomic_write_text(path, self.to_json())

    def replace(self, **overrides: Any) -> ExperimentConfig:
        """A copy with top-level fields replaced; a section given as a dict is merged into it.

        ``cfg.replace(seed=3, fine={"epochs": 2})``. Dotted keys are accepted through
        ``cfg.replace(**{"fine.epochs": 2})``. The result is validated like a loaded file.
        """
        d = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(d, key, value, self.source)
        return ExperimentConfig.from_dict(d, source=self.source)


# ====================================================================== loading helpers
@dataclass(frozen=True)
class _Ctx:
    source: str | None
    _lines: dict[tuple[str, ...], int] = field(default_factory=dict)

    def line(self, keypath: tuple[str, ...]) -> int | None:
        if not self._lines and self.source and self.source.endswith((".yaml", ".yml")):
            self._lines.update(_yaml_key_lines(Path(self.source)))
        return self._lines.get(keypath)


def _yaml_key_lines(path: Path) -> dict[tuple[str, ...], int]:
    """Map key paths to 1-based line numbers (best effort, for error messages)."""
    out: dict[tuple[str, ...], int] = {}
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, yaml.YAMLError):
        return out

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = (*prefix, str(k.value))
                out[key] = k.start_mark.line + 1
                walk(v, key)

    if root is not None:
        walk(root, ())
    return out


def _err(ctx: _Ctx, keypath: tuple[str, ...], problem: str, fix: str) -> ConfigError:
    return ConfigError(problem, path=ctx.source, line=ctx.line(keypath), fix=fix)


def _build(cls: type, data: Any, keypath: tuple[str, ...], ctx: _Ctx) -> Any:
    """Instantiate dataclass ``cls`` from ``data``, checking keys and types."""
    where = ".".join(keypath) or "top level"
    if not isinstance(data, dict):
        raise _err(
            ctx,
            keypath,
            f"'{where}' must be a mapping, got {type(data).__name__}.",
            "write the section as 'key: value' lines.",
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        kp = (*keypath, str(key))
        if key not in fields:
            match = closest_match(str(key), list(fields), cutoff=0.5)
            hint = f"did you mean '{match}'?" if match else "remove it."
            raise _err(
                ctx,
                kp,
                f"unknown config key '{'.'.join(kp)}'.",
                f"{hint} Valid keys here: {', '.join(fields)}.",
            )
        kwargs[key] = _coerce(value, hints[key], kp, ctx)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__  # "int", not "<class 'int'>"
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, kp: tuple[str, ...], ctx: _Ctx) -> Any:
    """Check ``value`` against type ``tp``; return the canonical value (lists -> tuples)."""
    name = ".".join(kp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build(tp, value, kp, ctx)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for alt in args:
            if alt is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, alt, kp, ctx)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise _err(
            ctx,
            kp,
            f"'{name}' must be {_type_name(tp)}, got {value!r}.",
            "use one of the allowed values or types.",
        )
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise _err(
            ctx,
            kp,
            f"'{name}' must be one of {', '.join(map(repr, args))}, got {value!r}.",
            f"set '{name}' to one of those.",
        )
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _err(
                ctx,
                kp,
                f"'{name}' must be a list, got {value!r}.",
                f"write it as [a, b, ...]: {_type_name(tp)}.",
            )
        if len(args) == 2 and args[1] is Ellipsis:
            if len(value) == 0:
                raise _err(ctx, kp, f"'{name}' must not be empty.", "give at least one value.")
            return tuple(_coerce(v, args[0], (*kp,), ctx) for v in value)
        if len(value) != len(args):
            raise _err(
                ctx,
                kp,
                f"'{name}' needs {len(args)} values, got {len(value)}.",
                f"write it as a list of {len(args)} numbers.",
            )
        return tuple(_coerce(v, a, kp, ctx) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"unsupported config field type {tp!r}")
    raise _err(
        ctx,
        kp,
        f"'{name}' must be {_type_name(tp)}, got {value!r}.",
        f"give '{name}' a value of type {_type_name(tp)}.",
    )


def _check_values(cfg: ExperimentConfig) -> None:
    """Range checks that types cannot express."""
    ctx = _Ctx(cfg.source)
    c, f, a = cfg.coarse, cfg.fine, cfg.augment

    def need(ok: bool, kp: str, problem: str, fix: str) -> None:
        if not ok:
            raise _err(ctx, tuple(kp.split(".")), f"'{kp}' {problem}", fix)

    for kp, value in _float_fields(cfg):
        need(
            all(math.isfinite(v) for v in value),
            kp,
            f"must be a finite number, got {value[0] if len(value) == 1 else list(value)}.",
            "use ordinary numbers (no .nan / .inf).",
        )
    for sec_name, sec in (("coarse", c), ("fine", f), ("correlated", cfg.correlated)):
        need(
            0 <= sec.momentum < 1,
            f"{sec_name}.momentum",
            "must be in [0, 1).",
            "use e.g. 0.9 (SGD momentum).",
        )
        need(sec.epochs >= 1, f"{sec_name}.epochs", "must be >= 1.", "use a positive number.")
        need(
            sec.batch_size >= 1, f"{sec_name}.batch_size", "must be >= 1.", "use a positive number."
        )
        need(sec.lr > 0, f"{sec_name}.lr", "must be > 0.", "use a positive learning rate.")
        need(sec.weight_decay >= 0, f"{sec_name}.weight_decay", "must be >= 0.", "use 0 or more.")
        need(sec.val_every >= 1, f"{sec_name}.val_every", "must be >= 1.", "use a positive number.")
        need(
            sec.samples_per_epoch is None or sec.samples_per_epoch >= 1,
            f"{sec_name}.samples_per_epoch",
            "must be >= 1 or null.",
            "use null for all cases.",
        )
    k = cfg.correlated
    need(
        k.use_fusion or not (k.use_axis_attention or k.use_slice_detection),
        "correlated.use_fusion",
        "must be true when axis attention or slice detection is on (they gate the fused features).",
        "set use_fusion: true, or switch use_axis_attention and use_slice_detection off.",
    )
    need(
        k.lambda0 >= 0 and k.lambda1 >= 0, "correlated.lambda1", "must be >= 0.", "use e.g. 0.005."
    )
    need(
        len(k.channels) == len(f.channels),
        "correlated.channels",
        "must have as many levels as fine.channels (the patch size is shared).",
        f"use {len(f.channels)} values.",
    )
    need(
        c.grid is None or min(c.grid) >= 16,
        "coarse.grid",
        "must have at least 16 voxels per axis.",
        "use e.g. [64, 64, 64].",
    )
    need(
        len(c.widths) == 4 and len(c.layers) == 4,
        "coarse.widths",
        "and coarse.layers need exactly 4 values (ResNet stages).",
        "use e.g. widths [64,128,256,512] and layers [3,4,6,3].",
    )
    need(
        min(c.widths) >= 1 and min(c.layers) >= 1,
        "coarse.widths",
        "values must be >= 1.",
        "use positive widths and block counts.",
    )
    levels = len(f.channels)
    need(levels >= 2, "fine.channels", "needs at least 2 levels.", "use e.g. [16, 32, 64, 128].")
    div = 2 ** (levels - 1)
    need(
        all(s % div == 0 and s >= 2 * div for s in f.patch_size),
        "fine.patch_size",
        f"must be multiples of {div} (and >= {2 * div}) for a {levels}-level U-Net.",
        f"use e.g. [{6 * div}, {6 * div}, {6 * div}] or fewer fine.channels.",
    )
    need(
        f.spacing_mm is None or min(f.spacing_mm) > 0,
        "fine.spacing_mm",
        "must be > 0.",
        "use positive spacings in mm, or null.",
    )
    need(f.sigma_mm > 0, "fine.sigma_mm", "must be > 0.", "use e.g. 3.0.")
    need(f.heatmap_amplitude > 0, "fine.heatmap_amplitude", "must be > 0.", "use e.g. 100.")
    need(
        0 <= f.jitter_fraction <= 0.5,
        "fine.jitter_fraction",
        "must be in [0, 0.5].",
        "the paper uses 1/6 (0.1667).",
    )
    need(
        0 <= a.translate < 0.5 and 0 <= a.scale < 0.5 and 0 <= a.intensity < 1,
        "augment",
        "amounts out of range (translate, scale < 0.5; intensity < 1).",
        "use small fractions.",
    )
    need(0 <= a.rotate_deg <= 90, "augment.rotate_deg", "must be in [0, 90].", "use e.g. 10.")
    w = cfg.intensity.ct_window
    need(
        w is None or w[0] < w[1], "intensity.ct_window", "needs low < high.", "e.g. [-1000, 2000]."
    )
    p = cfg.intensity.mr_percentiles
    need(
        0 <= p[0] < p[1] <= 100,
        "intensity.mr_percentiles",
        "needs 0 <= low < high <= 100.",
        "e.g. [0.5, 99.5].",
    )
    need(
        cfg.num_threads is None or cfg.num_threads >= 1,
        "num_threads",
        "must be >= 1 or null.",
        "use null for torch's default.",
    )


def _float_fields(obj: Any, prefix: str = "") -> list[tuple[str, tuple[float, ...]]]:
    """``(dotted key, values)`` of every float (or tuple of floats) field of a config tree."""
    out: list[tuple[str, tuple[float, ...]]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kp = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out += _float_fields(value, kp + ".")
        elif isinstance(value, float):
            out.append((kp, (value,)))
        elif isinstance(value, tuple) and value and all(isinstance(v, float) for v in value):
            out.append((kp, value))
    return out


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: _to_plain(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if f.name != "source"
        }
    if isinstance(obj, tuple | list):
        return [_to_plain(v) for v in obj]
    return obj


def _set_dotted(d: dict[str, Any], key: str, value: Any, source: str | None) -> None:
    """Set ``d[a][b] = value`` for key ``"a.b"``; a dict value merges into a section."""
    parts = key.split(".")
    node = d
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            valid = [k for k, v in node.items() if isinstance(v, dict)]
            match = closest_match(part, valid, cutoff=0.5)
            raise ConfigError(
                f"override '{key}': '{'.'.join(parts[: i + 1])}' is not a config section.",
                path=source,
                fix=(f"did you mean '{match}'? " if match else "")
                + f"Sections: {', '.join(valid)}.",
            )
        node = node[part]
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last].update(value)
    else:
        node[last] = value  # unknown keys are reported by from_dict, with the closest match


def apply_overrides(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """Apply ``["fine.epochs=3", "coarse.grid=[32,32,32]"]`` (values parsed as YAML)."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override '{item}' has no '='.",
                path=cfg.source,
                fix="write overrides as section.key=value, e.g. fine.epochs=3.",
            )
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except (yaml.YAMLError, ValueError, OverflowError, RecursionError):
            value = raw  # not YAML: taken as a string (and type-checked like any value)
        _set_dotted(d, key.strip(), value, cfg.source)
    return ExperimentConfig.from_dict(d, source=cfg.source)


# ====================================================================== packaged configs
def packaged_configs() -> list[str]:
    """Names of the configs shipped inside the package (``landmark3d/configs/*.yaml``)."""
    root = resources.files("landmark3d") / "configs"
    if not root.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_config(name_or_path: str | Path) -> ExperimentConfig:
    """Load a config from a YAML/JSON path, or a packaged config by bare name ("phantom_demo")."""
    p = Path(name_or_path)
    if p.is_file():
        return (
            ExperimentConfig.from_json(p) if p.suffix == ".json" else ExperimentConfig.from_yaml(p)
        )
    name = p.name[: -len(".yaml")] if p.name.endswith(".yaml") else p.name
    if p.parent == Path(".") and name in packaged_configs():
        res = resources.files("landmark3d") / "configs" / f"{name}.yaml"
        with resources.as_file(res) as real:
            return ExperimentConfig.from_yaml(real)
    names = packaged_configs()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    raise ConfigError(
        "no such config file or packaged config.",
        path=p,
        fix=(f"did you mean '{close[0]}'? " if close else "")
        + f"Packaged configs: {', '.join(names) or '(none)'}; or give a path to a YAML file.",
    )
