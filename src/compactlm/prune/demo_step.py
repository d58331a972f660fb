"""The ``prune`` step of ``make demo``: LLM-Barber vs its Wanda initial mask at 50 % (PPL-wiki-512-q)."""

from __future__ import annotations

import time
from typing import Any


def step_prune(ctx) -> list[dict[str, Any]]:
    """Wanda 50 % and Barber(init=Wanda 50 %) on quick calibration (32 × 512 essays), scored side by side."""
    from ..data import calibration_set
    from ..evaluation import perplexity
    from . import Barber, Wanda, prune

    rows = []
    model, tok = ctx.load()
    calib = calibration_set(tok, "essays", nsamples=32, seqlen=512, seed=0)
    for config in (Wanda(sparsity=0.5), Barber(init=Wanda(sparsity=0.5))):
        if rows:
            model, tok = ctx.load()
        start = time.perf_counter()
        report = prune(model, config, calib=calib)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, tok, windows=40).ppl
        name = "Wanda 50%" if isinstance(config, Wanda) else "LLM-Barber 50% (init Wanda)"
        print(f"{name}: PPL-wiki-512-q {ppl:.3f} (pruned in {seconds:.0f} s, mean sparsity "
              f"{report.overall_sparsity:.3f})", flush=True)
        rows.append({"step": "prune", "method": f"{name}, calib 32x512", "ppl_wiki_512_q": ppl,
                     "sparsity": report.overall_sparsity, "seconds": seconds})
    return rows
