"""`transferline` command line.

    transferline run CONFIG [key=value ...]        pretrain -> finetune -> scratch + report
    transferline pretrain CONFIG [key=value ...]   stage one only
    transferline finetune CONFIG finetune.init_from=PATH [key=value ...]
        (each with --dry-run: every check, and what would run, without training)
    transferline config CONFIG [key=value ...]     the resolved config, each key documented
    transferline data fractals --out DIR ...       FractalDB-style webdataset shards
    transferline data digits --out DIR             UCI digits as an HF dataset on disk
    transferline data embedded [--root data]       both, as the demo expects them
    transferline data shards SOURCE --out DIR      an HF dataset / image folder -> shards + _info.json
    transferline models                            registered architectures
    transferline assess --checkpoint PATH CONFIG   fine-tune vs scratch, predicted before fine-tuning
    transferline submit --address URL CONFIG [key=value ...] [--wait]   run it as a Ray job on a cluster
    transferline jobs list|logs|stop [JOB_ID] --address URL             that cluster's jobs
    transferline --version
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.deps import missing_dependencies, missing_message


def _loader_death(error: BaseException) -> BaseException | None:
    """torch's error for a loader process that died, wherever it sits in ``error``'s chain.

    torch raises it from a SIGCHLD handler, so it can land inside any call, e.g. a checkpoint
    write, whose own clean-up then raises a second error that carries the first as its context.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, RuntimeError) and str(error).startswith("DataLoader worker"):
            return error
        error = error.__cause__ or error.__context__
    return None


def _stage_command(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides, command=args.command)
    from pipeline.runner import run_pipeline  # heavy imports only once the config is good

    from pipeline.resume import stopped_message

    from pipeline import stopping

    try:
        with stopping.stop_on_sigterm():
            run_pipeline(cfg, args.command, dry_run=args.dry_run)
    except stopping.StageStopped as stop:  # a committed checkpoint at the step it stopped
        print(f"transferline: {stopped_message(cfg, f'stopped by {stop.reason}')}", file=sys.stderr)
        return stopping.STOPPED_EXIT_CODE
    except KeyboardInterrupt:
        reason = stopping.stop_requested()  # a SIGTERM where nothing polls for it: handled as a Ctrl-C
        if reason:
            print(f"transferline: {stopped_message(cfg, f'stopped by {reason}')}", file=sys.stderr)
            return stopping.STOPPED_EXIT_CODE
        print(f"\ntransferline: {stopped_message(cfg)}", file=sys.stderr)
        return 130
    except RuntimeError as e:
        death = _loader_death(e)
        if death is None:
            raise
        died = f"a data loader process died ({str(death).splitlines()[0].rstrip('. ')})"
        print(f"transferline: error: {stopped_message(cfg, died)}", file=sys.stderr)
        return 1
    return 0


def _config_command(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.schema.docs import commented_yaml

    print(commented_yaml(load_config(args.config, args.overrides, command=args.command)))
    return 0


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("transferline")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _fraction(text: str) -> float:
    """argparse type: a float in [0, 1], refused at parse time with the flag's name (not a traceback)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a fraction of the images, in [0, 1]; got {value}")
    return value


def _data_command(args: argparse.Namespace) -> int:
    from pipeline.data import embedded

    if args.what == "fractals":
        info = embedded.make_fractal_shards(
            args.out, num_classes=args.classes, per_class=args.per_class, img_size=args.img_size,
            samples_per_shard=args.per_shard, seed=args.seed,
            background=embedded.DEFAULT_BACKGROUND if args.background is None else args.background,
        )
        print(json.dumps({k: v for k, v in info.items() if k != "shards"}, indent=2))
    elif args.what == "deadleaves":
        from pipeline.data.deadleaves import make_deadleaves_shards

        info = make_deadleaves_shards(args.out, num_samples=args.samples, img_size=args.img_size,
                                      samples_per_shard=args.per_shard, seed=args.seed, workers=args.workers)
        print(json.dumps({k: v for k, v in info.items() if k != "shards"}, indent=2))
    elif args.what == "digits":
        path = embedded.make_digits_dataset(args.out, seed=args.seed)
        print(path)
    elif args.what == "shards":
        return _shards_command(args)
    else:
        print(json.dumps(embedded.ensure_embedded_data(args.root), indent=2))
    return 0


def _shards_command(args: argparse.Namespace) -> int:
    from pipeline.data.shardwriter import write_shards

    def progress(shard: dict) -> None:
        print(f"wrote {shard['url']}: {shard['num_samples']} samples, {shard['bytes'] / 1e6:.1f} MB", flush=True)

    try:
        info = write_shards(args.source, args.out, split=args.split, image_column=args.image_column,
                            label_column=args.label_column, max_count=args.max_count, max_size=args.max_size,
                            prefix=args.prefix, image_format=args.format, stats_samples=args.stats_samples,
                            on_shard=progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"transferline: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: info[k] for k in ("urls", "num_samples", "num_classes", "resumed_at", "throughput")},
                     indent=2))
    return 0


def _assess_command(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    overrides = [*args.overrides, f"finetune.init_from={args.checkpoint}"]
    cfg = load_config(args.config, overrides, command="finetune")
    from pipeline.assess import assess, format_table
    from pipeline.preflight import check_init_checkpoint

    from pipeline.suite import suite_targets

    targets = suite_targets(cfg)  # one target, or each of a suite's `finetune.targets`
    for t in targets:
        check_init_checkpoint(t.cfg, key=t.key)
    results = {t.name: assess(t.cfg, args.checkpoint) for t in targets}
    print("\n\n".join(format_table(r) for r in results.values()))
    if args.json:
        print(json.dumps(results[""] if "" in results else results, indent=2))
    return 0


def _models_command(args: argparse.Namespace) -> int:
    from architectures import list_models

    print("\n".join(list_models()))
    return 0


def _submit_command(args: argparse.Namespace) -> int:
    from pipeline.launch.submit import submit

    return submit(args.address, args.config, args.overrides, command=args.stages, wait=args.wait, pip=args.pip,
                  env_names=args.env, working_dir=args.working_dir, job_id=args.job_id, timeout=args.timeout,
                  dry_run=args.dry_run)


def _jobs_command(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError
    from pipeline.launch import submit

    if args.action == "list":
        return submit.jobs_list(args.address, args.timeout)
    if not args.job_id:
        raise ConfigError(f"<job>: `jobs {args.action}` needs a JOB_ID (see `transferline jobs list`)")
    if args.action == "logs":
        return submit.jobs_logs(args.address, args.job_id, follow_logs=args.follow, timeout=args.timeout)
    return submit.jobs_stop(args.address, args.job_id, args.timeout)


def _add_cluster_commands(sub: argparse._SubParsersAction) -> None:
    from pipeline.launch.submit import REQUEST_TIMEOUT_S

    address_help = "Ray dashboard address, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)"
    timeout_help = f"seconds each request to the dashboard may wait for an answer (default: {REQUEST_TIMEOUT_S:g})"
    sm = sub.add_parser("submit", help="run the pipeline as a Ray job on a running cluster")
    sm.add_argument("config", help="YAML config inside the working dir (it travels with it)")
    sm.add_argument("overrides", nargs="*", metavar="key=value",
                    help="dotlist overrides, e.g. output_dir=/mnt/shared/runs/x")
    sm.add_argument("--dry-run", action="store_true",
                    help="validate and print the job (entrypoint, working_dir, environment names) without submitting")
    sm.add_argument("--address", help=address_help)
    sm.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT_S, help=timeout_help)
    sm.add_argument("--wait", action="store_true", help="follow the job's logs; exit with its status")
    sm.add_argument("--stages", choices=("run", "pretrain", "finetune"), default="run",
                    help="what the job runs (default: run, the whole pipeline)")
    sm.add_argument("--pip", action="store_true",
                    help="have Ray pip-install transferline's dependencies for the job (clusters without them)")
    sm.add_argument("--env", action="append", default=[], metavar="NAME",
                    help="also pass this environment variable to the job (repeatable)")
    sm.add_argument("--working-dir", default=None, help="folder uploaded as the job's working_dir (default: .)")
    sm.add_argument("--job-id", default=None, help="submission id (default: Ray picks one)")
    sm.set_defaults(func=_submit_command)
    jb = sub.add_parser("jobs", help="list, follow or stop Ray jobs on a cluster")
    jb.add_argument("action", choices=("list", "logs", "stop"))
    jb.add_argument("job_id", nargs="?", default=None)
    jb.add_argument("--address", help=address_help)
    jb.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT_S, help=timeout_help)
    jb.add_argument("--follow", action="store_true", help="logs: follow until the job ends")
    jb.set_defaults(func=_jobs_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"transferline {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "pretrain, fine-tune and the scratch baseline, then the report"),
                        ("pretrain", "stage one only"),
                        ("finetune", "stage two (and its baseline) from finetune.init_from")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("config", help="YAML config (see configs/)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides, e.g. pretrain.steps=200")
        p.add_argument("--dry-run", action="store_true",
                       help="run every check and print what would run (stages, workers, shards, target sizes, "
                            "resume point) without training")
        p.set_defaults(func=_stage_command)
    cf = sub.add_parser("config", help="print the resolved config, each key with its documentation")
    cf.add_argument("config", help="YAML config (see configs/)")
    cf.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides")
    cf.add_argument("--command", choices=("run", "pretrain", "finetune"), default="run",
                    help="validate for this command (default: run)")
    cf.set_defaults(func=_config_command)

    data = sub.add_parser("data", help="build the embedded default datasets")
    data_sub = data.add_subparsers(dest="what", required=True)
    fr = data_sub.add_parser("fractals", help="FractalDB-style pretraining shards")
    fr.add_argument("--out", required=True)
    fr.add_argument("--classes", type=int, default=100)
    fr.add_argument("--per-class", type=int, default=200)
    fr.add_argument("--img-size", type=int, default=32)
    fr.add_argument("--per-shard", type=int, default=1000)
    fr.add_argument("--seed", type=int, default=0)
    fr.add_argument("--background", type=_fraction, default=None,
                    help="fraction of images on a 1/f-noise ground instead of black (default: the demo "
                    "corpus' 0.5; 0: the plain FractalDB look)")
    dl = data_sub.add_parser("deadleaves", help="label-free dead-leaves shards (natural-image statistics) for "
                             "pretrain.objective=simclr")
    dl.add_argument("--out", required=True)
    dl.add_argument("--samples", type=int, default=20000)
    dl.add_argument("--img-size", type=int, default=32)
    dl.add_argument("--per-shard", type=int, default=1000)
    dl.add_argument("--seed", type=int, default=0)
    dl.add_argument("--workers", type=int, default=1, help="rendering processes")
    dg = data_sub.add_parser("digits", help="UCI handwritten digits (bundled with scikit-learn)")
    dg.add_argument("--out", required=True)
    dg.add_argument("--seed", type=int, default=0)
    em = data_sub.add_parser("embedded", help="both datasets under --root, as configs/demo.yaml expects")
    em.add_argument("--root", default="data")
    sh = data_sub.add_parser(
        "shards", help="convert an HF dataset or an image folder into webdataset shards with an _info.json index",
        description="Resumable: re-run the same command after an interruption and it continues.")
    sh.add_argument("source", help="save_to_disk directory, image folder (DIR/<class>/*.jpg), or a Hub name")
    sh.add_argument("--out", required=True, help="output directory for the shards and _info.json")
    sh.add_argument("--split", default="train")
    sh.add_argument("--image-column", default="image")
    sh.add_argument("--label-column", default="label")
    sh.add_argument("--max-count", type=int, default=10000, help="samples per shard at most")
    sh.add_argument("--max-size", default="0", help="bytes per shard at most, e.g. 500M or 1G (0: no limit)")
    sh.add_argument("--prefix", default="shard", help="shard file name prefix")
    sh.add_argument("--format", default="keep", choices=("keep", "png", "jpg"),
                    help="keep the original JPEG/PNG/WebP bytes, or re-encode")
    sh.add_argument("--stats-samples", type=int, default=1000, help="images decoded for mean/std in the index")
    data.set_defaults(func=_data_command)

    asr = sub.add_parser("assess", help="will fine-tuning from a checkpoint beat scratch? (cross-validated on the training "
                         "shots; plus kNN, linear-probe and LogME of its features vs a random backbone)")
    asr.add_argument("--checkpoint", required=True, help="checkpoint directory (a step folder or a root)")
    asr.add_argument("--json", action="store_true", help="also print the scores as JSON")
    asr.add_argument("config", help="YAML config naming the target (finetune.data.*)")
    asr.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides")
    asr.set_defaults(func=_assess_command)

    models = sub.add_parser("models", help="list registered architectures")
    models.set_defaults(func=_models_command)
    _add_cluster_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    gone = missing_dependencies()
    if gone:
        print(f"transferline: error: {missing_message(gone)}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("transferline").setLevel(logging.INFO)
    from pipeline.config import ConfigError
    from pipeline.launch.submit import SubmitError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"transferline: error: {e}", file=sys.stderr)
        return 2
    except SubmitError as e:
        print(f"transferline: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        # A refused checkpoint comes from pipeline.transfer, imported (with torch) only by the
        # commands that load one: a config error fails without paying for torch's import.
        transfer = sys.modules.get("pipeline.transfer")
        if transfer is not None and isinstance(e, transfer.IncompatibleCheckpointError):
            print(f"transferline: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
