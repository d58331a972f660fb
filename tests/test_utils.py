import json

import pytest

from compactlm.utils import atomic_directory, machine_info, write_json_atomic


def test_atomic_directory_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "half.bin").write_text("x")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_replaces_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(FileExistsError, match="not empty"):
        with atomic_directory(target):
            pass
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]


def test_json_and_machine_notes(tmp_path):
    write_json_atomic(tmp_path / "r.json", {"machine": machine_info("bf16")})
    data = json.loads((tmp_path / "r.json").read_text())["machine"]
    assert {"cpu", "cores", "torch", "threads", "date", "dtype"} <= set(data)
