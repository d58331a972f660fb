"""The arguments and --lengths parser shared by the ``compactlm bench`` timing commands."""

from __future__ import annotations

import argparse

import pytest

from compactlm.cli.common import add_bench_args, parse_lengths
from compactlm.errors import ConfigError


def test_parse_lengths_reads_k_and_counts():
    assert parse_lengths("4k, 16k,1000", minimum=128) == [4096, 16384, 1000]
    assert parse_lengths("0.5k", minimum=128) == [512]


@pytest.mark.parametrize(("text", "minimum", "match"), [
    ("4q", 128, "could not read '4q'"),
    ("4k,,8k", 128, "could not read ''"),
    ("", 128, "could not read"),
    ("100", 128, "≥ 128 tokens, got '100'"),
    ("4k,200", 256, "≥ 256 tokens"),
])
def test_parse_lengths_errors_name_the_flag(text, minimum, match):
    with pytest.raises(ConfigError, match="--lengths") as err:
        parse_lengths(text, minimum=minimum)
    assert match in str(err.value)


def test_bench_args_defaults_and_overrides():
    p = argparse.ArgumentParser()
    add_bench_args(p, lengths="4k,8k", lengths_help="sequence lengths", threads=None, threads_help="threads",
                   min_repeats=10)
    args = p.parse_args([])
    assert (args.lengths, args.dtype, args.repeats, args.threads, args.json, args.quiet) == (
        "4k,8k", "bf16", 10, None, None, False)
    args = p.parse_args(["--lengths", "1k", "--dtype", "fp32", "--repeats", "12", "--threads", "1", "--json", "x.json",
                         "-q"])
    assert (args.lengths, args.dtype, args.repeats, args.threads, args.json, args.quiet) == (
        "1k", "fp32", 12, 1, "x.json", True)
    assert "at least 10" in p.format_help()
