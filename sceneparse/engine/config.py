"""Run configuration: OmegaConf structured dataclasses, a YAML file merged on top, `key=value` overrides.

`load_config("configs/quickstart.yaml", ["train.iterations=100"])` returns a typed `DictConfig`.
Unknown keys, wrong types, a missing or malformed YAML file become `SceneparseError`s that name the
key or file and list the valid keys next to it.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sceneparse.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from sceneparse.engine.distributed import DEVICE_FORMS, DEVICE_PATTERN
from sceneparse.engine.losses import LOSSES
from sceneparse.engine.optim import OPTIMIZERS
from sceneparse.errors import SceneparseError



@dataclass
class ModelConfig:
    encoder: str = "resnet50dilated"
    decoder: str = "ppm_deepsup"
    num_classes: Optional[int] = None  # None: taken from the dataset
    encoder_weights: Optional[str] = None  # path or URL of ImageNet weights, None: random init
    # A sceneparse checkpoint (path or zoo name) whose weights start a new run (fine-tuning): the
    # same encoder, decoder and options; with another class count the classifiers start fresh.
    weights: Optional[str] = None
    encoder_options: Dict[str, Any] = field(default_factory=dict)  # build_model(encoder_options=...)
    decoder_options: Dict[str, Any] = field(default_factory=dict)  # e.g. {pool_scales: [1, 2, 3, 6]}


@dataclass
class DataConfig:
    kind: str = "ade20k"  # a key of sceneparse.data.DATASETS: ade20k, camvid, voc, cityscapes, ...
    root: Optional[str] = None
    odgt: Optional[Any] = None  # a list file, or {train: file, val: file}
    classes_file: Optional[str] = None
    train_split: str = "train"  # several splits joined with '+', e.g. "train+val" (file-backed kinds)
    val_split: str = "val"
    # Training resize (CSAIL): the short side is drawn from `scales`, the long side capped at max_size.
    scales: List[int] = field(default_factory=lambda: [300, 375, 450, 525, 600])
    max_size: int = 1000
    # crop_size set: instead of the above, rescale by a factor from scale_range, then crops:
    # an int (square) or [height, width].
    crop_size: Optional[Any] = None
    scale_range: List[float] = field(default_factory=lambda: [0.5, 2.0])
    # With crop_size: the short side that scale_range multiplies (VOC's recipes rescale every image
    # to a 512 short side times the factor); null: each image's own short side.
    base_size: Optional[int] = None
    flip: bool = True
    color_jitter: float = 0.0  # strength of brightness/contrast/saturation jitter, 0: off
    mean: List[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: List[float] = field(default_factory=lambda: list(IMAGENET_STD))
    batch_size: int = 2
    num_workers: int = 4
    batching: str = "aspect"  # aspect: CSAIL's aspect-ratio grouping | crop: fixed-size crops
    # Decode every image and label once at start-up and keep them in RAM (uint8): DataLoader workers
    # then only augment. For small datasets (CamVid: ~250 MB); forked workers share the memory.
    cache_in_memory: bool = False
    # Where the training augmentation runs: `workers` (DataLoader processes, torchvision.transforms.v2)
    # or `device`: batched on the training device (sceneparse.data.device_augment; crop recipes
    # only). With cache_in_memory as well, the whole training set is kept on the device: no workers.
    augment_on: str = "workers"
    # kind=synthetic: {num_images: int or {train: N, val: M}, seed: int, image_size: int}
    synthetic: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    name: str = "cross_entropy"  # cross_entropy | ohem | focal | lovasz (sceneparse.engine.losses)
    label_smoothing: float = 0.0  # cross_entropy: 0..1
    # ohem: cross-entropy over the pixels whose true class has probability <= ohem_threshold, and
    # at least the ohem_min_kept hardest pixels of each batch (per process under torchrun)
    ohem_threshold: float = 0.7
    ohem_min_kept: int = 100_000
    focal_gamma: float = 2.0  # focal: (1 - p)^gamma down-weights easy pixels; 0 is cross-entropy
    dice_weight: float = 0.0  # any loss: + dice_weight x soft Dice over the classes in the batch
    lovasz_weight: float = 0.0  # any loss but lovasz: + lovasz_weight x Lovasz-softmax (the batch's classes)


@dataclass
class TrainConfig:
    iterations: int = 100_000
    # Wall-clock seconds from the start of training's set-up (a resumed run counts the time already
    # spent; interpreter start-up, the final validation and the curves come on top). Set: the poly
    # schedule is fitted to the clock (its end moves with the measured speed) and training ends
    # when the time is up; `iterations` is then a cap.
    time_budget_s: Optional[float] = None
    lr_encoder: float = 0.02
    lr_decoder: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4  # not applied to norm weights and biases
    poly_power: float = 0.9
    warmup_iters: int = 0
    deepsup_weight: float = 0.4
    se_weight: float = 0.2  # EncNet's SE-loss (class presence per image), when the decoder predicts it
    class_weights: Optional[Any] = None  # None | list of floats | "auto" (median frequency)
    loss: LossConfig = field(default_factory=LossConfig)
    # sgd: with momentum (CSAIL's recipe, convnets); adamw: betas (0.9, 0.999), `momentum` unused
    # (transformer encoders: Swin, ViT, with a learning rate around 6e-5)
    optimizer: str = "sgd"
    amp: str = "none"  # none | bf16 | fp16 (CUDA only)
    channels_last: bool = False
    compile: bool = False
    val_every: int = 5000
    checkpoint_every: int = 1000
    log_every: int = 20
    seed: int = 304
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    on_nonfinite: str = "stop"  # stop | skip


@dataclass
class EvalConfig:
    # short sides to test at (multi-scale: probabilities averaged); null = the original size
    scales: List[Optional[int]] = field(default_factory=lambda: [300, 375, 450, 525, 600])
    flip: bool = False
    max_size: int = 1000


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/default"
    overwrite: bool = False


CHOICES = {
    "data.batching": ("aspect", "crop"),
    "data.augment_on": ("workers", "device"),
    "train.amp": ("none", "bf16", "fp16"),
    "train.optimizer": tuple(OPTIMIZERS),
    "train.loss.name": tuple(LOSSES),
    "train.on_nonfinite": ("stop", "skip"),
}


POSITIVE = ("train.iterations", "train.checkpoint_every", "train.log_every", "data.batch_size", "data.max_size",
            "eval.max_size")


def default_config() -> DictConfig:
    return OmegaConf.structured(Config)


def _valid_keys_near(cfg: DictConfig, dotted: str) -> str:
    """The keys at the level where `dotted` went wrong, closest first."""
    parts = dotted.split(".")
    node: Any = cfg
    for part in parts[:-1]:
        if isinstance(node, DictConfig) and part in node and isinstance(node[part], DictConfig):
            node = node[part]
        else:
            break
    keys = list(node.keys()) if isinstance(node, DictConfig) else list(cfg.keys())
    close = difflib.get_close_matches(parts[-1], keys, n=3)
    ordered = close + [k for k in keys if k not in close]
    return ", ".join(ordered)


def _error_key(err: OmegaConfBaseException) -> str:
    return str(getattr(err, "full_key", "") or getattr(err, "key", "") or "")


def _friendly(err: OmegaConfBaseException, base: DictConfig, where: str) -> SceneparseError:
    key = _error_key(err)
    first_line = str(err).splitlines()[0]
    if key and OmegaConf.select(base, key, default="<missing>") != "<missing>":
        # The key exists, the value does not fit its type: show the default as an example.
        hint = f"{key} expects a value like {OmegaConf.select(base, key)!r}"
    else:
        hint = f"valid keys there: {_valid_keys_near(base, key)}"
    return SceneparseError(f"{where}: invalid setting {key!r}: {first_line}", hint=hint)


def _check_choices(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise SceneparseError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    for key in POSITIVE:
        value = OmegaConf.select(cfg, key)
        if value is None or value < 1:
            raise SceneparseError(f"{key}={value!r} must be a positive number")
    for key, meaning in (("train.val_every", " (0: never)"), ("data.num_workers", " (0: load in the main process)"),
                         ("train.warmup_iters", " (0: no warm-up)")):
        if OmegaConf.select(cfg, key) < 0:
            raise SceneparseError(f"{key}={OmegaConf.select(cfg, key)!r} must not be negative{meaning}")
    if not DEVICE_PATTERN.fullmatch(str(cfg.train.device)):  # its form only: a GPU config loads on a CPU
        raise SceneparseError(f"train.device={cfg.train.device!r} is not a device", DEVICE_FORMS)
    if cfg.train.time_budget_s is not None and cfg.train.time_budget_s <= 0:
        raise SceneparseError(f"train.time_budget_s={cfg.train.time_budget_s!r} must be positive (or null: no budget)")
    if cfg.model.weights and cfg.model.encoder_weights:
        raise SceneparseError("model.weights and model.encoder_weights are both set: the checkpoint's weights "
                              "would replace the encoder's",
                              "keep one: model.encoder_weights=null to fine-tune the checkpoint")
    if cfg.train.loss.lovasz_weight > 0 and cfg.train.loss.name == "lovasz":
        # the loss is already Lovasz-softmax: the term would only rescale it
        raise SceneparseError("train.loss.lovasz_weight adds a Lovasz term to another loss, and train.loss.name "
                              "is lovasz already",
                              "set train.loss.lovasz_weight=0, or e.g. train.loss.name=cross_entropy")
    crop = cfg.data.crop_size
    if cfg.data.augment_on == "device" and crop is None:
        raise SceneparseError(
            "data.augment_on=device needs data.crop_size: batched augmentation makes fixed-size crops",
            "set data.crop_size (e.g. 512 or [360, 480]), or keep data.augment_on=workers",
        )
    if crop is not None:
        values = list(crop) if OmegaConf.is_list(crop) else [crop]
        if not 1 <= len(values) <= 2 or not all(type(v) is int and v > 0 for v in values):
            shown = OmegaConf.to_container(crop) if OmegaConf.is_list(crop) else crop
            raise SceneparseError(f"data.crop_size={shown!r}: expected null, a positive int or [height, width]")
    weights = cfg.train.class_weights
    if weights is not None and weights != "auto" and not OmegaConf.is_list(weights):
        raise SceneparseError(
            f"train.class_weights={weights!r}: expected null, 'auto' or a list of numbers"
        )
    _check_finite(OmegaConf.to_container(cfg, resolve=True))
    _check_sizes(cfg)
    _check_loss_options(cfg.train.loss)  # after the range checks, which name a bad value first


# The options that one loss alone reads: set away from its default with another loss chosen, an
# option would do nothing, and the user would believe it did.
LOSS_OPTION_OWNER = {"label_smoothing": "cross_entropy", "ohem_threshold": "ohem", "ohem_min_kept": "ohem",
                     "focal_gamma": "focal"}


def _check_loss_options(loss: DictConfig) -> None:
    defaults = LossConfig()
    unused = [key for key, owner in LOSS_OPTION_OWNER.items()
              if owner != loss.name and loss[key] != getattr(defaults, key)]
    if unused:
        owners = sorted({LOSS_OPTION_OWNER[key] for key in unused})
        shown = ", ".join(f"train.loss.{key}={loss[key]}" for key in unused)
        resets = " ".join(f"train.loss.{key}={getattr(defaults, key)}" for key in unused)
        raise SceneparseError(
            f"{shown} only {'applies' if len(unused) == 1 else 'apply'} to train.loss.name="
            f"{' or '.join(owners)}, not {loss.name}: {'it' if len(unused) == 1 else 'they'} would do nothing",
            f"choose that loss, or remove the option ({resets})")


def _check_finite(node: Any, key: str = "") -> None:
    """No setting may be inf or nan (YAML's .inf/.nan, or `=inf` on the command line): an
    infinite learning rate or weight passes every `>= 0` check and turns the first step into nan."""
    if isinstance(node, dict):
        children = [(f"{key}.{name}" if key else str(name), value) for name, value in node.items()]
    elif isinstance(node, list):
        children = [(f"{key}[{i}]", value) for i, value in enumerate(node)]
    else:
        return
    for child, value in children:
        if isinstance(value, float) and not math.isfinite(value):
            raise SceneparseError(f"{child}={value}: expected a finite number")
        _check_finite(value, child)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_sizes(cfg: DictConfig) -> None:
    """Sizes, ranges and factors whose types alone let wrong values through (they would fail at
    the first batch or validation, or train on 1-pixel images)."""
    d, loss, weights = cfg.data, cfg.train.loss, cfg.train.class_weights
    counts = d.synthetic.get("num_images")
    counts = list(counts.values()) if isinstance(counts, DictConfig) else [counts]
    checks = [  # (keys shown, whether the values are fine, what is expected)
        # 0 would silently mean "the dataset's count" (`num_classes or ...`), a negative one fail later
        (["model.num_classes"], cfg.model.num_classes is None or cfg.model.num_classes >= 1,
         "a positive class count, or null (the dataset's)"),
        # a negative weight trains that class away from its label; all 0 makes the loss 0/0
        (["train.class_weights"], not OmegaConf.is_list(weights) or (
            all(_is_number(w) and w >= 0 for w in weights) and any(_is_number(w) and w > 0 for w in weights)),
         "numbers >= 0 (one per class, not all 0), null or 'auto'"),
        # free-form, so untyped: an empty split or a 0-pixel image would fail at the first batch
        (["data.synthetic.num_images"], all(c is None or _is_int(c) and c >= 1 for c in counts),
         "a positive number of images, or {train: N, val: M}"),
        (["data.synthetic.image_size"], d.synthetic.get("image_size") is None
         or _is_int(d.synthetic.image_size) and d.synthetic.image_size >= 1, "a positive size in pixels"),
        (["data.synthetic.seed"], d.synthetic.get("seed") is None
         or _is_int(d.synthetic.seed) and d.synthetic.seed >= 0, "a seed >= 0"),
        (["data.scales"], all(s >= 1 for s in d.scales), "positive short sides (or [] with data.crop_size)"),
        (["eval.scales"], len(cfg.eval.scales) > 0 and all(s is None or s >= 1 for s in cfg.eval.scales),
         "at least one positive short side (null: each image's own size)"),
        (["data.scale_range"], len(d.scale_range) == 2 and 0 < d.scale_range[0] <= d.scale_range[1],
         "[low, high] with 0 < low <= high"),
        (["data.base_size"], d.base_size is None or d.base_size >= 1, "a positive short side, or null"),
        (["data.base_size", "data.crop_size"], d.base_size is None or d.crop_size is not None,
         "data.base_size with data.crop_size (it sets the rescaling of the crop recipe)"),
        (["data.color_jitter"], d.color_jitter >= 0, "a strength >= 0 (0: off)"),
        (["data.mean", "data.std"], len(d.mean) == len(d.std) == 3 and all(v > 0 for v in d.std),
         "three values each (RGB), std positive"),
        (["train.lr_encoder"], cfg.train.lr_encoder >= 0, "a learning rate >= 0 (0: those weights are not updated)"),
        (["train.lr_decoder"], cfg.train.lr_decoder >= 0, "a learning rate >= 0 (0: those weights are not updated)"),
        (["train.momentum"], 0 <= cfg.train.momentum < 1, "a value in [0, 1)"),
        (["train.weight_decay"], cfg.train.weight_decay >= 0, "a value >= 0 (0: none)"),
        (["train.poly_power"], cfg.train.poly_power >= 0, "a power >= 0 (0: a constant learning rate)"),
        (["train.seed"], 0 <= cfg.train.seed < 2**32, "a seed in 0..2**32-1"),
        (["train.deepsup_weight"], cfg.train.deepsup_weight >= 0, "a weight >= 0 (0: no auxiliary loss)"),
        (["train.se_weight"], cfg.train.se_weight >= 0, "a weight >= 0 (0: no SE-loss)"),
        (["train.loss.label_smoothing"], 0 <= loss.label_smoothing <= 1, "a value in 0..1"),
        (["train.loss.ohem_threshold"], 0 < loss.ohem_threshold <= 1, "a probability in (0, 1]"),
        (["train.loss.ohem_min_kept"], loss.ohem_min_kept >= 1, "a positive pixel count"),
        (["train.loss.focal_gamma"], loss.focal_gamma >= 0, "a value >= 0 (0: cross-entropy)"),
        (["train.loss.dice_weight"], loss.dice_weight >= 0, "a weight >= 0 (0: no Dice term)"),
        (["train.loss.lovasz_weight"], loss.lovasz_weight >= 0, "a weight >= 0 (0: no Lovasz term)"),
    ]
    for keys, fine, expected in checks:
        if not fine:
            values = [OmegaConf.select(cfg, k) for k in keys]
            shown = [OmegaConf.to_container(v) if OmegaConf.is_list(v) else v for v in values]
            raise SceneparseError(", ".join(f"{k}={v!r}" for k, v in zip(keys, shown)) + f": expected {expected}")


# A config file's `base:` names the files it builds on (a path, or a list merged in order), each
# relative to the file that names it: MMSegmentation's composable configs, without its Python
# files or string magic. A run's saved config.yaml is the composed result, with no `base:`.
BASE_KEY = "base"


def _read_yaml(path: Path) -> DictConfig:
    """One YAML file's mapping; a parse error names the file and the parser's position."""
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise SceneparseError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(loaded, DictConfig):
        raise SceneparseError(f"{path}: expected a mapping of settings at the top level")
    return loaded


def _empties_a_mapping(key: str) -> bool:
    """Whether `key: {}` replaces the mapping beneath it: yes for free-form mappings (options such
    as model.decoder_options, data.synthetic, and anything inside them), where merging {} would
    change nothing; no for a section of settings (`model: {}` keeps every default, as before)."""
    default = OmegaConf.select(default_config(), key, default=None)
    return not (isinstance(default, DictConfig) and OmegaConf.get_type(default) is not dict)


def _empty_mappings(node: DictConfig, prefix: str = "") -> list[str]:
    """The dotted keys written `{}` whose mapping that replaces (`_empties_a_mapping`): in a file,
    as on the command line."""
    found = []
    for key in node:
        value = node._get_node(key)
        if isinstance(value, DictConfig):
            if len(value) == 0:
                found += [f"{prefix}{key}"] if _empties_a_mapping(f"{prefix}{key}") else []
            else:
                found += _empty_mappings(value, f"{prefix}{key}.")
    return found


def _merge_file(cfg: DictConfig, loaded: DictConfig, where: str) -> DictConfig:
    try:
        cfg = OmegaConf.merge(cfg, loaded)
        for key in _empty_mappings(loaded):
            OmegaConf.update(cfg, key, {}, merge=False)
    except OmegaConfBaseException as err:
        raise _friendly(err, default_config(), where) from None
    return cfg


def _compose(cfg: DictConfig, path: Path, chain: tuple[Path, ...] = (), merged: set | None = None) -> DictConfig:
    """`cfg` <- the `base:` files of `path` (recursively, in order) <- `path` itself. A file two
    bases share is merged once, before the first of them: merged again for the second, it would
    undo what the first one changed."""
    merged = set() if merged is None else merged
    if not path.is_file():
        if chain:
            raise SceneparseError(f"{chain[-1]}: base file not found: {path}",
                                  hint="base: paths are relative to the folder of the file that names them")
        raise SceneparseError(f"config file not found: {path}", hint="check the path")
    if path.resolve() in merged:
        return cfg
    if path.resolve() in {p.resolve() for p in chain}:
        raise SceneparseError("config files name each other as base: " + " -> ".join(map(str, (*chain, path))),
                              hint="remove one of these base: entries")
    loaded = _read_yaml(path)
    if "_base_" in loaded:
        raise SceneparseError(f"{path}: _base_ is MMSegmentation's key", hint="sceneparse's is base: (a path or a list)")
    bases = loaded.pop(BASE_KEY, None)
    bases = [] if bases is None else [bases] if isinstance(bases, str) else bases
    if not (OmegaConf.is_list(bases) or isinstance(bases, list)) or not all(isinstance(b, str) for b in bases):
        raise SceneparseError(f"{path}: base must be a file path or a list of file paths, got {bases!r}",
                              hint="e.g. base: ../voc/resnet50dilated-ppm_deepsup.yaml")
    for base in bases:
        cfg = _compose(cfg, path.parent / Path(base).expanduser(), (*chain, path), merged)
    merged.add(path.resolve())
    return _merge_file(cfg, loaded, str(path))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Structured defaults <- YAML file (after its `base:` files) <- dotted `key=value` overrides."""
    cfg = default_config()
    if path is not None:
        cfg = _compose(cfg, Path(path))
    for item in overrides:
        if "=" not in item:
            raise SceneparseError(f"override {item!r} is not key=value", hint="e.g. train.iterations=1000")
        key, value = item.split("=", 1)
        section = OmegaConf.select(cfg, key, default=None)
        if isinstance(section, DictConfig) and not value.strip().startswith("{"):
            keys = f"; its keys: {', '.join(section)}" if len(section) else ""
            raise SceneparseError(f"override {item!r}: {key} is a section, not a value",
                                  f"set one of its keys ({key}.KEY=VALUE), or '{key}={{...}}' ({{}} empties it){keys}")
        try:
            if value.strip() == "{}" and _empties_a_mapping(key):  # merging it would change nothing
                OmegaConf.update(cfg, key, {}, merge=False)
            else:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))
        except OmegaConfBaseException as err:
            raise _friendly(err, default_config(), f"override {item!r}") from None
        except yaml.YAMLError as err:  # the value is parsed as YAML: a list or mapping cut short
            raise SceneparseError(
                f"override {item!r}: the value is not valid YAML ({getattr(err, 'problem', None) or err})",
                "a shell splits an unquoted override at its spaces: quote the whole override, e.g. "
                "'model.decoder_options={pool_scales: [1, 2, 3, 6]}' or 'data.scales=[300, 450]'; "
                "and YAML mappings need a space after each ':' ({a: 1}, not {a:1})",
            ) from None
    _check_choices(cfg)
    return cfg


def dataset_settings(data_cfg: DictConfig) -> dict:
    """The `data:` section as `sceneparse.data.build_dataset` reads it (synthetic options flattened in)."""
    settings = OmegaConf.to_container(data_cfg, resolve=True)
    settings.update(settings.pop("synthetic", None) or {})
    return settings


def save_config(cfg: DictConfig, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(cfg))
