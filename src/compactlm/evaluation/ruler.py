"""RULER-syn: seeded synthetic long-context tasks and the runner that scores methods side by side.

Based on RULER (Hsieh et al., arXiv 2404.06654), §3 (NIAH variants, variable tracking, frequent-word
extraction) plus the classic passkey task, as pinned in ``../shared/PROTOCOL.md`` (RULER-syn):

- 8 tasks (:data:`TASKS`), generated offline from a seed so every method sees identical prompts;
- essay haystacks from :func:`compactlm.data.essays` (the Paul Graham essays), noise haystacks from
  RULER's "The grass is green..." filler; needle depths evenly spaced over 0-100 %;
- the prompt wrapped in the chat template with RULER's answer prefix after the generation prompt;
- score = RULER's ``string_match_all`` (fraction of expected answers found in the output), ×100.

Deviations: keys are drawn from a built-in word list (RULER uses ``wonderwords``), and the context
length counts the whole templated prompt, so a "4K" prompt holds 4,096 tokens within ±1 %.

The runner (:func:`run_ruler`) prefills each prompt once with full attention and starts every
decode-only method from a copy of that cache; methods that change prefill run their own.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..utils import progress
from .generate import eval_mode, prefill, run_method, stop_token_ids
from .methods import FULL, RuntimeMethod

TASKS = ("niah_single", "niah_essay", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "fwe", "passkey")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
WORDS = (
    "apple", "river", "candle", "forest", "marble", "violin", "harbor", "pepper", "saddle", "lantern", "meadow",
    "copper", "falcon", "garden", "hammer", "island", "jacket", "kettle", "ladder", "magnet", "needle", "orchid",
    "pencil", "quartz", "rabbit", "silver", "tunnel", "umbrella", "velvet", "walnut", "yogurt", "zipper", "anchor",
    "bishop", "cactus", "dragon", "engine", "feather", "glacier", "helmet", "igloo", "jungle", "kitten", "lemon",
    "mirror", "nutmeg", "oyster", "parrot", "quiver", "rocket", "spider", "tomato", "unicorn", "volcano", "wizard",
    "badger", "button", "canyon", "dolphin", "emerald", "fossil", "goblet", "hornet", "insect",
)
NIAH_TEMPLATE = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {kind} afterwards.\n{context}\n{question}")
LENGTHS = {"1k": 1024, "2k": 2048, "4k": 4096, "8k": 8192, "16k": 16384, "32k": 32768}


@dataclass(frozen=True)
class RulerSample:
    task: str
    length: int  # target context length in tokens
    index: int
    depth: float  # needle depth in [0, 1] (fwe: 0)
    input_ids: tuple[int, ...]  # the whole chat-templated prompt, answer prefix included
    answers: tuple[str, ...]


def parse_lengths(text: str) -> list[int]:
    """``"2k,4k"`` or ``"2048,4096"`` -> [2048, 4096]."""
    out = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        if part in LENGTHS:
            out.append(LENGTHS[part])
        elif part.isdigit() and int(part) >= 256:
            out.append(int(part))
        else:
            raise ConfigError(f"--lengths entry {part!r} is not a length: use 1k/2k/4k/8k/16k/32k or a token count "
                              "≥ 256, comma-separated, e.g. --lengths 2k,4k")
    if not out:
        raise ConfigError("--lengths is empty; e.g. --lengths 2k,4k")
    return out


def parse_sample_indices(text: str, samples: int) -> list[int]:
    """Which of a run's ``samples`` prompt indices to run: a slice ``start:stop[:step]`` or a list ``0,4,8``.

    A sample's needle depth is ``index / (samples - 1)``, so a 20-sample run split by a stride (``0::4``,
    ``1::4``, …) gives parts that each spread over every depth and together are exactly the 20-sample run;
    ``ruler_table.py --merge`` joins them.
    """
    spec = text.strip()
    try:
        if ":" in spec:
            fields = [int(f) if f.strip() else None for f in spec.split(":")]
            if len(fields) > 3:
                raise ValueError(spec)
            indices = list(range(samples))[slice(*fields)]
        else:
            indices = [int(f) for f in spec.split(",") if f.strip()]
    except ValueError:
        raise ConfigError(f"sample indices {text!r}: expected a slice like 0::4 or a list like 0,4,8") from None
    return check_sample_indices(indices, samples)


def check_sample_indices(indices, samples: int, name: str = "sample indices") -> list[int]:
    """``indices`` sorted, after checking they are distinct, in ``0..samples-1`` and not empty (``name`` in errors)."""
    indices = list(indices)
    bad = [i for i in indices if not 0 <= i < samples]
    if bad:
        raise ConfigError(f"{name} {bad} are outside 0..{samples - 1} (the run has {samples} samples)")
    if len(set(indices)) != len(indices):
        raise ConfigError(f"{name} {indices} repeat an index")
    if not indices:
        raise ConfigError(f"{name} select no sample of {samples}")
    return sorted(indices)


def check_tasks(tasks) -> tuple[str, ...]:
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ConfigError(f"unknown RULER-syn task(s) {unknown or '(none given)'}; tasks are {', '.join(TASKS)}")
    return tasks


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randint(10 ** (n - 1), 10 ** n - 1))


def _insert(text: str, items: list[tuple[float, str]]) -> str:
    """Insert each ``(depth, sentence)`` at the sentence boundary nearest ``depth`` × len(text)."""
    cuts = []
    for depth, sentence in items:
        pos = int(depth * len(text))
        if 0 < pos < len(text):
            nxt = text.find(". ", pos)
            pos = len(text) if nxt < 0 else nxt + 2
        cuts.append((min(max(pos, 0), len(text)), sentence))
    out, prev = [], 0
    for pos, sentence in sorted(cuts, key=lambda c: c[0]):
        out.append(text[prev:pos])
        out.append((" " if pos > 0 else "") + sentence.strip() + " ")
        prev = pos
    out.append(text[prev:])
    return "".join(out)


class RulerGenerator:
    """Builds :class:`RulerSample` s for one tokenizer; ``sample(task, length, index, n)`` is deterministic."""

    def __init__(self, tokenizer, seed: int = 0, chat: bool = True):
        if tokenizer is None:
            raise DataError("RULER-syn needs a tokenizer (tiny random models have none)")
        self.tok = tokenizer
        self.seed = seed
        self.chat = chat and bool(getattr(tokenizer, "chat_template", None))
        self._noise_tokens = max(1.0, len(self._ids(NOISE * 20)) / 20)  # per repetition, in context

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _wrap(self, body: str, answer_prefix: str) -> list[int]:
        if self.chat:
            text = self.tok.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True,
                                                tokenize=False)
            return self._ids(text + answer_prefix)
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        return bos + self._ids(body + "\n" + answer_prefix)

    def _haystack(self, rng: random.Random, kind: str, budget: int) -> str:
        if budget <= 0:
            return ""
        if kind == "noise":
            ids = self._ids(NOISE * (int(budget / self._noise_tokens) + 2))[:budget]
            return self.tok.decode(ids)
        from ..data.calib import tokenize_source

        ids = tokenize_source(self.tok, "essays")
        if ids.numel() <= budget:
            raise DataError(f"the essay haystack has {ids.numel()} tokens, fewer than the {budget} asked for")
        start = rng.randint(0, ids.numel() - budget)
        return self.tok.decode(ids[start: start + budget].tolist())

    def sample(self, task: str, length: int, index: int, n: int) -> RulerSample:
        check_tasks([task])
        rng = random.Random(f"ruler-syn/{self.seed}/{task}/{length}/{index}")
        depth = 0.5 if n <= 1 else index / (n - 1)
        body, prefix, answers, hay, needles = self._task(task, rng, depth)
        # Fill the haystack so the templated prompt reaches `length` tokens: measure the overhead once.
        overhead = len(self._wrap(body.format(context=" ".join(s for _, s in needles)), prefix))
        budget = length - overhead - 2
        if budget < 64:
            raise ConfigError(f"context length {length} is too short for RULER-syn task {task!r} "
                              f"(its prompt alone takes {overhead} tokens)")
        if task == "fwe":
            context, answers = self._fwe(rng, budget)
        else:
            context = _insert(self._haystack(rng, hay, budget), needles)
        ids = self._wrap(body.format(context=context), prefix)
        return RulerSample(task, length, index, depth if task != "fwe" else 0.0, tuple(ids), tuple(answers))

    def _task(self, task: str, rng: random.Random, depth: float):
        """(body with {context}, answer prefix, answers, haystack kind, [(depth, needle sentence)])."""
        needle = "One of the special magic numbers for {k} is: {v}."
        question = "What is the special magic number for {k} mentioned in the provided text?"
        prefix = "The special magic number for {k} mentioned in the provided text is"
        keys = rng.sample(WORDS, 4)
        values = [_digits(rng, 7) for _ in range(4)]
        other = [rng.random() for _ in range(3)]
        kind = "numbers"

        def niah(q: str) -> str:
            # Literal braces of the template survive the later .format(context=...).
            return NIAH_TEMPLATE.format(kind=kind, context="{context}", question=q)

        if task in ("niah_single", "niah_essay"):
            k, v = keys[0], values[0]
            hay = "noise" if task == "niah_single" else "essay"
            return (niah(question.format(k=k)), prefix.format(k=k), [v], hay, [(depth, needle.format(k=k, v=v))])
        if task == "niah_multikey":
            k = keys[0]
            needles = [(depth, needle.format(k=k, v=values[0]))]
            needles += [(d, needle.format(k=keys[j + 1], v=values[j + 1])) for j, d in enumerate(other)]
            return niah(question.format(k=k)), prefix.format(k=k), [values[0]], "essay", needles
        if task == "niah_multivalue":
            k = keys[0]
            needles = [(d, needle.format(k=k, v=v)) for d, v in zip([depth, *other], values, strict=True)]
            q = f"What are all the special magic numbers for {k} mentioned in the provided text?"
            return niah(q), f"The special magic numbers for {k} mentioned in the provided text are", values, \
                "essay", needles
        if task == "niah_multiquery":
            needles = [(d, needle.format(k=k, v=v)) for d, k, v in zip([depth, *other], keys, values, strict=True)]
            names = ", ".join(keys[:-1]) + f", and {keys[-1]}"
            q = f"What are all the special magic numbers for {names} mentioned in the provided text?"
            return niah(q), f"The special magic numbers for {names} mentioned in the provided text are", values, \
                "essay", needles
        if task == "vt":
            names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(5)]
            value = _digits(rng, 5)
            chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[j + 1]} = VAR {names[j]}." for j in range(4)]
            start = depth * 0.6  # 5 statements spread over [depth·0.6, depth·0.6 + 0.4], in chain order
            needles = [(start + 0.1 * j, s) for j, s in enumerate(chain)]
            body = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                    "{context}\nQuestion: Find all variables that are assigned the value " + value +
                    " in the text above.")
            return body, (f"Answer: According to the chain(s) of variable assignment in the text above, 5 variables "
                          f"are assigned the value {value}, they are:"), names, "noise", needles
        if task == "fwe":
            body = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                    "ignore the dots '....'. What are the three most frequently appeared words in the above coded "
                    "text?")
            return body, "Answer: According to the coded text above, the three most frequently appeared words are:", \
                [], "none", []
        if task == "passkey":
            key = _digits(rng, 5)
            body = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                    "I will quiz you about the important information there.\n{context}\nWhat is the pass key?")
            return body, "The pass key is", [key], "noise", \
                [(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")]
        raise ConfigError(f"unknown task {task!r}")

    def _fwe(self, rng: random.Random, budget: int) -> tuple[str, list[str]]:
        """Coded words drawn from a Zipf(α=2) law over a random vocabulary (RULER §3, frequent-word extraction)."""
        vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 6)))
                 for _ in range(200)]
        weights = [1.0 / (r + 1) ** 2.0 for r in range(len(vocab))]
        probe = rng.choices(vocab, weights, k=200)
        per_word = max(1.0, len(self._ids(" ".join(probe))) / 200)
        words = rng.choices(vocab, weights, k=max(10, int(budget / per_word * 1.1)))
        for _ in range(3):  # trim to the budget: tokens per word vary with the words drawn
            used = len(self._ids(" ".join(words)))
            if used <= budget:
                break
            words = words[: max(10, int(len(words) * budget / used * 0.995))]
        top = [w for w, _ in Counter(words).most_common(3)]
        return " ".join(words), top


def string_match_all(prediction: str, answers: tuple[str, ...] | list[str]) -> float:
    """RULER's metric: the fraction of ``answers`` found (case-insensitive) in ``prediction``."""
    if not answers:
        raise DataError("a RULER-syn sample needs at least one expected answer")
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


@dataclass
class RulerResult:
    protocol: str
    lengths: list[int]
    tasks: list[str]
    samples: int
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"score", "by_length", ...}
    records: list[dict[str, Any]] = field(default_factory=list)  # one per (sample, method)
    seconds: float = 0.0
    sample_indices: list[int] | None = None  # the subset of range(samples) run; None = all
    full_reused: int = 0  # full attention's records copied from ``full_records`` (not run)
    full_checked: int = 0  # prompts where full attention ran and reproduced the reused output exactly

    def to_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "lengths": self.lengths, "tasks": self.tasks, "samples": self.samples,
                "methods": self.methods, "records": self.records, "seconds": self.seconds,
                "sample_indices": self.sample_indices, "full_reused": self.full_reused,
                "full_checked": self.full_checked}


def protocol_name(lengths: list[int], samples: int, tasks: tuple[str, ...]) -> str:
    if tuple(tasks) == TASKS and samples == 5 and lengths == [2048, 4096]:
        return "RULER-syn-q"
    if tuple(tasks) == TASKS and samples == 20 and lengths == [2048, 4096, 8192]:
        return "RULER-syn"
    return f"RULER-syn-custom (lengths {lengths}, {samples} samples, tasks {list(tasks)})"


def run_ruler(model: nn.Module, tokenizer, methods: list[RuntimeMethod] | None = None, *,
              lengths: list[int] = (2048, 4096), samples: int = 5, tasks=TASKS, seed: int = 0,
              max_new_tokens: int = 32, full_records: list[dict[str, Any]] | None = None,
              full_check: int = 1, sample_indices: list[int] | None = None) -> RulerResult:
    """Score ``methods`` on RULER-syn, the full-attention, full-precision method always first beside them.

    Each prompt is prefilled once with full attention (all but its last token); every decode-only
    method then decodes greedily from its own ``make_cache`` copy of that cache.

    ``full_records`` reuses full attention's records from an earlier run of the same model, dtype and seed (the
    ``records`` of a RULER JSON; other methods' rows are ignored): every prompt of this run must have one whose
    answers, depth and token count match the regenerated prompt, and full attention still runs on the first
    ``full_check`` samples of each task and length and must reproduce the reused output text exactly, else
    :class:`DataError`. Full attention is skipped on the other prompts, about half the cost of a run whose other
    methods prefill on their own. Reused records carry ``"reused": True``.

    ``sample_indices`` runs only those of the ``samples`` prompts per task and length (see
    :func:`parse_sample_indices`): the prompts are the ones the whole run would make, so parts run apart merge
    into it. With ``full_records`` the reference check runs on the first ``full_check`` indices of the subset.
    """
    tasks = check_tasks(tasks)
    lengths = list(lengths)
    if samples < 1:
        raise ConfigError(f"samples must be ≥ 1, got {samples}")
    indices = (list(range(samples)) if sample_indices is None
               else check_sample_indices(sample_indices, samples, name="sample_indices"))
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max(lengths) + max_new_tokens > limit:
        raise ConfigError(f"length {max(lengths)} + {max_new_tokens} new tokens exceeds the model's context of "
                          f"{limit}; drop the longer --lengths")
    methods = [FULL] + [m for m in (methods or []) if m is not FULL]
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"two methods share a name in {names}; give each a distinct name")
    gen = RulerGenerator(tokenizer, seed=seed)
    stops = stop_token_ids(tokenizer)
    result = RulerResult(protocol_name(lengths, samples, tasks), lengths, list(tasks), samples,
                         sample_indices=None if sample_indices is None else indices)
    jobs = [(t, n, i) for n in lengths for t in tasks for i in indices]
    checked = set(indices[:full_check])
    reference = _reference_full(full_records, jobs, full_check) if full_records is not None else {}
    start = time.perf_counter()
    with eval_mode(model):
        for task, length, index in progress(jobs, desc="RULER-syn"):
            s = gen.sample(task, length, index, samples)
            reused = reference.get((task, length, index))
            if reused is not None:
                _check_same_prompt(reused, s)
            run_full = reused is None or index in checked
            active = [m for m in methods if m is not FULL or run_full]
            ids = torch.tensor([s.input_ids])
            shared = prefill(model, ids[:, :-1])[0] if any(m.shares_prefill for m in active) else None
            for m in methods:
                if m is FULL and not run_full:
                    result.records.append({**reused, "reused": True})
                    result.full_reused += 1
                    continue
                out = run_method(model, m, ids, max_new_tokens, stops, shared_prefill=shared)
                text = tokenizer.decode(out, skip_special_tokens=True)
                if m is FULL and reused is not None:
                    if text != reused["output"]:
                        raise DataError(f"full attention on {task} {length} sample {index} wrote {text!r}, the "
                                        f"reused record {reused['output']!r}: the earlier run differs (model, "
                                        "dtype, seed or code); run without reusing its records")
                    result.full_checked += 1
                result.records.append({"method": m.name, "task": task, "length": length, "index": index,
                                       "depth": s.depth, "tokens": len(s.input_ids), "answers": list(s.answers),
                                       "output": text, "score": 100.0 * string_match_all(text, s.answers)})
    result.seconds = time.perf_counter() - start
    for name in names:
        rows = [r for r in result.records if r["method"] == name]
        by_length = {}
        for n in lengths:
            per_task = {t: _mean([r["score"] for r in rows if r["length"] == n and r["task"] == t]) for t in tasks}
            by_length[str(n)] = {"tasks": per_task, "score": _mean(list(per_task.values()))}
        per_task = {t: _mean([by_length[str(n)]["tasks"][t] for n in lengths]) for t in tasks}
        desc = next(m.description for m in methods if m.name == name)
        result.methods[name] = {"score": _mean(list(per_task.values())), "tasks": per_task, "by_length": by_length,
                                "description": desc}
    return result


def _reference_full(records: list[dict[str, Any]], jobs: list[tuple[str, int, int]],
                    full_check: int) -> dict[tuple[str, int, int], dict[str, Any]]:
    """Full attention's reusable records keyed by (task, length, index); every job must have exactly one."""
    if full_check < 1:
        raise ConfigError(f"full_check must be ≥ 1 (reused records are only trusted after full attention "
                          f"reproduces some of them), got {full_check}")
    found: dict[tuple[str, int, int], dict[str, Any]] = {}
    for r in records:
        if r.get("method") != "full":
            continue
        key = (r["task"], int(r["length"]), int(r["index"]))
        if key in found:
            raise DataError(f"the reused records hold full attention twice for {key}; pass one run's records")
        found[key] = {k: v for k, v in r.items() if k != "reused"}
    missing = [j for j in jobs if j not in found]
    if missing:
        raise DataError(f"the reused records have no full-attention row for {len(missing)} of {len(jobs)} prompts "
                        f"(first: {missing[0]}); they must cover every task, length and sample of this run")
    return found


def _check_same_prompt(reused: dict[str, Any], sample: RulerSample) -> None:
    ours = {"answers": list(sample.answers), "depth": sample.depth, "tokens": len(sample.input_ids)}
    theirs = {k: reused.get(k) for k in ours}
    if ours != theirs:
        raise DataError(f"the reused full-attention record for {sample.task} {sample.length} sample {sample.index} "
                        f"was made from a different prompt ({theirs} vs this run's {ours}): different seed, sample "
                        "count or tokenizer")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
