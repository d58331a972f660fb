"""CPU time, peak RSS and attention forwards of a calibrated method with and without the attention memo.

The layer-wise driver reuses a layer's attention outputs across the passes that cannot change them
(``compactlm.layerwise.AttentionMemo``). This runs the same method on the default model with reuse off and on,
each in its own process (one torch thread), in the order off, on, on, off unless ``--once``, and checks that the
compressed weights are bit-identical (SHA-256 over every parameter). The off/on ratios come from the same
invocation, on the same machine, interleaved so that a load change affects both sides.

    python benchmarks/attention_reuse_cost.py --method gptq-w3 --nsamples 32 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("gptq-w3", "gptq-w4", "sparsegpt-2:4", "wanda-2:4")


def _config(method: str):
    from compactlm.prune import SparseGPT, Wanda
    from compactlm.quant import GPTQ

    if method.startswith("gptq-w"):
        return GPTQ(bits=int(method[-1]), group_size=64)  # the default clipping search on
    if method == "sparsegpt-2:4":
        return SparseGPT(pattern="2:4")
    if method == "wanda-2:4":
        return Wanda(pattern="2:4")
    raise SystemExit(f"unknown method {method!r}; choose from {METHODS}")


def worker(method: str, nsamples: int, reuse: bool, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    import compactlm
    from compactlm import layerwise
    from compactlm.data import calibration_set

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from aptq_sensitivity_cache import state_digest  # the same SHA-256 over the state dict

    model, tok = compactlm.models.load("smollm2-135m")
    calib = calibration_set(tok, "essays", nsamples=nsamples, seqlen=512)
    compactlm.utils.set_quiet(True)
    adapter = compactlm.models.get_adapter(model)
    cls = type(adapter.attention(0))
    calls = [0]
    original = cls.forward

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    cls.forward = counting
    config = _config(method)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu, wall = time.process_time(), time.time()
    with layerwise.attention_reuse(reuse):
        if method.startswith("gptq"):
            compactlm.quantize(model, config, calib=calib)
        else:
            compactlm.prune(model, config, calib=calib)
    cpu, wall = time.process_time() - cpu, time.time() - wall
    Path(out).write_text(json.dumps({
        "reuse_attention": reuse, "cpu_seconds": cpu, "wall_seconds": wall, "attention_forwards": calls[0],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mib": rss_before,
        "weights_sha256": state_digest(model), "loadavg_end": os.getloadavg()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="gptq-w3", choices=METHODS)
    p.add_argument("--nsamples", type=int, default=32, help="calibration sequences of 512 tokens (essays)")
    p.add_argument("--once", action="store_true", help="one run per side (off, on) instead of off, on, on, off")
    p.add_argument("--json", required=True)
    p.add_argument("--note", default="", help="machine note: what else was running")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reuse", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.method, args.nsamples, bool(args.reuse), args.out)
        return
    import torch

    import compactlm

    order = [False, True] if args.once else [False, True, True, False]
    runs = []
    tmp = Path(args.json).with_suffix(".part.json")
    for reuse in order:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, __file__, "--worker", "--method", args.method, "--nsamples",
                        str(args.nsamples), "--reuse", str(int(reuse)), "--out", str(tmp), "--json", str(tmp)],
                       check=True, env=env)
        runs.append(json.loads(tmp.read_text()))
        tmp.unlink()
        print(json.dumps(runs[-1]), flush=True)
    side = {r: [x for x in runs if x["reuse_attention"] == r] for r in (False, True)}

    def mean(rows, key):
        return sum(x[key] for x in rows) / len(rows)

    digests = {x["weights_sha256"] for x in runs}
    result = {
        "benchmark": "attention_reuse_cost", "method": args.method,
        "calibration": f"CALIB essays {args.nsamples} x 512",
        "command": " ".join(["python", "benchmarks/attention_reuse_cost.py", *sys.argv[1:]]),
        "machine": {"torch": torch.__version__, "threads": 1, "compactlm": compactlm.__file__,
                    "snapshot": os.environ.get("COMPACTLM_SNAPSHOT", ""), "note": args.note,
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "runs": runs,
        "weights_identical": len(digests) == 1,
        "ratio_on_over_off": {k: mean(side[True], k) / mean(side[False], k)
                              for k in ("cpu_seconds", "wall_seconds", "attention_forwards", "peak_rss_mib")},
    }
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("weights_identical", "ratio_on_over_off")}, indent=1))
    if not result["weights_identical"]:
        raise SystemExit("the weights differ between reuse on and off: the memo changed a result")


if __name__ == "__main__":
    main()
