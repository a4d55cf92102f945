"""Training configuration: YAML presets validated into dataclasses on load.

A preset is a YAML mapping whose sections mirror the dataclasses below. Every key is checked:
an unknown key, a value of the wrong type or out of range raises ConfigError naming the key
(for example ``optim.lr: must be > 0, got -1``). Presets shipped with the package live in
facemeta/configs/ and are found by name (``smoke``, ``cpu``, ``gpu``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from facemeta.data.sets import SET_NAMES
from facemeta.errors import ConfigError
from facemeta.objectives.margins import MARGIN_HEADS
from facemeta.train.methods import METHODS, MethodSettings
from facemeta.train.typed_config import build_checked

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"
# The leave-one-domain-out protocol of DESIGN.md: targets, and LFW people folds used for training.
LODO_TARGETS = ("yaleb", "orl", "mfr2")
LFW_TRAIN_FOLDS = [1, 2, 3, 4, 5]
MAX_EMBEDDING_SIZE = 65536  # as a gallery allows; larger heads would only exhaust memory


@dataclass
class ModelSection:
    """Backbone and embedding head (see facemeta.models.backbone.ModelConfig).

    ``head``: ``insightface`` (BN, flatten, linear, BN) or ``linear`` (global average pool + linear, no bias:
    the prior's own 128-d projection). ``pretrained: true`` starts from the backbone's installed weights (for
    ``dlib_resnet29``, the prior converted from face-recognition-models; no other backbone has local weights,
    use ``pretrained_path``); ``pretrained_path`` loads a local file instead. ``mean``/``std``: the input
    normalisation, null for the backbone's own (the prior's, for dlib_resnet29; 0.5 otherwise). ``frozen``:
    prefixes of parameter names (``backbone.stem``, ``backbone.blocks.0``) kept fixed during training.
    """

    backbone: str = "resnet18"
    embedding_size: int = 512
    image_size: int = 112
    dropout: float = 0.0
    head: Literal["insightface", "linear"] = "insightface"
    pretrained: bool = False
    pretrained_path: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    frozen: list[str] = field(default_factory=list)


@dataclass
class SourceSpec:
    """One source domain: a shared set, optionally restricted (LFW people folds, size caps).

    ``people_folds`` (LFW only) keeps the people of those folds of people.txt; ``min_images``
    drops identities with fewer aligned images; ``max_identities`` keeps the first N identities
    (sorted by name) that qualify; ``limit_per_identity`` keeps the first N images of each.
    ``style`` (facemeta.data.styles: harsh_light, mask) makes it a synthetic domain ``<set>+<style>``: the same
    people and images, every training image seen through the style; never from a target set.
    """

    set: str = "lfw"
    people_folds: list[int] | None = None
    min_images: int = 2
    max_identities: int | None = None
    limit_per_identity: int | None = None
    style: str | None = None

    @property
    def domain(self) -> str:
        """The domain this spec makes: its set, or ``<set>+<style>``."""
        from facemeta.data.styles import domain_name

        return domain_name(self.set, self.style)


@dataclass
class DataSection:
    """Which source domains to train on, where the data and the aligned cache live."""

    sources: list[SourceSpec] = field(default_factory=lambda: [
        SourceSpec(set="lfw", people_folds=list(LFW_TRAIN_FOLDS)), SourceSpec(set="orl"),
        SourceSpec(set="mfr2")])
    targets: list[str] = field(default_factory=lambda: ["yaleb"])
    root: str | None = None
    cache: str | None = None
    align_size: int = 112
    align_chip: Literal["arcface", "dlib"] = "arcface"
    workers: int = 0
    align_workers: int = 2


@dataclass
class SamplerSection:
    """Domain-balanced batches: identities per domain x images per identity, from every domain."""

    identities_per_domain: int = 8
    images_per_identity: int = 2


@dataclass
class OptimSection:
    """Optimiser, linear warm-up then cosine (or constant) schedule, gradient clipping."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 5.0


@dataclass
class LossSection:
    """Margin head on the embeddings (insightface's ArcFace or CosFace).

    ``init``: the class weights of the head(s) start ``random`` (from scratch) or as ``prototypes``: the
    normalised mean embedding of each training identity under the starting weights. From a prior, random
    class weights make the first steps' gradients noise that the backbone absorbs; prototypes give a
    classifier that is right from step 0, so fine-tuning refines the prior instead of unlearning it.
    """

    head: str = "arcface"  # a name in facemeta.objectives.margins.MARGIN_HEADS
    s: float = 64.0
    m: float = 0.5
    init: Literal["random", "prototypes"] = "random"


@dataclass
class DistillSection:
    """Distillation from the prior (teacher mode; facemeta.objectives.distill), added to any method's loss.

    ``weight``: the embedding-match term (through a learned projection to the teacher's 128 dimensions);
    ``pair_weight``: the batch's pairwise-similarity structure. Both 0 (the default): no teacher. The teacher's
    embeddings of the training faces are computed once on dlib's chips and cached (facemeta.train.teacher).
    ``teacher``: a facemeta checkpoint to distil instead of the prior (a single model or an ensemble, e.g. dlib's
    prior with SFace, distilled into one student; each chip it reads is aligned from the faces' sources); null:
    the prior.
    """

    weight: float = 0.0
    pair_weight: float = 0.0
    teacher: str | None = None


@dataclass
class EvalSection:
    """Held-out source-domain identities for validation and threshold calibration.

    ``heldout_fraction`` of each source domain's identities (at least ``min_heldout``) never
    enter training; at the end their all-pairs scores set the verification threshold at
    false-accept rate ``far``. Unseen targets are never used for calibration.
    """

    far: float = 1e-3
    heldout_fraction: float = 0.1
    min_heldout: int = 4
    every: int = 0
    flip: bool = True


@dataclass
class TrainConfig:
    """A whole training run; see facemeta/configs/*.yaml for annotated presets.

    ``interpolate``: the final model is ``start + interpolate * (trained - start)`` (WiSE-FT,
    facemeta.train.interpolation); 1 (the default) keeps the trained weights; below 1 needs starting weights.
    """

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    augment: dict[str, Any] = field(default_factory=dict)
    sampler: SamplerSection = field(default_factory=SamplerSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    method: str = "erm"  # a name in facemeta.train.methods.METHODS (the registry of training methods)
    meta: MethodSettings = field(default_factory=MethodSettings)
    distill: DistillSection = field(default_factory=DistillSection)
    steps: int = 1000
    interpolate: float = 1.0
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    amp: bool = True
    device: str = "auto"
    deterministic: bool = True
    threads: int | None = None
    output: str = "runs/default"
    eval: EvalSection = field(default_factory=EvalSection)
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-serialisable) of this config."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- validation
def _check(cond: bool, key: str, message: str, value: Any) -> None:
    """Raise ConfigError `key: message, got value` unless `cond`."""
    if not cond:
        raise ConfigError(f"{key}: {message}, got {value!r}")


def build_augment(values: dict[str, Any]) -> Any:
    """Validate the `augment` section against facemeta.data.transforms.AugmentConfig."""
    from facemeta.data.transforms import AugmentConfig

    return build_checked(AugmentConfig, values, "augment")


def _check_data_domains(d: DataSection) -> None:
    """The source specs (each domain once; a style only from a non-target set, with the people of its set's own
    source) and the targets (never a source)."""
    _check(len(d.sources) >= 1, "data.sources", "needs at least one source domain", d.sources)
    seen = set()
    for i, src in enumerate(d.sources):
        key = f"data.sources[{i}]"
        _check(src.set in SET_NAMES, f"{key}.set", f"must be one of {', '.join(SET_NAMES)}", src.set)
        twice = "is listed twice" + (f" with style {src.style}" if src.style else "")
        _check(src.domain not in seen, f"{key}.set", twice, src.set)
        seen.add(src.domain)
        if src.style is not None:
            from facemeta.data.styles import STYLES

            _check(src.style in STYLES, f"{key}.style", f"must be one of {', '.join(STYLES)} or null", src.style)
            _check(src.set not in d.targets, f"{key}.style", f"builds a domain from target set {src.set}", src.style)
        if src.people_folds is not None:
            _check(src.set == "lfw", f"{key}.people_folds", "applies to lfw only", src.people_folds)
            _check(bool(src.people_folds) and all(1 <= f <= 10 for f in src.people_folds),
                   f"{key}.people_folds", "must be fold numbers 1..10", src.people_folds)
        _check(src.min_images >= 2, f"{key}.min_images", "must be >= 2", src.min_images)
        _check(src.max_identities is None or src.max_identities >= 2, f"{key}.max_identities",
               "must be >= 2", src.max_identities)
        _check(src.limit_per_identity is None or src.limit_per_identity >= 2,
               f"{key}.limit_per_identity", "must be >= 2", src.limit_per_identity)
    natural = {src.set: src for src in d.sources if src.style is None}
    for i, src in enumerate(d.sources):  # a styled domain trains the people its set's own domain trains, no others
        own = natural.get(src.set)
        if src.style is not None and own is not None:
            _check(sorted(src.people_folds or []) == sorted(own.people_folds or []), f"data.sources[{i}].people_folds",
                   f"must select the people of the {src.set} source ({own.people_folds})", src.people_folds)
    for i, tgt in enumerate(d.targets):
        _check(tgt in SET_NAMES, f"data.targets[{i}]", f"must be one of {', '.join(SET_NAMES)}", tgt)
        _check(tgt not in seen, f"data.targets[{i}]", "is also a source domain (targets must be unseen)", tgt)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Range checks across sections; raises ConfigError naming the first bad key."""
    m, d, s, o, lo, e = cfg.model, cfg.data, cfg.sampler, cfg.optim, cfg.loss, cfg.eval
    _check(bool(m.backbone), "model.backbone", "must name a timm model", m.backbone)
    _check(1 <= m.embedding_size <= MAX_EMBEDDING_SIZE, "model.embedding_size", f"must be in 1..{MAX_EMBEDDING_SIZE}",
           m.embedding_size)
    _check(16 <= m.image_size <= 1024, "model.image_size", "must be in 16..1024", m.image_size)
    _check(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)", m.dropout)
    _check(not (m.pretrained and m.pretrained_path), "model.pretrained", "and model.pretrained_path exclude each "
           "other (pretrained: the backbone's installed weights; pretrained_path: a file)", m.pretrained)
    for key, values in (("model.mean", m.mean), ("model.std", m.std)):
        _check(values is None or (len(values) == 3 and all(math.isfinite(v) for v in values)), key,
               "must be three finite numbers (R, G, B) or null", values)
    _check(m.std is None or all(v > 0 for v in m.std), "model.std", "must be positive", m.std)
    _check_data_domains(d)
    _check(32 <= d.align_size <= 1024, "data.align_size", "must be in 32..1024", d.align_size)
    _check(d.workers >= 0, "data.workers", "must be >= 0", d.workers)
    _check(d.align_workers >= 1, "data.align_workers", "must be >= 1", d.align_workers)
    _check(s.identities_per_domain >= 2, "sampler.identities_per_domain", "must be >= 2", s.identities_per_domain)
    _check(s.images_per_identity >= 2, "sampler.images_per_identity", "must be >= 2", s.images_per_identity)
    _check(o.lr > 0, "optim.lr", "must be > 0", o.lr)
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0", o.weight_decay)
    _check(0 <= o.momentum < 1, "optim.momentum", "must be in [0, 1)", o.momentum)
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", o.warmup_steps)
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]", o.min_lr_ratio)
    _check(o.grad_clip is None or o.grad_clip > 0, "optim.grad_clip", "must be > 0 or null", o.grad_clip)
    _check(lo.head in MARGIN_HEADS, "loss.head", f"must be one of {', '.join(MARGIN_HEADS)}", lo.head)
    _check(lo.s > 0, "loss.s", "must be > 0", lo.s)
    for key, value in (("distill.weight", cfg.distill.weight), ("distill.pair_weight", cfg.distill.pair_weight)):
        _check(math.isfinite(value) and 0 <= value <= 100, key, "must be in [0, 100]", value)
    _check(cfg.distill.teacher is None or bool(cfg.distill.weight or cfg.distill.pair_weight), "distill.teacher",
           "needs distill.weight or distill.pair_weight above 0", cfg.distill.teacher)
    _check(0 <= lo.m < 1.5, "loss.m", "must be in [0, 1.5)", lo.m)
    _check(cfg.method in METHODS, "method", f"must be one of {', '.join(METHODS)}", cfg.method)
    try:
        cfg.meta.check()
    except ValueError as exc:
        raise ConfigError(f"meta.{exc}") from None
    if METHODS.get(cfg.method).episodic:
        # budget rule: every method sees domains x identities_per_domain x 2 images per step
        _check(s.images_per_identity == 2, "sampler.images_per_identity",
               f"must be 2 for method {cfg.method} (gallery/probe pairs; ERM uses the same for a fair budget)",
               s.images_per_identity)
        _check(len(d.sources) > cfg.meta.meta_test_domains, "meta.meta_test_domains",
               f"must be smaller than the number of source domains ({len(d.sources)}) for method {cfg.method}",
               cfg.meta.meta_test_domains)
    _check(cfg.steps >= 0, "steps", "must be >= 0 (0: no training, the starting weights calibrated)", cfg.steps)
    _check(cfg.steps > 0 or bool(m.pretrained or m.pretrained_path), "steps",
           "0 (no training) needs starting weights (model.pretrained or model.pretrained_path)", cfg.steps)
    _check(math.isfinite(cfg.interpolate) and 0 <= cfg.interpolate <= 1, "interpolate", "must be in [0, 1]",
           cfg.interpolate)
    _check(cfg.interpolate == 1 or bool(m.pretrained or m.pretrained_path), "interpolate",
           "below 1 needs starting weights to interpolate with (model.pretrained or model.pretrained_path)",
           cfg.interpolate)
    _check(cfg.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: only at the end)", cfg.checkpoint_every)
    _check(cfg.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1", cfg.keep_checkpoints)
    _check(cfg.log_every >= 1, "log_every", "must be >= 1", cfg.log_every)
    _check(cfg.seed >= 0, "seed", "must be >= 0", cfg.seed)
    _check(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"), "device",
           "must be auto, cpu or cuda[:N]", cfg.device)
    _check(cfg.threads is None or cfg.threads >= 1, "threads", "must be >= 1 or null", cfg.threads)
    _check(bool(cfg.output), "output", "must be a folder", cfg.output)
    _check(0 < e.far < 1, "eval.far", "must be in (0, 1)", e.far)
    _check(0 < e.heldout_fraction < 1, "eval.heldout_fraction", "must be in (0, 1)", e.heldout_fraction)
    _check(e.min_heldout >= 2, "eval.min_heldout", "must be >= 2", e.min_heldout)
    _check(e.every >= 0, "eval.every", "must be >= 0", e.every)
    build_augment(cfg.augment)
    return cfg


# ---------------------------------------------------------------- loading
def preset_names() -> list[str]:
    """Names of the presets shipped in facemeta/configs/."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_config_path(path_or_name: str | Path) -> Path:
    """A YAML path as given, else the shipped preset of that name; ConfigError if neither exists."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{path_or_name}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(f"no config file or preset named '{path_or_name}' "
                      f"(presets: {', '.join(preset_names())})")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; ConfigError on unreadable or malformed files."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                          f"at offset {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level")
    return data


def read_preset(path_or_name: str | Path) -> dict[str, Any]:
    """A training preset's settings (file path or shipped name): its YAML, or, where the file names a ``base``
    preset, that preset's settings with the file's dotted ``overrides`` applied (a variant of a recipe that cannot
    drift from it). One level only: a base does not name a base."""
    path = resolve_config_path(path_or_name)
    data = read_yaml(path)
    if "base" not in data:
        return data
    extra = sorted(set(data) - {"base", "name", "overrides"})
    if extra:
        raise ConfigError(f"config {path}: a preset with a base holds only base, name and overrides, not {extra}")
    base = read_yaml(resolve_config_path(data["base"]))
    if "base" in base:
        raise ConfigError(f"config {path}: its base {data['base']} names a base itself (one level only)")
    base.pop("name", None)
    out = apply_overrides(base, dict(data.get("overrides") or {}))
    if "name" in data:
        out["name"] = data["name"]
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """Return a copy of `data` with dotted overrides applied (``["optim.lr=0.05", "steps=10"]``).

    Values are parsed as YAML (so ``true``, ``3``, ``[1, 2]`` keep their types).
    """
    data = copy.deepcopy(data)
    if not overrides:
        return data
    items = overrides.items() if isinstance(overrides, dict) else []
    if isinstance(overrides, list):
        parsed = []
        for text in overrides:
            if "=" not in text:
                raise ConfigError(f"override '{text}' must look like key=value (for example optim.lr=0.05)")
            key, raw = text.split("=", 1)
            try:
                parsed.append((key.strip(), yaml.safe_load(raw)))
            except yaml.YAMLError as exc:
                raise ConfigError(f"override '{text}': bad value") from exc
        items = parsed
    for key, value in items:
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{key}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def leave_one_out(data: dict[str, Any], target: str) -> dict[str, Any]:
    """Rewrite sources/targets for DESIGN.md's protocol: LFW folds 1-5 + the other two small sets.

    Settings of an existing source (caps, min_images) are kept where that set stays a source; styled (synthetic)
    sources are kept after them, except those made from the target.
    """
    if target not in LODO_TARGETS:
        raise ConfigError(f"--leave-out must be one of {', '.join(LODO_TARGETS)}, got {target!r}")
    data = copy.deepcopy(data)
    section = data.setdefault("data", {}) or {}
    data["data"] = section
    given = [s for s in section.get("sources") or [] if isinstance(s, dict)]
    old = {s.get("set"): s for s in given if not s.get("style")}
    sources = []
    for name in ["lfw", *[t for t in LODO_TARGETS if t != target]]:
        spec = dict(old.get(name, {"set": name}))
        if name == "lfw":
            spec["people_folds"] = list(LFW_TRAIN_FOLDS)
        sources.append(spec)
    for spec in given:  # synthetic (styled) domains stay, but never one made from the target
        if spec.get("style") and spec.get("set") != target:
            spec = dict(spec)
            if spec.get("set") == "lfw":
                spec["people_folds"] = list(LFW_TRAIN_FOLDS)
            sources.append(spec)
    section["sources"] = sources
    section["targets"] = [target]
    return data


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Validate a nested mapping into a TrainConfig (ConfigError on any bad key or value)."""
    return validate(build_checked(TrainConfig, data))


def load_config(path_or_name: str | Path, overrides: list[str] | dict[str, Any] | None = None,
                leave_out: str | None = None) -> TrainConfig:
    """Load a preset (by file path or shipped name) and validate it into a TrainConfig.

    `overrides` are dotted ``key=value`` strings or a dict of dotted keys; `leave_out` applies
    the leave-one-domain-out protocol for that target. The preset's file stem becomes
    ``name`` unless the file sets one.
    """
    path = resolve_config_path(path_or_name)
    data = read_preset(path)
    data.setdefault("name", path.stem)
    if leave_out:
        data = leave_one_out(data, leave_out)
    data = apply_overrides(data, overrides)
    return config_from_dict(data)


def dump_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the config as YAML atomically (beside a run's outputs, for the record)."""
    from facemeta.atomic import atomic_write

    path = Path(path)
    with atomic_write(path) as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
    return path
