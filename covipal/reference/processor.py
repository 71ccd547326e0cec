"""Tokenizer and processor of the reference LVLM.

The reference model is a real ``LlavaForConditionalGeneration`` whose CLIP tower reads
64x64 pictures as 8x8 patches (64 vision tokens, one per cell). An image is one such
picture. A video's frames are smaller (4x4 cells, as video LVLMs pool frames), and
the processor packs them four to a picture in a 2x2 grid, as image-grid video LVLMs
do: an 8-frame video is two image placeholders of 64 tokens each (128 tokens).

Prompt layout: ``<s> <image> x n_tokens <question words>``; the answer is one word.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from covipal.world.questions import ANSWER_WORDS, CELL_NAMES

SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "<unk>"]
QUESTION_WORDS = "which digit is at what colour the there a how many right of in frames".split()
PATCH = 8


def vocabulary() -> list[str]:
    words = SPECIALS + [w for w in dict.fromkeys(QUESTION_WORDS + ANSWER_WORDS + CELL_NAMES)]
    return words


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over the world's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left")


class ReferenceProcessor:
    """Turns questions plus images or frames into ``LlavaForConditionalGeneration`` inputs."""

    def __init__(self, tokenizer, image_px: int = 64):
        self.tokenizer = tokenizer
        self.image_px = image_px
        self.tokens_per_picture = (image_px // PATCH) ** 2
        self.image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    # --- pictures -------------------------------------------------------------------
    def pictures(self, frames: list[np.ndarray]) -> np.ndarray:
        """One sample's frames ((H, W, 3) uint8 each) -> (n_pictures, 3, image_px, image_px) float."""
        px = self.image_px
        if len(frames) == 1 and frames[0].shape[0] == px:
            canvases = [frames[0]]
        else:
            half = px // 2
            if any(f.shape[:2] != (half, half) for f in frames):
                raise ValueError(f"video frames must be {half}x{half} pixels to pack 4 per {px}x{px} picture")
            canvases = []
            for start in range(0, len(frames), 4):
                canvas = np.zeros((px, px, 3), dtype=np.uint8)
                for q, f in enumerate(frames[start:start + 4]):
                    canvas[(q // 2) * half:(q // 2 + 1) * half, (q % 2) * half:(q % 2 + 1) * half] = f
                canvases.append(canvas)
        arr = np.stack(canvases).astype(np.float32).transpose(0, 3, 1, 2)
        return arr / 127.5 - 1.0

    def token_index(self, frame: int, row: int, col: int, n_frames: int) -> int:
        """Index among a sample's vision tokens of cell (row, col) of ``frame``."""
        side = self.image_px // PATCH
        if n_frames == 1:
            return row * side + col
        q = frame % 4
        r, c = (q // 2) * side // 2 + row, (q % 2) * side // 2 + col
        return (frame // 4) * self.tokens_per_picture + r * side + c

    # --- text -----------------------------------------------------------------------
    def __call__(self, questions: list[str], frames: list[list[np.ndarray]], padding_side: str = "left") -> dict:
        """Prompts plus pictures -> ``input_ids``, ``attention_mask``, ``pixel_values``."""
        pics = [self.pictures(f) for f in frames]
        out = self.text_inputs(questions, [len(p) for p in pics], padding_side)
        out["pixel_values"] = torch.from_numpy(np.concatenate(pics))
        return out

    def text_inputs(self, questions: list[str], n_pictures: list[int], padding_side: str = "left") -> dict:
        """Prompts (no answers) for callers that bring their own vision features."""
        texts = [" ".join(["<s>"] + ["<image>"] * (n * self.tokens_per_picture) + [q])
                 for q, n in zip(questions, n_pictures)]
        self.tokenizer.padding_side = padding_side
        ids = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, "attention_mask": (ids != self.tokenizer.pad_token_id).long()}

    def conversation_inputs(self, conversations: list[list[tuple[str, str]]], n_pictures: list[int]) -> dict:
        """Training batch, right-padded: ``<s> <image>.. q1 a1 q2 a2 ..`` with every answer word
        supervised in ``labels`` (-100 elsewhere)."""
        tok = self.tokenizer
        rows, targets = [], []
        for turns, n in zip(conversations, n_pictures):
            ids = [tok.bos_token_id] + [self.image_token_id] * (n * self.tokens_per_picture)
            labels = [-100] * len(ids)
            for question, answer in turns:
                q = tok(question, add_special_tokens=False)["input_ids"]
                a = tok.convert_tokens_to_ids(answer)
                ids += q + [a]
                labels += [-100] * len(q) + [a]
            rows.append(ids)
            targets.append(labels)
        width = max(map(len, rows))
        ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
        return {"input_ids": ids, "attention_mask": (ids != tok.pad_token_id).long(), "labels": labels}

    def decode_answers(self, token_ids: torch.Tensor) -> list[str]:
        """First generated token of each row -> answer word."""
        return self.tokenizer.convert_ids_to_tokens(token_ids[:, 0].tolist())

    # --- persistence ----------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.tokenizer.save_pretrained(folder)
        (folder / "covipal_processor.json").write_text(json.dumps({"image_px": self.image_px}))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "ReferenceProcessor":
        from transformers import PreTrainedTokenizerFast

        folder = Path(folder)
        cfg = json.loads((folder / "covipal_processor.json").read_text())
        return cls(PreTrainedTokenizerFast.from_pretrained(folder), **cfg)
