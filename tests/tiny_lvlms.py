"""Tiny random LVLMs of the real transformers classes, one per adapter-table family.

Every pruning property test is parametrised over :data:`FAMILIES`; a family added to
``covipal.pruning.ADAPTERS`` must get a builder here (``test_every_adapter_is_tested``).
Also holds the reference computations the tests compare the hooks against; they use
nothing from covipal except ``n_keep``'s documented rounding, written out again here.
:func:`tiny_processor` gives each family's real processor class for its tiny model
(tokenizer built offline, chat template) and :func:`save_checkpoint` saves both as a
pretrained checkpoint is saved.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from covipal.pruning import Pruner

FAMILIES = ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"]
VIDEO_FAMILIES = {"llava_onevision", "qwen2_vl", "qwen2_5_vl"}
VOCAB, PAD, BOS, IMAGE, VIDEO, V_START, V_END = 96, 0, 1, 90, 91, 92, 93
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=None, max_position_embeddings=512)
MROPE = {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}


def _clip(image_size: int) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                image_size=image_size, patch_size=4)


@functools.cache
def tiny_model(family: str, layers: int = 2):
    """A seeded tiny model of ``family`` with ``layers`` decoder layers, in eval mode (shared: tests must not
    modify it)."""
    return _build_model(family, layers, seed=0)


def _build_model(family: str, layers: int, seed: int):
    import transformers as tf

    torch.manual_seed(seed)
    text = dict(TEXT, num_hidden_layers=layers)
    pinpoints = [[8, 16], [16, 8], [8, 8]]
    if family == "llava":
        config = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**_clip(16)), text_config=tf.LlamaConfig(**text),
                                image_token_id=IMAGE, vision_feature_layer=-1)
        model = tf.LlavaForConditionalGeneration(config)
    elif family == "llava_next":
        config = tf.LlavaNextConfig(vision_config=tf.CLIPVisionConfig(**_clip(8)), text_config=tf.LlamaConfig(**text),
                                    image_token_index=IMAGE, image_grid_pinpoints=pinpoints, vision_feature_layer=-1)
        model = tf.LlavaNextForConditionalGeneration(config)
    elif family == "llava_onevision":
        config = tf.LlavaOnevisionConfig(vision_config=tf.SiglipVisionConfig(**_clip(8)),
                                         text_config=tf.Qwen2Config(**text), image_token_index=IMAGE,
                                         video_token_index=VIDEO, image_grid_pinpoints=pinpoints,
                                         vision_feature_layer=-1)
        model = tf.LlavaOnevisionForConditionalGeneration(config)
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        common = dict(depth=1, num_heads=2, patch_size=2, spatial_merge_size=2, temporal_patch_size=2)
        ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START,
                   vision_end_token_id=V_END, text_config=dict(text, rope_parameters=MROPE))
        if family == "qwen2_vl":
            config = tf.Qwen2VLConfig(vision_config=dict(common, embed_dim=32, hidden_size=32), **ids)
            model = tf.Qwen2VLForConditionalGeneration(config)
        else:
            vision = dict(common, hidden_size=32, out_hidden_size=32, intermediate_size=64, window_size=8,
                          fullatt_block_indexes=[0])
            config = tf.Qwen2_5_VLConfig(vision_config=vision, **ids)
            model = tf.Qwen2_5_VLForConditionalGeneration(config)
    else:
        raise KeyError(f"no tiny model for family {family!r}: add one to tests/tiny_lvlms.py")
    model.generation_config.eos_token_id = None  # random weights: generate a fixed number of tokens
    model.generation_config.pad_token_id = PAD
    return model.eval()


def _vision_inputs(family: str, n_images: int, n_videos: int, gen: torch.Generator):
    """Pixel inputs for ``n_images`` images and ``n_videos`` videos, and tokens per image/video."""
    if n_videos and family not in VIDEO_FAMILIES:
        raise ValueError(f"{family} takes no video")
    out, per_image, per_video = {}, 0, 0
    if family == "llava":
        out["pixel_values"] = torch.randn(n_images, 3, 16, 16, generator=gen)
        per_image = 16
    elif family in ("llava_next", "llava_onevision"):
        out["pixel_values"] = torch.randn(n_images, 2, 3, 8, 8, generator=gen)  # base + one 8x8 tile
        out["image_sizes"] = torch.tensor([[8, 8]] * n_images)
        per_image = 10  # 4 base + 4 tile + 2 row newlines
        if n_videos:
            out["pixel_values_videos"] = torch.randn(n_videos, 4, 3, 8, 8, generator=gen)
            per_video = 5  # 4 frames pooled to 1 token each + newline
    else:
        grid = torch.tensor([[1, 8, 8]] * n_images)  # 64 patches -> 16 tokens after the 2x2 merge
        out["pixel_values"] = torch.randn(64 * n_images, 3 * 2 * 2 * 2, generator=gen)
        out["image_grid_thw"] = grid
        per_image = 16
        if n_videos:
            out["pixel_values_videos"] = torch.randn(32 * n_videos, 3 * 2 * 2 * 2, generator=gen)
            out["video_grid_thw"] = torch.tensor([[2, 4, 4]] * n_videos)
            per_video = 8
    if not n_images:
        out = {k: v for k, v in out.items() if "video" in k}
    return out, per_image, per_video


def make_batch(family: str, layout: list[tuple[int, int]], seed: int = 0) -> dict:
    """Left-padded forward kwargs for samples with ``(n_images, n_videos)`` each.

    Sample ``b`` is ``<s>`` + 3 words + its images (each wrapped in vision start/end
    tokens for Qwen) + its videos + ``4 + b`` words, so rows differ in length.
    """
    gen = torch.Generator().manual_seed(seed)
    n_img, n_vid = sum(i for i, _ in layout), sum(v for _, v in layout)
    pixels, per_image, per_video = _vision_inputs(family, n_img, n_vid, gen)
    qwen = family.startswith("qwen")
    rows, types = [], []
    for b, (images, videos) in enumerate(layout):
        words = lambda n: torch.randint(3, IMAGE - 1, (n,), generator=gen).tolist()  # noqa: E731
        ids, kinds = [BOS] + words(3), [0] * 4
        for token, count, n, kind in ((IMAGE, per_image, images, 1), (VIDEO, per_video, videos, 2)):
            for _ in range(n):
                block = ([V_START] if qwen else []) + [token] * count + ([V_END] if qwen else [])
                ids += block
                kinds += [kind if t == token else 0 for t in block]
        ids += words(4 + b)
        kinds += [0] * (4 + b)
        rows.append(ids)
        types.append(kinds)
    L = max(map(len, rows))
    input_ids = torch.tensor([[PAD] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    batch = {"input_ids": input_ids, "attention_mask": mask, **pixels}
    if qwen:
        batch["mm_token_type_ids"] = torch.tensor([[0] * (L - len(t)) + t for t in types])
    return batch


ROWS = [{"images": i % 3, "seed": i} for i in range(7)]  # data-set rows for row_prompts: 0, 1 or 2 images


def row_prompts(family: str, rows: list[dict], calls: list | None = None) -> dict:
    """Left-padded prompts of data-set rows ``{"images": n, "seed": s}``, each row's content
    depending on the row alone (not on its batch); appends each row's seed to ``calls``."""
    singles = [make_batch(family, [(r["images"], 0)], seed=r["seed"]) for r in rows]
    if calls is not None:
        calls.extend(r["seed"] for r in rows)
    L = max(s["input_ids"].shape[1] for s in singles)

    def pad(x, value):
        return torch.cat([torch.full((1, L - x.shape[1]), value, dtype=x.dtype), x], dim=1)

    out = {"input_ids": torch.cat([pad(s["input_ids"], PAD) for s in singles]),
           "attention_mask": torch.cat([pad(s["attention_mask"], 0) for s in singles])}
    if "mm_token_type_ids" in singles[0]:
        out["mm_token_type_ids"] = torch.cat([pad(s["mm_token_type_ids"], 0) for s in singles])
    for key in ("pixel_values", "image_sizes", "image_grid_thw"):
        parts = [s[key] for s in singles if key in s]
        if parts:
            out[key] = torch.cat(parts)
    return out


@dataclass
class NormPruner(Pruner):
    """Test method: a vision token's score is the norm of its LLM-input embedding."""

    def score(self, ctx):
        return ctx.vision.float().norm(dim=-1)


def capture_llm_inputs(model, batch: dict) -> dict:
    """The keyword inputs the language model receives on an unpruned forward of ``batch``."""
    seen = {}
    llm = model.model.language_model
    handle = llm.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return seen


def vision_positions(batch: dict) -> list[torch.Tensor]:
    """Per sample, the prompt indices of its vision tokens."""
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    return [(torch.isin(row, torch.tensor([IMAGE, VIDEO])) & r).nonzero().squeeze(1) for row, r in zip(ids, real)]


def reference_kept(family: str, batch: dict, full: dict, ratio: float) -> list[torch.Tensor]:
    """Per sample, sorted prompt indices of the tokens NormPruner keeps: text + top-k vision."""
    kept = []
    for b, vis in enumerate(vision_positions(batch)):
        real = batch["attention_mask"][b].bool()
        k = min(len(vis), max(1, math.ceil(ratio * len(vis)))) if len(vis) else 0
        top = vis[full["inputs_embeds"][b, vis].float().norm(dim=-1).topk(k).indices]
        text = real.clone()
        text[vis] = False
        kept.append(torch.cat([text.nonzero().squeeze(1), top]).sort().values)
    return kept


def reference_generate(model, family: str, full: dict, kept: list[torch.Tensor], n_new: int):
    """Greedy decoding by hand: pruned prefill from ``full`` LLM inputs, then one token at a time.

    Returns ``(tokens (B, n_new), logits (n_new, B, V))``.
    """
    embeds, B = full["inputs_embeds"], len(kept)
    Lp = max(len(k) for k in kept)
    x = torch.zeros(B, Lp, embeds.shape[-1])
    mask = torch.zeros(B, Lp, dtype=torch.long)
    mrope = family.startswith("qwen")
    pos = torch.zeros(3, B, Lp, dtype=torch.long) if mrope else torch.zeros(B, Lp, dtype=torch.long)
    next_pos = torch.zeros(3 if mrope else 1, B, dtype=torch.long)
    full_pos = full.get("position_ids")  # every kept token keeps its full-prompt position
    if full_pos is None:
        full_pos = torch.arange(embeds.shape[1]).expand(B, -1)
    full_pos = full_pos[-3:] if mrope else full_pos.expand(B, -1)
    for b, k in enumerate(kept):
        n = len(k)
        x[b, Lp - n:], mask[b, Lp - n:] = embeds[b, k], 1
        pos[..., b, Lp - n:] = full_pos[..., b, k]
        next_pos[:, b] = full_pos[..., b, -1] + 1  # left padding: the last column is the last token
    tokens, logits = [], []
    with torch.no_grad():
        out = model(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=True)
        for step in range(n_new):
            logits.append(out.logits[:, -1])
            tokens.append(out.logits[:, -1].argmax(-1))
            if step == n_new - 1:
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
            p = next_pos[..., None] + step  # (R, B, 1)
            out = model(input_ids=tokens[-1][:, None], cache=out.cache, attention_mask=mask,
                        position_ids=p if mrope else p[0], use_cache=True)
    return torch.stack(tokens, dim=1), torch.stack(logits)


def all_hooks(model) -> list:
    """Every forward hook and pre-hook registered on any module of ``model``."""
    return [(name, kind) for name, m in model.named_modules()
            for kind in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                         "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")
            for _ in getattr(m, kind)]


def reference_layer_generate(model, batch: dict, stages: list[tuple[int, list[torch.Tensor]]], n_new: int):
    """Greedy decoding by hand for pruning inside a Llama-style LLM.

    ``stages`` lists ``(layer, kept)``: from decoder ``layer`` on, the LLM sees only the prompt
    tokens ``kept[b]`` (sorted prompt indices); every token keeps its original position, made as
    ``generate`` makes them (cumsum of the mask). Runs the decoder layers one by one with
    hand-made boolean masks. Returns ``(tokens (B, n_new), logits (n_new, B, V))``.
    """
    from transformers import DynamicCache

    llm = model.model.language_model
    embeds = capture_llm_inputs(model, batch)["inputs_embeds"]
    mask = batch["attention_mask"].bool()
    B, L = mask.shape
    pos = (mask.long().cumsum(1) - 1).clamp_min(0)

    def attend(keys_real: torch.Tensor, q: int) -> torch.Tensor:
        """(B, 1, q, n) bool: causal over the last q of n keys, padding masked, each query sees itself."""
        n = keys_real.shape[1]
        i = torch.arange(n - q, n)[:, None]
        j = torch.arange(n)[None]
        return (((j <= i)[None] & keys_real[:, None, :]) | (j == i)[None])[:, None]

    layer_mask = {}  # decoder layer -> (B, n) padding mask of the prompt it sees
    cur_idx, cur_mask = torch.arange(L).expand(B, L), mask
    stage_at = dict(stages)
    cache = DynamicCache(config=llm.config)
    tokens, logits = [], []
    with torch.no_grad():
        h = embeds
        pe = llm.rotary_emb(h, pos)
        for j, dec in enumerate(llm.layers):
            if j in stage_at:
                kept = stage_at[j]
                Lk = max(len(k) for k in kept)
                pick = torch.zeros(B, Lk, dtype=torch.long)
                new_mask = torch.zeros(B, Lk, dtype=torch.bool)
                for b, k in enumerate(kept):
                    col = {int(c): n for n, c in enumerate(cur_idx[b]) if cur_mask[b, n]}
                    pick[b, Lk - len(k):] = torch.tensor([col[int(c)] for c in k], dtype=torch.long)
                    new_mask[b, Lk - len(k):] = True
                h = h.gather(1, pick[..., None].expand(-1, -1, h.shape[-1]))
                pe = tuple(t.expand(B, *t.shape[1:]).gather(1, pick[..., None].expand(-1, -1, t.shape[-1]))
                           for t in pe)
                cur_idx, cur_mask = cur_idx.gather(1, pick), new_mask
            layer_mask[j] = cur_mask
            h = dec(h, attention_mask=attend(cur_mask, cur_mask.shape[1]), position_embeddings=pe, cache=cache,
                    use_cache=True)
        out = model.lm_head(llm.norm(h))[:, -1]
        next_pos = mask.sum(1)
        for step in range(n_new):
            logits.append(out)
            tokens.append(out.argmax(-1))
            if step == n_new - 1:
                break
            layer_mask = {j: torch.cat([m, torch.ones(B, 1, dtype=torch.bool)], dim=1) for j, m in layer_mask.items()}
            h = model.get_input_embeddings()(tokens[-1][:, None])
            pe = llm.rotary_emb(h, (next_pos + step)[:, None])
            for j, dec in enumerate(llm.layers):
                h = dec(h, attention_mask=attend(layer_mask[j], 1), position_embeddings=pe, cache=cache,
                        use_cache=True)
            out = model.lm_head(llm.norm(h))[:, -1]
    return torch.stack(tokens, dim=1), torch.stack(logits)


def eager_attentions(family: str, batch: dict, layers: int):
    """Attention maps of every decoder layer of the unpruned tiny model, computed eagerly (B, H, L, L)."""
    import copy

    model = copy.deepcopy(tiny_model(family, layers=layers))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        return model(**batch, output_attentions=True).attentions


PROCESSOR_WORDS = ["what", "colour", "is", "the", "square", "red", "blue", "yes", "no", "two", "one", "three",
                   "four", "how", "many", "are", "there", "a", "of", "in", "on", "green", "yellow", "circle",
                   "left", "right", "top", "bottom", "this", "picture", "video", "frame", "frames", "color"]
TEMPLATE_WORDS = ["?", ":", ".", ",", "USER", "ASSISTANT", "user", "assistant"]  # chat templates, punctuation
SPECIAL_TOKENS = {  # per family, the tokens at ids IMAGE (90) .. 95, and the eos token
    "llava": (["<image>", "x0", "x1", "x2", "x3", "x4"], "</s>"),
    "llava_next": (["<image>", "x0", "x1", "x2", "x3", "x4"], "</s>"),
    "llava_onevision": (["<image>", "<video>", "x0", "x1", "<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "qwen2_vl": (["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>",
                  "<|im_end|>"], "<|im_end|>"),
}
SPECIAL_TOKENS["qwen2_5_vl"] = SPECIAL_TOKENS["qwen2_vl"]
_CONTENT = ("{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}{IMAGE}{% elif c['type'] == 'video' %}{VIDEO}"
            "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}")
LLAMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }} : " + _CONTENT
                  + " {% if m['role'] == 'assistant' %}{{ eos_token }} {% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}ASSISTANT :{% endif %}")
IM_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n" + _CONTENT + "<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_TEMPLATES = {
    "llava": LLAMA_TEMPLATE.replace("{IMAGE}", "<image> ").replace("{VIDEO}", "<image> "),
    "llava_next": LLAMA_TEMPLATE.replace("{IMAGE}", "<image> ").replace("{VIDEO}", "<image> "),
    "llava_onevision": IM_TEMPLATE.replace("{IMAGE}", "<image> ").replace("{VIDEO}", "<video> "),
    "qwen2_vl": IM_TEMPLATE.replace("{IMAGE}", "<|vision_start|><|image_pad|><|vision_end|> ")
    .replace("{VIDEO}", "<|vision_start|><|video_pad|><|vision_end|> "),
}
CHAT_TEMPLATES["qwen2_5_vl"] = CHAT_TEMPLATES["qwen2_vl"]


def tiny_tokenizer(family: str = "llava"):
    """A word-level tokenizer built offline whose ids match the tiny models' configs: pad 0, ``<s>`` 1,
    ``</s>`` 2, :data:`PROCESSOR_WORDS` from 4, then :data:`TEMPLATE_WORDS`, filler words ``w0``.., the family's vision tokens from
    IMAGE (90) as in :data:`SPECIAL_TOKENS`; 96 tokens. Words split on spaces and punctuation."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials, eos = SPECIAL_TOKENS[family]
    vocab = ["<pad>", "<s>", "</s>", "<unk>"] + PROCESSOR_WORDS + TEMPLATE_WORDS
    vocab += [f"w{i}" for i in range(IMAGE - len(vocab))] + specials
    assert vocab.index(specials[0]) == IMAGE and vocab.index("<pad>") == PAD and len(vocab) == VOCAB
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    names = {"<image>": "image_token", "<video>": "video_token", "<|image_pad|>": "image_token",
             "<|video_pad|>": "video_token", "<|vision_start|>": "vision_bos_token",
             "<|vision_end|>": "vision_eos_token"}
    named = {names[t]: t for t in specials if t in names}
    rest = [t for t in specials if t.startswith("<") and t not in names]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token=eos, pad_token="<pad>",
                                        unk_token="<unk>", extra_special_tokens=named)
    tokenizer.add_tokens(rest, special_tokens=True)  # already in the vocabulary: split out, not added
    assert len(tokenizer) == VOCAB
    return tokenizer


def _image_processor(family: str):
    """Image processor sizes whose token count equals the tiny model's features (any input size)."""
    import transformers as tf

    pinpoints = [[8, 16], [16, 8], [8, 8]]
    if family == "llava":
        return tf.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    if family == "llava_next":
        return tf.LlavaNextImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8},
                                          image_grid_pinpoints=pinpoints)
    if family == "llava_onevision":
        return tf.LlavaOnevisionImageProcessor(size={"height": 8, "width": 8}, image_grid_pinpoints=pinpoints)
    return tf.Qwen2VLImageProcessor(**QWEN_PIXELS)


QWEN_PIXELS = dict(size={"shortest_edge": 256, "longest_edge": 256}, patch_size=2, merge_size=2,
                   temporal_patch_size=2)  # pictures resized to about 16x16 pixels: 16 tokens after the merge
VIDEO_PROCESSORS = {"llava_onevision": ("LlavaOnevisionVideoProcessor", {"size": {"height": 8, "width": 8}}),
                    "qwen2_vl": ("Qwen2VLVideoProcessor", QWEN_PIXELS),
                    "qwen2_5_vl": ("Qwen2VLVideoProcessor", QWEN_PIXELS)}


def _video_processor(family: str):
    """``(video processor, processor class adapter)``: the real one with torchvision, else covipal's stand-in."""
    import transformers as tf

    from covipal.base_model import accepting_frames_only, frames_only_video_processor

    name, settings = VIDEO_PROCESSORS[family]
    try:
        return getattr(tf, name)(**settings), lambda cls: cls
    except ImportError:  # no torchvision: the processor is built as covipal.base_model.load_processor builds it
        return frames_only_video_processor({**settings, "video_processor_type": name}), accepting_frames_only


def tiny_processor(family: str = "llava", chat_template: bool = True):
    """The real processor class of ``family`` for :func:`tiny_model`'s model, built offline.

    Its tokenizer is :func:`tiny_tokenizer`; with ``chat_template`` it has a simple template (a
    user turn renders its images, videos and text; the generation prompt opens the assistant
    turn). Pictures of any size give as many vision tokens as the tiny vision tower yields
    features (llava 16, llava_next and llava_onevision 10 for a square picture, Qwen 16).
    """
    import transformers as tf

    tokenizer, images = tiny_tokenizer(family), _image_processor(family)
    template = CHAT_TEMPLATES[family] if chat_template else None
    if family in ("llava", "llava_next"):
        cls = tf.LlavaProcessor if family == "llava" else tf.LlavaNextProcessor
        return cls(image_processor=images, tokenizer=tokenizer, patch_size=4, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=template)
    video, adapt = _video_processor(family)
    if family == "llava_onevision":
        return adapt(tf.LlavaOnevisionProcessor)(image_processor=images, tokenizer=tokenizer, video_processor=video,
                                                 num_image_tokens=4, vision_feature_select_strategy="full",
                                                 chat_template=template)
    cls = tf.Qwen2VLProcessor if family == "qwen2_vl" else tf.Qwen2_5_VLProcessor
    return adapt(cls)(image_processor=images, tokenizer=tokenizer, video_processor=video, chat_template=template)


def save_checkpoint(family: str, folder, layers: int = 2, seed: int = 0):
    """Save a tiny random ``family`` model (weights from ``seed``) and its processor to ``folder`` with
    ``save_pretrained``, as a real checkpoint is saved; generation stops at the tokenizer's eos."""
    import copy

    model = copy.deepcopy(tiny_model(family, layers)) if seed == 0 else _build_model(family, layers, seed)
    processor = tiny_processor(family)
    eos = processor.tokenizer.eos_token_id
    model.config.get_text_config().eos_token_id = eos
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, PAD
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
