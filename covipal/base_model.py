"""The ``base`` stage: the LVLM every later stage prunes.

``model.source: reference`` trains the reference LVLM on the prepared data; any other
source names a pretrained Hugging Face LVLM, recorded (id and revision) and not trained.
:func:`load_base` gives back ``(model, processor)`` either way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from covipal.config import Params
from covipal.io import atomic_output

PRETRAINED_RECORD = "pretrained.json"


def build_base(params: Params, data_dir: Path, out: Path, log=print) -> dict:
    """Produce ``out`` (a saved model folder, or a record of the pretrained one); return metrics."""
    if params.model.source != "reference":
        with atomic_output(out) as tmp:
            tmp.mkdir()
            record = {"source": params.model.source, "revision": params.model.revision}
            (tmp / PRETRAINED_RECORD).write_text(json.dumps(record, indent=2))
        log(f"base model: pretrained {params.model.source}@{params.model.revision} (nothing trained)")
        return {}
    return _train_reference(params, data_dir, out, log)


def _train_reference(params: Params, data_dir: Path, out: Path, log) -> dict:
    import torch
    from datasets import load_from_disk

    from covipal.reference.model import build_reference
    from covipal.reference.processor import ReferenceProcessor, build_tokenizer
    from covipal.reference.train import EncodedSplit, accuracy, train_llm, warm_up_tower

    torch.manual_seed(params.base.seed)
    t0 = time.time()
    ds = load_from_disk(str(data_dir))
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
    """``(model, processor)`` saved by the ``base`` stage, in eval mode."""
    folder = Path(folder)
    record = folder / PRETRAINED_RECORD
    if record.exists():
        from transformers import AutoModelForImageTextToText, AutoProcessor

        info = json.loads(record.read_text())
        model = AutoModelForImageTextToText.from_pretrained(info["source"], revision=info["revision"])
        return model.eval(), AutoProcessor.from_pretrained(info["source"], revision=info["revision"])
    from transformers import LlavaForConditionalGeneration

    from covipal.reference.processor import ReferenceProcessor

    return LlavaForConditionalGeneration.from_pretrained(folder).eval(), ReferenceProcessor.from_pretrained(folder)
