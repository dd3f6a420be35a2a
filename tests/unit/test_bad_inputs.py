"""Every bad input of `scripts/bad_inputs.py`'s catalogue fails before any training, in one line
naming the key, file or layer, with the right exit code, and loses nothing (issue #13).

The catalogue runs in-process here (`pipeline.cli.main`), the script runs it through
subprocesses and prints the table.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bad_inputs  # noqa: E402

from pipeline.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def catalogue(tiny_data, tmp_path_factory):
    ctx = bad_inputs.Context(urls=tiny_data["urls"], digits=tiny_data["digits"],
                             work=tmp_path_factory.mktemp("bad-inputs"))
    cases, cleanups = bad_inputs.build_cases(ctx)
    yield {c.name: c for c in cases}
    for c in cleanups:
        c()


def _names() -> list[str]:
    # The catalogue's names, without building it (collection must stay cheap).
    import ast

    tree = ast.parse(Path(bad_inputs.__file__).read_text())
    return [node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Case"
            and node.args and isinstance(node.args[0], ast.Constant)]


def test_the_catalogue_has_at_least_40_cases():
    assert len(_names()) >= 40 and len(set(_names())) == len(_names())


@pytest.mark.parametrize("name", _names())
def test_bad_input_fails_fast_in_one_line(name, catalogue, capsys, monkeypatch):
    case = catalogue[name]
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "TL_NOT_SET"):
        monkeypatch.delenv(var, raising=False)
    before = bad_inputs.digest(case.watch)
    t0 = time.monotonic()
    code = main(list(case.argv))
    row = bad_inputs.judge(case, code, capsys.readouterr().err, time.monotonic() - t0,
                           before != bad_inputs.digest(case.watch))
    assert row["ok"], row
    assert not row["lost"], f"{name}: a file that was there changed: {case.watch}"
    assert row["seconds"] < 30, f"{name}: {row['seconds']:.1f} s to fail"
