"""Does true-sequential calibration explain llm-compressor's 3 % lower SparseGPT 4:8 PPL? (issue 4)

Runs our SparseGPT through the llm-compressor side-by-side's own worker (same ids, fp32 folder, evaluation loop),
with ``SparseGPTRun.true_sequential`` as shipped (q/k/v, o, gate/up, down each re-collect their inputs) or False
(every linear of a layer calibrated in one pass on the layer's input, as llm-compressor does), and 8 or
``--batch-size`` calibration sequences per forward (llm-compressor: 1).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/results/prune/sparsegpt_order_ablation.py --one-pass \
        --pattern 4:8 --out benchmarks/results/prune/sparsegpt_4of8_one_pass.json
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pattern", default="4:8")
    p.add_argument("--one-pass", action="store_true", help="true_sequential=False (llm-compressor's order)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="calibration sequences per forward (ours 8; llm-compressor runs 1)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("driver", ROOT / "benchmarks" / "llmc_prune_side_by_side.py")
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    import compactlm
    from compactlm.data import calibration_set, eval_windows
    from compactlm.models.loading import default_model_dir
    from compactlm.prune.sparsegpt import SparseGPTRun

    if args.one_pass:
        SparseGPTRun.true_sequential = False
    if args.batch_size != 8:  # the worker's prune call, with the layer-wise driver's batch size changed
        def prune_ours(model, calib, wargs):
            from compactlm.prune import SparseGPT

            compactlm.utils.set_quiet(True)
            config = SparseGPT(pattern=args.pattern)
            compactlm.prune(model, config, calib=calib, batch_size=args.batch_size)
            return config.to_dict()

        driver._prune_ours = prune_ours
    _, tok = compactlm.models.load("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "ids.pt"
        torch.save({"calib": calibration_set(tok, "essays", nsamples=32, seqlen=512),
                    "eval": eval_windows(tok, "wiki", 512, 40)}, data)
        wargs = argparse.Namespace(threads=1, data=str(data), model_dir=str(default_model_dir()), llmc_worker=False,
                                   ours_worker=True, method="sparsegpt", spec=f'{{"pattern": "{args.pattern}"}}',
                                   nm=args.pattern, out=args.out)
        rc = driver.worker(wargs)
    import json

    out = json.loads(Path(args.out).read_text())
    out.update(true_sequential=SparseGPTRun.true_sequential, batch_size=args.batch_size, command=" ".join(sys.argv),
               machine=compactlm.utils.machine_info(torch.float32))
    compactlm.utils.write_json_atomic(Path(args.out), out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
