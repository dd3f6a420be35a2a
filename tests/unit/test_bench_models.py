"""scripts/bench_models.py: model specs parse as `pretrain.model.kwargs.*` overrides would, and
a run prints one row per spec with its ratio to the first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_models  # noqa: E402


def test_spec_values_are_yaml_and_lists_keep_their_commas() -> None:
    assert bench_models.parse_spec("hybrid_tiny") == ("hybrid_tiny", {})
    name, kwargs = bench_models.parse_spec("hybrid_tiny:stem_stride=1,dims=[8,32,64],conv_norm=layer")
    assert name == "hybrid_tiny"
    assert kwargs == {"stem_stride": 1, "dims": [8, 32, 64], "conv_norm": "layer"}
    with pytest.raises(SystemExit, match="'dims' is not key=value"):
        bench_models.parse_spec("hybrid_tiny:dims")


def test_an_import_path_is_a_name_and_its_kwargs_follow_a_second_colon() -> None:
    assert bench_models.parse_spec("arch_variants:dense") == ("arch_variants:dense", {})
    assert bench_models.parse_spec("arch_variants:stem1:dims=[8,16,32]") == ("arch_variants:stem1", {"dims": [8, 16, 32]})


def test_a_run_prints_a_row_per_spec() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_models.py"), "hybrid_tiny", "hybrid_tiny:dims=[8,16,32]",
         "--batch", "2", "--steps", "1", "--rounds", "1"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert len(rows) == 2 and rows[0].endswith("| 1.00 |"), out
    assert "hybrid_tiny:dims=[8,16,32]" in rows[1]
