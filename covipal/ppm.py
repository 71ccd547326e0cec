"""The Plug-and-Play Pruning Module (PPM): a small text-conditioned scorer of vision tokens.

CoViPAL (Tang et al., Findings of EMNLP 2025, https://arxiv.org/abs/2508.17243) scores
every vision token from the embeddings the LLM would see, ``S = PPM(H_v, H_t)``, and
keeps the top ``ceil(r * n_v)``. The PPM does not depend on the host LLM's architecture,
only on its hidden size ``d_model``: both inputs are normalised and projected to
``d_ppm``, then ``n_layers`` blocks let the vision tokens attend to each other and to the
text tokens, and an MLP head gives one score per vision token (higher means keep).
The PPM adds no position embeddings: vision tokens carry the ones their encoder gave
them, and the text is read as a set of word embeddings (the LLM's own input).

A PPM is saved as ``config.json`` plus ``model.safetensors`` (never a pickle):

>>> ppm = PPM(PPMConfig(d_model=4096))
>>> ppm.save_pretrained("models/ppm")
>>> ppm = PPM.from_pretrained("models/ppm")
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from covipal.io import atomic_output

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "covipal-ppm"


def file_checksums(folder: str | Path) -> dict[str, str]:
    """SHA-256 (hex) of a PPM folder's ``config.json`` and ``model.safetensors``."""
    import hashlib

    sums = {}
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        digest = hashlib.sha256()
        with open(Path(folder) / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        sums[name] = digest.hexdigest()
    return sums


def verify_checksums(folder: str | Path, expected: dict[str, str], what: str) -> None:
    """Raise ``ValueError`` naming the file if a PPM file's SHA-256 differs from ``expected``."""
    try:
        actual = file_checksums(folder)
    except FileNotFoundError as e:
        raise ValueError(f"{what}: PPM file missing ({e.filename}); the artifact is incomplete, "
                         "re-register the PPM or roll back to another version") from None
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if name not in expected:
            raise ValueError(f"{what}: no checksum recorded for {name}; re-register the PPM")
        if actual[name] != expected[name]:
            raise ValueError(f"{what}: {name} is corrupt or was tampered with (sha256 {actual[name][:16]}..., "
                             f"recorded at registration {expected[name][:16]}...); refusing to load it. "
                             "Re-register the PPM (dvc repro stage2) or roll back "
                             "(python -m covipal.registry rollback)")


@dataclass
class PPMConfig:
    """Shape of a PPM.

    Parameters
    ----------
    d_model : int
        Hidden size of the host LLM (the width of ``H_v`` and ``H_t``).
    d_ppm : int
        Width inside the PPM.
    n_layers : int
        Number of vision-text attention blocks (the paper's PPM has one or two).
    n_heads : int
        Attention heads per block; must divide ``d_ppm``.
    dropout : float
        Dropout inside the attention and MLP layers (0 keeps inference deterministic).
    mlp_ratio : int
        Width of each block's MLP as a multiple of ``d_ppm``.
    """

    d_model: int
    d_ppm: int = 128
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.0
    mlp_ratio: int = 4

    def __post_init__(self):
        for name in ("d_model", "d_ppm", "n_layers", "n_heads", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PPMConfig.{name} must be a positive integer, got {value!r}")
        if self.d_ppm % self.n_heads:
            raise ValueError(f"PPMConfig.n_heads ({self.n_heads}) must divide d_ppm ({self.d_ppm})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"PPMConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "PPMConfig":
        """Build from a dict; unknown keys are an error that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown PPMConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)


def _all_masked_rows_open(pad: torch.Tensor) -> torch.Tensor | None:
    """Unmask rows of a key-padding mask that hide every key (softmax over nothing is NaN).

    Such rows belong to queries whose output is discarded or zeroed by the caller. A mask
    hiding nothing becomes None: attention then runs a fused kernel instead of building
    the (B, heads, n, n) score matrix, which for long videos does not fit in memory.
    """
    pad = pad & ~pad.all(dim=-1, keepdim=True)
    return pad if pad.any() else None


class PPMBlock(nn.Module):
    """Pre-norm block: vision self-attention, vision-to-text cross-attention, MLP."""

    def __init__(self, config: PPMConfig):
        super().__init__()
        d, h, p = config.d_ppm, config.n_heads, config.dropout
        self.norm_self = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, h, dropout=p, batch_first=True)
        self.norm_cross = nn.LayerNorm(d)
        self.cross_attn = nn.MultiheadAttention(d, h, dropout=p, batch_first=True)
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, config.mlp_ratio * d), nn.GELU(), nn.Dropout(p),
                                 nn.Linear(config.mlp_ratio * d, d))

    def forward(self, v: torch.Tensor, t: torch.Tensor, v_pad: torch.Tensor, t_pad: torch.Tensor) -> torch.Tensor:
        """``v`` (B, n_v, d_ppm), ``t`` (B, n_t, d_ppm); ``*_pad`` True where a slot is padding."""
        h = self.norm_self(v)
        v = v + self.self_attn(h, h, h, key_padding_mask=_all_masked_rows_open(v_pad), need_weights=False)[0]
        if t.shape[1]:
            h = self.norm_cross(v)
            cross = self.cross_attn(h, t, t, key_padding_mask=_all_masked_rows_open(t_pad), need_weights=False)[0]
            has_text = (~t_pad).any(dim=-1)[:, None, None]  # (B, 1, 1): a sample without text gets no cross term
            v = v + cross * has_text
        return v + self.mlp(self.norm_mlp(v))


class PPM(nn.Module):
    """Score vision tokens from the LLM-input embeddings of the vision and text tokens.

    Parameters
    ----------
    config : PPMConfig
    """

    def __init__(self, config: PPMConfig):
        super().__init__()
        self.config = config
        d, m = config.d_ppm, config.d_model
        # the LLM's vision embeddings (projector output) and word embeddings differ in scale
        self.vision_in = nn.Sequential(nn.LayerNorm(m), nn.Linear(m, d))
        self.text_in = nn.Sequential(nn.LayerNorm(m), nn.Linear(m, d))
        self.blocks = nn.ModuleList(PPMBlock(config) for _ in range(config.n_layers))
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))

    def forward(self, vision: torch.Tensor, text: torch.Tensor, vision_mask: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of the vision tokens.

        Parameters
        ----------
        vision : torch.Tensor
            ``H_v``, shape (B, n_v, d_model): vision embeddings as the LLM receives them.
        text : torch.Tensor
            ``H_t``, shape (B, n_t, d_model): the prompt's text embeddings.
        vision_mask : torch.Tensor, optional
            Shape (B, n_v), bool, True for real vision tokens (False for padding or absent
            tokens, e.g. a text-only sample). Default: all real.
        text_mask : torch.Tensor, optional
            Shape (B, n_t), bool, True for real text tokens. Default: all real.

        Returns
        -------
        torch.Tensor
            Shape (B, n_v), float32; higher means keep. Entries where ``vision_mask`` is
            False are ``-inf``, so they sort last.
        """
        if vision_mask is None:
            vision_mask = torch.ones(vision.shape[:2], dtype=torch.bool, device=vision.device)
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        v, t = self.vision_in(vision), self.text_in(text)  # (B, n_v, d_ppm), (B, n_t, d_ppm)
        v_pad, t_pad = ~vision_mask.bool(), ~text_mask.bool()
        for block in self.blocks:
            v = block(v, t, v_pad, t_pad)
        scores = self.head(v).squeeze(-1).float()  # (B, n_v)
        return scores.masked_fill(v_pad, float("-inf"))

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``folder`` (created if needed)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_output(folder / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": FORMAT})
        with atomic_output(folder / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps({"format": FORMAT, **dataclasses.asdict(self.config)}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "PPM":
        """Load a PPM written by :meth:`save_pretrained`, in eval mode.

        Raises
        ------
        FileNotFoundError
            ``folder`` lacks ``config.json`` or ``model.safetensors``.
        ValueError
            A file is unreadable, or the weights do not match the config.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: a PPM folder holds {CONFIG_NAME} and {WEIGHTS_NAME}, "
                                        "as written by PPM.save_pretrained")
        try:
            values = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_path} is not valid JSON ({e}); re-save the PPM with save_pretrained") from e
        if not isinstance(values, dict) or values.pop("format", None) != FORMAT:
            raise ValueError(f"{config_path} is not a covipal PPM config (expected \"format\": \"{FORMAT}\")")
        model = cls(PPMConfig.from_dict(values))
        try:
            state = load_file(str(weights_path), device=str(device))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{weights_path} is not a readable safetensors file ({e}); "
                             "re-save the PPM with save_pretrained") from e
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{weights_path} does not match {config_path}: {e}") from e
        return model.to(device).eval()
