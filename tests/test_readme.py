"""Every command printed in README.md runs here, so the README cannot drift from the code.

Commands come from the README's ```bash blocks (one per line, ``&&`` chains split, ``#`` comments dropped). Each
is run as written, from a scratch folder that links the clone's ``tests/`` and ``benchmarks/`` (so relative paths
resolve and output files land outside the source tree). How each kind of command runs is spelled out in
``_run_part``; a command no rule covers fails the test. The only stand-ins, each checked:

- ``indexcache ARGS`` and ``.venv/bin/indexcache ARGS`` run as ``indexcache.cli.main(ARGS)`` in this process: that
  is the console script's entry point (checked against pyproject.toml), without a new interpreter per command.
- ``python -m benchmarks.MOD ARGS`` with ``--device cpu`` runs as ``benchmarks.MOD.main(ARGS)`` in this process.
  Without ``--device cpu`` it is a GPU command: on a machine without a GPU it must refuse within a second with a
  clear message (a real subprocess, timed); on a GPU machine benchmarks/gpu_run.sh runs it, not this test.
- ``bash scripts/bootstrap.sh`` runs for real when this interpreter is the clone's ``.venv`` (CI) and must then be a
  quiet no-op; elsewhere only its syntax is checked. ``.venv/bin/python -m pytest -q`` is this very suite: the
  test checks that CI (.ci/run) runs exactly that command.

Commands that take minutes on a CPU (``LONG``) must run without an error until the time limit stops them (their
arguments parse, the model and corpus load and the work starts); the others must finish with status 0.
tests/tools/ runs those tools to the end at small sizes.
"""
import importlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
LONG = {"search", "distill", "eval", "train"}  # indexcache subcommands that run for minutes on a CPU
LONG_LIMIT_S = 4.0
LIMIT_S = 180.0  # generous: the machine may be shared; on an idle 2-core machine every command takes seconds


def readme_commands() -> list[list[list[str]]]:
    """Each README command line as its ``&&``-separated parts, each part a list of words (quotes resolved)."""
    text = open(README, encoding="utf-8").read()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                parts, cur = [], []
                for w in words + ["&&"]:
                    if w == "&&":
                        parts.append(cur)
                        cur = []
                    else:
                        cur.append(w)
                out.append(parts)
    return out


def test_readme_has_its_commands_in_bash_blocks():
    cmds = [" && ".join(shlex.join(p) for p in parts) for parts in readme_commands()]
    assert "bash scripts/bootstrap.sh && .venv/bin/indexcache demo" in cmds
    assert "bash scripts/bootstrap.sh && .venv/bin/python -m pytest -q" in cmds
    assert len(cmds) >= 10
    prose = re.sub(r"```.*?```", "", open(README, encoding="utf-8").read(), flags=re.S)
    inline = [c for c in re.findall(r"`([^`\n]+)`", prose) if c.startswith("indexcache ")]
    assert not inline, f"indexcache commands in prose are not run by this test; put them in a bash block: {inline}"


class _TimeLimit(BaseException):
    """Raised in the main thread by SIGALRM; a BaseException so that no ``except Exception`` swallows it."""


def _in_process(fn, argv, limit_s):
    """(status, seconds, stopped_by_limit) of fn(argv); SystemExit gives the status (argparse --help, errors)."""
    def on_alarm(*_):
        raise _TimeLimit

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    t0 = time.perf_counter()
    try:
        rc = fn(argv)
    except SystemExit as e:
        rc = e.code or 0
    except _TimeLimit:
        return None, time.perf_counter() - t0, True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return rc, time.perf_counter() - t0, False


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_part(words: list[str], cwd: str, capsys) -> str:
    """Run one command of the README (see the module docstring); returns a one-line account, fails on error."""
    part = shlex.join(words)
    if words == ["bash", "scripts/bootstrap.sh"]:
        in_clone_venv = os.path.realpath(sys.prefix) == os.path.realpath(os.path.join(ROOT, ".venv"))
        if not in_clone_venv:
            subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", "bootstrap.sh")], check=True)
            return "syntax checked (this interpreter is not the clone's .venv)"
        r = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and not r.stdout and not r.stderr, (r.stdout, r.stderr)
        return "ran: a quiet no-op on a ready .venv"
    if words == [".venv/bin/python", "-m", "pytest", "-q"]:
        assert part in open(os.path.join(ROOT, ".ci", "run")).read()
        return "this suite: CI runs exactly this command"
    if words[0] in ("indexcache", ".venv/bin/indexcache"):
        from indexcache.cli import main

        pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
        assert 'indexcache = "indexcache.cli:main"' in pyproject
        long = words[1] in LONG
        rc, secs, stopped = _in_process(main, words[1:], LONG_LIMIT_S if long else LIMIT_S)
        out = capsys.readouterr()
        if stopped:
            assert long, f"{part!r} did not finish in {LIMIT_S:.0f} s"
            return f"ran {secs:.1f} s without error, then stopped by the time limit"
        assert rc == 0, f"{part!r} exited with {rc}: {out.err[-2000:]}"
        return f"status 0 in {secs:.1f} s"
    if words[:2] == ["python", "-m"] and words[2].startswith("benchmarks."):
        args = words[3:]
        if "--device" in args and args[args.index("--device") + 1] == "cpu":
            mod = importlib.import_module(words[2])
            rc, secs, stopped = _in_process(mod.main, args, LIMIT_S)
            out = capsys.readouterr()
            assert not stopped and rc == 0, f"{part!r}: {out.err[-2000:]}"
            return f"status 0 in {secs:.1f} s (CPU smoke run)"
        if _has_gpu():
            return "GPU command: benchmarks/gpu_run.sh runs it on the GPU machine"
        env = dict(os.environ, PYTHONPATH=ROOT)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable] + words[1:], cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=60)
        secs = time.perf_counter() - t0
        assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
        assert "GPU" in r.stderr and "--device cpu" in r.stderr, r.stderr
        assert secs < 1.0, f"{part!r} took {secs:.2f} s to refuse without a GPU"
        return f"refused in {secs:.2f} s without a GPU: {r.stderr.strip()[:80]}..."
    pytest.fail(f"README command {part!r} is not covered by tests/test_readme.py: add a rule for it")


def test_every_readme_command_runs(tmp_path, monkeypatch, capsys):
    for name in ("tests", "benchmarks"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    report = []
    for parts in readme_commands():
        for words in parts:
            report.append(f"{shlex.join(words)}: {_run_part(words, str(tmp_path), capsys)}")
    with capsys.disabled():
        print("\nREADME commands:\n  " + "\n  ".join(report))
