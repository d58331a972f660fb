"""Where compactlm's GPTQ calibration holds memory: VmRSS sampled every 10 ms, labelled by driver phase.

    .venv/bin/python benchmarks/gptq_rss_profile.py [THREADS] [BITS]      # default 1 thread, W4

Loads the default model (fp32), draws CALIB-pg-512-q (32 x 512), runs ``compactlm.quantize(GPTQ(bits,
group_size=64))`` and prints the peak (VmHWM), the largest sample with its phase, and a coarse timeline
(every 2 s: seconds, RSS MiB, phase). Phases: ``capture`` (layer-0 inputs and per-layer kwargs),
``solve_group`` (a true-sequential group's statistics forward), ``gptq_math`` (the solve), ``forward_all``
(propagating a finished layer), ``pack``. tracemalloc cannot see torch's allocations, hence RSS sampling.

Used for docs/quantization.md ("Where the memory goes"): the runs quoted there were this script at commit
8a99533 (before: packing at the end), and at 6c08d15 without / with ``malloc_trim`` (``TRIM=1`` then
patched it into ``GPTQRun.finish_layer``; the driver now trims after every layer itself).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _llmc_worker import peak_rss_mib, rss_mib  # noqa: E402


def main() -> int:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    bits = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    samples: list[tuple[float, float, str]] = []
    phase = ["import"]
    done = threading.Event()

    def sampler():
        while not done.is_set():
            samples.append((time.perf_counter(), rss_mib(), phase[0]))
            time.sleep(0.01)

    threading.Thread(target=sampler, daemon=True).start()
    import compactlm
    from compactlm import layerwise
    from compactlm.data import calibration_set
    from compactlm.quant import GPTQ, gptq

    model, tok = compactlm.models.load("smollm2-135m")
    calib = calibration_set(tok, "essays", nsamples=32, seqlen=512)
    print(f"RSS after load {rss_mib():.0f} MiB", flush=True)

    def label(owner, name, text):
        fn = getattr(owner, name)

        def wrapped(*a, **k):
            old = phase[0]
            phase[0] = text
            try:
                return fn(*a, **k)
            finally:
                phase[0] = old
        setattr(owner, name, wrapped)

    label(layerwise, "capture_inputs", "capture")
    label(layerwise, "_solve_group", "solve_group")
    label(gptq, "solve_rows", "gptq_math")
    label(gptq, "pack_into", "pack")
    label(layerwise.LayerContext, "forward_in_place", "forward_all")
    compactlm.utils.set_quiet(True)
    phase[0] = "quantize"
    start = time.perf_counter()
    compactlm.quantize(model, GPTQ(bits=bits, group_size=64), calib=calib)
    seconds = time.perf_counter() - start
    phase[0] = "done"
    time.sleep(0.05)
    done.set()
    top = max(samples, key=lambda s: s[1])
    print(f"quantize {seconds:.1f} s, peak (VmHWM) {peak_rss_mib():.0f} MiB; largest sample {top[1]:.0f} MiB in "
          f"{top[2]} at {top[0] - samples[0][0]:.1f} s", flush=True)
    t0, last = samples[0][0], -1e9
    for ts, r, p in samples:
        if ts - last >= 2.0:
            print(f"{ts - t0:8.1f} {r:7.0f} {p}")
            last = ts
    return 0


if __name__ == "__main__":
    sys.exit(main())
