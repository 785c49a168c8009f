import json, os, torch
from benchmarks.common import bench_ms, measure_ceilings, run_metadata
from benchmarks.sparse_mla_prefill import index_sets, CTX, K, SCALE
from indexcache.kernels.sparse_mla import sparse_mla_prefill, sparse_mla_prefill_reference
T = 8192
kv = torch.randn(CTX, 576, device="cuda", dtype=torch.bfloat16)
q = torch.randn(T, 20, 576, device="cuda", dtype=torch.bfloat16)
sets = index_sets(T)
cfgs = [None, {"num_warps": 8}, {"bt": 32}, {"bt": 32, "num_stages": 3}, {"num_stages": 3}, {"bt": 32, "num_stages": 4},
        {"bt": 128, "num_warps": 8, "num_stages": 1}, {"bt": 32, "num_warps": 2}, {"bt": 64, "num_warps": 4, "num_stages": 1}]
rows = []
ro, rl = sparse_mla_prefill_reference(q[:16], kv, sets["random"][:16], SCALE)
for cfg in cfgs:
    for name in ("random", "mix"):
        idx = sets[name]
        try:
            o, l = sparse_mla_prefill(q[:16], kv, sets["random"][:16], SCALE, config=cfg)
            err = ((o.float() - ro.float()).norm() / ro.float().norm()).item()
            ms = bench_ms(lambda: sparse_mla_prefill(q, kv, idx, SCALE, config=cfg))
            r = dict(cfg=str(cfg), sets=name, ms=round(ms, 3), rel_err=err)
        except Exception as e:
            r = dict(cfg=str(cfg), sets=name, error=repr(e)[:200])
        rows.append(r); print(r, flush=True)
json.dump({"meta": run_metadata(), "ceilings": measure_ceilings(), "rows": rows}, open(os.environ["OUT"] + "/sweep.json", "w"), indent=1)
from indexcache.kernels.sparse_mla import ops
for k, v in ops._FITTING.items():
    print("fitted step", v, "of", k[2], k[3])
