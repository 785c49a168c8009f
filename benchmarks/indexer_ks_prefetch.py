"""Experiment for the next session (branch ks-prefetch): the Gluon indexer kernel with its key scales loaded a tile
ahead (config ks_prefetch), and its candidates form with each tile's stores one tile late (defer_append: the slot
atomics' round trip off the tile's path), against the default, same run, same bits / same candidate sets.
python -m benchmarks.indexer_ks_prefetch   (about 1 min on an H200)"""
import json, os, torch
from benchmarks.common import bench_ms, measure_ceilings
import benchmarks.indexer_fused as bf
from indexcache.kernels import indexer as ix
from indexcache.kernels.indexer import gluon as G
ceil = measure_ceilings(); print(ceil, flush=True)
res = []
for H, S, ROWS in [(32, 200_000, 8192), (64, 200_000, 8192), (32, 1_000_000, 2112)]:
    q8, w, k8, ks, rs, re = bf.inputs(torch.arange(S - ROWS, S, device="cuda"), S, H, seed=1)
    flops = 2 * (re - rs).double().sum().item() * H * 128
    st = {}
    ix.indexer_topk_prefill_fused(q8, w, k8, ks, rs, re, 2048, out=torch.empty(ROWS, 2048, dtype=torch.int32, device="cuda"), stats=st)
    thr, cap = st["thr"], st["cap"]
    out = torch.empty(ROWS, S, device="cuda")
    ref = {}
    for name, cfg, cand in [("logits", {}, False), ("logits prefetch", {"ks_prefetch": True}, False),
                            ("skeleton", {"epilogue": "none", "mma": "none"}, False),
                            ("skeleton prefetch", {"epilogue": "none", "mma": "none", "ks_prefetch": True}, False),
                            ("mma only", {"epilogue": "none"}, False), ("mma only prefetch", {"epilogue": "none", "ks_prefetch": True}, False),
                            ("cand", {}, True), ("cand prefetch", {"ks_prefetch": True}, True),
                            ("cand defer", {"defer_append": True}, True),
                            ("cand prefetch+defer", {"ks_prefetch": True, "defer_append": True}, True),
                            ("logits again", {}, False)]:
        c = G.config_for(H); c.update(cfg)
        if cand:
            bufs = (torch.empty(ROWS, cap, device="cuda"), torch.empty(ROWS, cap, dtype=torch.int32, device="cuda"),
                    torch.empty(ROWS, 2, dtype=torch.int32, device="cuda"))
            def fn():
                bufs[2].zero_()
                G._launch(q8, w, k8, ks, rs, re, c, bufs[0], (thr.contiguous(), bufs[2], bufs[0], bufs[1], cap), CAND=True)
        else:
            fn = lambda: G.indexer_logits_gluon(q8, w, k8, ks, rs, re, out=out, config=c)
        try:
            ms = bench_ms(fn, warmup_ms=20, rep_ms=120)
            r = {"H": H, "S": S, "rows": ROWS, "name": name, "ms": ms, "frac": flops / ms / 1e9 / ceil["fp8_matmul_tflops"]}
            fn(); torch.cuda.synchronize()
            if cand:
                key = "cand"; got = (bufs[2].clone(), torch.sort(torch.where(torch.arange(cap, device="cuda")[None] < bufs[2][:, :1], bufs[1], 2**31-1), dim=1).values)
                if key in ref: r["same"] = bool(torch.equal(got[0], ref[key][0]) and torch.equal(got[1], ref[key][1]))
                else: ref[key] = got
            elif "epilogue" not in cfg:
                key = "logits"
                if key in ref: r["same"] = bool(torch.equal(out, ref[key]))
                else: ref[key] = out.clone()
        except Exception as e:
            r = {"H": H, "S": S, "name": name, "error": repr(e)[:300]}
        print(r, flush=True); res.append(r)
    del out, q8, k8, ref; torch.cuda.empty_cache()
json.dump({"ceilings": ceil, "rows": res}, open(os.path.join(os.environ.get("OUT", "/tmp"), "ks_prefetch.json"), "w"), indent=1)
for r in res: print(f"H={r['H']} {r['S']:>8} {r['name']:20} {r.get('ms', float('nan')):8.2f} ms {r.get('frac', float('nan')):6.3f} {r.get('same','')} {r.get('error','')}")
