"""Timing, same-run ceilings and result files shared by every benchmark script.

Every figure we quote comes with the ceilings measured in the same process, so ratios stay honest across
machines of the pool (their cuBLAS rates differ by ~15%).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess

import torch


def bench_ms(fn, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of ``fn()`` in milliseconds, CUDA events (triton.testing.do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def clocks_during(fn, seconds: float = 1.0) -> dict:
    """Median SM clock (MHz) and board power (W) while ``fn()`` runs back to back for about ``seconds``, sampled
    every 50 ms by ``nvidia-smi`` (read only; {} without it). Tells a power- or clock-limited kernel from a slow
    one: the same-run cuBLAS ceiling runs at a lower clock than an idle GPU's maximum."""
    import shutil
    import time

    if not torch.cuda.is_available() or shutil.which("nvidia-smi") is None:
        return {}
    idx = str(torch.cuda.current_device())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        idx = visible.split(",")[int(idx)]
    fn()
    torch.cuda.synchronize()
    proc = subprocess.Popen(["nvidia-smi", "-i", idx, "--query-gpu=clocks.sm,power.draw",
                             "--format=csv,noheader,nounits", "-lms", "50"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(4):
                fn()
            torch.cuda.synchronize()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=5)[0]
    samples = []
    for line in out.splitlines():
        try:
            mhz, watts = (float(x) for x in line.split(","))
            samples.append((mhz, watts))
        except ValueError:
            continue
    samples = samples[len(samples) // 4:]  # the first samples may predate the load
    if not samples:
        return {}
    mid = len(samples) // 2
    return {"sm_mhz": sorted(m for m, _ in samples)[mid], "power_w": sorted(w for _, w in samples)[mid],
            "clock_samples": len(samples)}


def fp8_matmul(n: int = 8192, device: str = "cuda"):
    """The fp8 ceiling's GEMM as a call: torch._scaled_mm of two random n x n e4m3 matrices (tensorwise scales,
    bf16 out), the second column-major as cuBLAS wants it."""
    a8 = torch.randn(n, n, device=device, dtype=torch.bfloat16).to(torch.float8_e4m3fn)
    b8 = torch.randn(n, n, device=device, dtype=torch.bfloat16).t().contiguous().to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=device)
    return lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)


def measure_ceilings(device: str = "cuda") -> dict:
    """cuBLAS fp8 and bf16 matmul 8192^3 and device-to-device copy, measured now on this GPU."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    flops = 2 * n**3
    bf16_ms = bench_ms(lambda: a @ b)
    del a, b
    fp8_ms = bench_ms(fp8_matmul(n, device))
    src = torch.randn(512 * 1024 * 1024 // 4, device=device)  # 512 MiB, >> L2
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return {
        "bf16_matmul_tflops": flops / bf16_ms / 1e9,
        "fp8_matmul_tflops": flops / fp8_ms / 1e9,
        "copy_tbps": 2 * 512 * 1024 * 1024 / copy_ms / 1e9,
        "method": "8192^3 matmul (torch @ bf16, torch._scaled_mm fp8 e4m3 tensorwise); 512 MiB copy_ counting read+write; do_bench median",
    }


def run_metadata() -> dict:
    """Device, software versions, date and git revision for a result file."""
    import triton

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    meta.update(git_revision())
    return meta


def git_revision(root: str | None = None) -> dict:
    """{"git": short HEAD, plus "+uncommitted" when tracked files differ from it} of the repository at ``root``
    (default: the one around this file); {} without git or outside a repository. A result's code is then never
    taken for a commit it is not."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=False)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return {}
        changed = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except OSError:
        return {}
    return {"git": head.stdout.strip() + ("+uncommitted" if changed else "")}


def results_dir() -> str:
    """Where results go by default: $OUT when set (the GPU machine), else runs/benchmarks/ under the current
    directory; never into the source tree (benchmarks/results/ holds runs copied there by hand, with their logs)."""
    return os.environ.get("OUT") or os.path.join("runs", "benchmarks")


def write_results(name: str, payload: dict, out_dirs: list[str] | None = None) -> list[str]:
    """Write ``payload`` as JSON to <dir>/<name>.json for each of ``out_dirs`` (default: ``results_dir()``), and
    to $OUT when set."""
    dirs = list(out_dirs or [results_dir()])
    if os.environ.get("OUT") and os.environ["OUT"] not in dirs:
        dirs.append(os.environ["OUT"])
    paths = []
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"{name}.json")
        with open(path, "w") as f:
            json.dump(payload, f, indent=1, default=str)
        paths.append(path)
    return paths


def table(rows: list[dict], cols: list[str]) -> str:
    """A plain aligned text table of ``rows`` restricted to ``cols``."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
