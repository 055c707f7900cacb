"""Image grids with captions, for sample sheets in run directories and tensorboard."""

from __future__ import annotations

import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images_NCHW: torch.Tensor) -> np.ndarray:
    """[-1, 1] float images -> [N, H, W, 3] uint8."""
    x = ((images_NCHW.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images_NCHW: torch.Tensor, captions: list[str] | None = None, cols: int = 8,
              cell: int = 96) -> Image.Image:
    """Lay images out in a grid, each upscaled (nearest) to ``cell`` px, with its caption underneath."""
    arr = to_uint8(images_NCHW)
    n = len(arr)
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    text_h = 30 if captions else 0
    sheet = Image.new("RGB", (cols * (cell + 4) + 4, rows * (cell + text_h + 4) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, img in enumerate(arr):
        r, c = divmod(i, cols)
        x0, y0 = 4 + c * (cell + 4), 4 + r * (cell + text_h + 4)
        sheet.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (x0, y0))
        if captions:
            lines = textwrap.wrap(captions[i], width=max(8, cell // 6))[:3]
            draw.multiline_text((x0, y0 + cell + 1), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=0)
    return sheet
