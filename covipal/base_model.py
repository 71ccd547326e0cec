"""The ``base`` stage: the LVLM every later stage prunes.

``model.source: reference`` trains the reference LVLM on the prepared data; any other
source names a pretrained Hugging Face LVLM, recorded and not trained: a hub id at the
commit its requested revision resolved to (:mod:`covipal.sources`; every later stage loads
that commit, so a branch moving upstream reaches them only through a new record), a local
checkpoint folder with a content hash of its files (so a checkpoint swapped inside the same
folder changes the recorded lineage).
:func:`load_base` gives back ``(model, processor)`` either way; :func:`load_processor`
loads a pretrained model's processor, also on an install without torchvision.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from covipal.config import ConfigError, Params
from covipal.io import atomic_output

PRETRAINED_RECORD = "pretrained.json"


def build_base(params: Params, data_dir: Path, out: Path, log=print, resolved: dict | None = None) -> dict:
    """Produce ``out`` (a saved model folder, or a record of the pretrained one); return metrics.

    ``resolved``: the ``sources`` stage's record of ``model.source`` (``sources/model.json``), so
    the model recorded is the version that stage resolved; None resolves it now.
    """
    if params.model.source != "reference":
        record = pretrained_record(params.model.source, params.model.revision, resolved)
        with atomic_output(out) as tmp:
            tmp.mkdir()
            (tmp / PRETRAINED_RECORD).write_text(json.dumps(record, indent=2))
        log(f"base model: pretrained {record['source']}@{record['revision']} (nothing trained)")
        return {}
    return _train_reference(params, data_dir, out, log)


def pretrained_record(source: str, revision: str, resolved: dict | None = None) -> dict:
    """What the ``base`` stage records of a pretrained model: ``source`` and ``revision`` (its lineage).

    ``revision`` is the version :func:`covipal.sources.resolve_model` gives (or ``resolved``
    holds, when it is the record of this source and revision): for a hub id the commit the
    requested revision points at, for a local folder ``sha256:<16 hex>`` of its files (hidden
    bookkeeping such as ``.cache`` left out), with ``local`` true. ``requested_revision``
    keeps ``model.revision``.
    """
    from covipal.sources import resolve_model

    same = resolved is not None and (resolved.get("source"), resolved.get("requested_revision")) == (source, revision)
    info = resolved if same else resolve_model(source, revision)
    record = {"source": source, "revision": info["version"], "requested_revision": revision}
    return {**record, "local": True} if info["kind"] == "folder" else record


def _train_reference(params: Params, data_dir: Path, out: Path, log) -> dict:
    import torch
    from datasets import load_from_disk

    from covipal.reference.model import build_reference
    from covipal.reference.processor import ReferenceProcessor, build_tokenizer
    from covipal.reference.train import EncodedSplit, accuracy, train_llm, warm_up_tower

    torch.manual_seed(params.base.seed)
    t0 = time.time()
    ds = load_from_disk(str(data_dir))
    missing = sorted({"question_type", "relevant", "digits"} - set(ds["train"].column_names))
    if missing:
        raise ConfigError(f"model.source: reference trains the reference LVLM on the digit world, but the prepared "
                          f"data lack its column(s) {missing}; for your own data set model.source to a pretrained "
                          "LVLM (a hub id or a saved folder), or data.source to digit-world")
    processor = ReferenceProcessor(build_tokenizer(), image_px=8 * params.data.image.grid)
    model = build_reference(params.model.reference, processor.image_px, seed=params.base.seed)
    model.to("cuda" if torch.cuda.is_available() else "cpu")  # fp32 either way: the model is small
    warm = warm_up_tower(model, processor, params.data, params.base, log)
    train, val = EncodedSplit(model, processor, ds["train"]), EncodedSplit(model, processor, ds["validation"])
    history = train_llm(model, processor, train, val, params.data, params.base, log)
    test = accuracy(model, processor, EncodedSplit(model, processor, ds["test"]), params.base.eval_batch_size,
                    by_type=True)
    with atomic_output(out) as tmp:
        model.cpu().save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return {"test": test, "train": {**warm, "minutes": (time.time() - t0) / 60}, "history": history}


def load_base(folder: Path):
    """``(model, processor)`` saved by the ``base`` stage, in eval mode.

    A pretrained record is loaded from its source: a local folder (relative paths from the
    current directory, as the stages run from the project root) or a hub id at its revision.
    """
    folder = Path(folder)
    record = folder / PRETRAINED_RECORD
    if record.exists():
        from transformers import AutoModelForImageTextToText

        source, revision = _recorded_source(json.loads(record.read_text()), record)
        model = AutoModelForImageTextToText.from_pretrained(source, revision=revision)
        return model.eval(), load_processor(source, revision)
    from transformers import LlavaForConditionalGeneration

    from covipal.reference.processor import ReferenceProcessor

    return LlavaForConditionalGeneration.from_pretrained(folder).eval(), ReferenceProcessor.from_pretrained(folder)


def _recorded_source(info: dict, record: Path) -> tuple[str, str | None]:
    """``(source, revision)`` to load a pretrained record from (a local folder takes no revision)."""
    if not info.get("local"):
        return info["source"], info["revision"]
    if not Path(info["source"]).is_dir():
        raise FileNotFoundError(f"the checkpoint folder {info['source']!r} recorded in {record} is not found from "
                                f"{Path.cwd()}: run from the project root, or rerun the base stage")
    return info["source"], None


def load_processor(source: str | Path, revision: str | None = None):
    """The processor of the pretrained model at ``source`` (hub id or folder).

    ``AutoProcessor`` when it loads. When it fails only because the model's video processor
    needs torchvision and torchvision is not installed (Qwen2-VL, Qwen2.5-VL and
    LLaVA-OneVision on a CPU-only install: the package index serves only CUDA builds of
    torchvision, which do not load beside the CPU torch), the same processor class is built
    from ``source``'s image processor (its PIL backend), tokenizer, chat template and settings,
    with a :func:`frames_only_video_processor` in place of the video processor. Such a
    processor handles text and images as usual and refuses videos passed as ``videos=`` with
    an error saying so; the pipeline gives a video as its frames (one image each), which works.
    A torchvision that is installed but does not load gets an error naming the fix.
    """
    source = str(source)
    try:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source, revision=revision)
    except ImportError as err:
        if _torchvision_installed():
            _raise_if_torchvision_broken(err)
            raise
        if "torchvision" not in str(err).lower():
            raise
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    cls = PROCESSOR_MAPPING[type(AutoConfig.from_pretrained(source, revision=revision))]
    parts = {"image_processor": AutoImageProcessor.from_pretrained(source, revision=revision),
             "tokenizer": AutoTokenizer.from_pretrained(source, revision=revision),
             "video_processor": frames_only_video_processor(_video_settings(source, revision))}
    return accepting_frames_only(cls).from_pretrained(source, revision=revision, **parts)  # settings, chat template


_BROKEN_TORCHVISION = (
    "torchvision is installed but does not load beside this torch ({err}); the package index's torchvision "
    "wheels are CUDA builds that fail beside the CPU torch. Either `pip uninstall torchvision` (covipal then "
    "builds the processor without it) or install the build matching torch, e.g. `pip install torchvision==0.28.0 "
    "--index-url https://download.pytorch.org/whl/cpu` for torch 2.13.0")


def _torchvision_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def _raise_if_torchvision_broken(err: ImportError) -> None:
    """An error naming the fix when torchvision is installed but does not import (a CUDA wheel beside the CPU torch)."""
    try:
        import torchvision  # noqa: F401
    except (RuntimeError, OSError, ImportError) as broken:  # a CUDA build beside the CPU torch: RuntimeError
        raise ImportError(_BROKEN_TORCHVISION.format(err=broken)) from err


def _video_settings(source: str, revision: str | None) -> dict:
    """The saved settings of ``source``'s video processor (its own file, the processor's, or the image one's)."""
    try:
        settings, _ = _frames_only_class().get_video_processor_dict(source, revision=revision)
    except OSError:
        return {}
    return {k: v for k, v in settings.items() if k not in ("image_processor_type", "processor_class")}


def frames_only_video_processor(settings: dict):
    """A video processor that needs no torchvision: it holds ``settings`` (saved back unchanged, so
    the real video processor loads them where torchvision is installed) and refuses to process
    videos, asking for the frames as images instead."""
    return _frames_only_class()(**settings)


@functools.cache
def _frames_only_class():
    from transformers.video_processing_utils import VideoProcessorMixin

    class FramesOnlyVideoProcessor(VideoProcessorMixin):
        """Stands in for a torchvision video processor: settings only, no video processing."""

        def __init__(self, **settings):
            self._settings = dict(settings)
            super().__init__(**settings)

        def preprocess(self, videos, **kwargs):
            raise RuntimeError(
                f"this {self._settings.get('video_processor_type', 'video processor')} was built without torchvision "
                "and cannot process videos: pass a video's frames as images (covipal's inputs do), or install the "
                "torchvision build matching torch")

        def to_dict(self) -> dict:
            return dict(self._settings)

        def __reduce__(self):  # a class made at run time pickles by how it is made
            return frames_only_video_processor, (self._settings,)

    return FramesOnlyVideoProcessor


@functools.cache
def accepting_frames_only(processor_class):
    """``processor_class`` (same name, a subclass) that takes a :func:`frames_only_video_processor`.

    transformers checks each part's class and, without torchvision, knows no video processor
    class at all; the subclass accepts the stand-in and leaves every other check as it is.
    """
    stand_in = _frames_only_class()

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and isinstance(argument, stand_in):
            return stand_in
        return processor_class.check_argument_for_proper_class(self, argument_name, argument)

    def __reduce__(self):  # pickled by how it is made: its name is the original class's
        return _restore_frames_only, (processor_class, self.__dict__)

    return type(processor_class.__name__, (processor_class,),
                {"check_argument_for_proper_class": check_argument_for_proper_class, "__reduce__": __reduce__,
                 "__module__": processor_class.__module__, "__doc__": processor_class.__doc__})


def _restore_frames_only(processor_class, state: dict):
    processor = object.__new__(accepting_frames_only(processor_class))
    processor.__dict__.update(state)
    return processor
