"""The README's Serve section runs as written: its server command (on a free port instead of 8000), its curl line
and its openai client snippet."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

from .fixtures import REPO, ServerProcess


def serve_section() -> tuple[list[str], list[str]]:
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = text[text.index("## Serve\n"):]
    section = section[:section.index("\n## ", 1)]
    sh = [b.replace("\\\n", " ") for b in re.findall(r"```sh\n(.*?)```", section, re.S)]
    py = re.findall(r"```python\n(.*?)```", section, re.S)
    return sh, py


def test_readme_serve_commands(tmp_path):
    sh, py = serve_section()
    assert len(sh) == 2 and len(py) == 1
    words = shlex.split(sh[0].splitlines()[0])
    assert words[:4] == [".venv/bin/python", "-m", "indexcache", "serve"] and words[-2:] == ["--port", "8000"]
    server = ServerProcess(words[4], str(tmp_path / "readme.log"), *words[5:-2])
    try:
        server.wait_ready()
        port = str(server.port)
        if shutil.which("curl"):
            curl = sh[1].strip().replace("8000", port)
            out = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=60, check=True).stdout
            body = json.loads(out)
            assert body["usage"]["completion_tokens"] >= 1 and body["choices"][0]["text"]
        code = py[0].replace("8000", port)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.strip(), r.stderr[-2000:]
    finally:
        server.stop()
