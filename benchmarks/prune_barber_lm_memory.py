"""Peak RSS of Barber(objective="lm") per phase on the default model, and a fingerprint of the masks it chose.

A small run (few calibration sequences) of the real model: a sampler thread reads this process's VmRSS every
few milliseconds and charges it to the phase running at the time (the initial method, the gradient statistics,
the swap scoring, the held-out forwards), so a change to the rebuild's memory layout can be checked phase by
phase, and the fingerprint (a hash of every pruned linear's mask, the held-out losses, the swaps) shows whether
the masks stayed identical. Run it at two commits (PYTHONPATH=<snapshot>/src) and compare the JSON files.

    python benchmarks/prune_barber_lm_memory.py --train 3 --heldout 4 --threads 1 --out PATH.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import threading
import time


def vm_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class PhaseSampler:
    """Max VmRSS seen while each named phase ran (sampled every ``period`` seconds by a thread)."""

    def __init__(self, period: float = 0.005):
        self.phase, self.peaks, self.period, self.at_start = "load", {}, period, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            rss = vm_rss_kib()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            time.sleep(self.period)

    def wrap(self, owner, name: str, label: str):
        """Charge every call of ``owner.name`` to ``label`` (the phase before it resumes afterwards)."""
        fn = getattr(owner, name, None)
        if fn is None:  # an older layout without this phase
            return

        def wrapped(*a, **k):
            self.at_start.setdefault(label, vm_rss_kib())  # what was resident when the phase began
            before, self.phase = self.phase, label
            try:
                return fn(*a, **k)
            finally:
                self.peaks[label] = max(self.peaks.get(label, 0), vm_rss_kib())
                self.phase = before

        setattr(owner, name, wrapped)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--train", type=int, default=3)
    p.add_argument("--heldout", type=int, default=4)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import compactlm
    from compactlm.data import calibration_set
    from compactlm.prune import Barber, Wanda, barber_lm
    from compactlm.utils import set_quiet

    set_quiet(True)
    load = os.getloadavg()
    with PhaseSampler() as s:
        model, tok = compactlm.models.load(args.model, dtype="fp32")
        calib = calibration_set(tok, "essays", nsamples=args.train + args.heldout, seqlen=512, seed=0)
        s.wrap(barber_lm, "execute", "init (Wanda, keeps dense copies)")
        s.wrap(barber_lm, "lm_statistics", "statistics (G, D, SE)")  # the layout before issue 4's change
        s.wrap(barber_lm, "lm_gradient", "gradient pass (G, SE)")
        s.wrap(barber_lm, "lm_curvature", "curvature pass (D)")
        s.wrap(barber_lm, "fold_margin", "fold margin")
        s.wrap(barber_lm.LMRebuild, "score", "score")
        s.wrap(barber_lm, "lm_loss", "held-out forwards")
        s.phase = "setup"
        cpu = time.process_time()
        report = compactlm.prune(model, Barber(init=Wanda(sparsity=args.sparsity), heldout=args.heldout),
                                 calib=calib)
        cpu = time.process_time() - cpu
        s.phase = "after"
    masks = hashlib.sha256()
    for name, mod in sorted(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name in report.sparsity:
            masks.update(name.encode())
            masks.update((mod.weight != 0).numpy().tobytes())
    weights = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        weights.update(name.encode())
        weights.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    record = {"model": args.model, "train": args.train, "heldout": args.heldout, "sparsity": args.sparsity,
              "phase_peak_rss_mib": {k: v / 1024 for k, v in s.peaks.items()},
              "phase_start_rss_mib": {k: v / 1024 for k, v in s.at_start.items()},
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "prune_cpu_seconds": cpu, "lm_rounds": report.layer_records[-1]["lm_rounds"],
              "memory_estimate": report.layer_records[-1]["memory_estimate"],
              "mask_sha256": masks.hexdigest(), "state_dict_sha256": weights.hexdigest(),
              "threads": args.threads, "torch": torch.__version__, "load_average": {"start": load,
                                                                                    "end": os.getloadavg()},
              "command": "python benchmarks/prune_barber_lm_memory.py " + " ".join(
                  f"--{k} {v}" for k, v in vars(args).items())}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps({k: record[k] for k in ("phase_peak_rss_mib", "peak_rss_mib", "prune_cpu_seconds",
                                              "mask_sha256")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
