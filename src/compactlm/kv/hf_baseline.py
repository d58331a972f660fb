"""transformers' own ``QuantizedCache`` (HQQ backend) as RuntimeMethods: the baseline beside ours.

``kv:hf-hqq-int4`` / ``kv:hf-hqq-int2``: ``transformers.QuantizedCache("hqq", nbits, q_group_size=32,
residual_length=128)`` with its default axes. Its layers quantize the whole prefill on the first
update and re-quantize everything whenever the window reaches ``residual_length`` (transformers 5.24
``QuantizedLayer.update``). Needs ``pip install hqq==0.2.8.post1`` (checked when the method is built).
"""

from __future__ import annotations

import contextlib

from torch import nn

from ..errors import ConfigError
from ..evaluation.methods import RuntimeMethod, register_method


@contextlib.contextmanager
def _nothing(model: nn.Module):
    yield model


def _builder(bits: int):
    def build(model: nn.Module, options: dict) -> RuntimeMethod:
        import importlib.util

        if importlib.util.find_spec("hqq") is None:
            raise ConfigError("kv:hf-hqq-* needs the hqq package: pip install hqq==0.2.8.post1")
        group = int(options.pop("group_size", 32))
        residual = int(options.pop("residual", 128))
        if options:
            raise ConfigError(f"kv:hf-hqq-int{bits} takes only group_size and residual, got {sorted(options)}")

        def make_cache(model: nn.Module, prefill_cache):
            from transformers.cache_utils import QuantizedCache

            cache = QuantizedCache("hqq", model.config, nbits=bits, q_group_size=group, residual_length=residual)
            if prefill_cache is not None:
                for i, layer in enumerate(prefill_cache.layers):
                    if getattr(layer, "keys", None) is not None and layer.keys.numel():
                        cache.update(layer.keys.clone(), layer.values.clone(), i)
            return cache

        return RuntimeMethod(f"hf-hqq-int{bits}-g{group}-r{residual}", attach=_nothing, make_cache=make_cache,
                             description=f"transformers QuantizedCache, HQQ backend, {bits} bits, q_group_size "
                                         f"{group}, residual_length {residual}")

    return build


for _bits in (2, 4):
    register_method(f"kv:hf-hqq-int{_bits}")(_builder(_bits))
