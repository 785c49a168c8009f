"""A tiny servable checkpoint (random weights + a real BPE tokenizer with a chat template) and a server process."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPECIALS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SYLLABLES = "ka to ri me su na lo pe vi da ge shu mor tel an is ol ex".split()
API_KEY = "test-key-123"


def corpus(n_sentences: int = 600, seed: int = 0) -> list[str]:
    """A few KB of sentences over ~400 made-up words."""
    rng = random.Random(seed)
    words = sorted({"".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(500)})
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))).capitalize() + rng.choice(".?!")
            for _ in range(n_sentences)]


def build_tokenizer(path: str, vocab_size: int = 512) -> int:
    """A character BPE (SentencePiece-style spaces) trained on ``corpus()``, as large as the tiny model's
    vocabulary, so every id the random model samples decodes to plain text; returns the eos id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"the fixture tokenizer has {tok.get_vocab_size()} tokens, not {vocab_size}")
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}, f)
    return tok.token_to_id("<|endoftext|>")


def build_checkpoint(path: str) -> str:
    """The tiny preset (random weights, vocabulary 512) with the tokenizer above."""
    from indexcache.checkpoint import build_empty, save_checkpoint
    from indexcache.presets import preset_config

    os.makedirs(path, exist_ok=True)
    eos = build_tokenizer(path)
    model = build_empty(preset_config("tiny"), "cpu", torch.float32).init_random(0)
    save_checkpoint(model, path, extra_config={"eos_token_id": eos})
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m indexcache serve`` on 127.0.0.1 and a free port; always ended by ``stop()``."""

    def __init__(self, model: str, log_path: str, *args: str, api_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("INDEXCACHE_API_KEY", None)
        if api_key:
            env["INDEXCACHE_API_KEY"] = api_key  # through the environment, as a deployment would
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "indexcache", "serve", model, "--port", str(self.port),
                                      "--log-level", "warning", *args], cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> "ServerProcess":
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the server did not become healthy in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def metrics(url: str, api_key: str | None = API_KEY) -> dict[str, float]:
    """The /metrics gauges and counters as {name: value} (labels dropped; histograms skipped)."""
    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or "_bucket" in line:
            continue
        full, value = line.rsplit(" ", 1)
        name = full.split("{")[0]
        out[name] = out.get(name, 0.0) + float(value)
        if "finished_reason=" in full:  # per reason too: request_success_total[abort]
            reason = full.split('finished_reason="')[1].split('"')[0]
            out[f"{name}[{reason}]"] = float(value)
    return out
