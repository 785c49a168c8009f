"""Synthetic long-range retrieval tasks written into Python code, for training and for the RULER-style eval suite.

Every item is ``<bos>`` + code + a query, followed by the answer the model must produce; the filler between the
facts and the query is stdlib code (a corpus split), so the model has to fetch the answer from thousands of tokens
back. Tasks (byte tokens; names are random identifiers with a hex tag, values random integers):

- ``passkey``: ``# the passkey is 48213`` early, ``# the passkey is `` at the end;
- ``kv_single`` (single needle): ``TABLE_x = {"key_ab12": 73914}`` early, ``assert TABLE_x["key_ab12"] == ``;
- ``kv_multikey``: one dict literal with 8 keys early, a lookup of one of them at the end;
- ``needle_multi`` (multi needle): 4 assignments ``NAME_i = value_i`` at random depths, the query asks for one;
- ``kv_multivalue``: ``REG_x["key"].append(v)`` at 3 depths, ``assert REG_x["key"] == [`` -> ``v1, v2, v3]``;
- ``vartrack`` (variable tracking): ``a = 48213`` then ``b = a``, ``c = b`` at later depths, ``assert c == ``.

Items are deterministic in (split, seed, task, length, index). Training seeds are below ``HELDOUT_SEED_BASE`` and
held-out seeds at or above it (and held-out filler comes from the held-out corpus split), so no evaluated item
is ever a training item.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .corpus import ByteTokenizer, Corpus

TASKS = ("passkey", "kv_single", "kv_multikey", "needle_multi", "kv_multivalue", "vartrack")
HELDOUT_SEED_BASE = 1 << 40  # items with seed >= this are held out; training draws seeds below it
LEAD_FRACTION = 0.15         # facts are written in the first 15% of the item (at the latest)


@dataclass
class TaskItem:
    task: str
    length: int
    prompt: list[int]  # <bos> + code + query: the model reads this
    answer: bytes      # ... and must continue with exactly these bytes

    def ids(self) -> torch.Tensor:
        """prompt + answer as int64 [length]."""
        return torch.tensor(self.prompt + list(self.answer), dtype=torch.long)


def _name(rng: random.Random, prefix: str, names: list[str]) -> str:
    names.append(f"{prefix}_{rng.getrandbits(32):08x}")
    return names[-1]


def _value(rng: random.Random) -> str:
    return str(rng.randint(10_000, 9_999_999))


def _facts(task: str, rng: random.Random, names: list[str]) -> tuple[list[bytes], bytes, bytes]:
    """(fact lines in order, query, answer); the names used are appended to ``names``. Fact lines end with a
    newline."""
    if task == "passkey":
        v = _value(rng)
        return [f"# the passkey is {v}. Remember it.\n".encode()], b"\n# the passkey is ", v.encode()
    if task == "kv_single":
        t, k, v = _name(rng, "TABLE", names), _name(rng, "key", names), _value(rng)
        return [f'{t} = {{"{k}": {v}}}\n'.encode()], f'\nassert {t}["{k}"] == '.encode(), v.encode()
    if task == "kv_multikey":
        t = _name(rng, "TABLE", names)
        pairs = [(_name(rng, "key", names), _value(rng)) for _ in range(8)]
        body = ", ".join(f'"{k}": {v}' for k, v in pairs)
        k, v = pairs[rng.randrange(len(pairs))]
        return [f"{t} = {{{body}}}\n".encode()], f'\nassert {t}["{k}"] == '.encode(), v.encode()
    if task == "needle_multi":
        pairs = [(_name(rng, "NEEDLE", names), _value(rng)) for _ in range(4)]
        k, v = pairs[rng.randrange(len(pairs))]
        return [f"{n} = {x}\n".encode() for n, x in pairs], f"\nassert {k} == ".encode(), v.encode()
    if task == "kv_multivalue":
        r, k = _name(rng, "REG", names), _name(rng, "key", names)
        vals = [_value(rng) for _ in range(3)]
        lines = [f'{r} = {{"{k}": []}}\n{r}["{k}"].append({vals[0]})\n'.encode()]
        lines += [f'{r}["{k}"].append({v})\n'.encode() for v in vals[1:]]
        return lines, f'\nassert {r}["{k}"] == ['.encode(), (", ".join(vals) + "]").encode()
    if task == "vartrack":
        names = [_name(rng, "var", names) for _ in range(3)]
        v = _value(rng)
        lines = [f"{names[0]} = {v}\n".encode()] + [f"{b} = {a}\n".encode() for a, b in zip(names, names[1:])]
        return lines, f"\nassert {names[-1]} == ".encode(), v.encode()
    raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")


def _filler(corpus: Corpus, n: int, rng: random.Random, avoid: list[bytes]) -> bytes:
    """``n`` bytes of the corpus stream from a random offset, starting after a newline; files are separated by a
    newline (EOS would tell the model a file ended). Redrawn if it happens to contain a fact's name."""
    toks = corpus.tokens
    for _ in range(20):
        start = rng.randrange(0, max(1, len(corpus) - 2 * n - 200))
        window = toks[start: start + n + 200].tolist()
        raw = bytes(10 if t >= 256 else t for t in window)
        cut = raw.find(b"\n") + 1
        chunk = raw[cut: cut + n]
        if len(chunk) == n and not any(a in chunk for a in avoid):
            return chunk
    raise ValueError(f"could not draw {n} filler bytes free of the task's names from corpus split {corpus.split!r}")


def make_item(corpus: Corpus, task: str, length: int, seed: int, index: int) -> TaskItem:
    """One item of exactly ``length`` tokens (prompt + answer), deterministic in its arguments."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 256:
        raise ValueError(f"task length must be an integer >= 256 tokens, got {length!r}")
    rng = random.Random(f"{corpus.split}:{seed}:{task}:{length}:{index}")
    names: list[str] = []
    facts, query, answer = _facts(task, rng, names)
    room = length - 1 - len(query) - len(answer) - sum(len(f) for f in facts)
    if room < 64:
        raise ValueError(f"task {task!r} needs more than {length} tokens")
    # depths: the first fact within the lead, the others spread over the rest (before the query)
    first = rng.randrange(0, max(1, int(LEAD_FRACTION * room)))
    later = sorted(rng.randrange(first, room) for _ in facts[1:])
    cuts = [first] + later + [room]
    text = _filler(corpus, room, rng, [n.encode() for n in names])
    # each fact starts a line: it goes in at the last line start at or before its cut
    body, prev = b"", 0
    for f, c in zip(facts, cuts):
        at = text.rfind(b"\n", 0, c) + 1
        body += text[prev:at] + f
        prev = at
    body += text[prev:]
    prompt = [ByteTokenizer.BOS] + list(body) + list(query)
    assert len(prompt) + len(answer) == length
    return TaskItem(task, length, prompt, answer)


PACKED_TOKENS_PER_EPISODE = 256  # a packed training window holds one episode per this many tokens


def task_weights_for(tasks, weights) -> list[float] | None:
    """Per-task draw weights aligned with ``tasks`` from ``weights`` (a mapping or (task, weight) pairs; a task
    not named gets 0), or None for ``weights`` None (every task alike). Raises on unknown tasks, negative
    weights, or no positive weight left among ``tasks``."""
    if weights is None:
        return None
    pairs = dict(weights.items() if isinstance(weights, dict) else (tuple(p) for p in weights))
    bad = [t for t in pairs if t not in TASKS]
    if bad:
        raise ValueError(f"task weights name unknown tasks {bad!r}; tasks are {TASKS}")
    neg = {t: w for t, w in pairs.items() if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0}
    if neg:
        raise ValueError(f"task weights must be numbers >= 0, got {neg!r}")
    out = [float(pairs.get(t, 0.0)) for t in tasks]
    if not sum(out) > 0:
        raise ValueError(f"task weights {pairs!r} give no positive weight to any of the tasks {tuple(tasks)!r}")
    return out


def packed_window(corpus: Corpus, length: int, seed: int, tasks=TASKS,
                  tokens_per_episode: int = PACKED_TOKENS_PER_EPISODE, task_share: float = 0.5,
                  weights=None) -> torch.Tensor:
    """A training window int64 [length] packed with many episodes (facts, then later the query and its answer and a
    newline) at random depths: about one answer per ``tokens_per_episode`` tokens (at most ``task_share`` of the
    window is task text, the rest corpus code), where a single item has one per window, so the
    retrieval signal is dense enough for a small model to learn from in minutes. Query-to-fact distances are spread
    over the whole window. ``weights`` (``task_weights_for``): each episode's task drawn with these weights
    instead of alike. Deterministic in (split, seed, length, weights)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 256:
        raise ValueError(f"packed window length must be an integer >= 256 tokens, got {length!r}")
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"unknown retrieval tasks {bad or tasks!r}; tasks are {TASKS}")
    if isinstance(tokens_per_episode, bool) or not isinstance(tokens_per_episode, int) or tokens_per_episode < 16:
        raise ValueError(f"tokens per episode must be an integer >= 16, got {tokens_per_episode!r}")
    if not 0.0 < task_share < 1.0:
        raise ValueError(f"task share of a packed window must be in (0, 1), got {task_share!r}")
    w = task_weights_for(tasks, weights)
    rng = random.Random(f"{corpus.split}:packed:{seed}:{length}")
    names: list[str] = []
    episodes, used, drawn = [], 0, set()
    for _ in range(max(1, length // tokens_per_episode)):
        # the passkey has no name: a second one would make both queries ambiguous
        choice = [i for i, t in enumerate(tasks) if not (t == "passkey" and t in drawn)]
        if w is not None and not any(w[i] for i in choice):
            break  # only the passkey had weight, and it is drawn
        choice = choice or list(range(len(tasks)))
        task = tasks[choice[rng.randrange(len(choice))] if w is None
                     else rng.choices(choice, weights=[w[i] for i in choice])[0]]
        drawn.add(task)
        facts, query, answer = _facts(task, rng, names)
        parts = facts + [query + answer + b"\n"]
        if used + sum(map(len, parts)) > task_share * length:
            break
        episodes.append(parts)
        used += sum(map(len, parts))
    room = length - 1 - used
    text = _filler(corpus, room, rng, [n.encode() for n in names])
    inserts = []  # (line start, depth, order within the episode, bytes): the query comes after its facts
    for parts in episodes:
        depths = sorted(rng.randrange(0, room + 1) for _ in parts)
        for j, (part, d) in enumerate(zip(parts, depths)):
            inserts.append((text.rfind(b"\n", 0, d) + 1, d, j, part))
    inserts.sort(key=lambda x: x[:3])
    body, prev = b"", 0
    for at, _, _, part in inserts:
        body += text[prev:at] + part
        prev = at
    body += text[prev:]
    ids = [ByteTokenizer.BOS] + list(body)
    assert len(ids) == length
    return torch.tensor(ids, dtype=torch.long)


def make_items(corpus: Corpus, tasks, length: int, n: int, seed: int, *, heldout: bool) -> list[TaskItem]:
    """``n`` items of each task; ``heldout`` requires a held-out seed and the held-out corpus split."""
    _check_seed(seed, heldout)
    if heldout and corpus.split != "test":
        raise ValueError(f"held-out items draw their filler from the 'test' split, got corpus split {corpus.split!r}")
    return [make_item(corpus, t, length, seed, i) for t in tasks for i in range(n)]


def _check_seed(seed: int, heldout: bool) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"task seed must be an integer >= 0, got {seed!r}")
    if heldout and seed < HELDOUT_SEED_BASE:
        raise ValueError(f"held-out task seeds start at {HELDOUT_SEED_BASE} (HELDOUT_SEED_BASE), got {seed}")
    if not heldout and seed >= HELDOUT_SEED_BASE:
        raise ValueError(f"training task seed {seed} is in the held-out range (>= {HELDOUT_SEED_BASE})")


def mixed_windows(corpus: Corpus, n: int, length: int, ratio: float, gen: torch.Generator,
                  tasks=TASKS, packed: bool = False, tokens_per_episode: int = PACKED_TOKENS_PER_EPISODE,
                  task_share: float = 0.5, weights=None) -> torch.Tensor:
    """Training windows int64 [n, length]: each row is a synthetic task item (``packed``: a window of many
    episodes, ``packed_window`` with ``tokens_per_episode`` and ``task_share``) with probability ``ratio``, else a
    random corpus window. ``ratio`` 0 draws exactly ``corpus.random_windows`` (same generator use); a packed row
    draws its task too, so packing changes no other row's draws. ``weights`` (``task_weights_for``): tasks (of a
    single item, or of each packed episode) drawn with these weights instead of alike."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"task mixing ratio must be in [0, 1], got {ratio!r}")
    if ratio == 0.0:
        return corpus.random_windows(n, length, gen)
    w = task_weights_for(tasks, weights)
    rows = corpus.random_windows(n, length, gen)
    pick = torch.rand(n, generator=gen) < ratio
    for r in pick.nonzero().flatten().tolist():
        task = tasks[int(torch.randint(0, len(tasks), (1,), generator=gen)) if w is None
                     else int(torch.multinomial(torch.tensor(w), 1, generator=gen))]
        seed = int(torch.randint(0, 1 << 31, (1,), generator=gen))
        rows[r] = (packed_window(corpus, length, seed, tasks, tokens_per_episode, task_share, weights) if packed
                   else make_item(corpus, task, length, seed, 0).ids())
    return rows


# ----- copy warm-up windows ---------------------------------------------------------------------------------------
# the random text's alphabet: with one alphabet drawn per window from letters, hex, identifier and printable
# characters, a 4-layer model did not learn to copy within 1500 steps; on letters alone it did
COPY_ALPHABET = b"abcdefghijklmnopqrstuvwxyz"
COPY_SEGMENT = 12  # bytes in the repeated segment
# the order in which ``copy_alphabet_of`` takes byte tokens: letters first (26 = COPY_ALPHABET), then the rest of
# printable ASCII, then the other bytes
_COPY_BYTE_ORDER = (COPY_ALPHABET + b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                    + bytes(b for b in range(32, 127) if not chr(b).isalnum()))
_COPY_BYTE_ORDER += bytes(b for b in range(256) if b not in _COPY_BYTE_ORDER)


def copy_alphabet_of(n: int) -> bytes:
    """An alphabet of ``n`` distinct byte tokens for copy windows: the first ``n`` of lowercase letters, uppercase
    letters, digits, the other printable ASCII characters, then the remaining bytes (26: ``COPY_ALPHABET``). With
    one matching previous token an induction head meets a false match about every ``n`` tokens; a larger alphabet
    makes single-token matches rarer."""
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= 256:
        raise ValueError(f"copy alphabet size must be an integer in [2, 256] (distinct byte tokens), got {n!r}")
    return _COPY_BYTE_ORDER[:n]


def copy_window_spans(length: int, seed: int, segment: int = COPY_SEGMENT, alphabet: bytes = COPY_ALPHABET,
                      inner: int | None = None) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """A pure copy window int64 [length]: ``<bos>`` + random lowercase letters (``COPY_ALPHABET``) in which one segment of ``segment`` bytes starting in the first half reappears once, later and not
    overlapping; its copy as [(source, destination, length)] in window positions.
    Induction (find the earlier occurrence, continue it) is the only way to predict the copy past its first bytes.
    64-token windows of letters with one copy are what a from-scratch 4-layer model learned copying from on a CPU
    in ~1500 steps; 128-token windows with two copies, or mixed alphabets, did not in as many
    (benchmarks/results/copy_warmup_cpu.log). ``inner``: the source and its copy lie in a sub-window of ``inner``
    tokens at a random offset (the copy distance of an ``inner``-token window, more tokens before it); copying
    learned on short windows alone fails once more tokens precede it (copy_length_eval_cpu.log).
    Deterministic in (seed, length, inner)."""
    if inner is not None and not 4 * segment <= inner <= length:
        raise ValueError(f"copy sub-window must be in [{4 * segment}, length={length}], got {inner!r}")
    if isinstance(segment, bool) or not isinstance(segment, int) or segment < 2:
        raise ValueError(f"copy segment length must be an integer >= 2, got {segment!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 4 * segment:
        raise ValueError(f"copy window length must be an integer >= 4 x the segment ({4 * segment}), got {length!r}")
    rng = random.Random(f"copy:{seed}:{length}")
    if len(alphabet) < 2:
        raise ValueError(f"copy alphabet needs at least 2 distinct bytes, got {alphabet!r}")
    text = [ByteTokenizer.BOS] + rng.choices(alphabet, k=length - 1)
    span = length if inner is None else inner
    off = 0 if inner is None else rng.randrange(0, length - inner + 1)  # positions off+1 .. off+span-1
    half = (span - 1) // 2
    src = off + rng.randrange(1, half - segment + 1)
    dst = rng.randrange(src + segment, off + span - segment + 1)
    text[dst: dst + segment] = text[src: src + segment]
    return torch.tensor(text, dtype=torch.long), [(src, dst, segment)]


def copy_windows(n: int, length: int, gen: torch.Generator, segment: int = COPY_SEGMENT,
                 alphabet: bytes = COPY_ALPHABET, inner: int | None = None) -> torch.Tensor:
    """``n`` copy windows int64 [n, length] (``copy_window_spans``), their seeds drawn from ``gen``."""
    seeds = torch.randint(0, 1 << 31, (n,), generator=gen).tolist()
    return torch.stack([copy_window_spans(length, s, segment, alphabet, inner)[0] for s in seeds])


COPY_GAPS = ("uniform", "log")


def copy_episode_spans(length: int, seed: int, every: int, max_gap: int, segment: int = COPY_SEGMENT,
                       alphabet: bytes = COPY_ALPHABET, gaps: str = "uniform", distract: int = 0,
                       distract_match: int = 2) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """A long copy window int64 [length]: ``<bos>`` + random letters holding (length - 1) // ``every`` copy
    episodes, each a ``segment``-byte run and, after a gap drawn uniformly from 0..``max_gap`` bytes, the same run
    again, at random places that do not overlap (episodes may nest); the copies as [(source, destination, length)]
    in source order. Short windows' copy density with copy distances spread over a long window: copying learned
    on short windows alone fails in longer ones (RoPE logits are pinned down only at the distances training
    showed), and one copy per long window is too little signal to keep it (benchmarks/results/
    copy_position_cpu.log). ``gaps`` "log": the copy distance (segment + gap) log-uniform instead, as many copies
    at 12-120 tokens as at 1.2K-12K, so a long window keeps the short distances where a copier formed on short
    windows still works. ``distract``: that many near-copies of each copied segment before its copy
    (``copy_distractor_spans``). Deterministic in (seed, length, every, max_gap, gaps, distract, distract_match)."""
    win, spans, _ = copy_distractor_spans(length, seed, every, max_gap, segment, alphabet, gaps, distract,
                                          distract_match)
    return win, spans


def copy_distractor_spans(length: int, seed: int, every: int, max_gap: int, segment: int = COPY_SEGMENT,
                          alphabet: bytes = COPY_ALPHABET, gaps: str = "uniform", distract: int = 0,
                          distract_match: int = 2) -> tuple[torch.Tensor, list, list[tuple[int, int, int]]]:
    """``copy_episode_spans`` and its distractors: (window, copies [(source, destination, length)], distractors
    [(position, source of the copy it imitates, first mutated offset)]). A distractor is a near-copy of a copied
    segment placed before its copy (between source and copy when they are at least a segment apart, else
    anywhere before the copy) in which every (``distract_match`` + 1)-th token, from a random first offset, is
    replaced by another symbol: so it holds the segment's runs of ``distract_match`` tokens, each followed by a
    wrong token, and no run of ``distract_match`` + 1. An induction head that matches only the last
    ``distract_match`` tokens finds a false match there at every mutated offset; one matching one more token
    does not. Random letters alone hold a 2-token look-alike only every ~676 tokens (26 letters), too rare to
    teach a copier to look further back than 2 tokens (benchmarks/results/copy_reach_cpu.log).
    The copies are those of ``distract`` 0 (the distractors are placed after them, over random text, as room
    allows; a crowded window gets fewer), and ``distract`` 0 draws exactly ``copy_episode_spans``'s windows."""
    if isinstance(distract, bool) or not isinstance(distract, int) or distract < 0:
        raise ValueError(f"copy distractors per copy must be an integer >= 0, got {distract!r}")
    if isinstance(distract_match, bool) or not isinstance(distract_match, int) \
            or not 1 <= distract_match < segment - 1:
        raise ValueError(f"copy distractors' matched run must be an integer in [1, segment - 2 = {segment - 2}], "
                         f"got {distract_match!r}")
    if gaps not in COPY_GAPS:
        raise ValueError(f"copy gaps must be one of {COPY_GAPS}, got {gaps!r}")
    if isinstance(segment, bool) or not isinstance(segment, int) or segment < 2:
        raise ValueError(f"copy segment length must be an integer >= 2, got {segment!r}")
    if not isinstance(length, int) or not isinstance(every, int) or not 2 * segment <= every < length:
        raise ValueError(f"copy episodes need 2 x segment ({2 * segment}) <= every < length, got every {every!r}, "
                         f"length {length!r}")
    if not isinstance(max_gap, int) or not 0 <= max_gap <= length - 1 - 2 * segment:
        raise ValueError(f"copy episodes' max gap must be an integer in [0, length - 1 - 2 x segment = "
                         f"{length - 1 - 2 * segment}], got {max_gap!r}")
    if len(alphabet) < 2:
        raise ValueError(f"copy alphabet needs at least 2 distinct bytes, got {alphabet!r}")
    rng = random.Random(f"copy-episodes:{seed}:{length}:{every}:{max_gap}" + ("" if gaps == "uniform" else ":log"))
    text = [ByteTokenizer.BOS] + rng.choices(alphabet, k=length - 1)
    used = [False] * length
    spans, distractors = [], []
    for _ in range((length - 1) // every):
        for _try in range(50):  # a place whose run and copy are both still free (gives up on a crowded window)
            gap = (rng.randint(0, max_gap) if gaps == "uniform"
                   else min(max_gap, int(segment * ((segment + max_gap + 1) / segment) ** rng.random()) - segment))
            src = rng.randint(1, length - 2 * segment - gap)
            dst = src + segment + gap
            if not any(used[src: src + segment]) and not any(used[dst: dst + segment]):
                break
        else:
            continue
        used[src: src + segment] = used[dst: dst + segment] = [True] * segment
        text[dst: dst + segment] = text[src: src + segment]
        spans.append((src, dst, segment))
    for src, dst, _ in spans if distract else ():  # the copies first: they are those of distract 0
        for _ in range(distract):
            # between source and copy when there is room, else anywhere before the copy
            lo = src + segment if dst - src >= 2 * segment else 1
            for _try in range(50):
                at = rng.randint(lo, dst - segment)
                if not any(used[at: at + segment]):
                    break
            else:
                continue
            first = rng.randrange(distract_match + 1)
            for i in range(segment):
                keep = text[src + i]
                text[at + i] = (keep if (i - first) % (distract_match + 1)
                                else rng.choice([b for b in alphabet if b != keep]))
            used[at: at + segment] = [True] * segment
            distractors.append((at, src, first))
    return torch.tensor(text, dtype=torch.long), sorted(spans), sorted(distractors)


def copy_episode_windows(n: int, length: int, gen: torch.Generator, every: int, max_gap: int,
                         segment: int = COPY_SEGMENT, alphabet: bytes = COPY_ALPHABET,
                         gaps: str = "uniform", distract: int = 0, distract_match: int = 2) -> torch.Tensor:
    """``n`` long copy windows int64 [n, length] (``copy_episode_spans``), their seeds drawn from ``gen``."""
    seeds = torch.randint(0, 1 << 31, (n,), generator=gen).tolist()
    return torch.stack([copy_episode_spans(length, s, every, max_gap, segment, alphabet, gaps, distract,
                                           distract_match)[0] for s in seeds])
