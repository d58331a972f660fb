"""Peak RSS and CPU time of one GPTQ W4 g64 run on the default model (8 x 512 calibration, 1 thread).

Run it once per code version to compare them, e.g. an old commit checked out as a worktree:

    PYTHONPATH=/tmp/wt_old/src /work/venvs/user/bin/python benchmarks/gptq_rss_check.py
    PYTHONPATH=src /work/venvs/user/bin/python benchmarks/gptq_rss_check.py

(``/work/venvs/user`` is a plain ``pip install -e .`` without the test extras, so no hqq import.)
Prints the package path used, CPU seconds, wall seconds and the process peak RSS (MiB).
"""

from __future__ import annotations

import resource
import time

import torch


def main() -> None:
    torch.set_num_threads(1)
    import compactlm
    from compactlm.data import calibration_set
    from compactlm.quant import GPTQ

    print(compactlm.__file__)
    model, tok = compactlm.models.load("smollm2-135m")
    calib = calibration_set(tok, "essays", nsamples=8, seqlen=512)
    compactlm.utils.set_quiet(True)
    cpu, wall = time.process_time(), time.time()
    compactlm.quantize(model, GPTQ(bits=4, group_size=64, clip_search=False), calib=calib)
    print("cpu", time.process_time() - cpu, "wall", time.time() - wall,
          "hwm", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


if __name__ == "__main__":
    main()
