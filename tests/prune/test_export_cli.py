"""Saving pruned models (dense + compressed-tensors sparsity config, 2:4 bitmask) and the ``prune`` command."""

import argparse
import json

import pytest
import torch

import compactlm
from compactlm.cli import main
from compactlm.errors import ConfigError
from compactlm.export.sparsity import compress_24, decompress_24, pack_bitmask, structure_of
from compactlm.models import tiny_model
from compactlm.prune import Magnitude, Wanda, load_sparse, save_sparse


def _same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("family, config, fmt, structure", [
    ("llama", Magnitude(pattern="2:4"), "sparse-24-bitmask", "2:4"),
    ("qwen2", Magnitude(pattern="4:8"), "dense", "4:8"),
    ("mixtral", Magnitude(sparsity=0.5), "dense", "unstructured"),
])
def test_save_and_load_round_trip(tmp_path, family, config, fmt, structure):
    model = tiny_model(family)
    report = compactlm.prune(model, config)
    out = save_sparse(model, tmp_path / "pruned", prune_config=config, report=report)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == fmt
    sc = cfg["sparsity_config"]
    assert sc["format"] == fmt and sc["sparsity_structure"] == structure and sc["global_sparsity"] == 0.5
    assert set(sc["targets"]) == set(report.sparsity) and "lm_head" in sc["ignore"]
    loaded, tok = compactlm.models.load(out)  # through the folder loader the export registers
    assert tok is None
    _same_model(model, loaded)
    _same_model(model, load_sparse(out)[0])


def test_sparsity_config_is_readable_by_compressed_tensors(tmp_path):
    ct = pytest.importorskip("compressed_tensors")
    model = tiny_model("llama")
    compactlm.prune(model, Magnitude(pattern="2:4"))
    out = save_sparse(model, tmp_path / "p")
    sc = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    parsed = ct.config.SparsityCompressionConfig.load_from_registry(sc["format"], **sc)
    assert parsed.format == "sparse-24-bitmask" and parsed.sparsity_structure == "2:4"


def test_24_bitmask_layout_matches_compressed_tensors():
    helpers = pytest.importorskip("compressed_tensors.utils.helpers")
    w = torch.randn(6, 16)
    w = w * compactlm.prune.nm_mask(w.abs(), 2, 4)
    triple = compress_24(w)
    assert triple["compressed"].shape == (6, 8) and triple["bitmask"].dtype == torch.uint8
    assert torch.equal(helpers.pack_bitmasks(w != 0), pack_bitmask(w != 0))
    assert torch.equal(decompress_24(**triple), w)
    assert structure_of(w) == "2:4"
    with pytest.raises(ConfigError, match="2:4"):
        compress_24(torch.randn(4, 8))


def test_save_errors(tmp_path):
    with pytest.raises(ConfigError, match="prune it first"):
        save_sparse(tiny_model("llama"), tmp_path / "x")
    model = tiny_model("llama")
    compactlm.prune(model, Magnitude(sparsity=0.5))
    with pytest.raises(ConfigError, match="every pruned linear to be 2:4"):
        save_sparse(model, tmp_path / "x", format="sparse-24-bitmask")
    save_sparse(model, tmp_path / "x")
    with pytest.raises(FileExistsError):
        save_sparse(model, tmp_path / "x")
    assert not list(tmp_path.glob(".x.tmp-*"))  # nothing half-written left behind


def test_cli_prune_magnitude_writes_folder_and_json(tmp_path, capsys):
    out, js = tmp_path / "out", tmp_path / "r.json"
    assert main(["prune", "tiny-llama", "--method", "magnitude", "--pattern", "2:4", "--out", str(out),
                 "--json", str(js), "-q"]) == 0
    data = json.loads(js.read_text())
    assert data["config"]["type"] == "Magnitude" and data["config"]["pattern"] == "2:4"
    assert len(data["per_layer_sparsity"]) == 14 and data["overall_sparsity"] == 0.5
    assert data["wall_seconds"] > 0 and data["peak_rss_mib"] > 0 and "machine" in data
    model, _ = compactlm.models.load(out)
    assert all(structure_of(m.weight) == "2:4" for n, m in model.named_modules() if n.endswith("_proj"))


@pytest.mark.parametrize("argv, match", [
    (["--method", "magnitude", "--sparsity", "1.5"], "sparsity must be a fraction"),
    (["--method", "magnitude", "--pattern", "5:4"], "0 < N < M"),
    (["--method", "wanda"], "no tokenizer"),
    (["--method", "barber", "--search-ratios", "0.1,abc"], "--search-ratios takes comma-separated fractions"),
    (["--method", "barber", "--search-ratios", "0.1,2"], "search_ratios must be a tuple of fractions"),
])
def test_cli_bad_input_exits_2(tmp_path, capsys, argv, match):
    assert main(["prune", "tiny-llama", *argv, "--out", str(tmp_path / "o"), "-q"]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.default_model
def test_cli_prune_wanda_on_the_default_model(tmp_path):
    out = tmp_path / "w"
    assert main(["prune", "smollm2-135m", "--method", "wanda", "--sparsity", "0.5", "--calib-samples", "2",
                 "--calib-seqlen", "64", "--out", str(out), "-q"]) == 0
    model, tok = compactlm.models.load(out)
    assert tok is not None
    q = model.model.layers[0].self_attn.q_proj.weight
    assert ((q == 0).sum(1) == q.shape[1] // 2).all()
    dense, _ = compactlm.models.load("smollm2-135m")
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)  # never pruned (tied to the embeddings here)
    assert (model.lm_head.weight != 0).float().mean() > 0.5


def test_cli_barber_taylor_flags_build_the_config():
    from compactlm.cli.prune import build_config
    from compactlm.prune import Barber

    args = argparse.Namespace(method="barber", init="wanda", pattern=None, sparsity=0.5, scope="row", targets=[],
                              ignore=[], rebuild_ratio=0.01, group="row", criterion="taylor",
                              search_ratios="0.01,0.1", objective="block", heldout=8, rounds=1, margin=2.0)
    cfg = build_config(args)
    assert isinstance(cfg, Barber) and cfg.criterion == "taylor" and cfg.search_ratios == (0.01, 0.1)
    args = argparse.Namespace(**{**vars(args), "criterion": None, "objective": "lm", "heldout": 4, "rounds": 2,
                                               "margin": 0.0})
    cfg = build_config(args)
    assert (cfg.objective, cfg.heldout, cfg.rounds, cfg.margin, cfg.search_ratios) == ("lm", 4, 2, 0.0, (0.01, 0.1))


def test_cli_barber_defaults_to_the_lm_objective_and_block_stays_available():
    from compactlm.cli import build_parser
    from compactlm.cli.prune import build_config
    from compactlm.prune.barber import LM_SEARCH_RATIOS

    parse = build_parser().parse_args
    cfg = build_config(parse(["prune", "tiny-llama", "--method", "barber", "--out", "o"]))
    assert (cfg.objective, cfg.search_ratios, cfg.rounds, cfg.margin, cfg.heldout) == ("lm", LM_SEARCH_RATIOS, 1, 2.0,
                                                                                       8)
    cfg = build_config(parse(["prune", "tiny-llama", "--method", "barber", "--objective", "block", "--out", "o"]))
    assert (cfg.objective, cfg.search_ratios, cfg.rebuild_ratio) == ("block", (), 0.01)
    cfg = build_config(parse(["prune", "tiny-llama", "--method", "barber", "--search-ratios", "0.001,0.01",
                              "--out", "o"]))
    assert (cfg.objective, cfg.search_ratios) == ("lm", (0.001, 0.01))


def test_wanda_default_is_half_and_compress_entry_point():
    model = tiny_model("llama")
    calib = torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    assert compactlm.compress(model, Wanda(), calib=calib) is model
    assert float((model.model.layers[1].mlp.down_proj.weight == 0).float().mean()) == 0.5
