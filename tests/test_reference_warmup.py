"""The reference recipe's tower warm-up: its learning-rate schedule."""

import math

import pytest
import torch

from covipal.config import BaseTraining, ConfigError, DataConfig, ReferenceModel, parse_params
from covipal.reference.model import build_reference
from covipal.reference.processor import ReferenceProcessor, build_tokenizer
from covipal.reference.train import warm_up_tower


def warm_up_lrs(monkeypatch, schedule: str, steps: int = 4) -> list[float]:
    """The learning rate of every warm-up step on a tiny reference model."""
    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    cfg = ReferenceModel(vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=2,
                         text_heads=2, text_intermediate=64)
    processor = ReferenceProcessor(build_tokenizer(), image_px=64)
    model = build_reference(cfg, processor.image_px, seed=0)
    base = BaseTraining(warmup_steps=steps, warmup_batch_size=2, warmup_lr=0.01, warmup_schedule=schedule)
    warm_up_tower(model, processor, DataConfig(), base, log=lambda *a: None)
    return seen


def test_the_warm_up_keeps_its_rate_or_decays_it_on_a_cosine(monkeypatch):
    assert warm_up_lrs(monkeypatch, "constant") == [0.01] * 4
    cosine = warm_up_lrs(monkeypatch, "cosine")
    assert cosine == pytest.approx([0.01 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])
    assert cosine[0] == 0.01 and cosine[-1] < 0.0015  # from the full rate to near 0 at the last step
    with pytest.raises(ConfigError, match="warmup_schedule"):
        parse_params({"base": {"warmup_schedule": "linear"}})
