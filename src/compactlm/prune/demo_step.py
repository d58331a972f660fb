"""The ``prune`` step of ``make demo``: LLM-Barber (its default, end-to-end objective) vs its Wanda initial mask at
50 % (PPL-wiki-512-q)."""

from __future__ import annotations

import time
from typing import Any

CALIB = 32  # CALIB-pg-512-q: both rows prune from these; Barber's default (objective="lm") holds 8 more out


def step_prune(ctx) -> list[dict[str, Any]]:
    """Wanda 50 % and Barber(init=Wanda 50 %) on quick calibration (32 × 512 essays), scored side by side.

    Barber's default objective ("lm") chooses its step on ``heldout`` extra sequences (CALIB-pg-512 32–39), so its
    initial mask is Wanda's on the very 32 sequences of the Wanda row, as in the quick table of docs/pruning.md.
    """
    from ..data import calibration_set
    from ..evaluation import perplexity
    from . import Barber, Wanda, prune

    rows = []
    model, tok = ctx.load()
    barber = Barber(init=Wanda(sparsity=0.5))
    calib = calibration_set(tok, "essays", nsamples=CALIB + barber.heldout, seqlen=512, seed=0)
    for config, ids, name in ((Wanda(sparsity=0.5), calib[:CALIB], "Wanda 50%"),
                              (barber, calib, f"LLM-Barber 50% (init Wanda, objective {barber.objective})")):
        if rows:
            model, tok = ctx.load()
        start = time.perf_counter()
        report = prune(model, config, calib=ids)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, tok, windows=40).ppl
        print(f"{name}: PPL-wiki-512-q {ppl:.3f} (pruned in {seconds:.0f} s, mean sparsity "
              f"{report.overall_sparsity:.3f})", flush=True)
        held = f" + {barber.heldout} held out" if config is barber and barber.objective == "lm" else ""
        rows.append({"step": "prune", "method": f"{name}, calib {CALIB}x512{held}", "ppl_wiki_512_q": ppl,
                     "sparsity": report.overall_sparsity, "seconds": seconds})
    return rows
