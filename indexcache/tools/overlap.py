"""Cross-layer top-k overlap: |T_i ∩ T_j| / |T_i| averaged over queries (the paper's Appendix A metric)."""
from __future__ import annotations

import torch


def row_overlap(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query intersection size and selected count of index sets a, b [..., k] (int, -1 = empty slot).

    Both layers select min(k, visible tokens) tokens per query, so dividing by the count equals the
    paper's division by k wherever a query sees more than k tokens.
    """
    a_sorted = torch.where(a < 0, torch.iinfo(torch.int32).max, a.to(torch.int32)).sort(dim=-1).values
    pos = torch.searchsorted(a_sorted.contiguous(), b.to(torch.int32).contiguous()).clamp(max=a.shape[-1] - 1)
    hit = (a_sorted.gather(-1, pos) == b) & (b >= 0)
    return hit.sum(-1), (a >= 0).sum(-1)


def pairwise_overlap(topk: list[torch.Tensor], min_visible: int | None = None) -> torch.Tensor:
    """[L, L] mean overlap between every pair of layers' selections (each [B, T, k]).

    Queries that see at most ``min_visible`` tokens (default: k, where every token is selected and the
    overlap is trivially 1) are left out.
    """
    k = topk[0].shape[-1]
    min_visible = k if min_visible is None else min_visible
    counts = (topk[0] >= 0).sum(-1)
    keep = counts >= 1
    T = topk[0].shape[1]
    visible = torch.arange(1, T + 1, device=topk[0].device).expand_as(counts)
    keep &= visible > min_visible
    if not bool(keep.any()):
        keep = counts >= 1  # short inputs: fall back to every query, noted by the caller
    L = len(topk)
    out = torch.ones(L, L, dtype=torch.float64)
    for i in range(L):
        for j in range(i + 1, L):
            inter, n = row_overlap(topk[i], topk[j])
            frac = inter[keep].double() / n[keep].clamp(min=1).double()
            out[i, j] = out[j, i] = frac.mean()
    return out


@torch.no_grad()
def model_overlap(model, batches: list[torch.Tensor], min_visible: int | None = None) -> torch.Tensor:
    """Pairwise overlap of every layer's own top-k (the model's all-F pattern) over ``batches`` of token ids."""
    total, n = None, 0
    for ids in batches:
        out = model(ids, return_topk=True)
        ov = pairwise_overlap(out.topk_indices, min_visible)
        total = ov if total is None else total + ov
        n += 1
    return total / n


def _colormap(v: float) -> tuple[int, int, int]:
    """A viridis-like ramp for v in [0, 1]."""
    anchors = [(0.0, (68, 1, 84)), (0.25, (59, 82, 139)), (0.5, (33, 145, 140)), (0.75, (94, 201, 98)),
               (1.0, (253, 231, 37))]
    v = min(max(v, 0.0), 1.0)
    for (a, ca), (b, cb) in zip(anchors, anchors[1:]):
        if v <= b:
            t = (v - a) / (b - a)
            return tuple(int(round(x + t * (y - x))) for x, y in zip(ca, cb))
    return anchors[-1][1]


# A 3x5 bitmap font for the heatmap's labels (digits and the few capitals used), so no plotting library is needed.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    " ": "000000000000000", "A": "010101111101101", "E": "111100110100111", "L": "100100100100111",
    "O": "010101101101010", "P": "110101110100100", "R": "110101110101101", "V": "101101101101010",
    "Y": "101101010010010", "I": "111010010010111", "J": "001001001101010", "K": "101101110101101",
}


def _text_size(text: str, scale: int) -> tuple[int, int]:
    return max(len(text) * 4 * scale - scale, 0), 5 * scale


def _draw_text(img, x: int, y: int, text: str, scale: int, rgb=(0, 0, 0)) -> None:
    """Draw ``text`` with its top-left corner at (x, y) into ``img`` (rows of bytearrays, 3 bytes per pixel)."""
    for n, ch in enumerate(text.upper()):
        glyph = _GLYPHS[ch]
        for gy in range(5):
            for gx in range(3):
                if glyph[gy * 3 + gx] == "1":
                    for dy in range(scale):
                        row = img[y + gy * scale + dy]
                        for dx in range(scale):
                            px = x + n * 4 * scale + gx * scale + dx
                            row[3 * px:3 * px + 3] = bytes(rgb)


def write_heatmap_png(matrix, path: str, cell: int = 24, vmin: float = 0.0, vmax: float = 1.0,
                      title: str = "overlap") -> str:
    """An RGB PNG of ``matrix`` (row i = layer i, top to bottom), ``cell`` pixels per entry, with layer numbers on
    both axes ("LAYER I" down the side, "LAYER J" along the bottom) and a colour bar on the right labelled with
    its values (vmin at the bottom, vmax at the top) under ``title``. Uses only zlib, no plotting library."""
    import struct
    import zlib

    m = [[float(x) for x in row] for row in (matrix.tolist() if hasattr(matrix, "tolist") else matrix)]
    L = len(m)
    s = max(1, min(3, cell // 8))  # font scale: 3x5 glyphs drawn s pixels per dot
    ch_h, pad = 5 * s, 2 * s
    step = max(1, -(-L * (_text_size(str(L - 1), s)[0] + pad) // max(L * cell, 1)))  # ticks that do not collide
    bar_w, gap = max(cell, 12), max(cell // 2, 4 * s)
    ticks = [f"{v:.2f}" for v in (vmax, (vmin + vmax) / 2, vmin)]
    tick_w = max(_text_size(t, s)[0] for t in ticks)
    title = title.upper()
    y_title = "LAYER I"
    left = _text_size(y_title, s)[0] + 3 * pad + _text_size(str(L - 1), s)[0] + pad
    top = ch_h + 2 * pad
    grid_w = grid_h = L * cell
    bar_x = left + grid_w + gap
    W = max(bar_x + bar_w + pad + tick_w + pad, bar_x + _text_size(title, s)[0] + pad)
    H = top + grid_h + pad + ch_h + pad + ch_h + pad
    img = [bytearray(b"\xff" * (3 * W)) for _ in range(H)]
    for y in range(grid_h):
        row, i = img[top + y], y // cell
        for j in range(L):
            row[3 * (left + j * cell):3 * (left + (j + 1) * cell)] = \
                bytes(_colormap((m[i][j] - vmin) / max(vmax - vmin, 1e-12))) * cell
        row[3 * bar_x:3 * (bar_x + bar_w)] = bytes(_colormap(1.0 - y / max(grid_h - 1, 1))) * bar_w
    for i in range(0, L, step):  # layer numbers: left of each row, under each column
        label = str(i)
        w = _text_size(label, s)[0]
        _draw_text(img, left - pad - w, top + i * cell + (cell - ch_h) // 2, label, s)
        _draw_text(img, left + i * cell + (cell - w) // 2, top + grid_h + pad, label, s)
    _draw_text(img, 0, top + (grid_h - ch_h) // 2, y_title, s)
    x_title = "LAYER J"
    _draw_text(img, left + (grid_w - _text_size(x_title, s)[0]) // 2, top + grid_h + 2 * pad + ch_h, x_title, s)
    for t, y in zip(ticks, (top, top + (grid_h - ch_h) // 2, top + grid_h - ch_h)):
        _draw_text(img, bar_x + bar_w + pad, y, t, s)
    _draw_text(img, bar_x, pad, title, s)
    raw = b"".join(b"\x00" + bytes(row) for row in img)  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)
    return path
