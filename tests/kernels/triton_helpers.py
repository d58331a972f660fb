"""Running a Triton check under the interpreter, shared by the kernel tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run_interpreted(code: str, arg) -> dict:
    """Run ``code`` with ``json.dumps(arg)`` as argv[1] in a fresh Python with TRITON_INTERPRET=1; its last stdout
    line, parsed as JSON. A fresh process because TRITON_INTERPRET must be set before anything imports triton."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(arg)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
