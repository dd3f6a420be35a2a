"""Every bad input a new user hits, run through the command line as they would type it.

    python scripts/bad_inputs.py [--out DIR]

prints one table row per case: the exit code, the time to fail, the message (its last line on
stderr) and whether anything was lost (a file that was there before changed or vanished). Each
case must fail before any training, with one line naming the key, file or layer.
`tests/unit/test_bad_inputs.py` runs the same catalogue in-process and asserts every row.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")


@dataclass
class Case:
    name: str
    argv: list[str]
    message: str  # a substring of the one-line error
    code: int = 2
    watch: list[Path] = field(default_factory=list)  # files that must survive unchanged
    lines: int = 1  # lines of the error (a refused checkpoint lists its mismatched layers)


@dataclass
class Context:
    """Good data to start from (`urls`, `digits`, `root` as `make_context` or the test fixture
    gives them) and a scratch folder for the bad artefacts."""

    urls: str
    digits: str
    work: Path

    def run_args(self, run: str, **extra: object) -> list[str]:
        """A tiny local run `run` of the demo config, with `extra` overrides."""
        base = {"name": run, "output_dir": str(self.work / "runs" / run), "launcher.kind": "local",
                "tracking.mode": "disabled", "pretrain.data.urls": self.urls, "pretrain.data.img_size": 16,
                "pretrain.data.batch_size": 8, "pretrain.data.num_workers": 0, "pretrain.steps": 4,
                "finetune.data.source": self.digits, "finetune.data.shots_per_class": 2, "finetune.steps": 2,
                "finetune.seeds": "[0]", "finetune.assess": "false"}
        base.update(extra)
        return [f"{k}={v}" for k, v in base.items()]


def _tar(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png() -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _image_folder(root: Path, classes: list[str]) -> str:
    import numpy as np
    from PIL import Image

    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / split / c / f"{i}.png")
    return str(root)


def _mismatched_checkpoint(root: Path) -> str:
    """A committed checkpoint whose meta claims hybrid_tiny but whose weights are resnet_tiny's."""
    from architectures import create_model
    from pipeline.checkpoint import model_meta, save_checkpoint

    claimed = model_meta(create_model("hybrid_tiny", num_classes=10), num_classes=10, in_chans=3, img_size=16,
                         mean=[0.5] * 3, std=[0.25] * 3)
    return str(save_checkpoint(root, 1, create_model("resnet_tiny", num_classes=10), claimed))


def _silent_port() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)  # accepts into the backlog; never answers
    return server, server.getsockname()[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_cases(ctx: Context) -> tuple[list[Case], list[Callable[[], None]]]:
    """The catalogue, with its artefacts made under `ctx.work`; returns cleanups to call after."""
    w, cleanups = ctx.work, []
    w.mkdir(parents=True, exist_ok=True)
    shards = Path(ctx.urls).parent
    run = ctx.run_args

    (w / "list.yaml").write_text("- name: x\n- steps: 3\n")
    (w / "broken.yaml").write_text("name: [unclosed\n")
    (w / "dir-shard.tar").mkdir(exist_ok=True)
    _tar(w / "empty" / "s-000.tar", {})
    (w / "garbage").mkdir(exist_ok=True)
    (w / "garbage" / "s-000.tar").write_bytes(b"<html>not a tar</html>" * 50)
    (w / "badinfo").mkdir(exist_ok=True)
    (w / "badinfo" / "s-000.tar").write_bytes((shards / "fractals-000000.tar").read_bytes())
    (w / "badinfo" / "_info.json").write_text("{not json")
    (w / "noindex").mkdir(exist_ok=True)
    _tar(w / "noindex" / "s-000.tar", {f"{i:03d}.{ext}": data for i in range(4)
                                       for ext, data in (("png", _png()), ("cls", str(7 + i).encode()))})
    one_class = _image_folder(w / "oneclass", ["cat"])
    mismatched = _mismatched_checkpoint(w / "mismatch")
    torn = Path(_mismatched_checkpoint(w / "torn"))
    (torn / "COMMITTED").unlink()
    (w / "a-file").write_text("not a directory\n")
    other = w / "runs" / "owned"
    other.mkdir(parents=True, exist_ok=True)
    (other / "config.yaml").write_text(f"name: x5\noutput_dir: {other}\n")
    (other / "report.md").write_text("# x5's report\n")
    foreign = w / "runs" / "foreign"
    foreign.mkdir(parents=True, exist_ok=True)
    (foreign / "report.md").write_text("# somebody's notes\n")
    server, silent = _silent_port()
    cleanups.append(server.close)
    silent_url, closed_url = f"http://127.0.0.1:{silent}", f"http://127.0.0.1:{_closed_port()}"

    cases = [
        # -- the config file and overrides
        Case("config file missing", ["run", str(w / "nope.yaml")], "<config>: file not found"),
        Case("config not YAML", ["run", str(w / "broken.yaml")], "is not valid YAML"),
        Case("config is a list", ["run", str(w / "list.yaml")], "holds a list at the top level"),
        Case("unknown key", ["run", DEMO, *run("k1"), "pretrain.stepz=5"], "pretrain.stepz:"),
        Case("override without =", ["run", DEMO, "pretrain.steps"], "overrides are key=value"),
        Case("wrong type", ["run", DEMO, *run("k2", **{"pretrain.steps": "many"})], "pretrain.steps:"),
        Case("zero steps", ["run", DEMO, *run("k3", **{"pretrain.steps": 0})], "pretrain.steps: must be >= 1"),
        Case("unknown strategy", ["run", DEMO, *run("k4", **{"finetune.strategy": "magic"})], "finetune.strategy:"),
        Case("unknown launcher", ["run", DEMO, *run("k5", **{"launcher.kind": "slurm"})], "launcher.kind:"),
        Case("name with a slash", ["run", DEMO, *run("k6", name="a/b")], "name: must be a non-empty name"),
        Case("unknown model", ["run", DEMO, *run("k7", **{"pretrain.model.name": "nope"})], "pretrain.model"),
        Case("bad model kwargs", ["run", DEMO, *run("k8", **{"pretrain.model.kwargs": "{depthz: 3}"})],
             "pretrain.model"),
        Case("unknown tracking mode", ["run", DEMO, *run("k9", **{"tracking.mode": "loud"})], "tracking.mode:"),
        Case("no seeds", ["run", DEMO, *run("k10", **{"finetune.seeds": "[]"})], "finetune.seeds:"),
        Case("unbalanced braces", ["run", DEMO, "pretrain.data.urls=a-{0..3.tar"], "pretrain.data.urls"),
        # -- stage one's shards
        Case("shards missing", ["run", DEMO, *run("d1", **{"pretrain.data.urls": f"{w}/none-{{0..3}}.tar"})],
             "shard not found"),
        Case("shard is a directory", ["run", DEMO, *run("d2", **{"pretrain.data.urls": str(w / "dir-shard.tar")})],
             "is not a file"),
        Case("empty tar", ["run", DEMO, *run("d3", **{"pretrain.data.urls": str(w / "empty" / "s-000.tar"),
                                                       "pretrain.data.num_classes": 10})], "a tar with no samples"),
        Case("not a tar", ["run", DEMO, *run("d4", **{"pretrain.data.urls": str(w / "garbage" / "s-000.tar"),
                                                       "pretrain.data.num_classes": 10})], "not a readable tar"),
        Case("_info.json not JSON", ["run", DEMO, *run("d5", **{"pretrain.data.urls": str(w / "badinfo" / "s-000.tar")})],
             "_info.json is not valid JSON"),
        Case("num_classes below the index", ["run", DEMO, *run("d6", **{"pretrain.data.num_classes": 5})],
             "pretrain.data.num_classes: 5, but the shards' _info.json says they hold 10"),
        Case("num_classes below the labels", ["run", DEMO, *run("d7", **{
            "pretrain.data.urls": str(w / "noindex" / "s-000.tar"), "pretrain.data.num_classes": 8})],
             "pretrain.data.num_classes: 8, but 3 of the first 4 samples"),
        Case("no index, no num_classes", ["run", DEMO, *run("d8", **{"pretrain.data.urls": str(w / "noindex" / "s-000.tar")})],
             "pretrain.data.num_classes: 0 and the shards have no _info.json"),
        Case("wrong image_key", ["run", DEMO, *run("d9", **{"pretrain.data.image_key": "jpg"})],
             "pretrain.data.image_key:"),
        Case("wrong label_key", ["run", DEMO, *run("d10", **{"pretrain.data.label_key": "label"})],
             "pretrain.data.label_key:"),
        Case("too few shards for the readers", ["run", DEMO, *run("d11", **{
            "pretrain.data.urls": str(shards / "fractals-000000.tar"), "pretrain.data.num_workers": 2})],
             "cannot feed"),
        Case("pipe: refused", ["run", DEMO, *run("d12", **{"pretrain.data.urls": "pipe:cat /etc/hostname"})],
             "pipe:"),
        # -- stage two's target
        Case("target missing", ["run", DEMO, *run("t1", **{"finetune.data.source": str(w / "no-target")})],
             "finetune.data.source:"),
        Case("target lacks the split", ["run", DEMO, *run("t2", **{"finetune.data.test_split": "validation"})],
             "has no split 'validation'"),
        Case("wrong image_column", ["run", DEMO, *run("t3", **{"finetune.data.image_column": "img"})],
             "has no image_column 'img'"),
        Case("one-class image folder", ["run", DEMO, *run("t4", **{"finetune.data.source": one_class})],
             "image folder with 1 class folder(s)"),
        Case("more shots than images", ["run", DEMO, *run("t5", **{"finetune.data.shots_per_class": 500})],
             "finetune.data.shots_per_class: 500-shot subset impossible"),
        Case("partial_blocks beyond the model", ["run", DEMO, *run("t6", **{"finetune.strategy": "partial",
                                                                           "finetune.partial_blocks": 99})],
             "finetune.partial_blocks: 99 exceeds"),
        Case("init_from missing", ["finetune", DEMO, *run("t7", **{"finetune.init_from": str(w / "no-ckpt")})],
             "finetune.init_from:"),
        Case("checkpoint of another architecture", ["finetune", DEMO, *run("t8", **{"finetune.init_from": mismatched})],
             "checkpoint does not fit StrataNet", lines=0),
        Case("torn checkpoint", ["finetune", DEMO, *run("t9", **{"finetune.init_from": str(torn)})],
             "finetune.init_from:"),
        # -- the output directory
        Case("output_dir is a file", ["run", DEMO, *run("o1", output_dir=w / "a-file")], "output_dir: ", watch=[w / "a-file"]),
        Case("output_dir under a file", ["run", DEMO, *run("o2", output_dir=w / "a-file" / "run")],
             "output_dir: cannot write to"),
        Case("output_dir of another run", ["run", DEMO, *run("x6", output_dir=other)], "belongs to the run 'x5'",
             watch=[other / "config.yaml", other / "report.md"]),
        Case("output_dir with foreign files", ["run", DEMO, *run("o4", output_dir=foreign)],
             "holds report.md, which no transferline run", watch=[foreign / "report.md"]),
        # -- clusters
        Case("submit: relative output_dir", ["submit", "--address", closed_url, DEMO, *run("c1", output_dir="runs/c1")],
             "output_dir: 'runs/c1' is relative"),
        Case("submit: relative data missing", ["submit", "--address", closed_url, DEMO, "output_dir=/tmp/tl-c2",
                                                "pretrain.data.urls=nodata/s-{000..003}.tar"],
             "is a relative path, and"),
        Case("submit: no address", ["submit", DEMO, *run("c3", output_dir="/tmp/tl-c3")], "no cluster address",
             code=1),
        Case("jobs: dashboard never answers", ["jobs", "list", "--address", silent_url, "--timeout", "1"],
             "did not answer within 1 s", code=1),
        Case("jobs: nothing listening", ["jobs", "list", "--address", closed_url, "--timeout", "2"],
             "cannot reach the Ray dashboard", code=1),
        Case("jobs logs without a job", ["jobs", "logs", "--address", closed_url], "needs a JOB_ID"),
        Case("jobs: zero timeout", ["jobs", "list", "--address", closed_url, "--timeout", "0"],
             "--timeout: must be > 0"),
        Case("submit: --env not set", ["submit", "--address", closed_url, "--env", "TL_NOT_SET", DEMO,
                                        *run("c8", output_dir="/tmp/tl-c8")], "--env: TL_NOT_SET not set"),
    ]
    return cases, cleanups


def digest(paths: list[Path]) -> dict[str, str | None]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None for p in paths}


def run_case(case: Case) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API"))}
    env.pop("TL_NOT_SET", None)
    before = digest(case.watch)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline", *case.argv], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=300)
    elapsed = time.monotonic() - t0
    return judge(case, proc.returncode, proc.stderr, elapsed, before != digest(case.watch))


def judge(case: Case, code: int, stderr: str, seconds: float, lost: bool) -> dict:
    """One row: the error is the text from the `transferline: error:` line on (libraries' progress
    bars before it are not the message); `lines` 0 allows any length."""
    lines = stderr.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("transferline: error:")), len(lines))
    error = lines[start:]
    return {"case": case.name, "code": code, "seconds": seconds, "message": error[0] if error else "",
            "lines": len(error), "lost": lost,
            "ok": code == case.code and bool(error) and case.message in "\n".join(error)
            and (case.lines == 0 or len(error) == case.lines)}


def make_context(root: Path) -> Context:
    from pipeline.data.embedded import make_digits_dataset, make_fractal_shards

    make_fractal_shards(root / "fractals", num_classes=10, per_class=24, img_size=16, samples_per_shard=40, seed=0)
    make_digits_dataset(root / "digits", seed=0)
    return Context(urls=str(root / "fractals" / "fractals-{000000..000005}.tar"), digits=str(root / "digits"),
                   work=root / "work")


def main() -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="where the tiny data and artefacts go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="tl-bad-inputs-"))
    cases, cleanups = build_cases(make_context(root))
    rows = []
    print("| # | bad input | exit | time | lines | lost | message |\n|---|---|---|---|---|---|---|")
    try:
        for i, case in enumerate(cases, 1):
            row = run_case(case)
            rows.append(row)
            msg = row["message"].replace("|", "\\|").replace(str(root), "…")
            print(f"| {i} | {case.name}{'' if row['ok'] else ' **(unexpected)**'} | {row['code']} | "
                  f"{row['seconds']:.1f} s | {row['lines']} | {'yes' if row['lost'] else 'nothing'} | {msg} |",
                  flush=True)
    finally:
        for c in cleanups:
            c()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    bad = [r["case"] for r in rows if not r["ok"] or r["lost"]]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} as expected" + (f"; not: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
