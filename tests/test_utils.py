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


def test_outputs_get_ordinary_permissions(tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "r.json", {"a": 1})
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "x").write_text("1")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
