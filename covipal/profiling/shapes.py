"""Model shapes to profile, built from config with random weights (nothing is downloaded), and their inputs.

=================  ==========================================================================
name               shape
=================  ==========================================================================
``llava-1.5-7b``   LLaVA-1.5-7B: CLIP ViT-L/14-336 (576 vision tokens per image), Llama-2-7B
``qwen2-vl-7b``    Qwen2-VL-7B: its 675M ViT with 2x2 patch merging, Qwen2-7B (576 tokens per 672 px image)
``llava-0.5b``     about 0.46B parameters for CPU hosts: CLIP ViT-B at 336 px with patch 14
                   (576 vision tokens per image), a 24-layer Llama of width 1024
``tiny-llava``,    a few hundred thousand parameters, for tests and ``--tiny`` runs
``tiny-qwen2-vl``
=================  ==========================================================================

:func:`load_subject` loads the pipeline's base model instead (the reference LVLM or a pretrained
checkpoint of any family in :data:`FAMILIES`), and :class:`Subject` builds the prompts of each
family (:func:`pixel_inputs`, :func:`make_inputs`).

Timing does not depend on the weights' values, only on shapes (and on their being normal
numbers: random normal weights, never uninitialised memory, whose denormals slow CPUs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from covipal.profiling.flops import (QWEN_FAMILIES, QWEN_GRID, SUPPORTED, measured_vision_flops, prefill_flops,
                                    vision_tokens)


def _llava(vision: dict, text: dict, **extra):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                       image_token_id=text["vocab_size"] - 1, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu", **extra)


def _qwen2_vl(vision: dict, text: dict):
    from transformers import Qwen2VLConfig

    vocab = text["vocab_size"]
    rope = {"rope_type": "default", "mrope_section": text.pop("mrope_section"), "rope_theta": 1e6}
    return Qwen2VLConfig(vision_config=vision, text_config={**text, "rope_parameters": rope},
                         image_token_id=vocab - 4, video_token_id=vocab - 3, vision_start_token_id=vocab - 2,
                         vision_end_token_id=vocab - 1)


def _clip(hidden: int, layers: int, heads: int, image: int = 336, patch: int = 14) -> dict:
    return dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                image_size=image, patch_size=patch, projection_dim=hidden)


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv: int | None = None, vocab: int = 32064) -> dict:
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv or heads, vocab_size=vocab, bos_token_id=1,
                eos_token_id=2, pad_token_id=0, max_position_embeddings=65536)


CONFIGS = {
    "llava-1.5-7b": lambda: _llava(_clip(1024, 24, 16), _llama(4096, 11008, 32, 32)),
    "llava-0.5b": lambda: _llava(_clip(768, 12, 12), _llama(1024, 2816, 24, 16)),
    "tiny-llava": lambda: _llava(_clip(32, 2, 2, image=32, patch=8), _llama(64, 128, 2, 4, vocab=128)),
    "qwen2-vl-7b": lambda: _qwen2_vl(
        dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4),
        dict(_llama(3584, 18944, 28, 28, kv=4, vocab=152064), mrope_section=[16, 24, 24], max_position_embeddings=131072)),
    "tiny-qwen2-vl": lambda: _qwen2_vl(
        dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
        dict(_llama(64, 128, 2, 4, kv=2, vocab=128), mrope_section=[2, 3, 3])),
}
SHAPES = sorted(CONFIGS)


TILED_FAMILIES = ("llava_next", "llava_onevision")  # vision tokens counted on the model (anyres tiles, pooling)
FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")


@dataclass
class Subject:
    """A model to profile: the model, what it is called, and how many video frames make one of its pictures.

    It builds the model's prompts (:meth:`inputs`) and counts their vision tokens and FLOPs
    (:meth:`vision_tokens`, :meth:`flops`), from the config where that is exact (``llava``,
    ``qwen2_vl``, ``qwen2_5_vl`` tokens) and otherwise by running the model's own vision path
    once per prompt size (LLaVA-NeXT and LLaVA-OneVision tokens, every family but ``llava``
    and ``qwen2_vl`` for the vision FLOPs; :func:`covipal.profiling.flops.measured_vision_flops`).
    """

    model: torch.nn.Module
    name: str
    frames_per_picture: int = 1
    _measured: dict = field(default_factory=dict, init=False, repr=False)  # pictures -> (tokens, (vision, proj))

    @property
    def config(self):
        return self.model.config

    @property
    def family(self) -> str:
        return self.config.model_type

    def pictures(self, frames: int) -> int:
        """Pictures the model takes for a video of ``frames`` frames (rounded up)."""
        return -(-frames // self.frames_per_picture)

    def vision_tokens(self, n_pictures: int) -> int:
        """Vision tokens the LLM receives for a prompt of ``n_pictures`` pictures."""
        if self.family in TILED_FAMILIES:
            return self._measure(n_pictures)[0]
        return vision_tokens(self.config, n_pictures)

    def inputs(self, n_pictures: int, n_text: int, device="cpu", dtype=torch.float32, seed: int = 0,
               batch: int = 1) -> dict:
        """Forward kwargs of one prompt (see :func:`make_inputs`)."""
        n_v = self.vision_tokens(n_pictures) if self.family in TILED_FAMILIES else None
        return make_inputs(self.config, n_pictures, n_text, device=device, dtype=dtype, seed=seed, batch=batch,
                           n_vision=n_v)

    def flops(self, n_pictures: int, n_text: int, schedule=None, ppm=None, causal: bool = True):
        """:func:`covipal.profiling.flops.prefill_flops` of one prompt, the vision side measured where no
        analytic count exists."""
        encoder = None if self.family in SUPPORTED else self._measure(n_pictures)[1]
        return prefill_flops(self.config, n_pictures, n_text, schedule=schedule, ppm=ppm, causal=causal,
                             encoder=encoder, n_vision=self.vision_tokens(n_pictures))

    def kv_bytes_per_token(self) -> int:
        """Bytes one prompt token adds to the KV cache: keys and values of every decoder layer, in the weights'
        dtype."""
        return kv_bytes_per_token(self.config.text_config, next(self.model.parameters()).element_size())

    def _measure(self, n: int) -> tuple[int, tuple[int, int]]:
        """``(vision tokens, (vision FLOPs, projector FLOPs))`` of ``n`` pictures, from runs of the model's vision
        path at 1, 2 and 4 pictures; beyond 4, extended linearly from 2 and 4 (the tower sees each
        picture, tile or frame pair on its own, so both grow linearly with the pictures)."""
        if n in (1, 2, 4):
            if n not in self._measured:
                self._measured[n] = _run_vision(self.model, n)
            return self._measured[n]
        (t2, (v2, p2)), (t4, (v4, p4)) = self._measure(2), self._measure(4)
        return (t2 + (n - 2) * (t4 - t2) // 2,
                (v2 + (n - 2) * (v4 - v2) // 2, p2 + (n - 2) * (p4 - p2) // 2))


def _vision_base(model):
    """The multimodal base model (``LlavaModel``, ``Qwen2VLModel``...) holding the vision path."""
    return model.model if hasattr(model, "model") and hasattr(model.model, "get_image_features") else model


def _run_vision(model, n: int) -> tuple[int, tuple[int, int]]:
    """Run ``model``'s vision path on the pixels of ``n`` pictures: ``(tokens it gives, (vision, projector) FLOPs)``."""
    base = _vision_base(model)
    param = next(model.parameters())
    pixels, video = pixel_inputs(model.config, n, torch.Generator().manual_seed(0))
    pixels = {k: (x.to(param.device, param.dtype) if x.is_floating_point() else x.to(param.device))
              for k, x in pixels.items()}
    outputs = []

    def run():
        get = base.get_video_features if video else base.get_image_features
        outputs.append(get(**pixels).pooler_output)

    projector = getattr(base, "multi_modal_projector", None)
    visual = getattr(base, "visual", None)
    keys = tuple(k for k in (type(projector).__name__ if projector is not None else None,
                             f"{type(visual).__name__}.merger" if visual is not None else None) if k)
    flops = measured_vision_flops(run, keys)
    pooled = outputs[0]
    parts = pooled if isinstance(pooled, (list, tuple)) else [pooled]
    return sum(t.reshape(-1, t.shape[-1]).shape[0] for t in parts), flops


def shape_config(name: str):
    """The config of shape ``name``."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model shape {name!r}; known shapes: {SHAPES} (or 'base', the pipeline's model)")
    config = CONFIGS[name]()
    config._attn_implementation = "sdpa"
    return config


def build_shape(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0) -> Subject:
    """Shape ``name`` with random normal weights, built directly on ``device`` in ``dtype``, in eval mode."""
    from transformers import AutoModelForImageTextToText

    config = shape_config(name)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return Subject(model.eval().requires_grad_(False), name)


def load_subject(base_dir) -> Subject:
    """The pipeline's base model (``models/base``, :func:`covipal.base_model.load_base`): the reference LVLM,
    which packs 4 video frames to a picture, or a pretrained checkpoint of a family in :data:`FAMILIES`,
    named after its source."""
    from covipal.base_model import load_base
    from covipal.reference.processor import ReferenceProcessor

    model, processor = load_base(base_dir)
    model.eval().requires_grad_(False)
    if isinstance(processor, ReferenceProcessor):
        return Subject(model, "reference LVLM (models/base)", frames_per_picture=4)
    family = getattr(model.config, "model_type", None)
    if family not in FAMILIES:
        raise ValueError(f"the base model {model.name_or_path} is a {family!r} model; the profile runs on "
                         f"{list(FAMILIES)}")
    return Subject(model, f"{model.name_or_path} ({family})")


def check_pictures(config, n_pictures: int) -> None:
    """Raise if a prompt of ``n_pictures`` pictures cannot be built for ``config``'s family."""
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise ValueError(f"no prompt builder for model family {family!r}; supported: {list(FAMILIES)}")
    if n_pictures < 1:
        raise ValueError(f"a prompt needs at least one picture, got {n_pictures}")
    if family in QWEN_FAMILIES and n_pictures > 1 and n_pictures % config.vision_config.temporal_patch_size:
        raise ValueError(f"{family} takes video frames in groups of {config.vision_config.temporal_patch_size} "
                         f"(temporal_patch_size); {n_pictures} frames is not a multiple: use even counts in "
                         "profile.frames and profile.pictures")


def pixel_inputs(config, n_pictures: int, gen: torch.Generator) -> tuple[dict, bool]:
    """``(pixel kwargs, is a video)`` of ``n_pictures`` random pictures for ``config``'s family.

    - ``llava``: ``n`` images at the tower's resolution.
    - ``llava_next``: ``n`` images, each a square of the tower's resolution cut into the tiles the
      model's ``image_grid_pinpoints`` ask for (plus the base picture).
    - ``llava_onevision``: one such image, or a video of ``n`` frames at the tower's resolution.
    - ``qwen2_vl``, ``qwen2_5_vl``: one image of :data:`QWEN_GRID` x :data:`QWEN_GRID` patches,
      or a video of ``n`` such frames (``n / temporal_patch_size`` temporal slices).
    """
    check_pictures(config, n_pictures)
    family, v = config.model_type, config.vision_config
    if family in QWEN_FAMILIES:
        video = n_pictures > 1
        t = n_pictures // v.temporal_patch_size if video else 1
        pixels = torch.randn(t * QWEN_GRID ** 2, v.in_channels * v.temporal_patch_size * v.patch_size ** 2,
                             generator=gen)
        grid = torch.tensor([[t, QWEN_GRID, QWEN_GRID]])
        return ({"pixel_values_videos": pixels, "video_grid_thw": grid} if video
                else {"pixel_values": pixels, "image_grid_thw": grid}), video
    size = v.image_size
    if family == "llava":
        return {"pixel_values": torch.randn(n_pictures, v.num_channels, size, size, generator=gen)}, False
    if family == "llava_onevision" and n_pictures > 1:
        return {"pixel_values_videos": torch.randn(1, n_pictures, v.num_channels, size, size, generator=gen)}, True
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    tiles = image_size_to_num_patches((size, size), config.image_grid_pinpoints, size)
    return {"pixel_values": torch.randn(n_pictures, tiles, v.num_channels, size, size, generator=gen),
            "image_sizes": torch.tensor([[size, size]] * n_pictures)}, False


def make_inputs(config, n_pictures: int, n_text: int, device="cpu", dtype=torch.float32, seed: int = 0,
                batch: int = 1, n_vision: int | None = None) -> dict:
    """One prompt: ``n_pictures`` random pictures (:func:`pixel_inputs`) and ``n_text`` other tokens
    (random words after a BOS; Qwen's vision start/end tokens count), repeated ``batch`` times.

    ``n_vision``: the vision tokens the pictures give, for the families whose count needs the model
    (:data:`TILED_FAMILIES`: pass :meth:`Subject.vision_tokens`, or use :meth:`Subject.inputs`).

    Returns the forward kwargs: ``input_ids`` and ``attention_mask`` (batch, L) with
    ``L = n_text + n_vision``, and the pixel inputs (``batch`` times one prompt's, along their
    first dimension).
    """
    if n_text < 3:
        raise ValueError(f"n_text must be at least 3 (BOS, a word and room for vision delimiters), got {n_text}")
    gen = torch.Generator().manual_seed(seed)
    pixels, video = pixel_inputs(config, n_pictures, gen)
    if n_vision is None:
        if config.model_type in TILED_FAMILIES:
            raise ValueError(f"{config.model_type}: the vision tokens depend on the model; pass n_vision "
                             "(Subject.vision_tokens) or use Subject.inputs")
        n_vision = vision_tokens(config, n_pictures)
    vocab = config.text_config.vocab_size
    special = {getattr(config, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                  "vision_end_token_id")}
    words = [t for t in range(3, vocab) if t not in special]

    def text(n: int) -> list[int]:
        return [words[i] for i in torch.randint(len(words), (n,), generator=gen).tolist()]

    token = config.video_token_id if video else config.image_token_id
    if config.model_type in QWEN_FAMILIES:
        ids = [config.vision_start_token_id] + [token] * n_vision + [config.vision_end_token_id] + text(n_text - 2)
        kinds = [0] + [2 if video else 1] * n_vision + [0] * (n_text - 1)
        pixels["mm_token_type_ids"] = torch.tensor([kinds])
    else:
        ids = [config.text_config.bos_token_id or 1] + [token] * n_vision + text(n_text - 1)
    out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long), **pixels}
    out = {k: x.repeat(batch, *[1] * (x.ndim - 1)) for k, x in out.items()}
    return {k: (x.to(device, dtype) if x.is_floating_point() else x.to(device)) for k, x in out.items()}


def kv_bytes_per_token(text_config, element_size: int) -> int:
    """Bytes of keys and values one token adds to the cache of a decoder of ``text_config`` (grouped KV heads as
    they are), at ``element_size`` bytes a number."""
    heads = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return 2 * text_config.num_hidden_layers * kv * head_dim * element_size


def n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
