"""Plain PyTorch references for the lightning indexer (DSA spec A2): quantisation, logits, top-k.

Shapes: T query rows, S keys, H indexer heads, D = 128. FP8 is e4m3fn with one power-of-two ("ue8m0") fp32
scale per 128-vector (``indexcache.kernels.formats``). Logits are fp32, -inf outside each row's window [row_start, row_end).
"""
from __future__ import annotations

import functools

import torch

from indexcache.kernels.formats import INDEX_DIM, PAGE, gather_indexer_k, quantize_rows

D = INDEX_DIM


@functools.lru_cache(maxsize=8)
def _hadamard_matrix(device: str) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < D:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h * D**-0.5).to(device)


def hadamard_128(x: torch.Tensor) -> torch.Tensor:
    """Normalised Walsh-Hadamard transform of the last dim (must be 128), computed in fp32, returned in x.dtype."""
    if x.shape[-1] != D:
        raise ValueError(f"hadamard_128: last dim must be {D}, got {x.shape[-1]}")
    return (x.float() @ _hadamard_matrix(str(x.device))).to(x.dtype)


def _check_last_dim(name: str, t: torch.Tensor, ndim: int):
    if t.dim() != ndim or t.shape[-1] != D:
        raise ValueError(f"{name}: expected {ndim} dims with last dim {D}, got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating dtype, got {t.dtype}")


def q_weight_fold(h: int) -> float:
    """The constant folded into the indexer weights with the q scale: 128^-0.5 * H^-0.5."""
    return D**-0.5 * h**-0.5


def check_quantize_q_inputs(q: torch.Tensor, weights: torch.Tensor):
    _check_last_dim("quantize_indexer_q(q)", q, 3)
    if weights.shape != q.shape[:2]:
        raise ValueError(f"quantize_indexer_q: weights shape {tuple(weights.shape)} != q.shape[:2] {tuple(q.shape[:2])}")


def check_quantize_k_inputs(k: torch.Tensor):
    _check_last_dim("quantize_indexer_k(k)", k, 2)


def quantize_indexer_q_ref(q: torch.Tensor, weights: torch.Tensor, *, hadamard: bool = False):
    """q [T,H,128], weights [T,H] (raw weights_proj output) -> (q_fp8 [T,H,128] e4m3, w_folded [T,H] fp32).

    w_folded = weights * q_scale * 128^-0.5 * H^-0.5, so that logits = k_scale * sum_h w_folded * relu(q_fp8 . k_fp8).
    """
    check_quantize_q_inputs(q, weights)
    if hadamard:
        q = hadamard_128(q.float())
    q_fp8, scale = quantize_rows(q)
    w = weights.float() * scale * q_weight_fold(q.shape[1])
    return q_fp8, w


def quantize_indexer_k_ref(k: torch.Tensor, *, hadamard: bool = False):
    """k [S,128] -> (k_fp8 [S,128] e4m3, k_scale [S] fp32), one power-of-two scale per token."""
    check_quantize_k_inputs(k)
    if hadamard:
        k = hadamard_128(k.float())
    return quantize_rows(k)


def check_logits_inputs(q_fp8, w, k_fp8, k_scale, row_start, row_end):
    if q_fp8.dim() != 3 or q_fp8.shape[2] != D:
        raise ValueError(f"indexer_logits: q_fp8 must be [T,H,{D}], got {tuple(q_fp8.shape)}")
    t, h, _ = q_fp8.shape
    if q_fp8.dtype != torch.float8_e4m3fn:
        raise ValueError(f"indexer_logits: q_fp8 dtype must be float8_e4m3fn, got {q_fp8.dtype}")
    if k_fp8.dim() != 2 or k_fp8.shape[1] != D or k_fp8.dtype != torch.float8_e4m3fn:
        raise ValueError(f"indexer_logits: k_fp8 must be [S,{D}] float8_e4m3fn, got {tuple(k_fp8.shape)} {k_fp8.dtype}")
    s = k_fp8.shape[0]
    if tuple(w.shape) != (t, h) or w.dtype != torch.float32:
        raise ValueError(f"indexer_logits: w must be [T,H]=({t},{h}) float32, got {tuple(w.shape)} {w.dtype}")
    if tuple(k_scale.shape) != (s,) or k_scale.dtype != torch.float32:
        raise ValueError(f"indexer_logits: k_scale must be [S]=({s},) float32, got {tuple(k_scale.shape)} {k_scale.dtype}")
    for name, r in (("row_start", row_start), ("row_end", row_end)):
        if tuple(r.shape) != (t,) or r.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"indexer_logits: {name} must be [T]=({t},) int32, got {tuple(r.shape)} {r.dtype}")
    return t, h, s


def window_mask(row_start, row_end, s: int, device) -> torch.Tensor:
    cols = torch.arange(s, device=device)
    return (cols[None, :] >= row_start[:, None].long()) & (cols[None, :] < row_end[:, None].long())


def indexer_logits_ref(q_fp8, w, k_fp8, k_scale, row_start, row_end) -> torch.Tensor:
    """logits[t,s] = k_scale[s] * sum_h w[t,h] * relu(q[t,h].k[s]) on [row_start[t], row_end[t]), -inf elsewhere."""
    t, h, s = check_logits_inputs(q_fp8, w, k_fp8, k_scale, row_start, row_end)
    kf = k_fp8.float()
    out = torch.zeros(t, s, device=q_fp8.device, dtype=torch.float32)
    for i in range(h):  # one head at a time: memory T*S, not T*H*S
        out += w[:, i:i + 1] * torch.relu(q_fp8[:, i].float() @ kf.T)
    out *= k_scale[None, :]
    return out.masked_fill_(~window_mask(row_start, row_end, s, q_fp8.device), float("-inf"))


def indexer_logits_fp32(q, weights, k, row_start, row_end) -> torch.Tensor:
    """Non-quantised scores (spec A2.7, dequantised form): sum_h weights/sqrt(H)/sqrt(D) * relu(q_h.k_s), masked."""
    t, h, _ = q.shape
    s = k.shape[0]
    kf = k.float()
    out = torch.zeros(t, s, device=q.device, dtype=torch.float32)
    for i in range(h):
        out += weights[:, i:i + 1].float() * torch.relu(q[:, i].float() @ kf.T)
    out *= h**-0.5 * D**-0.5
    return out.masked_fill_(~window_mask(row_start, row_end, s, q.device), float("-inf"))


def topk_rows_torch(logits: torch.Tensor, k: int, *, row_start=None, row_end=None) -> torch.Tensor:
    """torch.topk fallback with the ``topk_rows`` contract: int32 [R,k] column ids, -1 for slots past the valid count.

    Columns outside [row_start, row_end) are never selected (masked to -inf here when a window is given).
    """
    r, n = logits.shape
    dev = logits.device
    rs = torch.zeros(r, dtype=torch.long, device=dev) if row_start is None else row_start.to(dev).long().clamp(0, n)
    re = torch.full((r,), n, dtype=torch.long, device=dev) if row_end is None else row_end.to(dev).long().clamp(0, n)
    masked = row_start is not None or row_end is not None
    count = (re - rs).clamp(min=0)
    kk = min(k, n)
    out = torch.full((r, k), -1, dtype=torch.int32, device=dev)
    if kk == 0 or r == 0:
        return out
    cols = torch.arange(n, device=dev)
    slot = torch.arange(kk, device=dev)
    step = max(1, (1 << 24) // max(n, 1))  # row blocks bound the masked copy to 64 MB
    for a in range(0, r, step):
        b = min(r, a + step)
        lg = logits[a:b]
        if masked:
            inside = (cols[None] >= rs[a:b, None]) & (cols[None] < re[a:b, None])
            lg = lg.masked_fill(~inside, float("-inf"))
        _, idx = torch.topk(lg, kk, dim=1, sorted=True)
        out[a:b, :kk] = torch.where(slot[None] < count[a:b, None], idx, -1).to(torch.int32)
    return out


def indexer_topk_prefill_ref(q_fp8, w, k_fp8, k_scale, row_start, row_end, topk: int) -> torch.Tensor:
    """Exact prefill top-k: the reference logits, then the exact selection with the lower-column tie rule."""
    from indexcache.kernels.topk.reference import topk_rows_reference  # noqa: PLC0415

    logits = indexer_logits_ref(q_fp8, w, k_fp8, k_scale, row_start, row_end)
    return topk_rows_reference(logits, topk, row_start=row_start, row_end=row_end)


def prefill_candidates_ref(logits, thr, cap: int):
    """What the fused candidates kernel computes, from full logits (-inf outside windows): per row the valid
    (not NaN, not -inf) scores >= thr[row] in column order, the first ``cap`` of them as (values [R,cap] fp32,
    columns [R,cap] int32; NaN / -1 past the kept count), and counts [R,2] int32 = (all candidates, valid scores).
    The kernel writes the same lists in any order (an overflowing row: any ``cap`` of its candidates)."""
    r = logits.shape[0]
    valid = ~torch.isnan(logits) & (logits != float("-inf"))
    take = valid & (logits >= thr[:, None])
    vals = torch.full((r, cap), float("nan"), device=logits.device)
    cols = torch.full((r, cap), -1, dtype=torch.int32, device=logits.device)
    for i in range(r):
        c = take[i].nonzero().flatten()[:cap]
        vals[i, :len(c)] = logits[i, c]
        cols[i, :len(c)] = c.to(torch.int32)
    counts = torch.stack([take.sum(1), valid.sum(1)], 1).to(torch.int32)
    return vals, cols, counts


def topk_recall(idx_pred: torch.Tensor, idx_ref: torch.Tensor) -> float:
    """Mean over rows of |pred ∩ ref| / |ref| for int index sets with -1 padding (rows with empty ref count as 1)."""
    p = idx_pred.long().cpu()
    r = idx_ref.long().cpu()
    n = int(max(p.max().item(), r.max().item(), 0)) + 2
    hp = torch.zeros(p.shape[0], n, dtype=torch.bool)
    hr = torch.zeros(r.shape[0], n, dtype=torch.bool)
    hp.scatter_(1, p + 1, True)
    hr.scatter_(1, r + 1, True)
    hp[:, 0] = False
    hr[:, 0] = False
    inter = (hp & hr).sum(1).float()
    size = hr.sum(1).float()
    rec = torch.where(size > 0, inter / size.clamp_min(1), torch.ones_like(size))
    return float(rec.mean())


def decode_gather_keys(kv_cache, block_table, context_len: int, b: int):
    """(k_fp8 [L,128], k_scale [L]) of sequence b's first context_len tokens, from the paged 8448-B/page cache."""
    pos = torch.arange(context_len, device=kv_cache.device)
    slots = block_table[b, pos // PAGE].long() * PAGE + pos % PAGE
    return gather_indexer_k(kv_cache, slots)


def indexer_logits_decode_ref(q_fp8, w, kv_cache, block_table, context_lens, max_len: int) -> torch.Tensor:
    b, h, _ = q_fp8.shape
    out = torch.full((b, max_len), float("-inf"), device=q_fp8.device, dtype=torch.float32)
    for i in range(b):
        n = min(int(context_lens[i]), max_len)
        if n <= 0:
            continue
        k8, ks = decode_gather_keys(kv_cache, block_table, n, i)
        zero = torch.zeros(1, dtype=torch.int32, device=q_fp8.device)
        out[i, :n] = indexer_logits_ref(q_fp8[i:i + 1], w[i:i + 1], k8, ks, zero, zero + n)[0]
    return out

