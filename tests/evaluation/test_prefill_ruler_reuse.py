"""``benchmarks/prefill_ruler.py --full-from``: which earlier RULER JSONs it accepts, and the refusals' messages."""

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "prefill_ruler.py"
_spec = importlib.util.spec_from_file_location("prefill_ruler", _PATH)
prefill_ruler = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prefill_ruler)


def _write(path: Path, model="smollm2-135m", dtype="bf16", methods=("full", "int4")) -> str:
    records = [{"method": m, "task": "passkey", "length": 2048, "index": 0, "output": "x"} for m in methods]
    path.write_text(json.dumps({"model": model, "dtype": dtype, "records": records, "command": "run",
                                "machine": {"git_commit": "abc1234"}}))
    return str(path)


def test_keeps_only_full_rows_and_names_the_sources(tmp_path):
    a, b = _write(tmp_path / "a.json"), _write(tmp_path / "b.json", methods=("full",))
    records, sources = prefill_ruler.reused_full_records([a, b], "smollm2-135m", "bf16")
    assert [r["method"] for r in records] == ["full", "full"]
    assert [(s["path"], s["records"], s["git_commit"]) for s in sources] == [(a, 1, "abc1234"), (b, 1, "abc1234")]
    assert prefill_ruler.reused_full_records([], "smollm2-135m", "bf16") == ([], [])


def test_refuses_missing_file_other_model_or_dtype_and_no_full_rows(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        prefill_ruler.reused_full_records([str(tmp_path / "nope.json")], "smollm2-135m", "bf16")
    with pytest.raises(SystemExit, match="is tiny-llama in bf16, this run is smollm2-135m in bf16"):
        prefill_ruler.reused_full_records([_write(tmp_path / "m.json", model="tiny-llama")], "smollm2-135m", "bf16")
    with pytest.raises(SystemExit, match="in fp32, this run is smollm2-135m in bf16"):
        prefill_ruler.reused_full_records([_write(tmp_path / "d.json", dtype="fp32")], "smollm2-135m", "bf16")
    with pytest.raises(SystemExit, match="holds no full-attention records"):
        prefill_ruler.reused_full_records([_write(tmp_path / "n.json", methods=("int4",))], "smollm2-135m", "bf16")
