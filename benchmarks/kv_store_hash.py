"""Fingerprint of what the quantized KV cache stores: bytes and a SHA-256 over every held tensor, per setting.

Converts the real-text 8K prefill cache (``--cache-file``, as written by ``kv_bytes_speed.py --cache-file`` or
``kv_decode_profile.py``) to each setting and hashes the sinks, window, codes, scales, zeros, bases and channel
partitions of every layer. Run it from two commits (e.g. a ``git archive`` of the older one on ``PYTHONPATH``)
to show a change left the stored format bit-exact:

    PYTHONPATH=/tmp/base/src python benchmarks/kv_store_hash.py --cache-file /tmp/kv8k_wiki.pt --json before.json
    python benchmarks/kv_store_hash.py --cache-file /tmp/kv8k_wiki.pt --json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys

import torch
from transformers import DynamicCache

import compactlm
from compactlm.kv import KVQuant, QuantizedKVCache
from compactlm.kv.runtime import PRESETS
from compactlm.models import load
from compactlm.utils import machine_info, write_json_atomic

SETTINGS = {"int2-mixed": KVQuant(bits=2, **PRESETS["int2-mixed"]), "int2-g32-r128": KVQuant(bits=2),
            "int4-g32-r128": KVQuant(bits=4)}


def tensors(obj):
    """Every tensor a store holds, in a fixed order (dataclass fields, dict keys sorted)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k in sorted(obj):
            yield from tensors(obj[k])
    elif hasattr(obj, "__dataclass_fields__"):
        for f in obj.__dataclass_fields__:
            yield from tensors(getattr(obj, f))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-file", required=True)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, _ = load("smollm2-135m", dtype="bf16")
    full = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(torch.load(args.cache_file)):
        full.update(k, v, i)
    rows = []
    for name, cfg in SETTINGS.items():
        cache = QuantizedKVCache.from_cache(model, cfg, full)
        h = hashlib.sha256()
        for layer in cache.layers:
            for t in [layer.sink_k, layer.sink_v, layer.keys, layer.values, *tensors(layer.qk), *tensors(layer.qv)]:
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
        rows.append({"config": name, "kv_bytes": cache.kv_bytes(), "sha256": h.hexdigest()})
        print(name, cache.kv_bytes(), h.hexdigest()[:16], flush=True)
    out = {"benchmark": "kv store fingerprint", "compactlm_from": compactlm.__file__, "rows": rows,
           "command": "python " + shlex.join(sys.argv), "machine": machine_info("bf16")}
    if args.json:
        write_json_atomic(args.json, out)


if __name__ == "__main__":
    main()
