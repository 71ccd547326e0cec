"""Rendering frames to pixels: each cell is one 8x8 scan, tinted by its colour, on black."""

from __future__ import annotations

import numpy as np

from covipal.world.scenes import CELL_PX, COLOURS, Frame, digit_scans


def render_frame(frame: Frame) -> np.ndarray:
    """Frame -> (rows * 8, cols * 8, 3) uint8 RGB."""
    scans, _ = digit_scans()
    rows, cols = len(frame), len(frame[0])
    img = np.zeros((rows * CELL_PX, cols * CELL_PX, 3), dtype=np.float32)
    for r, row in enumerate(frame):
        for c, cell in enumerate(row):
            if cell is not None:
                tint = np.asarray(COLOURS[cell.colour], dtype=np.float32)
                img[r * CELL_PX:(r + 1) * CELL_PX, c * CELL_PX:(c + 1) * CELL_PX] = scans[cell.scan][..., None] * tint
    return np.round(img * 255).astype(np.uint8)
