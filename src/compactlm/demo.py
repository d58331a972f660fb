"""The main job (``make demo``): the default model's info and quality, then each compression step.

Each step is one function taking a :class:`DemoContext` and returning summary rows; later features add
their step to :data:`STEPS`. The summary is one table: method, PPL-wiki-512-q and its other figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .attention.prefill_bench import step_prefill
from .attention.sals_demo import step_sals
from .cli.common import print_table
from .errors import ConfigError
from .inspector.demo_step import step_inspect
from .kv.demo_step import step_kv
from .pipeline import step_pipeline
from .prune.demo_step import step_prune
from .quant.demo_step import step_quant


@dataclass
class DemoContext:
    model_spec: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    base_ppl: float | None = None

    def load(self, dtype: str = "fp32"):
        from .models import load

        return load(self.model_spec, dtype=dtype)


def step_baseline(ctx: DemoContext) -> list[dict[str, Any]]:
    from .evaluation import perplexity
    from .models import get_adapter

    model, tok = ctx.load()
    info = get_adapter(model).info()
    print(f"model {ctx.model_spec}: {info['architecture']} ({info['family']}), {info['parameters']:,} parameters, "
          f"{info['bytes'] / 2**20:.1f} MiB {info['dtype']}, {info['layers']} layers, {info['heads']} heads / "
          f"{info['kv_heads']} KV heads, head dim {info['head_dim']}, context {info['context_length']:,}")
    start = time.perf_counter()
    result = perplexity(model, tok, windows=40)
    ctx.base_ppl = result.ppl
    return [{"step": "baseline", "method": "reference (fp32)", "ppl_wiki_512_q": result.ppl,
             "weights_MiB": info["bytes"] / 2**20, "seconds": time.perf_counter() - start}]


STEPS: dict[str, Callable[[DemoContext], list[dict[str, Any]]]] = {
    "baseline": step_baseline,
    "quant": step_quant,
    "kv": step_kv,
    "sals": step_sals,
    "inspect": step_inspect,
    "prefill": step_prefill,
    "prune": step_prune,
    "pipeline": step_pipeline,
}


# ``make demo``: the product's main job only (compress with the default recipe, then its report) — it fits the
# 15-minute budget on 2 cores; the per-feature rows together take about twice that (``--steps all``).
DEFAULT_STEPS: tuple[str, ...] = ("pipeline",)


def run_demo(model_spec: str = "smollm2-135m", steps: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the named demo steps (default :data:`DEFAULT_STEPS`; ``["all"]``: every step) and print one summary."""
    names = list(DEFAULT_STEPS) if not steps else list(STEPS) if steps == ["all"] else steps
    unknown = [s for s in names if s not in STEPS]
    if unknown:
        raise ConfigError(f"unknown demo step(s) {unknown}; steps are {list(STEPS)}")
    ctx = DemoContext(model_spec)
    for name in names:
        print(f"\n== {name} ==", flush=True)
        start = time.perf_counter()
        ctx.rows.extend(STEPS[name](ctx))
        print(f"step {name}: {time.perf_counter() - start:.0f} s", flush=True)
    print("\n== summary (PPL-wiki-512-q: first 40 windows of PPL-wiki-512) ==")
    columns: list[str] = []
    for row in ctx.rows:
        columns.extend(c for c in row if c not in columns)
    print_table(ctx.rows, columns)
    return ctx.rows
