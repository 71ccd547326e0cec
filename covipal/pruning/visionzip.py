"""``visionzip``: keep the vision tokens the vision tower's [CLS] token attends to most.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
CVPR 2025 (arXiv 2412.04467), code https://github.com/dvlab-research/VisionZip
(``visionzip/clip_encoder.py``). Rule, before the LLM and without the text: at the
vision tower's selected layer (LLaVA's penultimate CLIP layer), the **[CLS] row of the
attention, summed over heads**, ranks the patches; the top ones are the *dominant*
tokens, kept in spatial order. The rest are merged into a few *contextual* tokens (by
key similarity to uniformly strided targets).

Implemented here: the dominant-token selection, with the whole budget
``ceil(r n_v)`` given to dominant tokens, shared across a sample's images (the top
tokens of all its images together). The [CLS] row is recomputed at that one layer by a
pre-hook on its self-attention (its own ``q_proj``/``k_proj``; no eager attention, no
patched classes). **Limitation:** the contextual merge is not implemented: it creates
new embeddings, which the runtime's "keep a subset of the vision tokens" contract does
not allow; the method is therefore VisionZip-dominant-only (as FasterVLM). Also, HF
LLaVA's ``"default"`` feature strategy drops the [CLS] token itself, which VisionZip
feeds to the LLM; with ``"full"`` it is a vision token and is always kept.

Families: ``llava`` and ``llava_next`` (CLIP towers; for LLaVA-NeXT each crop gets its
own [CLS] scores, and each LLM vision token is matched to the projector output row it
copies, which follows the model's own unpad/pack step without re-implementing it; the
row-newline tokens have no patch and rank last). ``generate`` may run the tower before
the prefill; the scores of the last tower call are used, so beam search (which repeats
the prompts) is not supported. **Unsupported:** ``llava_onevision`` (SigLIP tower: no
[CLS]), ``qwen2_vl``/``qwen2_5_vl`` (no [CLS], and 2x2 patches are merged after the
tower): :meth:`VisionZipPruner.supports` gives the reason, and entering ``with pruner(model)``
raises ``NotImplementedError`` with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from covipal.pruning.base import Pruner, PruningContext
from covipal.pruning.registry import register

SUPPORTED = ("llava", "llava_next")


def _vision_layers(base: nn.Module) -> nn.ModuleList:
    tower = base.vision_tower
    return getattr(getattr(tower, "vision_model", tower), "encoder").layers


def cls_attention(attn: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """[CLS] row of ``attn``'s attention on ``hidden`` (n, 1 + P, d), summed over heads: (n, 1 + P)."""
    n, T, _ = hidden.shape
    hd = attn.head_dim
    q = attn.q_proj(hidden[:, :1]).view(n, 1, -1, hd).transpose(1, 2)  # (n, H, 1, hd)
    k = attn.k_proj(hidden).view(n, T, -1, hd).transpose(1, 2)  # (n, H, T, hd)
    logits = torch.matmul(q.float(), k.float().transpose(2, 3)) * attn.scale
    return logits.softmax(dim=-1).sum(dim=1)[:, 0]


@register("visionzip")
@dataclass
class VisionZipPruner(Pruner):
    """VisionZip's dominant tokens: top ``ceil(r n_v)`` vision tokens by the tower's [CLS] attention."""

    reads_vision_tower = True  # it hooks the tower's attention: it needs the pixels

    def supports(self, model: nn.Module) -> str | None:
        """None for a CLIP-tower family with one feature layer; else why VisionZip cannot run on ``model``."""
        family = model.config.model_type
        if family not in SUPPORTED:
            return (f"visionzip reads the [CLS] attention of a CLIP vision tower, which {family} does not have "
                    f"(supported families: {', '.join(SUPPORTED)})")
        if not isinstance(model.config.vision_feature_layer, int):
            return "visionzip supports one vision_feature_layer, not a list"
        return None

    def attach(self, model: nn.Module, run) -> list:
        from covipal.pruning.adapters import get_adapter

        base, _ = get_adapter(model).locate(model)
        layers = _vision_layers(base)
        hidden_index = model.config.vision_feature_layer % (len(layers) + 1)
        if hidden_index == 0:
            raise ValueError("vision_feature_layer selects the tower's embeddings; there is no attention to read")
        self._records: list[torch.Tensor] = []
        self._features: list[torch.Tensor] = []

        # generate() may run the tower before the prefill (``mm_encoder_outputs``): keep the last tower call's rows
        def new_call(module, args, kwargs):
            self._records, self._features = [], []

        def record(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            with torch.no_grad():
                self._records.append(cls_attention(module, hidden))

        def features(module, args, output):
            self._features.append(output.detach())

        return [base.vision_tower.register_forward_pre_hook(new_call, with_kwargs=True),
                layers[hidden_index - 1].self_attn.register_forward_pre_hook(record, with_kwargs=True),
                base.multi_modal_projector.register_forward_hook(features)]

    def teardown(self, model: nn.Module) -> None:
        """Forget the last batch's attention rows and features."""
        self._records, self._features = [], []

    def _patch_scores(self, model: nn.Module) -> torch.Tensor:
        """(crops, T): [CLS] attention of every token the projector received (T = P, or 1 + P with "full")."""
        if not self._records:
            raise RuntimeError("visionzip saw no vision-tower call for this prompt")
        attn = torch.cat(self._records)  # (crops, 1 + P)
        if self._features and self._features[-1].shape[1] == attn.shape[1]:  # "full": [CLS] is a token, always kept
            return torch.cat([torch.full_like(attn[:, :1], float("inf")), attn[:, 1:]], dim=1)
        return attn[:, 1:]

    def score(self, ctx: PruningContext) -> torch.Tensor:
        """Shape (B, n_v): the [CLS] attention each vision token's patch received (summed over heads).

        LLaVA places the patches of its images in order. LLaVA-NeXT unpads, reorders and
        adds row newlines: each vision token is matched to the projector output row it
        equals (same patch, same value), newline tokens match none and rank last.
        """
        patches = self._patch_scores(ctx.model).to(ctx.vision.device)
        n = ctx.n_vision
        if ctx.model.config.model_type == "llava":
            flat = patches.flatten()
            if flat.numel() != int(n.sum()):
                raise ValueError(f"the vision tower scored {flat.numel()} patches but the prompts hold "
                                 f"{int(n.sum())} vision tokens; visionzip needs one tower call per batch")
            scores = torch.full(ctx.vision_mask.shape, float("-inf"), device=flat.device)
            for b, part in enumerate(torch.split(flat, n.tolist())):
                scores[b, :len(part)] = part
            return scores
        rows = torch.cat(self._features).flatten(0, 1).to(ctx.vision)  # (crops * T, d)
        tokens = ctx.vision[ctx.vision_mask]  # (n_total, d)
        # exact matching through one lexicographic sort of the rows and tokens together
        _, group = torch.unique(torch.cat([rows, tokens]), dim=0, return_inverse=True)
        owner = torch.full((int(group.max()) + 1,), -1, dtype=torch.long, device=group.device)
        owner[group[:len(rows)]] = torch.arange(len(rows), device=group.device)
        match = owner[group[len(rows):]]
        flat = torch.where(match >= 0, patches.flatten()[match.clamp_min(0)], float("-inf"))
        scores = torch.full(ctx.vision_mask.shape, float("-inf"), device=flat.device)
        scores[ctx.vision_mask] = flat
        return scores

