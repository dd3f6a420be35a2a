"""`transferline` command line.

    transferline run CONFIG [key=value ...]        pretrain -> finetune -> scratch + report
    transferline pretrain CONFIG [key=value ...]   stage one only
    transferline finetune CONFIG finetune.init_from=PATH [key=value ...]
    transferline data fractals --out DIR ...       FractalDB-style webdataset shards
    transferline data digits --out DIR             UCI digits as an HF dataset on disk
    transferline data embedded [--root data]       both, as the demo expects them
    transferline models                            registered architectures
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.config import ConfigError


def _stage_command(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides, command=args.command)
    from pipeline.runner import run_pipeline  # heavy imports only once the config is good

    run_pipeline(cfg, args.command)
    return 0


def _data_command(args: argparse.Namespace) -> int:
    from pipeline.data import embedded

    if args.what == "fractals":
        info = embedded.make_fractal_shards(
            args.out, num_classes=args.classes, per_class=args.per_class, img_size=args.img_size,
            samples_per_shard=args.per_shard, seed=args.seed,
        )
        print(json.dumps({k: v for k, v in info.items() if k != "shards"}, indent=2))
    elif args.what == "digits":
        path = embedded.make_digits_dataset(args.out, seed=args.seed)
        print(path)
    else:
        print(json.dumps(embedded.ensure_embedded_data(args.root), indent=2))
    return 0


def _models_command(args: argparse.Namespace) -> int:
    from architectures import list_models

    print("\n".join(list_models()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "pretrain, fine-tune and the scratch baseline, then the report"),
                        ("pretrain", "stage one only"),
                        ("finetune", "stage two (and its baseline) from finetune.init_from")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("config", help="YAML config (see configs/)")
        p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. pretrain.steps=200")
        p.set_defaults(func=_stage_command)

    data = sub.add_parser("data", help="build the embedded default datasets")
    data_sub = data.add_subparsers(dest="what", required=True)
    fr = data_sub.add_parser("fractals", help="FractalDB-style pretraining shards")
    fr.add_argument("--out", required=True)
    fr.add_argument("--classes", type=int, default=100)
    fr.add_argument("--per-class", type=int, default=200)
    fr.add_argument("--img-size", type=int, default=32)
    fr.add_argument("--per-shard", type=int, default=1000)
    fr.add_argument("--seed", type=int, default=0)
    dg = data_sub.add_parser("digits", help="UCI handwritten digits (bundled with scikit-learn)")
    dg.add_argument("--out", required=True)
    dg.add_argument("--seed", type=int, default=0)
    em = data_sub.add_parser("embedded", help="both datasets under --root, as configs/demo.yaml expects")
    em.add_argument("--root", default="data")
    data.set_defaults(func=_data_command)

    models = sub.add_parser("models", help="list registered architectures")
    models.set_defaults(func=_models_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("transferline").setLevel(logging.INFO)
    from pipeline.transfer import IncompatibleCheckpointError

    try:
        return args.func(args)
    except (ConfigError, IncompatibleCheckpointError) as e:
        print(f"transferline: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
