"""``compactlm compress MODEL --recipe R --out DIR``: run a whole recipe, resumably, and write one folder.

Order of work (nothing heavy happens before the recipe and the model have been checked):

1. validate the recipe (:mod:`compactlm.recipes`), load the model, check each step against it (group
   sizes divide the layers, KV groups divide the head dim);
2. the weight steps (prune, then quantize) through :func:`compactlm.compress`, inside a
   :func:`~compactlm.layer_checkpoint.checkpointing` scope in ``DIR.partial/``: every layer-wise driver call
   saves each finished layer, so a killed run, started again with the same command, resumes after the
   last finished layer and ends with a bit-identical model;
3. SALS projections (when the recipe has a SALS step without a projections file), calibrated on the
   compressed weights and stored beside the model;
4. the evaluation the recipe asks for (:mod:`compactlm.report.measure`), side by side with the
   uncompressed model in the same process;
5. one atomic write of ``DIR``: ``model/`` (``compactlm.models.load("DIR/model")``), optionally
   ``compressed-tensors/``, ``recipe.yaml`` (as run, with resolved paths), ``choices.json`` (per-layer bits
   and sparsity, APTQ's allocation), ``report.json`` and ``report.html``. ``DIR.partial/`` is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .recipes import Recipe, load_recipe
from .utils import atomic_directory, machine_info, peak_rss_mib, write_json_atomic

SALS_FILE = "sals_projections.safetensors"


def check_against_model(recipe: Recipe, model: nn.Module) -> None:
    """Model-dependent checks of every step, before any work (a bad group size fails here, not at layer 17)."""
    from .attention.sals import SALSConfig
    from .models import get_adapter
    from .quant.common import WeightQuantConfig, quant_targets

    adapter = get_adapter(model)
    for cfg in recipe.stage("quantize"):
        if isinstance(cfg, WeightQuantConfig):
            quant_targets(model, cfg)
    if recipe.kv is not None:
        recipe.kv.check_model(adapter.head_dim)
    for cfg in recipe.attention:
        if isinstance(cfg, SALSConfig):
            cfg.sparse_layers(adapter.num_layers)
            if cfg.projections is not None and not Path(cfg.projections).exists():
                raise ConfigError(f"SALS step: projections file {cfg.projections} does not exist; remove the field "
                                  "to calibrate projections during compress")


def _state_key(model_spec: str, dtype: str, recipe: Recipe) -> dict[str, Any]:
    return {"model": model_spec, "dtype": dtype, "recipe": _without_description(recipe.to_dict())}


def _without_description(recipe: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in recipe.items() if k != "description"}  # prose does not change the result


def _prepare_state(state_dir: Path, key: dict[str, Any], restart: bool) -> bool:
    """Create or check ``DIR.partial``; return True when resuming an earlier run."""
    if restart and state_dir.exists():
        shutil.rmtree(state_dir)
    marker = state_dir / "run.json"
    if marker.exists():
        saved = json.loads(marker.read_text())
        if isinstance(saved.get("recipe"), dict):
            saved["recipe"] = _without_description(saved["recipe"])
        if saved != key:
            raise ConfigError(f"{state_dir} holds an interrupted run of a different model/recipe/dtype; pass "
                              "--restart to discard it, or choose another --out")
        return True
    state_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, key)
    return False


def per_layer_choices(model: nn.Module, step_reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Per linear: bits (quantized layers), fraction of zeros; APTQ's allocation where there was one."""
    from .models import get_adapter
    from .modules.packed_linear import PackedLinear
    from .quant.common import quant_summary

    summary = quant_summary(model)
    sparsity = {}
    for name, module in get_adapter(model).named_linears().items():
        w = module.dequantize_weight() if isinstance(module, PackedLinear) else module.weight
        sparsity[name] = float((w == 0).float().mean())
    out = {"bits": summary["bits_per_layer"], "avg_bits": summary["avg_bits"],
           "avg_bits_with_metadata": summary["avg_bits_with_metadata"], "sparsity": sparsity}
    for rep in step_reports:
        if "allocation" in rep:
            out["aptq_allocation"] = rep["allocation"]
    return out


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() < 64 else f"tensor{tuple(obj.shape)}"
    if isinstance(obj, float | int | str | bool) or obj is None:
        return obj
    return str(obj)


def run_weight_steps(model: nn.Module, recipe: Recipe, calib: torch.Tensor | None, layers_dir: Path,
                     after_layer: Callable[[int], None] | None = None, log: Callable[[str], None] = print
                     ) -> list[dict[str, Any]]:
    """Prune and quantize in recipe order, each layer-wise driver call checkpointed under ``layers_dir``."""
    from .api import compress
    from .layer_checkpoint import checkpointing

    reports = []
    steps = recipe.weight_steps
    with checkpointing(layers_dir, after_layer=after_layer):
        for k, cfg in enumerate(steps):
            log(f"step {k + 1}/{len(steps)}: {type(cfg).__name__} {cfg.to_json()}")
            start = time.perf_counter()
            report: dict[str, Any] = {}
            compress(model, cfg, calib=calib, report=report)
            reports.append({"step": type(cfg).__name__, "config": cfg.to_dict(),
                            "seconds": time.perf_counter() - start, **_json_safe(report)})
    return reports


def resolve_runtime(model: nn.Module, recipe: Recipe, calib: torch.Tensor | None, state_dir: Path,
                    log: Callable[[str], None] = print) -> Recipe:
    """Calibrate SALS projections where needed (cached in the state folder); return the recipe as run."""
    import dataclasses

    from .attention.sals import SALSConfig
    from .attention.sals_calib import calibrate_sals, save_projections

    steps = []
    for cfg in recipe.steps:
        if isinstance(cfg, SALSConfig) and cfg.projections is None:
            path = state_dir / SALS_FILE
            if not path.exists():
                log("SALS: calibrating the latent projections on the compressed weights")
                proj = calibrate_sals(model, calib, attach=False,
                                      meta={"calibration": recipe.calibration.protocol})
                save_projections(proj, path)
            cfg = dataclasses.replace(cfg, projections=str(path))
        if isinstance(cfg, SALSConfig):
            from .models import get_adapter
            from .recipes.runtime import sals_with_kv_values

            cfg = sals_with_kv_values(cfg, recipe.kv, get_adapter(model).head_dim)  # explicit in recipe.yaml
        steps.append(cfg)
    return dataclasses.replace(recipe, steps=tuple(steps))


def compress_to_folder(model_spec: str, recipe: Recipe | str, out: str | os.PathLike[str], *, dtype: str = "fp32",
                       evaluate: bool = True, restart: bool = False, overwrite: bool = False,
                       after_layer: Callable[[int], None] | None = None, calib: torch.Tensor | None = None,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``recipe`` on ``model_spec`` and write the folder ``out``; returns the report (also report.json).

    ``calib`` (N, T) token ids replaces the recipe's calibration text (for models without a tokenizer);
    ``after_layer(i)`` is called after each layer checkpoint (tests interrupt a run with it).
    """
    from .data import calibration_set
    from .models import load
    from .quant.serialize import save

    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output folder {out} exists and is not empty; pass --overwrite or choose another --out")
    started = time.perf_counter()
    model, tok = load(model_spec, dtype=dtype)
    check_against_model(recipe, model)
    state_dir = out.with_name(out.name + ".partial")
    resumed = _prepare_state(state_dir, _state_key(model_spec, dtype, recipe), restart)
    if resumed:
        log(f"resuming the interrupted run in {state_dir}")
    if calib is not None:
        if not isinstance(calib, torch.Tensor) or calib.dim() != 2:
            raise ConfigError(f"calib must be an (N, T) tensor of token ids, got {getattr(calib, 'shape', calib)}")
    elif recipe.needs_calibration:
        if tok is None:
            raise ConfigError(f"{model_spec} has no tokenizer, and this recipe needs calibration text; use a model "
                              "with a tokenizer")
        c = recipe.calibration
        calib = calibration_set(tok, c.source, nsamples=c.nsamples, seqlen=c.seqlen, seed=c.seed)
    step_reports = run_weight_steps(model, recipe, calib, state_dir / "layers", after_layer, log)
    recipe_run = resolve_runtime(model, recipe, calib, state_dir, log)
    choices = per_layer_choices(model, step_reports)
    report: dict[str, Any] = {"model": model_spec, "dtype": dtype, "recipe": recipe_run.to_dict(),
                              "calibration": recipe.calibration.protocol if recipe.needs_calibration else None,
                              "steps": [{k: v for k, v in r.items() if k not in ("layers", "sensitivity",
                                                                                  "allocation")}
                                        for r in step_reports],
                              "resumed": resumed, "compress_seconds": time.perf_counter() - started}
    if evaluate:
        from .report.measure import measure

        report["evaluation"] = measure(model_spec, dtype, model, tok, recipe_run, log=log)
    report["machine"] = machine_info(dtype)
    report["peak_rss_mib"] = peak_rss_mib()
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save(model, tmp / "model", tokenizer=tok, extra={"recipe": recipe_run.name})
        if (state_dir / SALS_FILE).exists():
            shutil.copy(state_dir / SALS_FILE, tmp / "model" / SALS_FILE)
            report["recipe"] = _relocate_projections(report["recipe"], "model/" + SALS_FILE)
        if recipe.export.format == "compressed-tensors":
            from .export.compressed_tensors import export_compressed_tensors

            export_compressed_tensors(model, tmp / "compressed-tensors", tokenizer=tok, dtype=recipe.export.dtype)
        import yaml

        (tmp / "recipe.yaml").write_text(yaml.safe_dump(report["recipe"], sort_keys=False))
        (tmp / "choices.json").write_text(json.dumps(_json_safe(
            {**choices, "steps": [{k: r.get(k) for k in ("step", "layers", "sensitivity") if k in r}
                                  for r in step_reports]}), indent=1))
        (tmp / "report.json").write_text(json.dumps(_json_safe(report), indent=1))
        from .report.html import write_report

        write_report(tmp, tmp / "report.html")
    shutil.rmtree(state_dir, ignore_errors=True)
    return report


def _relocate_projections(recipe: dict[str, Any], rel: str) -> dict[str, Any]:
    for step in recipe["steps"]:
        if step.get("type") == "SALSConfig" and step.get("projections"):
            step["projections"] = rel
    return recipe


def load_compressed(folder: str | os.PathLike[str], dtype: str | None = None) -> tuple[nn.Module, Any, Any]:
    """(model, tokenizer, RuntimeMethod) of a ``compactlm compress`` folder: the model and its recipe's runtime."""
    import yaml

    from .models import load
    from .recipes import Recipe
    from .recipes.runtime import recipe_method

    folder = Path(folder)
    if not (folder / "recipe.yaml").is_file() or not (folder / "model").is_dir():
        raise ConfigError(f"{folder} is not a `compactlm compress` output folder (no recipe.yaml and model/)")
    data = yaml.safe_load((folder / "recipe.yaml").read_text())
    for step in data["steps"]:
        if step.get("type") == "SALSConfig" and step.get("projections"):
            step["projections"] = str(folder / step["projections"])
    recipe = Recipe.from_dict(data)
    model, tok = load(str(folder / "model"), dtype=dtype or "fp32")
    return model, tok, recipe_method(model, recipe)


DEMO_RECIPE = "aptq-2.5bit+kv4+sals"


def step_pipeline(ctx: Any) -> list[dict[str, Any]]:
    """Demo step ``pipeline``: ``compactlm compress MODEL --recipe aptq-2.5bit+kv4+sals`` then the report.

    Writes ``$COMPACTLM_DEMO_OUT`` (default ``demo-out``)/``<recipe>``; an interrupted demo resumes there.
    """
    from .cli.common import print_table
    from .report.html import summary_rows

    out = Path(os.environ.get("COMPACTLM_DEMO_OUT", "demo-out")) / DEMO_RECIPE
    start = time.perf_counter()
    report = compress_to_folder(ctx.model_spec, DEMO_RECIPE, out, overwrite=True,
                                log=lambda m: print(m, flush=True))
    rows = summary_rows(report)
    print_table(rows)
    print(f"report: {out / 'report.html'}")
    seconds = time.perf_counter() - start
    return [{"step": "pipeline", "method": r["model"], "ppl_wiki_512_q": r["ppl"], "weights_MiB": r["weights_MiB"],
             "kv_B_per_token": r["kv_B_per_token"], "ruler": r["ruler"], "seconds": seconds if k == len(rows) - 1
             else None} for k, r in enumerate(rows)]
