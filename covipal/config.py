"""Typed configuration: ``params.yaml`` maps onto these dataclasses and nothing else.

Each section is a pydantic dataclass, so an unknown key, a wrong type or an
out-of-range value is refused when the file is read, before any stage does work;
:func:`load_params` turns pydantic's report into one message per problem that names
the key (``data.sizes.train``) and how to fix it. Checks that need more than one
section (a guide layer beyond the model's depth) live in :meth:`Params.check`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator
from pydantic.dataclasses import dataclass

STRICT = ConfigDict(extra="forbid")
IMAGE_QUESTIONS = ["position", "colour", "presence", "count", "relation"]
VIDEO_QUESTIONS = ["colour", "presence", "count", "relation"]


class ConfigError(ValueError):
    """A bad ``params.yaml``: the message names each bad key and the fix."""


@dataclass(config=STRICT)
class ImageWorld:
    """Image scenes: ``grid`` x ``grid`` cells of 8x8 pixels, one vision token per cell."""

    grid: int = Field(8, ge=2, le=16)
    digits: int = Field(8, ge=2)  # digits per validation/test image
    min_train_digits: int = Field(2, ge=2)  # training images hold min_train_digits..digits
    question_types: list[Literal["position", "colour", "presence", "count", "relation"]] = Field(
        default_factory=lambda: list(IMAGE_QUESTIONS), min_length=1)


@dataclass(config=STRICT)
class VideoWorld:
    """Video scenes: ``frames`` frames of ``grid`` x ``grid`` cells."""

    frames: int = Field(8, ge=3, le=64)
    grid: int = Field(4, ge=2, le=16)
    digits: int = Field(10, ge=2)  # digits over the whole video, validation/test
    min_train_digits: int = Field(3, ge=2)
    question_types: list[Literal["colour", "presence", "count", "relation"]] = Field(
        default_factory=lambda: list(VIDEO_QUESTIONS), min_length=1)


@dataclass(config=STRICT)
class Sizes:
    train: int = Field(20000, ge=1)
    validation: int = Field(600, ge=1)
    test: int = Field(2000, ge=1)


@dataclass(config=STRICT)
class DataConfig:
    """Where samples come from: ``digit-world`` builds the embedded world; anything else
    is a local folder saved with ``DatasetDict.save_to_disk`` or a hub id, in the same schema."""

    source: str = "digit-world"
    seed: int = 0
    video_share: float = Field(0.4, ge=0.0, le=1.0)  # fraction of samples that are videos
    train_turns: int = Field(8, ge=1)  # questions per training scene (a multi-turn conversation)
    sizes: Sizes = Field(default_factory=Sizes)
    image: ImageWorld = Field(default_factory=ImageWorld)
    video: VideoWorld = Field(default_factory=VideoWorld)

    @model_validator(mode="after")
    def _digits_fit(self):
        if self.image.min_train_digits > self.image.digits:
            raise ValueError("image.min_train_digits must be at most image.digits")
        if self.image.digits > self.image.grid ** 2:
            raise ValueError(f"image.digits ({self.image.digits}) must fit in grid**2 = {self.image.grid ** 2} cells")
        if self.video.min_train_digits > self.video.digits:
            raise ValueError("video.min_train_digits must be at most video.digits")
        return self


@dataclass(config=STRICT)
class ReferenceModel:
    """Sizes of the reference LVLM (real LLaVA classes: CLIP tower, projector, Llama)."""

    vision_hidden: int = Field(64, ge=8)
    vision_layers: int = Field(2, ge=1)
    vision_heads: int = Field(4, ge=1)
    text_hidden: int = Field(128, ge=8)
    text_layers: int = Field(4, ge=1)
    text_heads: int = Field(4, ge=1)
    text_intermediate: int = Field(384, ge=8)


@dataclass(config=STRICT)
class ModelConfig:
    """``source: reference`` trains the reference LVLM; anything else is a pretrained
    Hugging Face LVLM id or local folder, recorded with its ``revision`` and not trained."""

    source: str = "reference"
    revision: str = "main"
    reference: ReferenceModel = Field(default_factory=ReferenceModel)


@dataclass(config=STRICT)
class BaseTraining:
    """Recipe for the reference LVLM (see ``covipal.reference.train``)."""

    seed: int = 0
    warmup_steps: int = Field(300, ge=0)  # vision tower warm-up on per-cell labels
    warmup_lr: float = Field(3e-3, gt=0)
    steps: int = Field(1800, ge=1)  # projector + LLM steps, tower frozen
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    curriculum_threshold: float = Field(0.8, gt=0, le=1)  # running train accuracy that admits harder scenes
    curriculum_increment: float = Field(0.25, gt=0, le=1)  # level step (0 = fewest digits, 1 = most)
    curriculum_deadline: float = Field(0.85, gt=0, le=1)  # share of steps by which all scenes are admitted
    eval_batch_size: int = Field(128, ge=1)


@dataclass(config=STRICT)
class PruningConfig:
    method: str = "covipal"
    reserve_ratio: float = Field(0.25, gt=0, le=1)
    eval_ratios: list[float] = Field(default_factory=lambda: [1.0, 0.5, 0.25, 0.125, 0.0625], min_length=1)

    @model_validator(mode="after")
    def _ratios_in_range(self):
        bad = [r for r in self.eval_ratios if not 0 < r <= 1]
        if bad:
            raise ValueError(f"eval_ratios {bad} are outside (0, 1]; a reserve ratio is the kept share of vision tokens")
        return self


@dataclass(config=STRICT)
class TargetsConfig:
    guide_layer: int = Field(2, ge=0)  # decoder layer whose attention guides stage 1


@dataclass(config=STRICT)
class TrackingConfig:
    experiment: str = "covipal"
    tracking_uri: str = "sqlite:///mlflow.db"  # relative to the project folder; MLFLOW_TRACKING_URI overrides


@dataclass(config=STRICT)
class Params:
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    base: BaseTraining = Field(default_factory=BaseTraining)
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    targets: TargetsConfig = Field(default_factory=TargetsConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def check(self, text_layers: int | None = None, root: Path | None = None) -> "Params":
        """Cross-section checks; ``text_layers`` is the LLM depth when already known."""
        depth = text_layers if text_layers is not None else (
            self.model.reference.text_layers if self.model.source == "reference" else None)
        if depth is not None and self.targets.guide_layer >= depth:
            raise ConfigError(
                f"targets.guide_layer: {self.targets.guide_layer} is beyond the model's depth "
                f"({depth} decoder layers, numbered 0..{depth - 1}); set it to at most {depth - 1}")
        source = self.data.source
        if source != "digit-world" and _looks_local(source):
            path = Path(source) if root is None or Path(source).is_absolute() else root / source
            if not path.exists():
                raise ConfigError(
                    f"data.source: {source!r} does not exist; give a folder written by "
                    "DatasetDict.save_to_disk, a hub id, or 'digit-world' for the embedded world")
        return self


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix != "" or source.count("/") != 1


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "unexpected_keyword_argument" or e["type"] == "extra_forbidden":
            fix = "remove it or check its spelling against covipal/config.py"
        elif e["type"].startswith(("greater", "less")):
            fix = "use a value in the allowed range"
        elif e["type"] == "literal_error":
            fix = "use one of the listed values"
        else:
            fix = "correct the value"
        lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r}); {fix}")
    return "\n".join(lines)


def parse_params(raw: dict | None, root: Path | None = None) -> Params:
    """Build and check :class:`Params` from a mapping; raise :class:`ConfigError` on any problem."""
    try:
        params = Params(**(raw or {}))
    except ValidationError as err:
        raise ConfigError("params.yaml is invalid:\n" + _describe(err)) from None
    except TypeError as err:  # a section given as a scalar, e.g. ``data: 3``
        raise ConfigError(f"params.yaml is invalid: {err}; each section must be a mapping") from None
    return params.check(root=root)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read ``params.yaml`` (or another file) into checked :class:`Params`."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found; run from the project folder or pass --params PATH")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (data, model, base, ...)")
    return parse_params(raw, root=path.resolve().parent)
