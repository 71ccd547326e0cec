"""Data-set rows as inputs of a pretrained Hugging Face LVLM, for the PPM stages.

The counterpart of :class:`covipal.training.data.ReferenceInputs` for a model named by
``model.source``: the same four methods, built with the model's own ``AutoProcessor``
and, when it has one, its chat template (one user turn: the row's images, then the
user text, ``prompt`` with the row's question in place of ``{question}`` (``model.prompt``);
the generation prompt opens the answer). Rows are in the project's schema (``images``,
``question``, ``answer``); a row with several images (a video as frames) gets one image
entry per frame.
"""

from __future__ import annotations

import torch


class HFInputs:
    """``prompt`` / ``train`` / ``answers`` / ``evaluation`` for a Hugging Face processor.

    Parameters
    ----------
    processor
        The model's ``AutoProcessor``.
    prompt : str
        The user text, a ``str.format`` template with the row's question as ``{question}``
        (e.g. ``"{question}\nAnswer the question using a single word or phrase."``).
    """

    def __init__(self, processor, prompt: str = "{question}"):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.prompt_template = prompt

    def user_text(self, row: dict) -> str:
        """The row's user text: the prompt template with its question filled in."""
        return self.prompt_template.format(question=row["question"])

    def texts(self, rows: list[dict]) -> list[str]:
        """Prompt text per row (chat template with generation prompt, or ``<image>``.. + user text)."""
        if getattr(self.processor, "chat_template", None):
            return [self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"} for _ in r["images"]]
                  + [{"type": "text", "text": self.user_text(r)}]}], add_generation_prompt=True) for r in rows]
        image_token = getattr(self.processor, "image_token", None)
        if image_token is None:
            raise ValueError(f"{type(self.processor).__name__} has neither a chat template nor an image_token; "
                             "give the model's processor (AutoProcessor) with one of them")
        return [image_token * len(r["images"]) + "\n" + self.user_text(r) for r in rows]

    @staticmethod
    def _images(rows: list[dict]) -> list:
        return [im.convert("RGB") if hasattr(im, "convert") else im for r in rows for im in r["images"]]

    def _encode(self, rows: list[dict], texts: list[str], side: str) -> dict:
        self.tokenizer.padding_side = side
        return dict(self.processor(images=self._images(rows), text=texts, return_tensors="pt", padding=True))

    def prompt(self, rows: list[dict]) -> dict:
        """Left-padded prompts without answers (``input_ids``, ``attention_mask``, pixel inputs)."""
        return self._encode(rows, self.texts(rows), "left")

    def _answer_ids(self, answer: str) -> list[int]:
        """The answer's tokens as they follow the prompt (the tokenizer's own word-start handling)."""
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"answer {answer!r} has no tokens in {type(self.tokenizer).__name__}")
        return ids

    def train(self, rows: list[dict]) -> dict:
        """Right-padded prompt + answer tokens, with ``labels`` (B, L) on the answer tokens only.

        Per-token outputs of the processor besides ``input_ids`` (``attention_mask``, token
        type ids) are extended to match; pixel inputs are passed through.
        """
        batch = self._encode(rows, self.texts(rows), "right")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        per_token = [k for k, v in batch.items() if torch.is_tensor(v) and v.shape == ids.shape and k != "input_ids"]
        seqs, extra = [], {k: [] for k in per_token}
        for j, row in enumerate(rows):
            n = int(mask[j].sum())
            answer = self._answer_ids(row["answer"])
            seqs.append((ids[j, :n].tolist(), answer))
            for k in per_token:
                fill = 1 if k == "attention_mask" else 0
                extra[k].append(batch[k][j, :n].tolist() + [fill] * len(answer))
        width = max(len(p) + len(a) for p, a in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = dict(batch)
        out["input_ids"] = torch.tensor([p + a + [pad] * (width - len(p) - len(a)) for p, a in seqs])
        out["labels"] = torch.tensor([[-100] * len(p) + a + [-100] * (width - len(p) - len(a)) for p, a in seqs])
        for k in per_token:
            out[k] = torch.tensor([v + [0] * (width - len(v)) for v in extra[k]], dtype=batch[k].dtype)
        return out

    def answers(self, rows: list[dict]) -> torch.Tensor:
        """First token id of each row's answer, (B,)."""
        return torch.tensor([self._answer_ids(r["answer"])[0] for r in rows])

    def evaluation(self, rows: list[dict]) -> tuple[dict, torch.Tensor]:
        """``(prompt(rows), answers(rows))`` for :func:`covipal.training.stage2.evaluate`."""
        return self.prompt(rows), self.answers(rows)
