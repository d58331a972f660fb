"""An lm-eval (0.4.13) model adapter: evaluate a compactlm model in process, with its KV cache and attention.

``CompactLMEval`` is lm-eval's ``HFLM`` around a model that is already in memory, plus a
:class:`~compactlm.evaluation.methods.RuntimeMethod` (a recipe's KV-cache + attention steps, or
``--kv`` / ``--attn`` names):

- ``loglikelihood`` / ``loglikelihood_rolling`` requests run one forward per batch inside
  ``method.attach(model)``: prefill-phase methods (block-sparse prefill) act there; decode-phase methods
  (a quantized KV cache, SALS) do not change a single full forward, so they leave these scores unchanged.
- ``generate_until`` requests decode greedily through the method's own cache and decode path
  (:func:`compactlm.evaluation.generate.run_method`), one request at a time, exactly as RULER-syn does:
  this is where KV-cache and decode attention methods are measured.

Construct it from a model object, a model spec, or a ``compactlm compress`` output folder::

    lm = CompactLMEval.from_folder("out/")                 # the compressed model and its recipe's runtime
    results = evaluate(lm, ["my_task"], include_path="tasks/")   # local task YAMLs, no hub index

``lm_eval --model compactlm --model_args pretrained=out/`` works too once this module is imported
(it registers the name ``compactlm``). Requires ``lm-eval==0.4.13`` and ``accelerate``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .methods import FULL, RuntimeMethod

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError("compactlm.evaluation.lm_eval needs lm-eval: pip install 'lm-eval==0.4.13' accelerate") from exc


@register_model("compactlm")
class CompactLMEval(HFLM):
    """lm-eval ``LM`` for a compactlm model object (or spec / compress folder) and a runtime method."""

    def __init__(self, pretrained: str | nn.Module = "smollm2-135m", tokenizer: Any = None,
                 method: RuntimeMethod | None = None, kv: str | None = None, attn: str | None = None,
                 dtype: str = "fp32", batch_size: int | str = 1, max_length: int | None = None, **kwargs: Any):
        if isinstance(pretrained, str):
            model, tok, folder_method = _load(pretrained, dtype)
            tokenizer = tokenizer if tokenizer is not None else tok
            method = method or folder_method
        else:
            model = pretrained
        if tokenizer is None:
            raise ConfigError("CompactLMEval needs a tokenizer: the model has none; pass tokenizer=...")
        if method is None and (kv or attn):
            from .generate import resolve_methods

            methods = resolve_methods(model, kv, attn)
            if len(methods) != 1:
                raise ConfigError(f"give one kv method and/or one attn method, got kv={kv!r} attn={attn!r}")
            method = methods[0]
        self.method = method or FULL
        device = str(next(model.parameters()).device)
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                         max_length=max_length, device=device, **kwargs)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str], **kwargs: Any) -> CompactLMEval:
        """The model of a ``compactlm compress`` output folder with its recipe's KV cache and attention."""
        return cls(pretrained=str(folder), **kwargs)

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        with self.method.attach(self.model):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        **generation_kwargs: Any) -> torch.Tensor:
        """Greedy decoding per request through the method's cache (sampling is refused, not ignored)."""
        from .generate import run_method, stop_token_ids

        if generation_kwargs.get("do_sample") or generation_kwargs.get("temperature", 0.0) not in (0, 0.0, None):
            raise ConfigError("CompactLMEval decodes greedily (the protocols do); set do_sample=false, temperature=0")
        mask = generation_kwargs.get("attention_mask")
        new_tokens = max(0, max_length - context.shape[1])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        stops = stop_token_ids(self.tokenizer)
        rows = []
        for b in range(context.shape[0]):
            ids = context[b] if mask is None else context[b][mask[b].bool()]
            produced = run_method(self.model, self.method, ids[None].cpu(), new_tokens, stops) if new_tokens else []
            rows.append(produced + [pad] * (new_tokens - len(produced)))
        gen = torch.tensor(rows, dtype=context.dtype, device=context.device).reshape(context.shape[0], new_tokens)
        return torch.cat([context, gen], dim=1)


def _load(spec: str, dtype: str) -> tuple[nn.Module, Any, RuntimeMethod | None]:
    from pathlib import Path

    if (Path(spec) / "recipe.yaml").is_file():
        from ..pipeline import load_compressed

        return load_compressed(spec, dtype)
    from ..models import load

    model, tok = load(spec, dtype=dtype)
    return model, tok, None


def evaluate(lm: CompactLMEval, tasks: list[str], include_path: str | os.PathLike[str] | None = None,
             limit: int | float | None = None, num_fewshot: int | None = None) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on ``lm`` with tasks from ``include_path`` only (no index of the hub tasks)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path), include_defaults=False) if include_path else TaskManager()
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                   log_samples=False, bootstrap_iters=0)
