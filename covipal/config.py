"""Typed configuration: ``params.yaml`` maps onto these dataclasses and nothing else.

Each section is a pydantic dataclass, so an unknown key, a wrong type or an
out-of-range value is refused when the file is read, before any stage does work;
:func:`load_params` turns pydantic's report into one message per problem that names
the key (``data.sizes.train``) and how to fix it. Checks that need more than one
section (a guide layer beyond the model's depth) live in :meth:`Params.check`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
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
class ColumnMap:
    """The source data set's column for each field of the prepared schema (``covipal.world.dataset``).

    ``null`` looks for the usual names (``covipal.world.dataset.COLUMN_GUESSES``: ``images`` or
    ``image``, ``question``, ``answers`` or ``answer``, ...) and the ``prepare`` stage prints the
    one it took. ``images`` holds one image, a list of images or a video's frames; ``answer`` one
    string, a list of human answers or VQAv2 ``{"answer": ...}`` records. The optional fields are
    kept when the data set has them.
    """

    images: str | None = None
    question: str | None = None
    answer: str | None = None
    modality: str | None = None  # "image" | "video"; otherwise one picture is an image, several a video
    question_type: str | None = None
    relevant: str | None = None  # [frame, row, col] cells
    digits: str | None = None

    @model_validator(mode="after")
    def _distinct(self):
        named = [v for v in vars(self).values() if v is not None]
        twice = sorted({v for v in named if named.count(v) > 1})
        if twice:
            raise ValueError(f"column(s) {twice} are mapped to more than one field; give each field its own column")
        return self


@dataclass(config=STRICT)
class DataConfig:
    """Where samples come from: ``digit-world`` builds the embedded world; anything else
    is a local folder saved with ``DatasetDict.save_to_disk`` or a hub id, with train,
    validation and test splits whose columns ``columns`` maps onto the prepared schema
    (``sizes``, ``image``, ``video`` and the other fields describe the digit world only)."""

    source: str = "digit-world"
    columns: ColumnMap = Field(default_factory=ColumnMap)
    # the `relevant` cells of a data set's rows lie on a cell_grid x cell_grid grid over each picture
    # (the digit world's grids are image.grid and video.grid); null: relevant cells are not mapped
    cell_grid: int | None = Field(None, ge=1)
    seed: int = 0
    video_share: float = Field(0.4, ge=0.0, le=1.0)  # fraction of samples that are videos
    train_turns: int = Field(8, ge=1)  # questions per training scene (a multi-turn conversation)
    # relative weight of each question type among the follow-up turns of training scenes (types not
    # named weigh 1; the first question of every row, and so validation and test, stay uniform)
    follow_up_weights: dict[Literal["position", "colour", "presence", "count", "relation"],
                            float] = Field(default_factory=dict)
    sizes: Sizes = Field(default_factory=Sizes)
    image: ImageWorld = Field(default_factory=ImageWorld)
    video: VideoWorld = Field(default_factory=VideoWorld)

    @model_validator(mode="after")
    def _digits_fit(self):
        mapped = sorted(k for k, v in vars(self.columns).items() if v is not None)
        if self.source == "digit-world" and mapped:
            raise ValueError(f"columns {mapped} map a data set's own columns, but source is the digit world, "
                             "whose columns are fixed; leave them null or name your data set in data.source")
        if self.image.min_train_digits > self.image.digits:
            raise ValueError("image.min_train_digits must be at most image.digits")
        if self.image.digits > self.image.grid ** 2:
            raise ValueError(f"image.digits ({self.image.digits}) must fit in grid**2 = {self.image.grid ** 2} cells")
        if self.video.min_train_digits > self.video.digits:
            raise ValueError("video.min_train_digits must be at most video.digits")
        if any(w < 0 for w in self.follow_up_weights.values()):
            raise ValueError("follow_up_weights must be >= 0 (0 leaves a type out of the follow-ups)")
        for name, world in (("image", self.image), ("video", self.video)):
            if not any(self.follow_up_weights.get(t, 1.0) > 0 for t in world.question_types):
                raise ValueError(f"follow_up_weights leave no {name} question type with a weight above 0")
        return self


@dataclass(config=STRICT)
class ReferenceModel:
    """Sizes of the reference LVLM (real LLaVA classes: CLIP tower, projector, Llama)."""

    vision_hidden: int = Field(128, ge=8)
    vision_layers: int = Field(2, ge=1)
    vision_heads: int = Field(4, ge=1)
    text_hidden: int = Field(128, ge=8)
    text_layers: int = Field(4, ge=1)
    text_heads: int = Field(2, ge=1)
    text_intermediate: int = Field(384, ge=8)
    rope_theta: float = Field(10000.0, gt=0)  # the decoder's RoPE base (larger: slower turning, more content matching)


@dataclass(config=STRICT)
class ModelConfig:
    """``source: reference`` trains the reference LVLM; anything else is a pretrained
    Hugging Face LVLM id or local folder, recorded with its ``revision`` and not trained.

    ``prompt`` is a pretrained model's user text, with ``{question}`` standing for each row's
    question (``covipal.training.hf_inputs.HFInputs``, for training and evaluation alike); the
    reference model, trained on bare questions, does not use it."""

    source: str = "reference"
    revision: str = "main"
    # a pretrained model's user text around each row's question (the chat template wraps it)
    prompt: str = "{question}"
    reference: ReferenceModel = Field(default_factory=ReferenceModel)

    @field_validator("prompt")
    @classmethod
    def _prompt_names_the_question(cls, prompt: str) -> str:
        from string import Formatter

        try:
            fields = {name for _, name, _, _ in Formatter().parse(prompt) if name is not None}
        except ValueError as err:
            raise ValueError(f"not a valid template ({err}); write a literal brace as {{{{ or }}}}") from None
        if fields != {"question"}:
            raise ValueError(f"the template must contain {{question}} and no other field "
                             f"(found {sorted(fields) or 'none'}); write a literal brace as {{{{ or }}}}")
        return prompt


@dataclass(config=STRICT)
class BaseTraining:
    """Recipe for the reference LVLM (see ``covipal.reference.train``)."""

    seed: int = 0
    warmup_steps: int = Field(300, ge=0)  # vision tower warm-up on per-cell labels
    warmup_lr: float = Field(3e-3, gt=0)
    warmup_batch_size: int = Field(64, ge=1)  # pictures per warm-up step
    # warm-up learning rate: constant, or a cosine decay to 0 (its tower depends less on the host's
    # floating-point paths; docs/reference_model.md "Another CPU, another model")
    warmup_schedule: Literal["constant", "cosine"] = "constant"
    steps: int = Field(2400, ge=1)  # projector + LLM steps, tower frozen
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    curriculum_threshold: float = Field(0.6, gt=0, le=1)  # running train accuracy that admits harder scenes
    curriculum_increment: float = Field(0.25, gt=0, le=1)  # level step (0 = fewest digits, 1 = most)
    curriculum_deadline: float = Field(0.5, gt=0, le=1)  # share of steps by which all scenes are admitted
    grounding_layer: int = Field(0, ge=0)  # decoder layer whose head 0 learns to look at the relevant cells
    grounding_weight: float = Field(1.0, ge=0)  # weight of that loss (0: none)
    # question types whose grounding target also holds <s>, a sink whose share tells the count
    grounding_sink: list[Literal["position", "colour", "presence", "count", "relation"]] = Field(
        default_factory=lambda: ["count", "presence"])
    # question types grounded on another head of that layer than head 0 (e.g. position lookups,
    # which match a cell name to the tower's row/column features, on a head of their own)
    grounding_heads: dict[Literal["position", "colour", "presence", "count", "relation"], int] = Field(
        default_factory=dict)
    # question types grounded on the cell of the digit they name only, not on every relevant cell
    grounding_named_only: list[Literal["position", "colour", "presence", "count", "relation"]] = Field(
        default_factory=list)
    # share of training conversations seen with part of their irrelevant vision tokens masked out,
    # as a pruner removes them; each such token is masked with a probability drawn from [0, prune_max]
    prune_share: float = Field(0.5, ge=0, le=1)
    prune_max: float = Field(0.9, ge=0, le=1)
    # share of those conversations that hide only empty cells, a share of them from [0, 1] (the
    # digit-rich inputs a pruner that ranks by salience leaves, down to digits alone)
    prune_salient: float = Field(0.0, ge=0, le=1)
    # weight of the answer loss read at every intermediate decoder layer through the final norm
    # and LM head (deep supervision: the layers below learn to carry the answer, not only the last)
    deep_supervision: float = Field(0.0, ge=0)
    eval_batch_size: int = Field(128, ge=1)


@dataclass(config=STRICT)
class PruningConfig:
    method: str = "covipal"
    reserve_ratio: float = Field(0.25, gt=0, le=1)


@dataclass(config=STRICT)
class SplitRows:
    """Rows used per split: the first ``n`` (rows are drawn independently, so that is a random
    subset); ``null`` uses the whole split."""

    train: int | None = Field(None, ge=1)
    validation: int | None = Field(None, ge=1)


@dataclass(config=STRICT)
class TargetsConfig:
    """Stage-1 targets (``covipal.training.targets.write_target_shards``)."""

    guide_layer: int = Field(2, ge=0)  # decoder layer whose attention guides stage 1
    queries: Literal["after_image", "last", "all"] = "after_image"  # tokens whose attention is averaged
    shard_size: int = Field(512, ge=1)  # rows per shard (the unit of resume)
    batch_size: int = Field(16, ge=1)  # rows per LVLM forward
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # storage of H_v, H_t
    rows: SplitRows = Field(default_factory=SplitRows)


# --- PPM training: covipal.training.pipeline builds the library's dataclasses from these sections
# (``deepspeed_config``, ``stage1_config``, ``stage2_config``, ``ppm_config``), so the library's
# defaults and checks stay the reference; tests/test_training_pipeline.py fails if the fields drift apart.


@dataclass(config=STRICT)
class DeepSpeedSection:
    """The DeepSpeed engine of stages 1 and 2 (builds ``covipal.training.ds.DeepSpeedConfig``),
    plus how many processes run it. ``stage1.deepspeed`` / ``stage2.deepspeed`` override keys per stage."""

    processes: int = Field(1, ge=1)  # per host: GPUs (`deepspeed --num_gpus`) or gloo processes on a CPU
    hostfile: str | None = None  # a DeepSpeed hostfile (several hosts, passwordless ssh); relative to the project
    zero_stage: Literal[1, 2] = 2
    micro_batch_size: int = Field(16, ge=1)  # per process
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    gradient_clipping: float = Field(1.0, ge=0)  # 0 disables
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on a GPU, fp32 on the CPU
    warmup_steps: int = Field(0, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _betas_in_range(self):
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas {list(self.betas)} must each be in [0, 1)")
        return self



LAUNCH_KEYS = ("processes", "hostfile")


@dataclass(config=STRICT)
class PPMShape:
    """The PPM's shape (``covipal.ppm.PPMConfig``; ``d_model`` comes from the base model)."""

    d_ppm: int = Field(128, ge=1)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    mlp_ratio: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.d_ppm % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_ppm ({self.d_ppm})")
        return self



@dataclass(config=STRICT)
class Stage1Section:
    """Stage 1, attention-guided (builds ``covipal.training.stage1.Stage1Config``; its
    ``reserve_ratio`` is ``pruning.reserve_ratio``)."""

    loss: Literal["mse", "listnet", "rank"] = "mse"
    normalize: Literal["zscore", "sum"] = "zscore"
    epochs: int = Field(5, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    ppm: PPMShape = Field(default_factory=PPMShape)
    deepspeed: dict[str, Any] = Field(default_factory=dict)  # overrides of the deepspeed section



@dataclass(config=STRICT)
class Stage2Section:
    """Stage 2, end to end (builds ``covipal.training.stage2.Stage2Config``; its
    ``reserve_ratio`` is ``pruning.reserve_ratio``)."""

    temperature: float = Field(1.0, gt=0)
    threshold: Literal["topk", "zero"] = "topk"
    estimator: Literal["soft", "straight_through"] = "soft"   # straight_through: hard top-k forward
    noise: float = Field(0.0, ge=0)  # straight_through: Gumbel scale of the training top-k
    lambda_bin: float = Field(0.5, ge=0)
    lambda_ratio: float = Field(5.0, ge=0)
    min_retention: float = Field(1e-6, gt=0, lt=1)
    epochs: int = Field(1, ge=1)
    eval_batch_size: int = Field(64, ge=1)  # validation rows per forward
    rows: SplitRows = Field(default_factory=SplitRows)  # rows trained on / validated on
    deepspeed: dict[str, Any] = Field(default_factory=dict)  # overrides of the deepspeed section


@dataclass(config=STRICT)
class RegistryConfig:
    """Publishing the stage-2 PPM (``covipal.registry.register_ppm``)."""

    model_name: str = Field("covipal-ppm", min_length=1)
    # validation metric (higher is better) that must beat the champion's for the alias to move
    metric: Literal["hard_accuracy", "soft_accuracy", "stage1_recall", "stage1_spearman"] = "hard_accuracy"


EVALUATED_METHODS = ["covipal", "random", "oracle", "visionzip", "dart", "fastv", "pyramiddrop", "sparsevlm"]


@dataclass(config=STRICT)
class EvaluateConfig:
    """The ``evaluate`` stage (``covipal.evaluation.stage.run_evaluate``): every method at every ratio.

    ``methods`` are names of ``covipal.pruning.available_methods()`` (checked when the
    stage starts); ``method_args`` are extra dataclass fields per method. The stage fills
    in ``covipal``'s ``ppm`` (models/ppm), ``oracle``'s ``guide_layer`` (``targets.guide_layer``),
    ``random``'s ``seed`` and, with ``match_layer_average``, that field of the in-LLM methods.
    ``variants`` names further entries of ``methods``: a registered ``method`` with its own
    arguments, e.g. ``covipal_stage1: {method: covipal, ppm: models/stage1}`` (the PPM after
    stage 1 only). ``r = 1`` (the unpruned model) is always evaluated, listed in ``ratios`` or not.

    ``scoring``: ``first_token`` counts a row right when the greedy next token is its answer's
    first token (the reference model, whose answers are one word); ``generate`` generates up to
    ``max_new_tokens`` tokens greedily and scores them with VQA normalisation and accuracy
    against the row's ``answers`` (or ``[answer]``); ``auto`` is ``first_token`` for the
    reference model and ``generate`` for a pretrained one.
    """

    methods: list[str] = Field(default_factory=lambda: list(EVALUATED_METHODS), min_length=1)
    # the reference LLM has 4 layers: K = 1 keeps FastV/DART's pruned share of compute near the papers' K = 2 of 32
    method_args: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"fastv": {"layer": 1}, "dart": {"layer": 1}})
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    ratios: list[float] = Field(default_factory=lambda: [1.0, 0.5, 0.25, 0.125, 0.0625], min_length=1)
    match_layer_average: bool = True  # in-LLM methods keep as many tokens as make the layer average ceil(r n_v)
    rows: int | None = Field(1000, ge=1)  # first rows of the test split (null: all); sized for ~3 min on 2 cores
    batch_size: int = Field(64, ge=1)
    n_bootstrap: int = Field(1000, ge=100)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0
    scoring: Literal["auto", "first_token", "generate"] = "auto"
    max_new_tokens: int = Field(16, ge=1)  # generate scoring: longest answer generated

    @model_validator(mode="after")
    def _check(self):
        bad = [r for r in self.ratios if not 0 < r <= 1]
        if bad:
            raise ValueError(f"ratios {bad} are outside (0, 1]; a reserve ratio is the kept share of vision tokens")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods {self.methods} name a method twice")
        no_method = sorted(name for name, args in self.variants.items() if "method" not in args)
        if no_method:
            raise ValueError(f"variants {no_method} lack `method`: name the registered method each one runs")
        return self


@dataclass(config=STRICT)
class ProfileConfig:
    """The ``profile`` stage (``covipal.profiling``): speed and memory of each method against the limit.

    The frames test finds the longest video (of the lengths in ``frames``) whose ``generate``
    fits under a memory cap, unpruned and pruned with ``pruning.method`` at
    ``pruning.reserve_ratio``. The cap:

    - ``memory_cap_gb`` set: that many GB (10^9 bytes), whatever the model and device;
    - ``memory_cap_gb: null``: scaled to the model profiled: its weights (and the PPM's) plus
      the KV cache of 18,832 prompt tokens of this model, the room a 24 GB GPU leaves
      LLaVA-1.5-7B in bf16 beside its weights (so that model gets exactly 24 GB); on a GPU at
      most its memory.

    On a GPU the cap is enforced and a length fits when ``generate`` does not run out of
    memory; on the CPU a length fits when its measured peak of live tensors is at most the cap.
    """

    model: str = "base"  # base: models/base; or a shape built with random weights (covipal.profiling.shapes)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when there is a GPU
    threads: int | None = Field(None, ge=1)  # torch threads on the CPU (null: torch's default)
    methods: list[str] = Field(default_factory=lambda: ["covipal", "random"], min_length=1)
    ratios: list[float] = Field(default_factory=lambda: [0.5, 0.25, 0.125], min_length=1)
    pictures: int = Field(1, ge=1)  # pictures per prompt (a video's frames are packed into pictures)
    text_tokens: int = Field(64, ge=3)
    warmup: int = Field(2, ge=0)
    repeats: int = Field(7, ge=1)  # timed rounds; each times every case once, interleaved
    decode_tokens: int = Field(8, ge=2)
    frames: list[int] = Field(default_factory=lambda: [4, 8, 16, 32, 64, 128, 256, 384, 512], min_length=1)
    memory_cap_gb: float | None = Field(None, gt=0)  # GB (10^9 bytes); null: scaled to the model (see above)
    trace: bool = True  # keep a torch profiler trace of one pruned prefill

    @model_validator(mode="after")
    def _in_range(self):
        bad = [r for r in self.ratios if not 0 < r <= 1]
        if bad:
            raise ValueError(f"ratios {bad} are outside (0, 1]; a reserve ratio is the kept share of vision tokens")
        if any(f < 1 for f in self.frames):
            raise ValueError(f"frames {self.frames} must be positive frame counts")
        return self


@dataclass(config=STRICT)
class TrackingConfig:
    experiment: str = "covipal"
    tracking_uri: str = "sqlite:///mlflow.db"  # relative to the project folder; MLFLOW_TRACKING_URI overrides


@dataclass(config=STRICT)
class ScheduleConfig:
    """When Prefect starts the retraining flow (a cron line read in ``timezone``)."""

    cron: str = "0 3 * * 0"  # minute hour day-of-month month day-of-week
    timezone: str = "UTC"  # an IANA zone name
    active: bool = True  # False: the deployment exists but nothing fires until resumed

    @model_validator(mode="after")
    def _valid(self):
        from datetime import datetime
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        from cronsim import CronSim, CronSimError  # a Prefect dependency, small

        try:
            CronSim(self.cron, datetime.now())
        except CronSimError as e:
            raise ValueError(f"cron {self.cron!r} is not a valid cron line ({e}); "
                             "use five fields, e.g. '0 3 * * 0' (Sundays 03:00)") from None
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {self.timezone!r} is unknown; use an IANA name such as 'UTC' "
                             "or 'Europe/Paris'") from None
        return self


@dataclass(config=STRICT)
class OpsConfig:
    """Operations: the Prefect deployment that retrains on a schedule, and scale-out of the stages
    that are not DeepSpeed training (see docs/operations.md). One flow run at a time is not a
    setting: DVC cannot share a workspace."""

    deployment: str = Field("covipal-retrain", min_length=1)  # Prefect deployment name
    work_pool: str = Field("covipal", min_length=1)  # the work pool of prefect.yaml's deployment
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    stage_retries: int = Field(2, ge=0)  # Prefect retries of a `dvc repro <stage>` that failed transiently
    retry_delay_seconds: float = Field(10.0, ge=0)  # the first retry's delay; it doubles for each next one
    targets_processes: int = Field(1, ge=1)  # processes sharing the target extraction (DeepSpeed launcher)
    stage_timeout_minutes: float = Field(720.0, gt=0)  # a `dvc repro <stage>` running longer is stopped, failed
    flow_timeout_minutes: float = Field(2880.0, gt=0)  # a whole flow run, its wait for the workspace included
    notify_webhook: str | None = None  # http(s) URL a JSON note is POSTed to when a run fails or moves the registry

    @field_validator("notify_webhook")
    @classmethod
    def _webhook_is_a_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"'{url}' is not an http(s) URL; give one such as https://hooks.example.com/covipal, "
                             "or null for no webhook")
        return url


@dataclass(config=STRICT)
class Params:
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    base: BaseTraining = Field(default_factory=BaseTraining)
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    targets: TargetsConfig = Field(default_factory=TargetsConfig)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    stage1: Stage1Section = Field(default_factory=Stage1Section)
    stage2: Stage2Section = Field(default_factory=Stage2Section)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ops: OpsConfig = Field(default_factory=OpsConfig)

    def deepspeed_for(self, stage: Literal["stage1", "stage2"]) -> DeepSpeedSection:
        """The ``deepspeed`` section with ``<stage>.deepspeed``'s overrides applied (and checked)."""
        from dataclasses import asdict

        overrides = getattr(self, stage).deepspeed
        try:
            return DeepSpeedSection(**{**asdict(self.deepspeed), **overrides})
        except ValidationError as err:
            raise ConfigError(f"{stage}.deepspeed overrides the deepspeed section wrongly:\n"
                              + _describe(err, prefix=f"{stage}.deepspeed.")) from None

    def check(self, text_layers: int | None = None, root: Path | None = None) -> "Params":
        """Cross-section checks; ``text_layers`` is the LLM depth when already known."""
        self.check_guide_layer(text_layers if text_layers is not None else (
            self.model.reference.text_layers if self.model.source == "reference" else None))
        if self.model.source == "reference" and self.base.grounding_layer >= self.model.reference.text_layers:
            raise ConfigError(
                f"base.grounding_layer: {self.base.grounding_layer} is beyond the reference LLM's depth "
                f"({self.model.reference.text_layers} layers); set it to at most {self.model.reference.text_layers - 1}")
        heads = self.model.reference.text_heads
        beyond = {t: h for t, h in self.base.grounding_heads.items() if not 0 <= h < heads}
        if self.model.source == "reference" and beyond:
            raise ConfigError(
                f"base.grounding_heads: {beyond} names heads the reference LLM does not have "
                f"(model.reference.text_heads: {heads}, numbered 0..{heads - 1}); use at most {heads - 1}")
        for stage in ("stage1", "stage2"):
            self.deepspeed_for(stage)
        source = self.data.source
        if source != "digit-world" and _looks_local(source):
            path = Path(source) if root is None or Path(source).is_absolute() else root / source
            if not path.exists():
                raise ConfigError(
                    f"data.source: {source!r} does not exist; give a folder written by "
                    "DatasetDict.save_to_disk, a hub id, or 'digit-world' for the embedded world")
        return self


    def check_guide_layer(self, depth: int | None) -> "Params":
        """Refuse a ``targets.guide_layer`` beyond an LLM of ``depth`` decoder layers (None: unknown)."""
        if depth is not None and self.targets.guide_layer >= depth:
            raise ConfigError(
                f"targets.guide_layer: {self.targets.guide_layer} is beyond the model's depth "
                f"({depth} decoder layers, numbered 0..{depth - 1}); set it to at most {depth - 1}")
        return self


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix != "" or source.count("/") != 1


def _describe(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        key = prefix + ".".join(str(p) for p in e["loc"]) or "(top level)"
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
