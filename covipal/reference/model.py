"""The reference LVLM: a small ``LlavaForConditionalGeneration`` (CLIP tower, projector, Llama)."""

from __future__ import annotations

from covipal.config import ReferenceModel
from covipal.reference.processor import PATCH, SPECIALS, vocabulary


def build_reference(cfg: ReferenceModel, image_px: int = 64, seed: int = 0):
    """Randomly initialised reference model; vision tokens = (image_px / 8)^2 per picture."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                              image_size=image_px, patch_size=PATCH, projection_dim=cfg.vision_hidden)
    text = LlamaConfig(hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
                       num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                       num_key_value_heads=cfg.text_heads, vocab_size=len(vocabulary()), rope_theta=cfg.rope_theta,
                       max_position_embeddings=1024, pad_token_id=SPECIALS.index("<pad>"),
                       bos_token_id=SPECIALS.index("<s>"), eos_token_id=SPECIALS.index("</s>"))
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=SPECIALS.index("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)
