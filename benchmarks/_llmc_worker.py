"""llm-compressor side of ``benchmarks/llmc_side_by_side.py``; runs in llm-compressor's own venv.

This file never imports compactlm: llm-compressor 0.14 pins transformers 5.17 / compressed-tensors
0.19, so it lives in a separate venv (``/work/venvs/llmc``, install commands in docs/quantization.md).
The driver hands it a ``.pt`` file holding the exact calibration ids (CALIB-pg-512-q) and evaluation
windows (PPL-wiki-512-q) that compactlm's own run uses, so both tools see identical tokens.

    /work/venvs/llmc/bin/python benchmarks/_llmc_worker.py --data ids.pt --model-dir DIR \
        --bits 4 --group-size 64 --threads 1 --out result.json      # GPTQModifier oneshot + PPL
    /work/venvs/llmc/bin/python benchmarks/_llmc_worker.py --data ids.pt --model-dir DIR \
        --base --threads 1 --out base.json                           # base-model PPL only (harness check)

GPTQ (arXiv 2210.17323) through llm-compressor's ``GPTQModifier`` with its defaults (block 128,
dampening 0.01, static act-order, sequential pipeline, batch size 1) and a g64 integer weight scheme on
every decoder ``Linear`` (``lm_head`` ignored: its weight is the tied embedding, which compactlm keeps
in full precision too).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time

import torch
import torch.nn.functional as F


def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's own peak resident set (VmHWM). Not ``getrusage``'s ru_maxrss: Linux carries that over
    ``fork`` + ``exec``, so a worker started by a driver holding 600 MiB could never report less."""
    hwm = _status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Current resident set (VmRSS), what the process holds before quantization starts."""
    now = _status_mib("VmRSS")
    return now if now is not None else peak_rss_mib()


def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> tuple[float, int, list[float]]:
    """exp(mean next-token NLL over every predicted token of every window), fp32 logits (PPL-wiki-512); also the
    predicted-token count and each window's mean NLL (for paired intervals, ``benchmarks/ppl_compare.py``)."""
    model.eval()
    sums: list[float] = []
    with torch.no_grad():
        for batch in torch.split(windows, batch_size):
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            target = batch[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="none")
            sums += nll.view(target.shape).double().sum(dim=1).tolist()
    per_window = windows.size(1) - 1
    count = per_window * len(sums)
    return math.exp(math.fsum(sums) / count), count, [x / per_window for x in sums]


def grid_check(model, bits: int, group_size: int) -> dict:
    """Largest number of distinct values in any contiguous ``group_size`` slice of a row of the quantized
    linears: at most 2**bits when the weights the forward uses really sit on a g``group_size`` grid
    (static act-order keeps groups contiguous), so the PPL below is the quantized model's."""
    worst, checked = 0, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "layers." in name:
            w = module.weight.detach().float()
            g = w.reshape(w.shape[0], -1, group_size)
            # distinct values per group: sort, count changes
            s = g.sort(dim=-1).values
            distinct = 1 + (s[..., 1:] != s[..., :-1]).sum(dim=-1)
            worst = max(worst, int(distinct.max()))
            checked += 1
    return {"linears_checked": checked, "max_distinct_per_group": worst, "levels": 2**bits,
            "on_grid": worst <= 2**bits}


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The arguments every worker takes from the side-by-side driver (the ids file, the model, the setting)."""
    p.add_argument("--data", required=True, help=".pt with {'calib': (N, T) ids, 'eval': (W, T') ids}")
    p.add_argument("--model-dir", required=True, help="fp32 safetensors folder of the model")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)


def load_inputs(args: argparse.Namespace):
    """The ids file and the fp32 model folder every worker reads: (calibration ids, evaluation windows, model)."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    data = torch.load(args.data)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()
    return data["calib"].long(), data["eval"].long(), model


def write_json_atomic(path: str, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".llmc-", dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--symmetric", action="store_true", help="symmetric weights (default: asymmetric)")
    p.add_argument("--base", action="store_true", help="only evaluate the unquantized model")
    args = p.parse_args(argv)
    import transformers

    calib, windows, model = load_inputs(args)
    import compressed_tensors
    import llmcompressor
    out = {"tool": "llm-compressor", "versions": {"llmcompressor": llmcompressor.__version__,
                                                  "transformers": transformers.__version__,
                                                  "compressed_tensors": compressed_tensors.__version__,
                                                  "torch": torch.__version__},
           "threads": torch.get_num_threads(), "python": sys.executable, "rss_method": "VmHWM"}
    if not args.base:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier

        # Pre-tokenized: llm-compressor skips its own tokenization when the dataset has input_ids.
        dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
        recipe = GPTQModifier(
            config_groups={"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": args.bits, "type": "int", "symmetric": args.symmetric,
                            "strategy": "group", "group_size": args.group_size},
            }},
            ignore=["lm_head"],
        )  # block_size, dampening_frac, actorder: llm-compressor's defaults (128, 0.01, static)
        out["recipe"] = {"block_size": recipe.block_size, "dampening_frac": recipe.dampening_frac,
                         "actorder": str(recipe.actorder), "bits": args.bits, "group_size": args.group_size,
                         "symmetric": args.symmetric, "ignore": ["lm_head"]}
        out["rss_before_mib"] = rss_mib()
        start, cpu_start = time.perf_counter(), time.process_time()
        oneshot(model=model, tokenizer=args.model_dir, dataset=dataset, recipe=recipe,
                num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
                shuffle_calibration_samples=False)
        out["quantize_seconds"] = time.perf_counter() - start
        # CPU time of the process (all its threads): on a shared machine it moves far less with the load.
        out["quantize_cpu_seconds"] = time.process_time() - cpu_start
        out["peak_rss_mib"] = peak_rss_mib()  # read before evaluation, whose logits would add to the peak
        out["grid_check"] = grid_check(model, args.bits, args.group_size)
    start = time.perf_counter()
    ppl, tokens, window_nll = perplexity(model, windows)
    out.update(ppl=ppl, tokens=tokens, window_nll=window_nll, eval_seconds=time.perf_counter() - start)
    write_json_atomic(args.out, out)
    print(json.dumps({k: v for k, v in out.items() if k in ("ppl", "quantize_seconds", "peak_rss_mib")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
