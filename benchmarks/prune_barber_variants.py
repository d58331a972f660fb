"""Diagnose LLM-Barber's swap rule on held-out calibration sequences: block-output error of each rule, per block.

    python benchmarks/prune_barber_variants.py --init wanda --sparsity 0.5 --layers 0,2,4,...

The default model is pruned by the initial method layer by layer (its statistics from the first
``--train`` CALIB-pg-512 sequences only). At each chosen layer, for the attention and then the MLP block,
every rule below rebuilds the initial mask from statistics of the training sequences, and its block error
(MSE against the dense block on the sparse model's inputs, §3.2 of arXiv 2408.10631) is measured on the
training sequences and on ``--heldout`` further CALIB-pg-512 sequences never used for any statistic (not the
evaluation text). The initial mask is kept afterwards, so every rule is judged on the same inputs.
Rules: ``grad`` = the paper's |W_dense|·sqrt(E[g²]) (g at the dense weights), ``taylor`` = the second-order
Taylor model of the block loss (:func:`compactlm.prune.barber.taylor_scores`; ``taylor+dropgrad`` with the
drops' first-order term), each with a comparison group and the fraction of profitable swaps made, or ``ls``:
the ratio of 0.001 ... 0.3 with the lowest training block loss (Barber's ``search_ratios``).
(The first committed run, 2026-11-30 06:40, labelled ``taylor`` as ``obd`` and ``taylor+dropgrad`` as
``taylor``.) Writes ``benchmarks/results/prune/barber_variants_<init>_<setting>.json``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
VARIANTS = ["grad:row:0.01", "grad:row:0.1", "grad:row:ls", "taylor+dropgrad:row:ls", "taylor:row:0.01",
            "taylor:row:0.1", "taylor:row:ls", "taylor:layer:ls"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init", default="wanda", choices=["wanda", "sparsegpt"])
    p.add_argument("--sparsity", type=float, default=None)
    p.add_argument("--pattern", default=None)
    p.add_argument("--train", type=int, default=32)
    p.add_argument("--heldout", type=int, default=16)
    p.add_argument("--layers", default="0,3,6,9,12,15,18,21,24,27,29")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--heldout-source", default="essays", choices=["essays", "wiki"],
                   help="held-out sequences: further CALIB-pg-512 essays, or wiki windows 1000+ (the evaluation "
                        "domain, disjoint from every PPL-wiki-512 window: the protocol scores windows 0-199)")
    p.add_argument("--model", default="smollm2-135m", help="tiny-* models calibrate on random ids (smoke runs)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import compactlm
    from compactlm.data import calibration_set
    from compactlm.prune import METHODS, Barber
    from compactlm.prune.barber import (
        BarberRun,
        BlockCalls,
        _block_mse,
        barber_scores,
        block_outputs,
        block_taylor_statistics,
        capture_block,
        rebuild_masks,
        taylor_scores,
    )
    from compactlm.prune.common import execute
    from compactlm.utils import machine_info, set_quiet, write_json_atomic

    set_quiet(True)
    batch = 8
    if args.train % batch or args.heldout % batch:
        raise SystemExit("--train and --heldout must be multiples of 8 (the calibration batch size)")
    layers = {int(x) for x in args.layers.split(",")}
    variants = [v.split(":") for v in args.variants.split(",")]
    spec = {"pattern": args.pattern} if args.pattern else {"sparsity": args.sparsity or 0.5}
    config = Barber(init=METHODS[args.init](**spec))
    n_train = args.train // batch
    rows: list[dict] = []

    class VariantRun(BarberRun):
        def new_stats(self, name, module):
            self._seen = {**getattr(self, "_seen", {}), name: 0}
            return super().new_stats(name, module)

        def add_batch(self, stats, name, module, inp, out):
            self._seen[name] += 1
            if self._seen[name] <= n_train:  # held-out batches never feed the initial method's statistics
                super().add_batch(stats, name, module, inp, out)

        def refine_layer(self, ctx, targets, reference_outputs):
            if ctx.index in layers:
                adapter = ctx.adapter
                for label, block, linears in [("attention", adapter.attention(ctx.index),
                                               adapter.attention_linears(ctx.index)),
                                              ("mlp", adapter.mlp(ctx.index), adapter.mlp_linears(ctx.index))]:
                    mods = {n: targets[n] for n in linears if n in targets}
                    rows.append({"layer": ctx.index, "block": label, **self._compare(ctx, block, mods)})
                    print(rows[-1]["layer"], label, {k: round(v["heldout_rel"], 4) for k, v in
                                                     rows[-1]["variants"].items()}, flush=True)
            self.init.refine_layer(ctx, targets, reference_outputs)

        def _compare(self, ctx, block, mods):
            dense, keeps = self.init.dense, self.init.masks
            cap = capture_block(ctx, block)
            train = BlockCalls(cap.calls[:n_train], cap.outputs[:n_train])
            held = BlockCalls(cap.calls[n_train:], cap.outputs[n_train:])
            sparse = {n: m.weight.detach().clone() for n, m in mods.items()}
            t0 = time.process_time()
            grad_sq, seen, _, dense_train = self._dense_gradients(block, mods, train)
            t1 = time.process_time()
            g, d, _, _ = block_taylor_statistics(block, mods, train, dense_train)
            t2 = time.process_time()
            with torch.no_grad():
                for n, m in mods.items():
                    m.weight.copy_(dense[n])
                dense_held = block_outputs(block, held)
                for n, m in mods.items():
                    m.weight.copy_(sparse[n])
            base_tr, base_ho = _block_mse(block, train, dense_train), _block_mse(block, held, dense_held)
            out = {"init_train_mse": base_tr, "init_heldout_mse": base_ho, "cpu_s_grad": t1 - t0,
                   "cpu_s_taylor": t2 - t1, "variants": {}}
            def candidate(scores, group, ratio):
                new, swaps = rebuild_masks({n: keeps[n] for n in mods}, scores, ratio, group, config.nm)
                with torch.no_grad():
                    for n, m in mods.items():
                        m.weight.copy_(torch.where(keeps[n], sparse[n], dense[n]) * new[n].to(sparse[n].dtype))
                    tr = _block_mse(block, train, dense_train)
                    for n, m in mods.items():
                        m.weight.copy_(sparse[n])
                return tr, new, swaps

            for rule, group, ratio in variants:
                if rule == "grad":
                    scores = {n: barber_scores(dense[n], grad_sq[n] / seen) for n in mods}
                else:  # "taylor" = Barber(criterion="taylor"); "taylor+dropgrad" adds the drops' gradient term
                    scores = {n: taylor_scores(keeps[n], sparse[n], dense[n], g[n], d[n],
                                               drop_gradient=rule == "taylor+dropgrad") for n in mods}
                if ratio == "ls":  # line search: the ladder's ratio with the lowest training block loss (or none)
                    best = (base_tr, {n: keeps[n] for n in mods}, 0, 0.0)
                    for r in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3):
                        tr, new, swaps = candidate(scores, group, r)
                        if tr < best[0]:
                            best = (tr, new, swaps, r)
                    _, new, swaps, chosen = best
                else:
                    new, swaps = rebuild_masks({n: keeps[n] for n in mods}, scores, float(ratio), group, config.nm)
                    chosen = float(ratio)
                predicted = 0.0
                if rule != "grad":  # the diagonal model's predicted change of the training block loss
                    for n in mods:
                        grown, dropped = new[n] & ~keeps[n], keeps[n] & ~new[n]
                        predicted += float(-scores[n][grown].sum() + scores[n][dropped].sum())
                with torch.no_grad():
                    for n, m in mods.items():
                        m.weight.copy_(torch.where(keeps[n], sparse[n], dense[n]) * new[n].to(sparse[n].dtype))
                    tr, ho = _block_mse(block, train, dense_train), _block_mse(block, held, dense_held)
                    for n, m in mods.items():
                        m.weight.copy_(sparse[n])
                out["variants"][f"{rule}:{group}:{ratio}"] = {
                    "swaps": swaps, "train_mse": tr, "heldout_mse": ho, "train_rel": tr / base_tr - 1,
                    "heldout_rel": ho / base_ho - 1, "predicted_train_delta": predicted, "ratio": chosen,
                    "actual_train_delta": tr - base_tr}
            return out

    model, tok = compactlm.models.load(args.model, dtype="fp32")
    if tok is None:
        calib = torch.randint(3, 256, (args.train + args.heldout, 64), generator=torch.Generator().manual_seed(0))
    elif args.heldout_source == "wiki":
        from compactlm.data import eval_windows

        wiki = eval_windows(tok, "wiki", 512, 1000 + args.heldout)[1000:]
        calib = torch.cat([calibration_set(tok, "essays", nsamples=args.train, seqlen=512, seed=0), wiki[:, :512]])
    else:
        calib = calibration_set(tok, "essays", nsamples=args.train + args.heldout, seqlen=512, seed=0)
    start, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()
    execute(model, config.init, VariantRun(config), calib, None, batch_size=batch)
    summary = {}
    for key in rows[0]["variants"] if rows else []:
        rel = [r["variants"][key]["heldout_rel"] for r in rows]
        summary[key] = {"mean_heldout_rel": sum(rel) / len(rel), "blocks_improved_heldout": sum(x < 0 for x in rel),
                        "blocks": len(rel), "swaps": sum(r["variants"][key]["swaps"] for r in rows),
                        "mean_train_rel": sum(r["variants"][key]["train_rel"] for r in rows) / len(rows)}
        print(key, summary[key], flush=True)
    setting = args.pattern.replace(":", "of") if args.pattern else f"{round(100 * (args.sparsity or 0.5))}pct"
    if tok is None:
        return 0  # smoke run: nothing to record
    suffix = "" if args.heldout_source == "essays" else "_heldout-wiki"
    out = ROOT / "results" / "prune" / f"barber_variants_{args.init}_{setting}{suffix}.json"
    write_json_atomic(out, {
        "what": "block-output MSE (vs the dense block on the sparse model's inputs) of each Barber rule, relative "
                "to the initial mask; train = the sequences the statistics came from, heldout = further "
                "CALIB-pg-512 sequences", "init": config.init.to_dict(),
        "calibration": f"CALIB-pg-512 sequences 0-{args.train - 1} (train), " + (
            f"{args.train}-{args.train + args.heldout - 1} (held out)" if args.heldout_source == "essays" else
            f"held out: PPL-wiki text windows 1000-{999 + args.heldout} (outside every PPL-wiki-512 window)"),
        "summary": summary, "blocks": rows, "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu, "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": {**machine_info("fp32"), "note": "2 cores shared with other engineers' jobs",
                    "load_average": {"start": load, "end": os.getloadavg()}}})
    print("->", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
