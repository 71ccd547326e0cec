"""Analytic FLOP count of one prefill: vision encoder, projector, PPM and LLM, full or pruned.

The count is of matrix products only (a multiply-add is 2 FLOPs); norms, activations,
rotary embeddings, softmax and gathers are left out: they are a small share and do not
change with the method. Dimensions come from the model's Hugging Face config.

- **Vision encoder** (CLIP/SigLIP tower of LLaVA models; the Qwen2-VL ViT): patch
  embedding, per layer QKV/output projections, attention (every token with every token
  of its image, or of its temporal slice for Qwen2-VL) and MLP; every layer is counted,
  because LLaVA computes them all even when it reads a hidden layer's output.
- **Projector**: LLaVA's two-layer MLP per vision token; Qwen2-VL's patch merger.
- **PPM** (``covipal`` only): its input projections, self-attention over the vision
  tokens, cross-attention to the text tokens, MLPs and head (:class:`covipal.ppm.PPMConfig`).
- **LLM**: per decoder layer, the Q/K/V/O projections (grouped KV heads counted as they
  are), the causal attention over ``n (n + 1) / 2`` query-key pairs, and the gated MLP;
  then the LM head on the last token only (a prefill for generation needs only its logits,
  and the harness asks for just those with ``logits_to_keep=1``).

Pruning changes the number of tokens each decoder layer sees; a method's
:meth:`~covipal.pruning.Pruner.schedule` says how many vision tokens remain from which
layer on, so the same count serves methods that prune before the LLM and inside it.
The largest speedup pruning can bring to a prefill is ``full.total / pruned.total``.

The analytic vision count covers ``llava`` and ``qwen2_vl`` (:data:`SUPPORTED`). For the
other families (LLaVA-NeXT's and LLaVA-OneVision's tiles, Qwen2.5-VL's windowed ViT) the
vision encoder and projector are counted by :func:`measured_vision_flops`, torch's
``FlopCounterMode`` over one run of the model's own vision path, and passed to
:func:`prefill_flops` as ``encoder``; the LLM and the PPM are counted here for every family.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED = ("llava", "qwen2_vl")  # families whose vision encoder and projector are counted from the config
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")  # vision tokens from the grid: patches / spatial_merge_size ** 2
QWEN_GRID = 48  # patches per side of a Qwen2-VL picture in the profiling shapes (14 px each)


@dataclass(frozen=True)
class PrefillFlops:
    """FLOPs of one prefill, by part."""

    vision: int
    projector: int
    ppm: int
    llm: int

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.ppm + self.llm

    def as_dict(self) -> dict:
        return {"vision": self.vision, "projector": self.projector, "ppm": self.ppm, "llm": self.llm,
                "total": self.total}


def _linear(n: int, d_in: int, d_out: int) -> int:
    """FLOPs of ``n`` rows through a ``d_in`` x ``d_out`` matrix."""
    return 2 * n * d_in * d_out


def _family(config, supported: tuple = SUPPORTED) -> str:
    family = getattr(config, "model_type", None)
    if family not in supported:
        raise ValueError(f"no analytic count for model type {family!r}; supported: {list(supported)} "
                         "(for other families, count the vision side with measured_vision_flops)")
    return family


def _qwen_grid(n_images: int) -> tuple[int, int]:
    """``(temporal slices, patches per slice)`` of ``n_images`` pictures in the profiling shapes:
    one 672x672 image (t = 1) or a video of ``n_images`` such frames (t = n_images / 2), each slice
    :data:`QWEN_GRID` x :data:`QWEN_GRID` patches (576 tokens after the 2x2 merge)."""
    if n_images > 1 and n_images % 2:
        raise ValueError(f"a Qwen2-VL video needs an even number of frames, got {n_images}")
    return (1 if n_images == 1 else n_images // 2), QWEN_GRID * QWEN_GRID


def vision_tokens(config, n_images: int) -> int:
    """Vision tokens the LLM receives for ``n_images`` pictures (video frames for Qwen2-VL and Qwen2.5-VL)."""
    if _family(config, SUPPORTED + QWEN_FAMILIES) in QWEN_FAMILIES:
        t, patches = _qwen_grid(n_images)
        return t * patches // config.vision_config.spatial_merge_size ** 2
    v = config.vision_config
    n_patches = (v.image_size // v.patch_size) ** 2
    cls = 1 if v.model_type == "clip_vision_model" and config.vision_feature_select_strategy == "full" else 0
    return n_images * (n_patches + cls)


def encoder_flops(config, n_images: int) -> tuple[int, int]:
    """``(vision encoder, projector)`` FLOPs for ``n_images`` pictures."""
    v = config.vision_config
    if _family(config) == "qwen2_vl":
        t, per_slice = _qwen_grid(n_images)
        n, d, merge = t * per_slice, v.embed_dim, v.spatial_merge_size ** 2
        patch = _linear(n, v.in_channels * v.temporal_patch_size * v.patch_size ** 2, d)
        layer = _linear(n, d, 3 * d) + _linear(n, d, d) + 4 * t * per_slice ** 2 * d \
            + 2 * _linear(n, d, int(d * v.mlp_ratio))
        merger = _linear(n // merge, d * merge, d * merge) + _linear(n // merge, d * merge, v.hidden_size)
        return patch + v.depth * layer, merger
    n_patches = (v.image_size // v.patch_size) ** 2
    seq = n_patches + (1 if v.model_type == "clip_vision_model" else 0)  # CLIP adds a class token
    d, i = v.hidden_size, v.intermediate_size
    patch = _linear(n_patches, v.num_channels * v.patch_size ** 2, d)
    layer = _linear(seq, d, 4 * d) + 4 * seq ** 2 * d + _linear(seq, d, i) + _linear(seq, i, d)
    features = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
    d_text, n_v = config.text_config.hidden_size, vision_tokens(config, 1)
    projector = _linear(n_v, d * features, d_text) + _linear(n_v, d_text, d_text)
    return n_images * (patch + v.num_hidden_layers * layer), n_images * projector


def llm_flops(text_config, tokens_per_layer: list[int], causal: bool = True) -> int:
    """FLOPs of the decoder layers, layer ``l`` seeing ``tokens_per_layer[l]`` tokens, plus the LM head
    on the last token. ``causal=False`` counts the whole ``n x n`` score matrix (what eager
    attention computes) instead of the causal pairs."""
    c = text_config
    if len(tokens_per_layer) != c.num_hidden_layers:
        raise ValueError(f"tokens_per_layer has {len(tokens_per_layer)} entries for {c.num_hidden_layers} layers")
    d, heads = c.hidden_size, c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or d // heads
    total = 0
    for n in tokens_per_layer:
        total += _linear(n, d, heads * head_dim) + 2 * _linear(n, d, kv * head_dim) + _linear(n, heads * head_dim, d)
        pairs = n * (n + 1) // 2 if causal else n * n
        total += 4 * heads * head_dim * pairs  # QK^T and AV
        total += 3 * _linear(n, d, c.intermediate_size)  # gate, up, down
    return total + _linear(1, d, c.vocab_size)


def ppm_flops(ppm_config, n_vision: int, n_text: int) -> int:
    """FLOPs of one PPM forward over ``n_vision`` vision and ``n_text`` text tokens."""
    m, d, hidden = ppm_config.d_model, ppm_config.d_ppm, ppm_config.mlp_ratio * ppm_config.d_ppm
    total = _linear(n_vision, m, d) + _linear(n_text, m, d)
    for _ in range(ppm_config.n_layers):
        total += _linear(n_vision, d, 4 * d) + 4 * n_vision ** 2 * d  # self-attention: QKV, O, scores, AV
        if n_text:
            total += _linear(n_vision, d, 2 * d) + _linear(n_text, d, 2 * d) + 4 * n_vision * n_text * d
        total += _linear(n_vision, d, hidden) + _linear(n_vision, hidden, d)
    return total + _linear(n_vision, d, d) + _linear(n_vision, d, 1)


def prefill_flops(config, n_images: int, n_text: int, schedule: list[tuple[int, int]] | None = None,
                  ppm=None, causal: bool = True, encoder: tuple[int, int] | None = None,
                  n_vision: int | None = None) -> PrefillFlops:
    """FLOPs of a prefill of ``n_images`` pictures and ``n_text`` text tokens.

    Parameters
    ----------
    config : transformers.PretrainedConfig
        A LLaVA-family or Qwen2-VL config.
    schedule : list of (layer, vision tokens), optional
        From decoder ``layer`` on, that many vision tokens remain (``Pruner.schedule``);
        None: unpruned.
    ppm : covipal.ppm.PPMConfig, optional
        Count a PPM scoring the vision tokens (the ``covipal`` method).
    causal : bool
        Count the LLM's attention over the causal pairs (default) or the full square.
    encoder : (vision, projector), optional
        FLOPs of the vision side, counted elsewhere (:func:`measured_vision_flops`); None:
        the analytic count (``llava`` and ``qwen2_vl`` only).
    n_vision : int, optional
        Vision tokens the LLM receives; None: :func:`vision_tokens` of the config.
    """
    n_v = vision_tokens(config, n_images) if n_vision is None else n_vision
    layers = config.text_config.num_hidden_layers
    counts = [n_v] * layers
    for layer, count in sorted(schedule or []):
        counts[layer:] = [count] * (layers - layer)
    vision, projector = encoder_flops(config, n_images) if encoder is None else encoder
    return PrefillFlops(vision=vision, projector=projector,
                        ppm=ppm_flops(ppm, n_v, n_text) if ppm is not None else 0,
                        llm=llm_flops(config.text_config, [n_text + c for c in counts], causal))


def speedup_limit(full: PrefillFlops, pruned: PrefillFlops) -> float:
    """The largest prefill speedup pruning can bring: the ratio of FLOPs."""
    return full.total / pruned.total


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU's fused attention (QK^T and AV over the full square), which torch's counter lacks."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def measured_vision_flops(run, projector_keys: tuple[str, ...]) -> tuple[int, int]:
    """``(vision encoder, projector)`` FLOPs of ``run()``, a call of a model's vision path, counted by torch's
    ``FlopCounterMode`` (matrix products and convolutions, attention over the full square as here).

    ``projector_keys``: the counter's names of the projector module (its class name when it is
    called on its own, ``Outer.attr`` when a module calls it); the first present is taken.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False,
                              custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                                              _cpu_sdpa_flops})
    with torch.inference_mode(), counter:
        run()
    by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    total = counter.get_total_flops()
    projector = next((by_module[k] for k in projector_keys if k in by_module), 0)
    return total - projector, projector
