"""Diagnostic (branch gluon-candidates, H200 runs 94-95): the Gluon candidates form's values against a logits call
of the same inputs, entry by entry: how many differ, by how much, at which key offsets / rows. Run on a GPU:
``python -m benchmarks.gluon_candidates_diag`` (NANKEY=1 puts a NaN key scale at key 12345)."""
import torch, os, json
from indexcache.kernels.indexer import quantize_indexer_q, quantize_indexer_k, indexer_logits
from indexcache.kernels.indexer import ops
out = {}
for h in (32, 64):
    g = torch.Generator().manual_seed(h + 1)
    t, s, cap = 1000, 20000 + 37, 2048
    q8, w = quantize_indexer_q(torch.randn(t, h, 128, generator=g).cuda(), torch.randn(t, h, generator=g).cuda())
    k8, ks = quantize_indexer_k((torch.randn(s, 128, generator=g) * 2).cuda())
    ks = ks.clone(); ks[12345] = float("nan") if os.environ.get("NANKEY") else ks[12345]
    re = torch.arange(s - t + 1, s + 1, dtype=torch.int32, device="cuda")
    rs = (torch.arange(t, device="cuda", dtype=torch.int32) * 7) % 900
    lg = indexer_logits(q8, w, k8, ks, rs, re, kernel="gluon")
    lg2 = indexer_logits(q8, w, k8, ks, rs, re, kernel="gluon")
    thr = torch.where(torch.isfinite(lg), lg, float("nan")).nanquantile(0.95, dim=1)
    thr[:8] = float("-inf")
    vals, cols, cnt = ops.indexer_prefill_candidates(q8, w, k8, ks, rs, re, thr, cap, kernel="gluon")
    n = cnt[:, 0].clamp(max=cap)
    wr = torch.arange(cap, device="cuda")[None, :] < n[:, None]
    c = torch.where(wr, cols, 0).long()
    ref = torch.gather(lg, 1, c)
    bad = wr & (vals != ref)
    idx = bad.nonzero()
    d = {"logits_deterministic": bool(torch.equal(torch.nan_to_num(lg), torch.nan_to_num(lg2))), "bad": int(bad.sum()), "written": int(wr.sum())}
    if idx.numel():
        r, j = idx[:, 0], idx[:, 1]
        cc = cols[r, j].long()
        v, rv = vals[r, j], lg[r, cc]
        d.update(max_rel=float(((v - rv).abs() / rv.abs().clamp_min(1e-9)).max()),
                 rows=sorted(set(r.tolist()))[:20], row_mod_bq=sorted(set((r % (256 // h)).tolist())),
                 col_mod_64=sorted(set((cc % 64).tolist()))[:40], tiles=sorted(set((cc // 64).tolist()))[:20],
                 samples=[(int(a), int(b), float(x), float(y)) for a, b, x, y in zip(r[:10], cc[:10], v[:10], rv[:10])])
        # does the value equal another row's logit at the same column?
        m = (lg[:, cc[:200]] == v[None, :200])
        d["same_as_other_row"] = int(m.any(0).sum())
        d["which_rows"] = [sorted(set(m[:, i].nonzero().flatten().tolist()))[:4] for i in range(5)]
        m2 = (lg[r[:200]][:, :] == v[:200, None])
        d["same_as_other_col"] = int(m2.any(1).sum())
        d["which_cols"] = [(int(cc[i]), m2[i].nonzero().flatten().tolist()[:4]) for i in range(5)]
    out[h] = d
    print(h, json.dumps(d)[:1500], flush=True)
json.dump(out, open(os.environ.get("OUT", "/tmp") + "/diag_" + os.environ.get("TAG", "x") + ".json", "w"))
