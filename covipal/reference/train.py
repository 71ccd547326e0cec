"""Training recipe of the reference LVLM on the digit world.

1. **Tower warm-up.** The CLIP tower learns, per patch token, what its cell holds (digit
   or empty, colour, row, column, and the digit to its right, context a CLIP feature
   carries) and, on the [CLS] token, which digits the picture
   holds (an image-level objective, so [CLS] attention means something, as in CLIP,
   which keeps [CLS]-based baselines fair). Scenes come from the world generator with
   the training scan pool.
2. **Projector + LLM.** The tower is frozen and its features are computed once; the
   projector and the Llama decoder learn the answer words of multi-turn conversations
   about each training scene, with a :class:`Curriculum` that admits scenes with more
   digits as the model masters fewer (from scratch on full scenes it stays at chance).
3. **Grounding.** From scratch, the LLM sits on a long plateau before it learns to match a
   question word to the vision token holding that digit or cell. Head 0 of decoder layer
   ``grounding_layer`` is therefore supervised, at each question's last word, to put its
   attention on the question's ground-truth relevant cells (attention supervision, as in
   Qiao et al., AAAI 2018, "Exploring Human-like Attention Supervision in VQA"): the
   cross-entropy between its attention and a target spread evenly over the relevant
   vision tokens, added with weight ``grounding_weight``. For the question types in
   ``grounding_sink`` (counting, presence) the target also holds the ``<s>`` token, as
   one more share: the head's attention on ``<s>``, ``1 / (k + 1)`` for ``k`` relevant
   cells, tells the layers above how many there are (all of it when there are none),
   and it does not change when irrelevant tokens are pruned. Without the sink the head
   averages the matching cells and the count is lost (count accuracy about 0.55 against
   0.85-0.9 with it: docs/reference_model.md). The other heads and layers stay free;
   pruning methods that read the LLM's attention see a model that grounds its questions,
   as a pretrained LVLM does.
4. **Deep supervision.** With ``deep_supervision > 0`` the answer loss is also read at every
   intermediate decoder layer through the final norm and the LM head
   (:func:`intermediate_answer_loss`; Lee et al., AISTATS 2015, "Deeply-Supervised Nets").
   Without it the colour and relation readouts were learned suddenly or not at all, depending
   on the seed; with it, in nearly every seed (docs/reference_model.md, "Fourth sweep").
5. **Pruned views.** A share ``prune_share`` of the training conversations is seen with
   part of its vision tokens hidden through the attention mask, as a pruner removes them
   (the positions of the others unchanged, as :mod:`covipal.pruning.runtime` keeps them):
   only tokens that no turn of the conversation is about, each with a probability drawn
   per conversation from ``[0, prune_max]``, so every answer stays right. A model trained
   on whole scenes only learns to lean on the irrelevant tokens too (heads that average
   over the picture), and then loses accuracy under any pruning even when every relevant
   token is kept; pretrained LVLMs, which see very redundant pictures, are far less so.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from covipal.config import BaseTraining, DataConfig
from covipal.reference.processor import ReferenceProcessor
from covipal.pruning.guide import rows_attention
from covipal.world.scenes import COLOURS, DIGITS, empty_frame, fill, scan_pools
from covipal.world.render import render_frame

# ---------------------------------------------------------------------------------------
# 1. tower warm-up
# ---------------------------------------------------------------------------------------


def _warmup_batch(rng, pool, processor: ReferenceProcessor, data: DataConfig, n: int):
    """n pictures (half images, half packed video frames) with per-cell and per-picture labels."""
    side = processor.image_px // 8
    pics, cell_labels, present = [], [], []
    colours = list(COLOURS)
    for i in range(n):
        if i % 2 == 0:
            frames = [empty_frame(side, side)]
            fill(rng, frames[0], pool, int(rng.integers(2, side * side // 4)), list(DIGITS))
        else:
            frames = [empty_frame(side // 2, side // 2) for _ in range(4)]
            for f in frames:
                fill(rng, f, pool, int(rng.integers(0, 4)), list(DIGITS))
        pics.append(processor.pictures([render_frame(f) for f in frames])[0])
        labels = np.zeros((side * side, 7), dtype=np.int64)
        for f_idx, fr in enumerate(frames):
            for r, row in enumerate(fr):
                for c, cell in enumerate(row):
                    t = processor.token_index(f_idx, r, c, len(frames))
                    right = row[c + 1] if c + 1 < len(row) else None
                    digit = 10 if cell is None else cell.digit
                    colour = 4 if cell is None else colours.index(cell.colour)
                    right_digit = 10 if right is None else right.digit
                    labels[t] = (digit, colour, t // side, t % side, right_digit,
                                 digit * 5 + colour, digit * 11 + right_digit)
        cell_labels.append(labels)
        present.append(np.isin(np.arange(10), labels[:, 0]).astype(np.float32))
    return torch.from_numpy(np.stack(pics)), torch.from_numpy(np.stack(cell_labels)), torch.from_numpy(np.stack(present))


def warm_up_tower(model, processor: ReferenceProcessor, data: DataConfig, cfg: BaseTraining, log=print) -> dict:
    """Train the vision tower on per-cell and [CLS] labels; returns final per-head accuracies."""
    tower = model.model.vision_tower
    hidden = tower.config.hidden_size
    device = model.device
    side = processor.image_px // 8
    heads = nn.ModuleDict({"digit": nn.Linear(hidden, 11), "colour": nn.Linear(hidden, 5),
                           "row": nn.Linear(hidden, side), "col": nn.Linear(hidden, side),
                           "right": nn.Linear(hidden, 11), "digit_colour": nn.Linear(hidden, 55),
                           "digit_right": nn.Linear(hidden, 121), "present": nn.Linear(hidden, 10)}).to(device)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.warmup_lr, weight_decay=cfg.weight_decay)
    sched = None
    if cfg.warmup_schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(cfg.warmup_steps, 1))))
    rng = np.random.default_rng([cfg.seed, 1])
    pool = scan_pools(data.seed)["train"]
    ce, bce = nn.CrossEntropyLoss(), nn.BCEWithLogitsLoss()
    acc = {}
    tower.train()
    for step in tqdm(range(cfg.warmup_steps), desc="tower warm-up", mininterval=5):
        batch = _warmup_batch(rng, pool, processor, data, cfg.warmup_batch_size)
        pixels, cells, present = (t.to(device) for t in batch)
        h = tower(pixels, output_hidden_states=True).hidden_states[-1]  # (B, 1 + n_cells, hidden)
        logits = {k: heads[k](h[:, 1:]) for k in ("digit", "colour", "row", "col", "right", "digit_colour", "digit_right")}
        loss = sum(ce(logits[k].flatten(0, 1), cells[..., i].flatten()) for i, k in enumerate(logits))
        loss = loss + bce(heads["present"](h[:, 0]), present)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if step == cfg.warmup_steps - 1 or step % 100 == 0:
            acc = {k: (logits[k].argmax(-1) == cells[..., i]).float().mean().item() for i, k in enumerate(logits)}
            log(f"warm-up step {step}: loss {loss.item():.3f} " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    tower.eval()
    return {f"warmup_{k}_acc": v for k, v in acc.items()}


# ---------------------------------------------------------------------------------------
# 2. projector + LLM on the training split
# ---------------------------------------------------------------------------------------


class EncodedSplit:
    """A split with its frozen tower features computed once.

    ``features[i]``: (n_pictures_i, n_tokens, tower_hidden) float16 for row i;
    ``occupied[i]``: (n_pictures_i * n_tokens,) bool, vision tokens whose cell is not empty;
    ``rows[i]`` holds the row's other columns plus ``n_frames``.
    """

    def __init__(self, model, processor: ReferenceProcessor, split, batch: int = 256):
        self.rows = split.remove_columns("images").to_list()
        self.features: list[torch.Tensor] = []
        self.occupied: list[torch.Tensor] = []
        tower = model.model.vision_tower
        images = split.select_columns(["images"])
        for start in tqdm(range(0, len(split), batch), desc="tower features", mininterval=5):
            chunk = images[start:start + batch]["images"]
            pics = [processor.pictures([np.asarray(im.convert("RGB")) for im in frames]) for frames in chunk]
            for j, frames in enumerate(chunk):
                self.rows[start + j]["n_frames"] = len(frames)
            counts = [len(p) for p in pics]
            self.occupied.extend(torch.from_numpy(occupancy(p)) for p in pics)
            with torch.no_grad():
                pixels = torch.from_numpy(np.concatenate(pics)).to(model.device)
                h = tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
            self.features.extend(h.to(torch.float16).cpu().split(counts))

    def __len__(self) -> int:
        return len(self.rows)


def occupancy(pictures: np.ndarray) -> np.ndarray:
    """(n, 3, px, px) pictures in [-1, 1] -> (n * (px / 8)^2,) bool: 8x8 patches (vision tokens,
    in order) with any lit pixel. Cells are drawn on black, so an empty cell is all -1."""
    n, _, px, _ = pictures.shape
    g = px // 8
    return (pictures > -1).reshape(n, 3, g, 8, g, 8).any(axis=(1, 3, 5)).reshape(-1)


def occupied_positions(processor: ReferenceProcessor, data: EncodedSplit, idx, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: input positions holding a vision token of a non-empty cell, for rows ``idx``."""
    out = torch.zeros(input_ids.shape, dtype=torch.bool)
    for j, i in enumerate(idx):
        out[j, (input_ids[j] == processor.image_token_id).nonzero()[:, 0].cpu()] = data.occupied[i]
    return out.to(input_ids.device)


def batch_inputs(model, processor: ReferenceProcessor, data: EncodedSplit, idx, train: bool):
    """Model inputs for rows ``idx`` with the cached tower features in place of pixels.

    ``train``: the row's question plus its follow-ups as one conversation, answers supervised
    (right-padded); otherwise the question alone as a prompt (left-padded)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    rows = [data.rows[i] for i in idx]
    n_pictures = [len(data.features[i]) for i in idx]
    if train:
        turns = [[(r["question"], r["answer"])] + [(t["question"], t["answer"]) for t in r.get("follow_ups") or []]
                 for r in rows]
        inputs = processor.conversation_inputs(turns, n_pictures)
    else:
        inputs = processor.text_inputs([r["question"] for r in rows], n_pictures)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    projected = model.model.multi_modal_projector(torch.cat([data.features[i] for i in idx]).to(model.device).float())
    inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=list(projected))}
    return inputs


def grounding_targets(processor: ReferenceProcessor, rows: list[dict], inputs: dict, sink: tuple[str, ...] = (),
                      named_only: tuple[str, ...] = ()):
    """Where each training turn asks and which tokens its grounded head should look at.

    Returns ``queries`` (B, T) long: position of each turn's last question word (the token
    that predicts the answer; padded turns repeat the last one), and ``relevant`` (B, T, L)
    bool: the input positions of that turn's relevant cells, plus the ``<s>`` token (input
    position 0: batches are right-padded) for turns whose question type is in ``sink``. For
    types in ``named_only`` only the first relevant cell counts (for a relation, the cell of the
    digit the question names; the tower's feature there carries its right neighbour).
    All False on padded turns, and on a turn with no relevant cell and no sink (e.g. "is there
    a 3" when there is none and presence is not in ``sink``).
    """
    labels, ids = inputs["labels"].cpu(), inputs["input_ids"].cpu()
    B, L = ids.shape
    asks = [(labels[j] != -100).nonzero()[:, 0] - 1 for j in range(B)]
    T = max(len(a) for a in asks)
    queries = torch.stack([torch.cat([a, a[-1:].expand(T - len(a))]) for a in asks])
    relevant = torch.zeros(B, T, L, dtype=torch.bool)
    for j, row in enumerate(rows):
        vision = (ids[j] == processor.image_token_id).nonzero()[:, 0]
        turns = [row] + list(row.get("follow_ups") or [])
        for t, turn in enumerate(turns[:len(asks[j])]):
            cells = turn.get("relevant") or []
            for f, r, c in cells[:1] if turn.get("question_type") in named_only else cells:
                relevant[j, t, vision[processor.token_index(f, r, c, row["n_frames"])]] = True
            if turn.get("question_type") in sink:
                relevant[j, t, 0] = True
    return queries, relevant


class AttentionRows:
    """Attention probabilities of chosen query rows at one decoder layer, with gradients.

    Set ``rows`` (B, n_q) before a forward; read ``probs`` (B, H, n_q, L) after it. The layer
    itself still runs its own (SDPA) attention; the rows are recomputed by
    :func:`covipal.pruning.guide.rows_attention`.
    """

    def __init__(self, model, layer: int):
        self.rows, self.probs = None, None
        attn = model.model.language_model.layers[layer].self_attn
        self._handle = attn.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if self.rows is not None:
            self.probs = rows_attention(module, args, kwargs, self.rows)

    def remove(self) -> None:
        self._handle.remove()


def turn_heads(rows: list[dict], n_turns: int, heads: dict[str, int]) -> torch.Tensor:
    """(B, T) long: the grounded head of each training turn, ``heads[question_type]`` or 0."""
    out = torch.zeros(len(rows), n_turns, dtype=torch.long)
    for j, row in enumerate(rows):
        for t, turn in enumerate(([row] + list(row.get("follow_ups") or []))[:n_turns]):
            out[j, t] = heads.get(turn.get("question_type"), 0)
    return out


def grounding_loss(probs: torch.Tensor, relevant: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of each turn's grounded head's attention against a target spread evenly over
    the ``relevant`` tokens, averaged over the turns that have any: probs (B, H, T, L), relevant
    (B, T, L) bool, heads (B, T) long (None: head 0 everywhere) -> scalar. With one relevant
    token this is ``-log`` of the attention on it."""
    has = relevant.any(-1)  # (B, T)
    if not has.any():
        return probs.sum() * 0.0
    B, H, T, L = probs.shape
    heads = torch.zeros(B, T, dtype=torch.long, device=probs.device) if heads is None else heads.to(probs.device)
    grounded = probs.gather(1, heads[:, None, :, None].expand(B, 1, T, L))[:, 0]  # (B, T, L)
    target = relevant.float() / relevant.sum(-1, keepdim=True).clamp_min(1)
    return -(target * torch.log(grounded + 1e-6)).sum(-1)[has].mean()


def pruned_view(attention_mask: torch.Tensor, vision: torch.Tensor, relevant: torch.Tensor, share: float,
                max_drop: float, generator: torch.Generator, occupied: torch.Tensor | None = None,
                salient: float = 0.0) -> torch.Tensor:
    """``attention_mask`` (B, L) with part of each chosen row's irrelevant vision tokens set to 0.

    ``vision`` (B, L) bool marks vision tokens, ``relevant`` (B, L) bool the tokens any turn
    of the row is about (never hidden). A row is chosen with probability ``share``; in it each
    other vision token is hidden with a probability drawn uniformly from ``[0, max_drop]``.
    With ``salient > 0`` that share of the chosen rows instead hides empty cells only
    (``occupied`` (B, L) bool marks the non-empty ones), a share of them drawn uniformly from
    ``[0, 1]``: the digit-rich inputs a pruner that ranks by salience leaves, down to digits alone.
    """
    B, L = attention_mask.shape
    device = attention_mask.device
    chosen = torch.rand(B, generator=generator).to(device) < share  # (B,)
    rate = (torch.rand(B, generator=generator) * max_drop).to(device)  # (B,)
    noise = torch.rand(B, L, generator=generator).to(device)  # (B, L)
    candidates = vision & ~relevant & chosen[:, None]
    hide = (noise < rate[:, None]) & candidates
    if salient > 0:
        by_salience = (torch.rand(B, generator=generator).to(device) < salient) & chosen  # (B,)
        empty_rate = torch.rand(B, generator=generator).to(device)  # (B,)
        background = candidates & ~occupied
        hide = torch.where(by_salience[:, None], (noise < empty_rate[:, None]) & background, hide)
    return attention_mask.masked_fill(hide, 0)


def _difficulty(rows: list[dict], data: DataConfig) -> np.ndarray:
    """Per row, 0 (fewest digits) .. 1 (most), relative to its modality's training range."""
    out = np.zeros(len(rows))
    for i, r in enumerate(rows):
        w = data.video if r["modality"] == "video" else data.image
        out[i] = (r["digits"] - w.min_train_digits) / max(w.digits - w.min_train_digits, 1)
    return out


class Curriculum:
    """Admit harder training scenes once the model answers the current ones.

    The level (0 = fewest digits, 1 = most) rises by ``curriculum_increment`` whenever
    the running training accuracy reaches ``curriculum_threshold``, so the model waits out
    its plateau on easy scenes; from half of ``curriculum_deadline`` on, it is pushed
    linearly to reach 1 at ``curriculum_deadline`` of the steps, so the model always ends
    on full scenes.
    """

    def __init__(self, cfg: BaseTraining):
        self.cfg, self.adaptive, self.ema = cfg, 0.0, 0.0

    def level(self, step: int) -> float:
        start, end = 0.5 * self.cfg.curriculum_deadline, self.cfg.curriculum_deadline
        forced = (step / self.cfg.steps - start) / max(end - start, 1e-9)
        return float(np.clip(max(self.adaptive, forced), 0.0, 1.0))

    def update(self, batch_accuracy: float) -> None:
        self.ema = 0.9 * self.ema + 0.1 * batch_accuracy
        if self.ema >= self.cfg.curriculum_threshold and self.adaptive < 1.0:
            self.adaptive = min(1.0, self.adaptive + self.cfg.curriculum_increment)
            self.ema = 0.0  # re-earn the next step on the harder scenes


def intermediate_answer_loss(model, hidden_states: tuple, labels: torch.Tensor) -> torch.Tensor:
    """Answer cross-entropy read at each intermediate decoder layer through the final norm and the
    LM head (deep supervision), averaged over those layers. ``hidden_states``: the model's
    (n_layers + 1) x (B, L, D), embeddings first and the last one already normed; labels (B, L)."""
    norm = model.model.language_model.norm
    target = labels[:, 1:]
    keep = target != -100
    losses = [nn.functional.cross_entropy(model.lm_head(norm(h[:, :-1][keep])), target[keep])
              for h in hidden_states[1:-1]]
    return torch.stack(losses).mean() if losses else hidden_states[-1].sum() * 0.0


def _answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of supervised answer words predicted right: logits (B, L, V), labels (B, L)."""
    target = labels[:, 1:]
    hit = (logits[:, :-1].argmax(-1) == target)[target != -100]
    return hit.float().mean().item()


def train_llm(model, processor: ReferenceProcessor, train: EncodedSplit, val: EncodedSplit, data: DataConfig,
              cfg: BaseTraining, log=print) -> list[dict]:
    """Train projector + decoder on answer words; returns the validation history."""
    model.model.vision_tower.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = min(100, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(warm, 1)) * 0.5 * (1 + math.cos(math.pi * min(s / cfg.steps, 1.0))))
    difficulty = _difficulty(train.rows, data)
    modalities = np.array([r["modality"] for r in train.rows])
    share = float((modalities == "video").mean())
    by_modality = ["video" if (i + 0.5) / 20 < share else "image" for i in range(20)]  # batch rota
    by_modality = [m for m in by_modality if (modalities == m).any()]
    rng = np.random.default_rng([cfg.seed, 2])
    torch_rng = torch.Generator().manual_seed(cfg.seed + 3)  # the pruned views
    curriculum = Curriculum(cfg)
    probe = AttentionRows(model, cfg.grounding_layer) if cfg.grounding_weight > 0 else None
    history = []
    model.train()
    t0 = time.time()
    for step in tqdm(range(cfg.steps), desc="reference LVLM", mininterval=5):
        level = curriculum.level(step)
        modality = by_modality[step % len(by_modality)]  # one modality per batch: less padding
        allowed = np.flatnonzero((difficulty <= level + 1e-9) & (modalities == modality))
        idx = rng.choice(allowed, size=cfg.batch_size, replace=len(allowed) < cfg.batch_size)
        inputs = batch_inputs(model, processor, train, idx, train=True)
        if probe is not None:
            batch_rows = [train.rows[i] for i in idx]
            probe.rows, relevant = (t.to(model.device) for t in
                                    grounding_targets(processor, batch_rows, inputs, tuple(cfg.grounding_sink),
                                                      tuple(cfg.grounding_named_only)))
            heads = turn_heads(batch_rows, relevant.shape[1], cfg.grounding_heads)
        if cfg.prune_share > 0:  # every relevant cell of every turn stays visible
            about = relevant if probe is not None and not cfg.grounding_named_only else grounding_targets(
                processor, [train.rows[i] for i in idx], inputs)[1].to(model.device)  # (B, T, L)
            vision = inputs["input_ids"] == processor.image_token_id
            occupied = occupied_positions(processor, train, idx, inputs["input_ids"]) if cfg.prune_salient else None
            inputs["attention_mask"] = pruned_view(inputs["attention_mask"], vision, about.any(1), cfg.prune_share,
                                                   cfg.prune_max, torch_rng, occupied, cfg.prune_salient)
        out = model(**inputs, output_hidden_states=cfg.deep_supervision > 0)
        loss = out.loss
        if cfg.deep_supervision > 0:
            loss = loss + cfg.deep_supervision * intermediate_answer_loss(model, out.hidden_states, inputs["labels"])
        grounding = grounding_loss(probe.probs, relevant, heads) if probe is not None else torch.zeros(())
        curriculum.update(_answer_accuracy(out.logits, inputs["labels"]))
        opt.zero_grad()
        (loss + cfg.grounding_weight * grounding).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(cfg.steps // 6, 1) == 0 or step + 1 == cfg.steps:
            if probe is not None:
                probe.rows = None  # evaluation needs no attention rows
            acc = accuracy(model, processor, val, cfg.eval_batch_size)
            history.append({"step": step + 1, "loss": loss.item(), "grounding": grounding.item(),
                            "minutes": (time.time() - t0) / 60, **acc})
            log(f"step {step + 1}: loss {loss.item():.3f} grounding {grounding.item():.3f} level {level:.2f} "
                f"train {curriculum.ema:.2f} val " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
            model.train()
    if probe is not None:
        probe.remove()
    model.eval()
    return history


@torch.no_grad()
def predict(model, processor: ReferenceProcessor, data: EncodedSplit, batch: int) -> list[str]:
    """Greedy first answer word for every row."""
    model.eval()
    out = []
    for start in range(0, len(data), batch):
        idx = list(range(start, min(start + batch, len(data))))
        logits = model(**batch_inputs(model, processor, data, idx, train=False), logits_to_keep=1).logits
        out += processor.tokenizer.convert_ids_to_tokens(logits[:, -1].argmax(-1).tolist())
    return out


def accuracy(model, processor, data: EncodedSplit, batch: int, by_type: bool = False) -> dict:
    """Answer accuracy per modality (``{"image": 0.93, ...}``); with ``by_type`` a nested
    ``{"image": {"all": .., "position": .., ...}, "video": {...}}``."""
    preds = predict(model, processor, data, batch)
    return score(preds, data.rows, by_type)


def score(preds: list[str], rows: list[dict], by_type: bool = False) -> dict:
    ok = np.array([p == r["answer"] for p, r in zip(preds, rows)])
    mod = np.array([r["modality"] for r in rows])
    qtype = np.array([r["question_type"] for r in rows])
    out = {}
    for m in ("image", "video"):
        if not (mod == m).any():
            continue
        if not by_type:
            out[m] = float(ok[mod == m].mean())
            continue
        out[m] = {"all": float(ok[mod == m].mean())}
        for t in sorted(set(qtype[mod == m])):
            out[m][t] = float(ok[(mod == m) & (qtype == t)].mean())
    return out
