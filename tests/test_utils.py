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


def test_machine_notes_name_the_snapshot_commit_outside_git(monkeypatch):
    """Run from a `git archive` snapshot, git fails: COMPACTLM_SNAPSHOT names the commit instead."""
    import subprocess

    def no_git(*args, **kwargs):
        raise subprocess.CalledProcessError(128, "git")

    monkeypatch.setattr(subprocess, "run", no_git)
    monkeypatch.delenv("COMPACTLM_SNAPSHOT", raising=False)
    assert "git_commit" not in machine_info()
    monkeypatch.setenv("COMPACTLM_SNAPSHOT", "abc1234")
    assert machine_info()["git_commit"] == "abc1234"


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


def test_median_time_warms_up_then_takes_the_median():
    import time

    from compactlm.errors import ConfigError
    from compactlm.utils import median_time

    calls = []
    # The first (warm-up) call is slow and must not count; of the 3 timed calls one is an outlier (a busy
    # machine): the median ignores both.
    delays = iter([0.2, 0.0, 0.3, 0.0])

    def fn():
        calls.append(1)
        time.sleep(next(delays))

    seconds = median_time(fn, warmup=1, repeat=3)
    assert len(calls) == 4
    assert 0 <= seconds < 0.1
    assert median_time(lambda: time.sleep(0.02), warmup=0, repeat=1) >= 0.02
    for bad in (dict(warmup=-1), dict(repeat=0), dict(repeat=2.0), dict(warmup=True)):
        with pytest.raises(ConfigError, match="warmup|repeat"):
            median_time(fn, **bad)
