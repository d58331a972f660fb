"""The ``quant`` step of ``make demo``: APTQ at 3.0 average bits beside RTN and GPTQ at W3 (g64).

APTQ picks from a 2/3/4-bit menu with the loss-gradient sensitivity and GPTQ's own error at each width
(RTN's error is cheaper but chose worse widths: at 2.5 bits from 16 sequences, PPL 396 against 284,
``benchmarks/results/quant/demo_scale_aptq25.json``). GPTQ and APTQ run with their default clipping search.
Calibration: CALIB-pg-512-q (32 x 512), the same for GPTQ and APTQ; quality is PPL-wiki-512-q. Each row reports
the quantization wall time, the packed model's size and the averages with and without scales.
"""

from __future__ import annotations

import time
from typing import Any


def step_quant(ctx) -> list[dict[str, Any]]:
    from ..api import compress
    from ..data import calibration_set
    from ..evaluation import perplexity
    from .aptq import APTQ
    from .common import quant_summary
    from .gptq import GPTQ
    from .rtn import RTN

    rows = []
    # GPTQ and APTQ with their default clipping search; RTN stays plain min-max (its default)
    configs = [("RTN W3 g64", RTN(bits=3, group_size=64)), ("GPTQ W3 g64 + clip", GPTQ(bits=3, group_size=64)),
               ("APTQ avg 3.0 (2/3/4) g64 + clip", APTQ(avg_bits=3.0, group_size=64, bits_menu=(2, 3, 4)))]
    calib = None
    for label, cfg in configs:
        model, tok = ctx.load()
        if calib is None:
            calib = calibration_set(tok, "essays", nsamples=32, seqlen=512)
        start = time.perf_counter()
        compress(model, cfg, calib=None if isinstance(cfg, RTN) else calib)
        seconds = time.perf_counter() - start
        summary = quant_summary(model)
        ppl = perplexity(model, tok, windows=40).ppl
        print(f"{label}: PPL-wiki-512-q {ppl:.2f}, {summary['avg_bits']:.3f} weight bits "
              f"({summary['avg_bits_with_metadata']:.3f} with scales/zeros), {seconds:.0f} s", flush=True)
        rows.append({"step": "quant", "method": f"{label}, calib 32x512", "ppl_wiki_512_q": ppl,
                     "weights_MiB": summary["model_bytes"] / 2**20, "avg_bits": summary["avg_bits"],
                     "avg_bits_with_metadata": summary["avg_bits_with_metadata"], "seconds": seconds})
        del model
    return rows
