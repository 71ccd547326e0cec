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

Timing does not depend on the weights' values, only on shapes (and on their being normal
numbers: random normal weights, never uninitialised memory, whose denormals slow CPUs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from covipal.profiling.flops import QWEN_GRID, vision_tokens


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


@dataclass
class Subject:
    """A model to profile: the model, what it is called, and how many video frames make one of its pictures."""

    model: torch.nn.Module
    name: str
    frames_per_picture: int = 1

    @property
    def config(self):
        return self.model.config

    def pictures(self, frames: int) -> int:
        """Pictures the model takes for a video of ``frames`` frames (rounded up)."""
        return -(-frames // self.frames_per_picture)


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
    """The pipeline's base model (``models/base``); the reference LVLM packs 4 video frames to a picture."""
    from covipal.base_model import load_base
    from covipal.reference.processor import ReferenceProcessor

    model, processor = load_base(base_dir)
    return Subject(model.eval().requires_grad_(False), "base", 4 if isinstance(processor, ReferenceProcessor) else 1)


def make_inputs(config, n_pictures: int, n_text: int, device="cpu", dtype=torch.float32, seed: int = 0,
                batch: int = 1) -> dict:
    """One prompt: ``n_pictures`` random pictures (Qwen2-VL: one image, or a video of that many frames)
    and ``n_text`` other tokens (random words after a BOS; Qwen2-VL's vision start/end tokens count),
    repeated ``batch`` times.

    Returns the forward kwargs: ``input_ids`` and ``attention_mask`` (batch, L) with
    ``L = n_text + vision_tokens(config, n_pictures)``, and the pixel inputs (``batch`` times
    one prompt's, along their first dimension).
    """
    gen = torch.Generator().manual_seed(seed)
    n_v = vision_tokens(config, n_pictures)
    vocab = config.text_config.vocab_size
    special = {getattr(config, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                  "vision_end_token_id")}
    words = [t for t in range(3, vocab) if t not in special]
    if n_text < 3:
        raise ValueError(f"n_text must be at least 3 (BOS, a word and room for vision delimiters), got {n_text}")

    def text(n: int) -> list[int]:
        return [words[i] for i in torch.randint(len(words), (n,), generator=gen).tolist()]

    if config.model_type == "qwen2_vl":
        video = n_pictures > 1
        token = config.video_token_id if video else config.image_token_id
        ids = [config.vision_start_token_id] + [token] * n_v + [config.vision_end_token_id] + text(n_text - 2)
        kinds = [0] + [2 if video else 1] * n_v + [0] * (n_text - 1)
        t = n_pictures // 2 if video else 1
        v = config.vision_config
        pixels = torch.randn(t * QWEN_GRID ** 2, v.in_channels * v.temporal_patch_size * v.patch_size ** 2,
                             generator=gen)
        grid = torch.tensor([[t, QWEN_GRID, QWEN_GRID]])
        extra = ({"pixel_values_videos": pixels, "video_grid_thw": grid} if video
                 else {"pixel_values": pixels, "image_grid_thw": grid})
        extra["mm_token_type_ids"] = torch.tensor([kinds])
    else:
        v = config.vision_config
        ids = [config.text_config.bos_token_id or 1] + [config.image_token_id] * n_v + text(n_text - 1)
        extra = {"pixel_values": torch.randn(n_pictures, v.num_channels, v.image_size, v.image_size, generator=gen)}
    out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long), **extra}
    out = {k: x.repeat(batch, *[1] * (x.ndim - 1)) for k, x in out.items()}
    return {k: (x.to(device, dtype) if x.is_floating_point() else x.to(device)) for k, x in out.items()}


def n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
