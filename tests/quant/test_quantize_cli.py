"""``compactlm quantize``: output folder, JSON, and clear errors (exit 2)."""

import json

from compactlm.cli import main


def test_quantize_rtn_writes_a_loadable_folder_and_json(tmp_path, capsys):
    out, js = tmp_path / "q", tmp_path / "r.json"
    rc = main(["quantize", "tiny-llama", "--method", "rtn", "--bits", "3", "--group-size", "16", "--out", str(out),
               "--json", str(js), "-q"])
    assert rc == 0
    data = json.loads(js.read_text())
    assert data["avg_bits"] == 3.0 and data["config"]["type"] == "RTN" and len(data["bits_per_layer"]) == 14
    assert {"quantize_seconds", "peak_rss_mib", "machine", "avg_bits_with_metadata"} <= set(data)
    import compactlm

    model, _ = compactlm.models.load(out)
    assert compactlm.quant.quant_summary(model)["avg_bits"] == 3.0


def test_bad_inputs_exit_2_with_a_message(tmp_path, capsys):
    cases = [
        (["--method", "rtn", "--bits", "5"], "bits=5"),
        (["--method", "rtn", "--bits", "4", "--group-size", "100"], "group_size=100 does not divide"),
        (["--method", "gptq", "--bits", "4", "--group-size", "16"], "no tokenizer"),
        (["--method", "gptq", "--avg-bits", "3"], "--avg-bits is for --method aptq"),
        (["--method", "rtn", "--bits", "3", "--group-size", "16", "--export", "compressed-tensors"], "3-bit"),
    ]
    for extra, message in cases:
        rc = main(["quantize", "tiny-llama", *extra, "--out", str(tmp_path / "x"), "-q"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (extra, err)
    assert not (tmp_path / "x").exists()


def test_clip_search_flag_overrides_each_methods_default():
    from compactlm.cli import build_parser
    from compactlm.cli.quantize import build_config
    from compactlm.quant import GPTQ, RTN

    def config(*extra):
        return build_config(build_parser().parse_args(["quantize", "tiny-llama", "--out", "x", *extra]))

    assert config("--method", "rtn", "--bits", "4").clip_search is RTN().clip_search
    assert config("--method", "gptq", "--bits", "4").clip_search is GPTQ().clip_search
    assert config("--method", "rtn", "--bits", "4", "--clip-search").clip_search is True
    assert config("--method", "gptq", "--bits", "4", "--no-clip-search").clip_search is False
