"""Per-family knowledge: the one table that says how to prune each LVLM family.

Each entry names the config attributes holding the vision placeholder token ids, the
attribute of the multimodal base model that holds the language model, and how the
positions of the pruned sequence are made:

- ``"rope"`` (1-D RoPE LLMs: Llama, Vicuna, Qwen2): every kept token keeps the position
  it has in the full prompt (the positions the LLM was given, or ``0..L-1``), so the
  image's layout stays in the rotary phases, as in FastV's and DART's reference code and
  the in-LLM methods here; decoding continues from the full prompt's last position + 1,
  as it would without pruning. (Renumbering the kept tokens ``0..n_kept-1`` instead cost
  a reference model 6-7 accuracy points on images: docs/evaluation.md.)
- ``"mrope"`` (Qwen2-VL, Qwen2.5-VL): the model's 3-D M-RoPE positions are computed on the
  full sequence and gathered at the kept indices, so every kept token keeps its
  temporal/height/width position; decoding continues from the full prompt's last
  position + 1, as it would without pruning. The cache is shorter than the full prompt,
  so the model's own ``rope_deltas`` would be off by the number of pruned tokens: the
  hook supplies the decoding positions itself and leaves ``rope_deltas`` as the model set
  it. A 4th leading row of 1-D text positions, which ``generate`` passes for
  packed-sequence masks, is renumbered ``0..n_kept-1``.

Adding a family means adding one entry here and to the test matrix in
``tests/tiny_lvlms.py``, which runs every property test on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn


@dataclass(frozen=True)
class Adapter:
    """How to prune one model family.

    Parameters
    ----------
    token_attrs : tuple of str
        Config attributes holding the vision placeholder ids (image, video).
    positions : {"rope", "mrope"}
        How positions of the pruned sequence are made (see the module docstring).
    language_model : str
        Attribute of the multimodal base model (``LlavaModel``, ``Qwen2VLModel``) holding
        the language model, whose input is pruned.
    """

    token_attrs: tuple[str, ...]
    positions: Literal["rope", "mrope"]
    language_model: str = "language_model"
    layout: Literal["square", "thw"] | None = None

    def picture_grids(self, config, prompt: dict, first: int, count: int) -> list[tuple[int, int]] | None:
        """``(rows, cols)`` of the vision-token grid of images ``first .. first + count - 1`` of the
        batch ``prompt`` (images numbered over the batch in order), when each image's tokens are one
        row-major grid; else None.

        ``"square"`` (LLaVA-1.5): every image is ``image_size / patch_size`` patches a side, one
        token each. ``"thw"`` (Qwen2-VL, Qwen2.5-VL): image ``i`` is ``image_grid_thw[i] = (1, h, w)``
        patches, merged ``spatial_merge_size`` a side into ``(h / m, w / m)`` tokens. Families that
        tile an image or add separator tokens (LLaVA-NeXT, LLaVA-OneVision) have no such grid: None.
        """
        if self.layout == "square" and getattr(config, "vision_feature_select_strategy", "default") == "default":
            side = config.vision_config.image_size // config.vision_config.patch_size
            return [(side, side)] * count
        grid = prompt.get("image_grid_thw")
        if self.layout == "thw" and grid is not None:
            m = config.vision_config.spatial_merge_size
            return [(int(h) // m, int(w) // m) for _, h, w in grid[first:first + count].tolist()]
        return None

    def vision_token_ids(self, config) -> list[int]:
        """Ids of the placeholder tokens that the vision features replace."""
        return [int(getattr(config, attr)) for attr in self.token_attrs if getattr(config, attr, None) is not None]

    def locate(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """``(base, language_model)``: the module receiving ``input_ids`` and the LLM inside it.

        ``model`` may be the generation class (``...ForConditionalGeneration``) or its base.
        """
        for base in (model, getattr(model, "model", None)):
            if isinstance(base, nn.Module) and isinstance(getattr(base, self.language_model, None), nn.Module):
                return base, getattr(base, self.language_model)
        raise ValueError(f"{type(model).__name__} has no `{self.language_model}` (nor `model.{self.language_model}`); "
                         "pass the LVLM itself, e.g. a LlavaForConditionalGeneration")


ADAPTERS: dict[str, Adapter] = {
    "llava": Adapter(token_attrs=("image_token_id",), positions="rope", layout="square"),
    "llava_next": Adapter(token_attrs=("image_token_id",), positions="rope"),
    "llava_onevision": Adapter(token_attrs=("image_token_id", "video_token_id"), positions="rope"),
    "qwen2_vl": Adapter(token_attrs=("image_token_id", "video_token_id"), positions="mrope", layout="thw"),
    "qwen2_5_vl": Adapter(token_attrs=("image_token_id", "video_token_id"), positions="mrope", layout="thw"),
}


def get_adapter(model: nn.Module) -> Adapter:
    """The table entry for ``model.config.model_type``; an unknown family lists the supported ones."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in ADAPTERS:
        raise ValueError(f"covipal cannot prune model family {family!r} ({type(model).__name__}); "
                         f"supported families (model.config.model_type): {sorted(ADAPTERS)}")
    return ADAPTERS[family]
