"""``compactlm bench decode-attention`` and the SALS CLI errors."""

from __future__ import annotations

import json

import pytest

from compactlm.cli import main
from compactlm.cli.bench_decode import parse_lengths
from compactlm.errors import ConfigError


def test_bench_decode_attention_writes_protocol_fields(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["bench", "decode-attention", "--lengths", "512", "--methods", "sals,sals-index,quest,streaming,oracle",
               "--threads", "1", "--dtype", "fp32", "--json", str(out), "-q"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["protocol"] == "ATTN-decode" and "cpu" in data["machine"]
    rows = data["results"]
    assert {r["method"] for r in rows} == {"sals", "sals-index", "quest", "streaming", "oracle"}
    for r in rows:
        assert {"method", "length", "ms", "dense_ms", "dense_impl", "ratio", "ideal_ratio", "achieved"} <= set(r)
        assert r["dense_impl"] in ("sdpa", "grouped") and r["ms"] > 0
        assert r["ideal_ratio"] > 1 or r["method"] == "oracle"
        assert r["cpu_ms"] > 0 and r["dense_cpu_ms"] > 0
        assert r["ratio_cpu"] == pytest.approx(r["dense_cpu_ms"] / r["cpu_ms"])
        assert r["achieved_cpu"] == pytest.approx(r["ratio_cpu"] / r["ideal_ratio"])


def test_bad_inputs_exit_2(capsys):
    assert main(["bench", "decode-attention", "--lengths", "4q"]) == 2
    assert "--lengths" in capsys.readouterr().err
    assert main(["bench", "decode-attention", "--methods", "magic"]) == 2
    assert main(["bench", "decode-attention", "--repeats", "3"]) == 2
    with pytest.raises(ConfigError):
        parse_lengths("100")
    assert parse_lengths("4k, 16k,1000") == [4096, 16384, 1000]
