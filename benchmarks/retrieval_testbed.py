"""The retrieval testbed (issue 14): train a DSA model that must retrieve, then compare layer patterns on it.

Rows: full DSA; uniform, greedy-searched and distilled F/S patterns at keep 1/2, 1/4, 1/8 (plus the control: the
all-F model trained by the same distillation steps); F/R patterns at the indexer cost of each keep ratio, with
the F layers spread evenly, on the greedy F/S search's F layers, and as a greedy search that may make each
layer S or R chooses them ("searched F/S/R").
Columns: held-out loss and bits per byte (stdlib test split), exact-match retrieval of the RULER-style suite
(tools/ruler.py, held-out items) per length. Also the overlap heatmap of the all-F model.

Everything is resumable, in pieces of at most ``--budget`` seconds (<= 600): the state lives in ``--work-dir``
(training checkpoints every ``--checkpoint-every`` seconds, finished units in state.json). Run the same command
with ``--resume`` until it prints "testbed complete"; each piece exits by itself before its budget ends.

    python -m benchmarks.retrieval_testbed --work-dir runs/testbed --budget 570            # first piece (GPU)
    python -m benchmarks.retrieval_testbed --work-dir runs/testbed --budget 570 --resume   # every later piece
    python -m benchmarks.retrieval_testbed --work-dir runs/testbed --resume --update-docs  # table into docs
    python -m benchmarks.retrieval_testbed --smoke --work-dir /tmp/tb --budget 120          # CPU, seconds
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import run_metadata  # noqa: E402
from indexcache.checkpoint import build_empty, load_model, save_checkpoint  # noqa: E402
from indexcache.pattern import IndexPattern  # noqa: E402
from indexcache.tools.corpus import ByteTokenizer, load_corpus  # noqa: E402
from indexcache.tools.distill import distill  # noqa: E402
from indexcache.tools.evaluate import heldout_loss  # noqa: E402
from indexcache.tools.overlap import model_overlap, write_heatmap_png  # noqa: E402
from indexcache.tools.probe import copy_probe  # noqa: E402
from indexcache.tools.ruler import ruler_suite  # noqa: E402
from indexcache.tools.search import greedy_search  # noqa: E402
from indexcache.tools.tasks import TASKS  # noqa: E402
from indexcache.tools.train import PRESETS, TrainConfig, extend_copy, run_stage, stages  # noqa: E402

KEEPS = ("1/2", "1/4", "1/8")
PRIORITY = ("1/4", "1/2", "1/8")  # evaluation order: the paper's headline ratio first, so a short run has it
SHARES = {"dense": 0.72, "warmup": 0.08, "sparse": 0.20}  # of the training time a copy warm-up leaves
DOCS_START, DOCS_END = "<!-- retrieval-testbed:start -->", "<!-- retrieval-testbed:end -->"


@dataclasses.dataclass
class Settings:
    tc: TrainConfig
    train_seconds: float      # total training time: the copy warm-up (and its reach extension) first, the
    #                           other stages split what it leaves by SHARES (step counts fixed once, then)
    suite_lengths: tuple
    suite_n: int
    suite_tasks: tuple
    heldout_windows: int
    eval_context: int
    calib_seqs: int
    distill_steps: tuple      # (warm-up, sparse)
    eval_batch: int
    guesses: dict             # seconds a unit of each kind is guessed to take before one has run
    keeps: tuple = KEEPS


def settings(args) -> Settings:
    if args.smoke:
        tc = TrainConfig(layers=4, hidden=32, heads=2, q_lora=32, kv_lora=32, nope=16, rope=16, v=16, mlp=64,
                         index_heads=2, index_dim=16, topk=16, context=512, batch=1, task_ratio=0.5,
                         copy_steps=2, copy_length=128, copy_batch=2, copy_long_length=(256,), copy_long_share=0.5,
                         copy_reach_nats=0.0, copy_reach_block=1, copy_reach_blocks=1,  # one extension block
                         dense_steps=2, warmup_steps=1, sparse_steps=1, max_train_bytes=300_000, index_rows=200)
        return Settings(tc, 0.0, (256,), 1, ("kv_single",), 1, 256, 1, (1, 1), 1,
                        {"probe": 5, "overlap": 5, "search": 10, "search F/S/R": 10, "row": 10, "distill": 10},
                        ("1/2",))
    tc = PRESETS["retrieval"]
    return Settings(tc, args.train_seconds, tuple(args.suite_lengths), args.suite_n, tuple(TASKS), 16,
                    tc.context, 8, (args.distill_warmup, args.distill_sparse), 2,
                    {"probe": 20, "overlap": 60, "search": 240, "search F/S/R": 200, "row": 120, "distill": 300})


# ----- state -------------------------------------------------------------------------------------------------------
class Work:
    def __init__(self, path: str, budget: float, guesses: dict):
        self.path, self.t0, self.budget, self.guesses = path, time.perf_counter(), budget, guesses
        self.state_file = os.path.join(path, "state.json")
        self.state = json.load(open(self.state_file)) if os.path.exists(self.state_file) else {"done": {}}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def deadline(self, reserve: float) -> float:
        return time.perf_counter() + max(0.0, self.left() - reserve)

    def save(self) -> None:
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1, default=str)
        os.replace(tmp, self.state_file)

    def unit(self, name: str, fn):
        """Run ``fn`` once (its JSON-able result is kept) unless done already; False when the budget is too short."""
        if name in self.state["done"]:
            return True
        kind = name.split(":")[0]  # the slowest finished unit of the same kind, else the guess
        est = max([v for k, v in self.state.setdefault("seconds", {}).items() if k.split(":")[0] == kind],
                  default=self.guesses[kind])
        if self.left() < est:
            print(f"[testbed] {name}: ~{est:.0f} s needed, {self.left():.0f} s left in this piece; stopping",
                  flush=True)
            return False
        t = time.perf_counter()
        self.state["done"][name] = fn()
        self.state["seconds"][name] = time.perf_counter() - t
        self.save()
        print(f"[testbed] {name} done in {time.perf_counter() - t:.0f} s", flush=True)
        return True


# ----- training (resumable) ----------------------------------------------------------------------------------------
def plan_steps(tc: TrainConfig, seconds: float, device, corpus) -> TrainConfig:
    """Fixed step counts for the dense, warm-up and sparse stages from a time budget, by timing 3 steps of each on a
    throwaway model; they share ``seconds`` by ``SHARES``. The copy warm-up is not cut: the copying it forms is what
    retrieval needs, so it runs first and the other stages are planned on the time it leaves."""
    if seconds <= 0:
        return tc
    steps = {}
    for stage, _, _ in stages(tc):
        if stage == "copy":
            continue
        m = tc.init_weights(build_empty(tc.model_config(), device, torch.float32))
        g = torch.Generator().manual_seed(99)
        # warm every window length the timed steps use (their first step pays for autotuning and allocation)
        run_stage(m, corpus, stage, 3, 1e-4, tc, g, progress=False)
        _sync(device)
        t = time.perf_counter()
        run_stage(m, corpus, stage, 3, 1e-4, tc, g, progress=False)
        _sync(device)
        steps[stage] = max(5, int(SHARES[stage] * seconds / ((time.perf_counter() - t) / 3)))
    return dataclasses.replace(tc, dense_steps=steps["dense"], warmup_steps=steps["warmup"],
                               sparse_steps=steps["sparse"])


def train_piece(work: Work, s: Settings, device, corpus, checkpoint_every: float) -> bool:
    """Continue training until done (True) or the piece's budget (False); checkpoints along the way."""
    st = work.state
    ck_path = os.path.join(work.path, "train_state.pt")
    if "train_config" not in st:
        st["train_config"] = dataclasses.asdict(s.tc)
        st["train"] = {"stage": 0, "step": 0, "logs": [], "planned": False, "copy_seconds": 0.0}
        work.save()
    tr = st["train"]
    tc = _train_config(st)
    model = tc.init_weights(build_empty(tc.model_config(), device, torch.float32))
    gen = torch.Generator().manual_seed(tc.seed)
    opt_state = None
    if os.path.exists(ck_path):
        ck = torch.load(ck_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        gen.set_state(ck["gen"].cpu())  # map_location moved it to the device
        opt_state = ck["opt"]
    recipe = stages(tc)  # a run planned before the copy warm-up existed has no copy_steps: its indices still hold
    last = {}  # the optimizer of the latest checkpoint
    while tr["stage"] < len(recipe):
        stage, total, lr = recipe[tr["stage"]]
        if stage != "copy" and not tr.get("planned", True):  # the stages after the copy warm-up share what it left
            tc = plan_steps(tc, s.train_seconds - tr["copy_seconds"], device, corpus)
            st["train_config"], tr["planned"] = dataclasses.asdict(tc), True
            work.save()
            recipe = stages(tc)
            stage, total, lr = recipe[tr["stage"]]

        def checkpoint(next_step, opt, stage_i=tr["stage"]):
            last["opt"] = opt
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state()}, ck_path + ".tmp")
            os.replace(ck_path + ".tmp", ck_path)
            tr["stage"], tr["step"] = stage_i, next_step
            work.save()

        t = time.perf_counter()
        if stage == "copy" and tr["step"] >= total:  # the stage is done: its reach extension (copy_reach_nats)
            ext = tr.setdefault("copy_extension", {})

            def ext_checkpoint(_next_step, opt):  # the extension's position lives in ``ext``, the stage's stays
                checkpoint(total, opt)

            finished, opt_state = extend_copy(model, corpus, tc, gen, ext, opt_state, deadline=work.deadline(30),
                                              checkpoint=ext_checkpoint, progress=False)
            tr["copy_seconds"] += time.perf_counter() - t
            phases = ["stage's text"] + [f"{n} symbols" for n in tc.copy_reach_alphabets]
            print("[testbed] copy reach (copied NLL over the longest copy windows, before each extension block and "
                  "after the last): " + "; ".join(f"{name}: " + ", ".join(f"{x:.3f}" for x in r)
                                                   for name, r in zip(phases, ext["reach"])), flush=True)
            if not finished:
                work.save()
                print("[testbed] training: copy extension cut by the budget; resume to continue", flush=True)
                return False
        else:
            log = run_stage(model, corpus, stage, total, lr, tc, gen, deadline=work.deadline(30),
                            start_step=tr["step"], opt_state=opt_state, checkpoint=checkpoint,
                            checkpoint_every_s=checkpoint_every, progress=False)
            tr["logs"].append({k: log[k] for k in ("stage", "start_step", "steps_done", "seconds", "curve")})
            if stage == "copy":
                tr["copy_seconds"] += log["seconds"]
            if tr["step"] < total:
                work.save()
                print(f"[testbed] training: {stage} at step {tr['step']}/{total}; resume to continue", flush=True)
                return False
            if stage == "copy" and tc.copy_reach_nats is not None:
                opt_state = last["opt"].state_dict()
                continue  # the reach check and extension, resumable, next time round
        if stage == "copy":  # did copying form? known a few minutes in, not after the whole training
            tr["copy_probe_after_copy_stage"] = probe_copy(model, s, load_corpus("test"), device,
                                                           "after the copy warm-up, dense", dense=True)
        tr["stage"], tr["step"], opt_state = tr["stage"] + 1, 0, None
        # the next stage starts with a fresh optimizer: drop the finished stage's state from the checkpoint
        torch.save({"model": model.state_dict(), "opt": None, "gen": gen.get_state()}, ck_path)
        work.save()
    # bf16 on disk: 9 MB, small enough to keep as a fixture so that later pieces (and sessions) need not retrain;
    # every row, probe and distillation loads these same rounded weights
    save_checkpoint(model, os.path.join(work.path, "model"), dtype=torch.bfloat16, extra_config={
        "tokenizer": ByteTokenizer.description(),
        "training": {"recipe": " -> ".join(name for name, _, _ in recipe) + "; stdlib corpus mixed with synthetic "
                               "retrieval tasks (tools/tasks.py)", "train_config": st["train_config"],
                     "copy_extension": tr.get("copy_extension")}})
    return True


def _train_config(st: dict) -> TrainConfig:
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in st["train_config"].items()})


def probe_copy(model, s: Settings, test, device, when: str, dense: bool = False) -> dict:
    """The copy probe (tools/probe.py), printed; the smoke run's 256-token context gets a small one. ``dense``
    before the indexers are trained (their top-k would hide the copy's source at random)."""
    full_size = s.eval_context >= 1024
    res = copy_probe(model, test, length=1024 if full_size else s.eval_context,
                     distances=(64, 300, 800) if full_size else (32,), span=32 if full_size else 8, cue=2,
                     device=device, dense=dense)
    print(f"[testbed] copy probe ({when}): {res['nll']:.3f} nats per copied byte (cannot copy: >= {res['chance']:.3f})",
          flush=True)
    return res


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ----- patterns ------------------------------------------------------------------------------------------------------
def fr_pattern(n: int, cost: float, context: int, pool: int) -> IndexPattern:
    """The F/R pattern with the most F layers whose indexer cost (F: 1, R: pool/context of a layer) is at most
    ``cost`` of full DSA; F layers spread evenly (layer 0 first), the others R."""
    r = min(pool, context) / context
    fits = [f for f in range(1, n + 1) if (f + (n - f) * r) / n <= cost + 1e-9]
    n_full = max(fits, default=1)
    full = {round(i * n / n_full) for i in range(n_full)}
    return IndexPattern("".join("F" if i in full else "R" for i in range(n)), pool=pool)


def greedy_fr_pattern(greedy: str, pool: int) -> IndexPattern:
    """The greedy search's F layers (its pattern with that many F), every other layer R instead of S: where the
    F layers sit matters (a layer whose top-k no other layer shares cannot re-rank another's pool)."""
    return IndexPattern(greedy.replace("S", "R"), pool=pool)


def evaluate_row(path, pattern, s: Settings, test, device) -> dict:
    model = load_model(path, device=device)
    p = model.resolve_pattern(pattern)
    res = {"pattern": str(p), "num_full": p.num_full, "num_rerank": p.num_rerank, "pool": p.pool,
           "indexer_cost": p.indexer_cost(s.eval_context, p.pool or 4 * model.config.index_topk)}
    res["heldout"] = heldout_loss(model, test, s.eval_context, s.heldout_windows, p, s.eval_batch, device)
    res["suite"] = ruler_suite(model, p, test=test, lengths=s.suite_lengths, n_per_task=s.suite_n,
                               tasks=s.suite_tasks, batch=s.eval_batch, device=device, progress=False)
    return res


def run(args) -> int:
    if not 0 < args.budget <= 600:
        raise SystemExit(f"--budget must be in (0, 600] seconds (one device piece), got {args.budget}")
    if os.path.exists(os.path.join(args.work_dir, "state.json")) and not args.resume:
        raise SystemExit(f"{args.work_dir} holds a testbed run: pass --resume to continue it (or a new --work-dir)")
    os.makedirs(args.work_dir, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        # evaluation runs the model in fp32: TF32 matmuls make it several times faster; every row shares it
        torch.set_float32_matmul_precision("high")
    s = settings(args)
    work = Work(args.work_dir, args.budget, s.guesses)
    work.state.setdefault("meta", run_metadata())
    work.state["smoke"] = bool(args.smoke)
    work.state["fp32_matmul_precision"] = torch.get_float32_matmul_precision()
    try:
        return _run(args, s, work, device)
    finally:
        _copy_out(args.work_dir)


def _copy_out(work_dir: str) -> None:
    """State and results into $OUT (when set) after every piece: a lost machine keeps what was finished."""
    out = os.environ.get("OUT")
    if not out or os.path.abspath(out) == os.path.abspath(work_dir):
        return
    import shutil
    for name in ("state.json", "testbed.json", "testbed_table.md", "testbed_overlap.png"):
        if os.path.exists(os.path.join(work_dir, name)):
            shutil.copy(os.path.join(work_dir, name), os.path.join(out, name))
    for name in ("config.json", "model.safetensors"):  # the trained model (9 MB): later pieces can start from it
        if os.path.exists(os.path.join(work_dir, "model", name)):
            shutil.copy(os.path.join(work_dir, "model", name), os.path.join(out, "model_" + name))


def _run(args, s: Settings, work: Work, device) -> int:
    corpus = load_corpus("train", max_bytes=s.tc.max_train_bytes)
    if "trained" not in work.state["done"]:
        if not train_piece(work, s, device, corpus, args.checkpoint_every):
            return 3
        work.state["done"]["trained"] = True
        work.save()
    # the search's calibration windows and distillation draw the mix the model was trained on, whatever the preset
    # says now (a resumed state keeps its own)
    s = dataclasses.replace(s, tc=_train_config(work.state))
    model_dir = os.path.join(args.work_dir, "model")
    test = load_corpus("test")
    model = load_model(model_dir, device=device)
    N, k = model.config.num_layers, model.config.index_topk
    pool = args.pool or 4 * k

    def overlap():
        ov = model_overlap(model, [w[None].to(device) for w in test.sequential_windows(s.eval_context, 2)])
        write_heatmap_png(ov, os.path.join(args.work_dir, "testbed_overlap.png"))
        return {"matrix": ov.tolist(), "adjacent_mean": float(sum(ov[i, i + 1] for i in range(N - 1)) / (N - 1))}

    def fr_for(num_full):  # the F/R pattern at the indexer cost of ``num_full`` F layers
        return fr_pattern(N, num_full / N, s.eval_context, pool)

    def calibration():
        g = torch.Generator().manual_seed(1)
        return list(s.tc.training_windows(corpus, s.calib_seqs, s.eval_context + 1, g).to(device).split(1))

    def search():
        # down to the fewest F layers a row takes: keep ratios' and their F/R patterns' (greedy F/R rows)
        fewest = [IndexPattern.keep(N, f).num_full for f in s.keeps]
        fewest += [n for n in (fr_for(k).num_full for k in fewest) if n > 1]
        return greedy_search(model, calibration(), N - min(fewest), progress=False).to_json()

    # F/R patterns at each keep ratio's cost with more than one F layer (one is the evenly spread row): a greedy
    # search whose steps may make a layer S or R, down to the fewest F layers of those
    fr_full = {f: fr_for(IndexPattern.keep(N, f).num_full).num_full for f in sorted(s.keeps, key=_priority)}
    fr_full = {f: n for f, n in fr_full.items() if n > 1}

    def search_fr():
        target = N - min(fr_full.values())
        return greedy_search(model, calibration(), target, progress=False, max_rerank=target, pool=pool).to_json()

    def probe():
        return probe_copy(model, s, test, device, "trained model")

    # the copy probe and full DSA first: the first signs of whether the model can retrieve at all
    if not (work.unit("probe: copy", probe) and work.unit("overlap", overlap)
            and work.unit("row: full DSA", lambda: evaluate_row(model_dir, None, s, test, device))
            and work.unit("search", search)):
        return 3
    by_full = work.state["done"]["search"]["patterns_by_num_full"]
    units = []  # (name, pattern, distil first?) in priority order: a short run has the headline ratio whole
    for j, f in enumerate(sorted(s.keeps, key=_priority)):
        u = IndexPattern.keep(N, f)
        fr = fr_for(u.num_full)
        units += [(f"uniform {f}", str(u), False), (f"greedy {f}", by_full[str(u.num_full)], False),
                  (f"F/R at the cost of {f}", fr, False)]
        if str(fr.num_full) in by_full and fr.num_full > 1:  # with layer 0 the only F it is the row above
            units.append((f"greedy F/R at the cost of {f}", greedy_fr_pattern(by_full[str(fr.num_full)], pool), False))
        units.append((f"distilled uniform {f}", u, True))
        if j == 0:  # the control right after the headline ratio: it tells distillation from extra training
            units.append(("DSA + same extra steps", IndexPattern.all_full(N), True))
    for name, pattern, distilled in units:
        if not distilled:
            if not work.unit(f"row: {name}", lambda: evaluate_row(model_dir, pattern, s, test, device)):
                return 3
            continue
        out = os.path.join(args.work_dir, "distill_" + name.replace(" ", "_").replace("/", "_"))

        def do_distill(pat=pattern, out=out):
            _, log = distill(model_dir, str(pat), out, warmup_steps=s.distill_steps[0], sparse_steps=s.distill_steps[1],
                             batch=s.tc.batch, context=s.tc.context, device=device, time_budget_s=work.left() - 20,
                             max_train_bytes=s.tc.max_train_bytes, task_ratio=s.tc.task_ratio,
                             tasks_packed=s.tc.tasks_packed,
                             task_tokens_per_episode=s.tc.task_tokens_per_episode, task_share=s.tc.task_share,
                             index_rows=s.tc.index_rows, task_weights=s.tc.task_weights, progress=False)
            return {"pattern": log["pattern"], "seconds": log["seconds"],
                    "steps_done": {x["stage"]: x["steps_done"] for x in log["stages"]}}

        if not (work.unit(f"distill: {name}", do_distill)
                and work.unit(f"row: {name}", lambda: evaluate_row(out, None, s, test, device))):
            return 3
    if fr_full and not work.unit("search F/S/R", search_fr):
        return 3
    for f, n in fr_full.items():
        searched = IndexPattern(work.state["done"]["search F/S/R"]["patterns_by_num_full"][str(n)], pool=pool)
        if not work.unit(f"row: searched F/S/R at the cost of {f}",
                         lambda: evaluate_row(model_dir, searched, s, test, device)):
            return 3
    table = markdown_table(work.state)
    with open(os.path.join(args.work_dir, "testbed_table.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.work_dir, "testbed.json"), "w") as f:
        json.dump(work.state, f, indent=1, default=str)
    if args.update_docs:
        update_docs(args.docs, table)
    print(table)
    print("testbed complete")
    return 0


def _priority(keep: str) -> int:
    return PRIORITY.index(keep) if keep in PRIORITY else len(PRIORITY)


def _table_order(name: str) -> tuple:
    """Rows by keep ratio (1/2, 1/4, 1/8), the same kinds in the same order within each; full DSA first."""
    keep = name.split()[-1]
    kinds = ("uniform", "greedy", "F/R", "greedy F/R", "searched F/S/R", "distilled")
    matches = [k for k in kinds if name.startswith(k)]  # the longest: "greedy F/R" before "greedy"
    return (KEEPS.index(keep) if keep in KEEPS else (-1 if name == "full DSA" else len(KEEPS)),
            kinds.index(max(matches, key=len)) if matches else len(kinds))


def markdown_table(state: dict) -> str:
    rows = sorted(((k[len("row: "):], v) for k, v in state["done"].items() if k.startswith("row: ")),
                  key=lambda r: _table_order(r[0]))
    if not rows:
        return ""
    lengths = [str(L) for L in rows[0][1]["suite"]["lengths"]]
    head = ["config", "pattern", "#F", "#R", "indexer cost", "held-out loss", "bits/byte"] + \
        [f"retrieval@{L}" for L in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows:
        cells = [name, f"`{r['pattern']}`", str(r["num_full"]), str(r["num_rerank"]), f"{r['indexer_cost']:.3f}",
                 f"{r['heldout']['loss']:.4f}", f"{r['heldout']['bits_per_byte']:.4f}"]
        cells += [f"{r['suite']['mean_by_length'][L]:.3f}" for L in lengths]
        lines.append("| " + " | ".join(cells) + " |")
    n = rows[0][1]["suite"]["n_per_task"]
    lines.append(f"\nretrieval: exact match, mean over tasks ({', '.join(rows[0][1]['suite']['tasks'])}), "
                 f"{n} held-out items per task and length\n")
    return "\n".join(lines)


def update_docs(path: str, table: str) -> None:
    text = open(path).read()
    block = f"{DOCS_START}\n{table}{DOCS_END}"
    if DOCS_START in text and DOCS_END in text:
        text = text[: text.index(DOCS_START)] + block + text[text.index(DOCS_END) + len(DOCS_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote the table into {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", default="runs/testbed")
    ap.add_argument("--budget", type=float, default=570, help="seconds for this piece (<= 600)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --work-dir")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: the whole pipeline in seconds on a CPU")
    ap.add_argument("--device")
    ap.add_argument("--train-seconds", type=float, default=1080, help="total training time (fixed on first piece)")
    ap.add_argument("--checkpoint-every", type=float, default=150, help="seconds between training checkpoints")
    ap.add_argument("--suite-lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--suite-n", type=int, default=16, help="held-out items per task and length")
    ap.add_argument("--distill-warmup", type=int, default=100)
    ap.add_argument("--distill-sparse", type=int, default=200)
    ap.add_argument("--pool", type=int, help="candidate pool of F layers for R layers (default 4 x top-k)")
    ap.add_argument("--update-docs", action="store_true", help="write the table into --docs between markers")
    ap.add_argument("--docs", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                   "docs", "quality.md"))
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
