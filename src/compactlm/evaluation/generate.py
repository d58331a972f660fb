"""Prefill and greedy decoding with an explicit cache: the loop every long-context runner shares.

The runners need control that ``model.generate`` hides: prefill once with full attention, then
start several methods from copies of that cache (PROTOCOL RULER-syn), and feed decode tokens one at
a time so decode-only methods see exactly one query token per step. Batch 1 only; ``generate_text``
is the user-facing path (``compactlm generate``) and goes through the same loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .methods import FULL, RuntimeMethod


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def prefill(model: nn.Module, input_ids: torch.Tensor, cache: Any = None) -> tuple[Any, torch.Tensor]:
    """Run ``input_ids`` (1, T) through ``model`` into ``cache`` (a new DynamicCache if None).

    Returns ``(cache, last_logits)`` with ``last_logits`` (1, V) in fp32: the prediction for token T.
    """
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    ids = input_ids.to(_device(model))
    # logits_to_keep=1: an 8K prefill would otherwise materialise (T, vocab) fp32 logits for nothing.
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    return out.cache, out.logits[:, -1].float()


@torch.no_grad()
def decode_step(model: nn.Module, token: torch.Tensor, cache: Any) -> tuple[Any, torch.Tensor]:
    """Feed one token per row (B, 1) through the decode path; returns ``(cache, logits (B, V) fp32)``."""
    out = model(input_ids=token.to(_device(model)), cache=cache, use_cache=True)
    return out.cache, out.logits[:, -1].float()


@torch.no_grad()
def greedy_decode(model: nn.Module, cache: Any, first_token: int, max_new_tokens: int,
                  stop_ids: Sequence[int] = ()) -> list[int]:
    """Greedy tokens after a prefilled ``cache``: feeds ``first_token`` (the prompt's last token) first.

    Every generated token therefore comes out of the decode path (one query token per step), which is
    what decode-only methods change. Stops after a token in ``stop_ids`` (not included in the output).
    """
    stop = set(int(s) for s in stop_ids)
    token = torch.tensor([[first_token]], dtype=torch.long)
    produced: list[int] = []
    for _ in range(max_new_tokens):
        cache, logits = decode_step(model, token, cache)
        nxt = int(logits[0].argmax())
        if nxt in stop:
            break
        produced.append(nxt)
        token = torch.tensor([[nxt]], dtype=torch.long)
    return produced


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus the chat template's end-of-turn token where the tokenizer has one."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(ids)


@torch.no_grad()
def run_method(model: nn.Module, method: RuntimeMethod, prompt_ids: torch.Tensor, max_new_tokens: int,
               stop_ids: Sequence[int] = (), shared_prefill: Any = None) -> list[int]:
    """Greedy-generate after ``prompt_ids`` (1, T) with ``method``.

    Decode-only methods (``shares_prefill``) start from ``method.make_cache(model, shared_prefill)``
    where ``shared_prefill`` is a full-attention cache of ``prompt_ids[:, :-1]`` (computed here when
    None). Other methods prefill ``prompt_ids[:, :-1]`` themselves inside ``attach``.
    """
    if prompt_ids.dim() != 2 or prompt_ids.size(0) != 1 or prompt_ids.size(1) < 2:
        from ..errors import DataError

        raise DataError(f"prompt_ids must be (1, T ≥ 2), got shape {tuple(prompt_ids.shape)}")
    head, last = prompt_ids[:, :-1], int(prompt_ids[0, -1])
    if method.shares_prefill and shared_prefill is None:
        shared_prefill, _ = prefill(model, head)
    with method.attach(model):
        if method.shares_prefill:
            cache = method.make_cache(model, shared_prefill)
        else:
            cache, _ = prefill(model, head, method.make_cache(model, None))
        return greedy_decode(model, cache, last, max_new_tokens, stop_ids)


def generate_text(model: nn.Module, tokenizer, prompt: str, method: RuntimeMethod = FULL, max_new_tokens: int = 128,
                  chat: bool = True) -> str:
    """Greedy continuation of ``prompt`` (chat-templated where the tokenizer has a template) under ``method``."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if len(ids) < 2:
        ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + list(ids)
    out = run_method(model, method, torch.tensor([ids]), max_new_tokens, stop_token_ids(tokenizer))
    return tokenizer.decode(out, skip_special_tokens=True)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode for the scope and restore its previous mode."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def resolve_methods(model: nn.Module, kv: str | None = None, attn: str | None = None,
                    kv_options: dict[str, Any] | None = None,
                    attn_options: dict[str, Any] | None = None) -> list[RuntimeMethod]:
    """``--kv A,B`` / ``--attn C,D`` -> the RuntimeMethods to run; both given -> every kv×attn combination.

    Each name may carry its own typed options: ``int2@sinks=16@group_size=64``, ``sals@keep=1/16``.

    A combination attaches both and decodes with the kv method's cache, so the attention method sees
    the keys/values the quantized cache returns; the kv method is built with ``fused_attention=False``
    so that only the attention method installs attention handlers.
    """
    from ..config import parse_spec
    from ..errors import ConfigError
    from .methods import _copy_cache, build_method

    def specs(text: str | None, common: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
        # NAME@FIELD=VALUE options belong to that name alone; kv_options/attn_options apply to every name.
        out = []
        for spec in (s for s in (text or "").split(",") if s.strip()):
            name, options = parse_spec(spec)
            if name not in ("full", "none"):
                out.append((name, {**(common or {}), **options}))
            elif options:
                raise ConfigError(f"{spec!r}: full attention / the full-precision cache takes no options")
        return out

    kv_specs, attn_specs = specs(kv, kv_options), specs(attn, attn_options)
    if not attn_specs:
        return [build_method(model, "kv", n, o) for n, o in kv_specs]
    attn_methods = [build_method(model, "attn", n, o) for n, o in attn_specs]
    if not kv_specs:
        return attn_methods
    out = []
    for a in attn_methods:
        if a.make_cache is not _copy_cache:
            raise ConfigError(f"--attn {a.name} manages its own cache, so it cannot be combined with --kv; "
                              "run them separately")
        for n, o in kv_specs:
            k = build_method(model, "kv", n, {**o, "fused_attention": False})
            out.append(_combined(k, a))
    return out


def _combined(kv: RuntimeMethod, attn: RuntimeMethod) -> RuntimeMethod:
    @contextlib.contextmanager
    def attach(model: nn.Module):
        with attn.attach(model), kv.attach(model):
            yield model

    return RuntimeMethod(f"{kv.name}+{attn.name}", attach=attach, make_cache=kv.make_cache,
                         shares_prefill=kv.shares_prefill and attn.shares_prefill,
                         description=f"{kv.description}; {attn.description}")
