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


def write_heatmap_png(matrix, path: str, cell: int = 24, vmin: float = 0.0, vmax: float = 1.0) -> str:
    """An RGB PNG of ``matrix`` (row i = layer i, top to bottom), ``cell`` pixels per entry, plus a colour bar on
    the right (vmin at the bottom, vmax at the top). Uses only zlib, no plotting library."""
    import struct
    import zlib

    m = [[float(x) for x in row] for row in (matrix.tolist() if hasattr(matrix, "tolist") else matrix)]
    L = len(m)
    bar_w, gap = max(cell, 12), cell // 2
    W, H = L * cell + gap + bar_w, L * cell
    rows = []
    for y in range(H):
        line = bytearray([0])  # filter type 0
        i = y // cell
        for j in range(L):
            line += bytes(_colormap((m[i][j] - vmin) / max(vmax - vmin, 1e-12))) * cell
        line += b"\xff\xff\xff" * gap
        line += bytes(_colormap(1.0 - y / max(H - 1, 1))) * bar_w
        rows.append(bytes(line))
    raw = b"".join(rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)
    return path
