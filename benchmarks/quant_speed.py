"""Speed of packed int4 linears vs dense bf16, and decode tokens/s of a W4 default model vs bf16.

    .venv/bin/python benchmarks/quant_speed.py --json benchmarks/results/quant/speed.json

Kernel part: median of >= 10 timed runs after warm-up, random inputs, at M = 1 and 16 rows, for
4096x4096 (g128) and the default model's shapes (g64), at 1 and 2 threads. For each it reports the
int4 kernel (``torch.ops.aten._weight_int4pack_mm_for_cpu``), the dequantize-then-matmul path, dense
bf16 ``F.linear``, their ratios, which path :class:`PackedLinear` chooses (from its measured crossover)
and the achieved weight-read bandwidth (packed bytes / time). Decode part: greedy generation of
``--new-tokens`` tokens from a 64-token prompt, bf16 dense vs the same model RTN-W4/W3/W2-g64 packed (the
quantization method does not change the kernels; 2/3-bit layers run on the int4 kernel), tokens/s.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import compactlm
from compactlm.modules.packed_linear import PackedLinear, force_path, int4_crossover
from compactlm.primitives.quant import QuantSpec, rtn
from compactlm.quant import RTN
from compactlm.utils import machine_info, median_time, write_json_atomic


@torch.no_grad()
def kernel_rows(shapes, ms, threads, reps):
    rows = []
    for th in threads:
        torch.set_num_threads(th)
        for (n, k, g) in shapes:
            w = torch.randn(n, k) * 0.02
            codes, s, z = rtn(w, QuantSpec(bits=4, group_size=g))
            layer = PackedLinear.from_codes(codes, s, z, bits=4, group_size=g, symmetric=False,
                                            scale_dtype=torch.bfloat16)
            dense = w.to(torch.bfloat16)
            packed_bytes = n * k // 2 + s.numel() * 4
            for m in ms:
                x = torch.randn(m, k, dtype=torch.bfloat16)
                with force_path("int4"):
                    t_int4 = 1e3 * median_time(lambda x=x, layer=layer: layer(x), warmup=3, repeat=reps)
                with force_path("dequant"):
                    t_deq = 1e3 * median_time(lambda x=x, layer=layer: layer(x), warmup=3, repeat=reps)
                t_dense = 1e3 * median_time(lambda x=x, dense=dense: F.linear(x, dense), warmup=3, repeat=reps)
                chosen = layer.choose_path(x)
                rows.append({"threads": th, "out": n, "in": k, "group": g, "M": m, "int4_ms": t_int4,
                             "dequant_ms": t_deq, "bf16_dense_ms": t_dense, "int4_speedup_vs_bf16": t_dense / t_int4,
                             "chosen_path": chosen, "crossover_M": int4_crossover(n, k, g),
                             "chosen_speedup_vs_bf16": t_dense / (t_int4 if chosen == "int4" else t_deq),
                             "int4_weight_GBps": packed_bytes / t_int4 / 1e6,
                             "bf16_weight_GBps": n * k * 2 / t_dense / 1e6})
                print(rows[-1], flush=True)
    return rows


@torch.no_grad()
def decode_rows(model_spec, new_tokens, threads, bits_list=(4,)):
    torch.set_num_threads(threads)
    rows = []
    for bits in (None, *bits_list):
        label = "bf16 dense" if bits is None else f"RTN W{bits} g64 packed (bf16 activations)"
        model, tok = compactlm.models.load(model_spec, dtype="bf16")
        if bits is not None:
            compactlm.quantize(model, RTN(bits=bits, group_size=64))
        prompt = compactlm.data.tokenize_source(tok, "essays")[:64].unsqueeze(0)
        model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up (and the crossover measurement)
        t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        dt = time.perf_counter() - t
        rows.append({"model": label, "threads": threads, "new_tokens": out.shape[1] - 64,
                     "tokens_per_s": (out.shape[1] - 64) / dt})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--decode-bits", default="4,3,2", help="packed widths for the decode rows (RTN g64)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the decode rows")
    p.add_argument("--note", default="", help="machine note (what else was running)")
    args = p.parse_args(argv)
    shapes = [(4096, 4096, 128), (576, 576, 64), (192, 576, 64), (1536, 576, 64), (576, 1536, 64)]
    result = {"benchmark": "quant_speed", "command": " ".join(["python", *sys.argv]),
              "machine": {**machine_info(torch.bfloat16), "note": args.note}}
    if not args.skip_kernels:
        result["kernels"] = kernel_rows(shapes, (1, 16), (1, 2), args.reps)
    write_json_atomic(args.json, result)
    if not args.skip_decode:
        result["decode"] = decode_rows("smollm2-135m", args.new_tokens, args.threads,
                                       tuple(int(b) for b in args.decode_bits.split(",")))
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
