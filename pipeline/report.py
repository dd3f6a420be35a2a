"""summary.json, report.md and curves.png: what pretraining bought, said plainly."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.fileio import write_text_atomic
from pipeline.results import EASY_TARGET, PretrainResult, TargetResult, monitor_readings
from pipeline.suite import SuiteTarget, suite_targets
from pipeline.lineage import tracking_links
from pipeline.redact import redact_text
from pipeline.tracking import start_report_tracker

def build_summary(cfg: RunConfig, results: dict[str, Any]) -> dict[str, Any]:
    """The run's summary. Every target is an entry of a suite; the single-target form is a suite
    of one unnamed target, whose entry is the summary's top level (a named suite also lists
    every target under `targets`, its first at the top level for old readers)."""
    summary: dict[str, Any] = {"run": cfg.name, "launcher": cfg.launcher.kind}
    if "pretrain" in results:
        summary["pretrain"] = PretrainResult.from_dict(results["pretrain"]).summary()
        logged = (results["pretrain"].get("tracking") or {}).get("artifacts") or [None]
        summary["pretrain"]["artifact"] = logged[-1]  # the W&B model artifact of the checkpoint
    targets = suite_targets(cfg)
    entries = {t.name: {"source": t.cfg.finetune.data.source, **entry}
               for t in targets if (entry := _target_summary(results, t))}
    if targets[0].name:
        summary["targets"] = entries
    if entries:
        summary.update({k: v for k, v in next(iter(entries.values())).items() if k != "source"})
    return summary


def _target_summary(results: dict[str, Any], t: SuiteTarget) -> dict[str, Any]:
    """finetune, scratch, assess, transfer_gain, steps_to_target_saved and summary_line of a target."""
    out: dict[str, Any] = {}
    for stage in ("finetune", "scratch"):
        if t.label(stage) in results:
            out[stage] = TargetResult.from_dict(results[t.label(stage)]).summary()
    if t.label("assess") in results:
        out["assess"] = results[t.label("assess")]
    if t.label("finetune") in results and t.label("scratch") in results:
        ft, sc = results[t.label("finetune")], results[t.label("scratch")]
        out["transfer_gain"] = ft["test_accuracy"] - sc["test_accuracy"]
        out["steps_to_target_saved"] = (
            sc["steps_to_target"] - ft["steps_to_target"]
            if ft["steps_to_target"] is not None and sc["steps_to_target"] is not None else None
        )
        out["steps_to_scratch_final"] = steps_to_scratch_final(ft["runs"], sc["runs"])
        out["summary_line"] = verdict(ft, sc)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _paired(ft_runs: list[dict[str, Any]], sc_runs: list[dict[str, Any]]) -> str:
    """The gain seed by seed: a seed's fine-tune and scratch train on the same k-shot subset, so
    the per-seed differences carry less noise than either arm's spread (which holds the subsets')."""
    sc_by_seed = {r["seed"]: r["test_accuracy"] for r in sc_runs if "seed" in r}
    diffs = [100 * (r["test_accuracy"] - sc_by_seed[r["seed"]]) for r in ft_runs if r.get("seed") in sc_by_seed]
    if len(diffs) < 2:
        return ""
    ahead = sum(d > 0 for d in diffs)
    return (f"; paired by seed {statistics.mean(diffs):+.1f} ± {statistics.stdev(diffs):.1f}, "
            f"fine-tuned ahead on {ahead} of {len(diffs)}")


# Scratch still gaining this much (accuracy points, mean over seeds) over the last quarter of its
# steps means the baseline had not converged: a win may be faster learning only.
STILL_RISING_POINTS = 2.0


def _accuracy_by_step(runs: list[dict[str, Any]]) -> list[tuple[float, ...]]:
    """Each evaluation's test accuracies across the seeds (as far as every seed's curve goes)."""
    return list(zip(*[[a for _, a in r.get("curve") or []] for r in runs]))


def _late_rise(runs: list[dict[str, Any]]) -> float | None:
    """Mean test accuracy gained (points) over the last quarter of the seeds' evaluation curves;
    None without a curve to read (fewer than 5 evaluations, or curves of unequal length)."""
    mean = [a for _, a in _mean_curve(runs)]
    if len(mean) < 5:
        return None
    return 100 * (mean[-1] - mean[int(0.75 * (len(mean) - 1))])


def _mean_curve(runs: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, test accuracy averaged over seeds) at each evaluation; empty when the seeds' curves
    differ in length (nothing to average step by step)."""
    lengths = {len(r.get("curve") or []) for r in runs}
    if len(lengths) != 1 or lengths == {0}:
        return []
    steps = [int(s) for s, _ in runs[0]["curve"]]
    return list(zip(steps, (statistics.fmean(v) for v in _accuracy_by_step(runs))))


def _first_step(curve: Any, accuracy: float) -> int | None:
    """The first evaluation step of ``[(step, accuracy), ...]`` at or above ``accuracy``."""
    return next((int(step) for step, acc in curve if acc >= accuracy), None)


def steps_to_scratch_final(ft_runs: list[dict[str, Any]], sc_runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Faster learning, measured apart from a higher ceiling: the first evaluation step at which each
    arm's mean curve reaches the accuracy scratch ends at (mean over seeds), and their ratio; and
    seed by seed (same shots in both arms), on how many seeds the fine-tune reached its scratch
    run's final accuracy in fewer steps than that scratch run first did. None without curves."""
    ft, sc = _mean_curve(ft_runs), _mean_curve(sc_runs)
    if not ft or not sc:
        return None
    goal = sc[-1][1]
    ft_steps, sc_steps = _first_step(ft, goal), _first_step(sc, goal)
    sc_by_seed = {r["seed"]: r["curve"] for r in sc_runs if "seed" in r}
    paired = [(r["curve"], sc_by_seed[r["seed"]]) for r in ft_runs if r.get("seed") in sc_by_seed]
    faster = 0
    for ft_curve, sc_curve in paired:
        first = _first_step(ft_curve, sc_curve[-1][1])
        faster += first is not None and first < _first_step(sc_curve, sc_curve[-1][1])
    return {"accuracy": goal, "finetune_steps": ft_steps, "scratch_steps": sc_steps,
            "speedup": sc_steps / ft_steps if ft_steps else None, "faster_seeds": f"{faster}/{len(paired)}"}


def _speed_sentence(ft: dict[str, Any], sc: dict[str, Any]) -> str:
    m = steps_to_scratch_final(ft["runs"], sc["runs"])
    if m is None:
        return ""
    where = f"scratch's final mean accuracy ({_pct(m['accuracy'])}, reached by scratch at step {m['scratch_steps']})"
    if m["finetune_steps"] is None:
        return f" The fine-tuned mean curve never reached {where}."
    ratio = f": {m['speedup']:.1f}x fewer steps" if m["speedup"] else ""
    seeds = f" (seed by seed, faster on {m['faster_seeds'].replace('/', ' of ')})" if m["faster_seeds"] != "0/0" else ""
    return f" The fine-tuned mean curve reached {where} at step {m['finetune_steps']}{ratio}{seeds}."


def _still_rising(ft: dict[str, Any], sc: dict[str, Any]) -> str:
    rise = _late_rise(sc["runs"])
    if rise is None or rise < STILL_RISING_POINTS:
        return ""
    ft_rise = _late_rise(ft["runs"])
    ft_text = f", fine-tuned {ft_rise:+.1f}" if ft_rise is not None else ""
    return (f" Scratch was still improving when training stopped ({rise:+.1f} points over the last "
            f"quarter of its steps{ft_text}): part of this gain may be faster learning only; more "
            f"finetune.steps show the ceiling.")


def verdict(ft: dict[str, Any], sc: dict[str, Any]) -> str:
    """One plain sentence on what pretraining bought, even when it is nothing."""
    gain = ft["test_accuracy"] - sc["test_accuracy"]
    noise = max(ft["test_accuracy_std"], sc["test_accuracy_std"])
    n = len(ft["runs"])
    acc = (f"{_pct(ft['test_accuracy'])} ± {100 * ft['test_accuracy_std']:.1f} fine-tuned vs "
           f"{_pct(sc['test_accuracy'])} ± {100 * sc['test_accuracy_std']:.1f} from scratch over {n} seeds")
    acc += _paired(ft["runs"], sc["runs"])
    if abs(gain) <= noise:
        head = f"Pretraining made no clear difference to final accuracy ({acc}; the gap is within the seed spread)"
    elif gain > 0:
        head = f"Pretraining bought {100 * gain:+.1f} points of test accuracy ({acc})"
    else:
        head = f"Pretraining cost {100 * -gain:.1f} points of test accuracy ({acc})"
    target = _pct(ft["target_accuracy"])
    f_steps, s_steps = ft["steps_to_target"], sc["steps_to_target"]
    if f_steps is not None and s_steps is not None:
        speed = f"{target} was reached after {f_steps:.0f} steps with pretraining and {s_steps:.0f} without"
    elif f_steps is not None:
        speed = f"only the pretrained runs reached {target} (after {f_steps:.0f} steps)"
    elif s_steps is not None:
        speed = f"only the scratch runs reached {target} (after {s_steps:.0f} steps)"
    else:
        speed = f"neither reached {target} on every seed"
    easy = (f" The target is too easy for transfer to show: training from scratch already reaches "
            f"{_pct(sc['test_accuracy'])}." if sc["test_accuracy"] >= EASY_TARGET else "")
    rising = _still_rising(ft, sc) if gain > 0 else ""
    return f"{head}; {speed}.{_speed_sentence(ft, sc)}{easy}{rising}"


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "—"
    if pct:
        return _pct(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _shards(cfg: RunConfig) -> str:
    d = cfg.pretrain.data
    if d.sources:
        return ", ".join(f"`{s.urls}` (weight {s.weight:g})" for s in d.sources) + (" resampled" if d.resampled else "")
    return f"`{d.urls}`" + (" resampled" if d.resampled else "")


def _data_lines(data: dict[str, Any] | None) -> list[str]:
    """Stage one's data health: bad samples skipped, partial and failed shards, epochs."""
    if not data:
        return []
    epochs = data.get("epochs_seen")
    size = (f"; one epoch = {data['epoch_samples']:,} samples ({data['epoch_samples_from']}), "
            f"{epochs:.2f} epoch(s) seen" if data.get("epoch_samples") and epochs is not None else "")
    lines = [f"- data: {data['skipped_samples']:,} bad sample(s) skipped, {data['partial_shards']} partial and "
             f"{data['failed_shards']} failed shard(s){size}"]
    for problem in data.get("problem_shards", [])[:5]:
        lines.append(f"  - {problem['status']} `{problem['url']}`: {problem['reason']}")
    return lines


def render_markdown(cfg: RunConfig, summary: dict[str, Any]) -> str:
    # A named suite gets one row per target; the suite of one its own table, per seed.
    suite = summary.get("targets")
    targets = suite if suite is not None else {"": summary}
    lines = [f"# transferline report: {cfg.name}", ""]
    for name, t in targets.items():
        if "summary_line" in t:
            lines.append(f"- **{name}**: {t['summary_line']}" if name else f"**{t['summary_line']}**")
    if any("summary_line" in t for t in targets.values()):
        lines.append("")
    lines += _pretrain_markdown(cfg, summary.get("pretrain"))
    lines += _suite_markdown(cfg, suite) if suite else _target_markdown(cfg, summary)
    for name, t in targets.items():
        lines += _auto_markdown(name, t)
        lines += _assess_markdown(t, title=f"## Predicted vs measured: {name}" if name else "## Predicted vs measured")
    lines += _tracking_markdown(summary)
    lines += ["![curves](curves.png)", "", "Resolved config: `config.yaml`.", ""]
    return "\n".join(lines)


_WEIGHTS = {"ema": " (the EMA of the weights, `pretrain.ema`)", "teacher": " (DINO's EMA teacher)",
            "student": " (DINO's student)"}


def _pretrain_markdown(cfg: RunConfig, p: dict[str, Any] | None) -> list[str]:
    if not p:
        return []
    lines = [
        "## Stage one: pretraining", "",
        f"- architecture: `{p['model']}` ({p['num_params']:,} parameters), " + (
            f"objective `{p['objective']}` (label-free: no labels read; its projection head is not handed on)"
            if p.get("objective", "supervised") != "supervised" else f"{p['num_classes']} classes, supervised"),
        f"- shards: {_shards(cfg)}",
        *_data_lines(p.get("data")),
        f"- {p['steps']} steps on {p['world_size']} worker(s) ({p['device']}), "
        f"batch {cfg.pretrain.data.batch_size} per worker, {p['samples_seen']:,} samples seen",
        f"- final loss {_fmt(p['final_loss'])}, {p['samples_per_s']:.0f} samples/s, {p['wall_s']:.1f} s",
        f"- {p['train_flops_per_sample'] / 1e9:.3g} GFLOP per training sample, {p['tflops']:.3g} TFLOP/s achieved"
        + (f", MFU {100 * p['mfu']:.1f}% of {p['peak_tflops']:.0f} TFLOP/s measured" if p.get("mfu") else ""),
        f"- checkpoint: `{p['checkpoint']}`" + _WEIGHTS.get(p.get("weights", "model"), ""),
    ]
    if p.get("peak_rss_mib"):
        lines.append("- peak resident memory per worker (MiB, process / largest loader child): " + ", ".join(
            f"rank {i}: {m['process']:.0f} / {m['children']:.0f}" for i, m in enumerate(p["peak_rss_mib"])))
    if p.get("monitor_share") is not None:
        readings = monitor_readings(p.get("monitor_curve") or [])
        lines.append(f"- downstream kNN monitor: {readings + ' (step 0: random init); ' if readings else ''}"
                     f"{100 * p['monitor_share']:.1f}% of the training loop's time")
    if (p.get("attempts") or 1) > 1 or p.get("resumed_from_step"):
        lines.append(f"- {p.get('attempts') or 1} attempt(s); the last resumed from step "
                     f"{p.get('resumed_from_step')}, {p.get('steps_redone') or 0} step(s) redone after failures")
    lines.append("")
    return lines


def _target_markdown(cfg: RunConfig, summary: dict[str, Any]) -> list[str]:
    """Stage two of the single-target form: fine-tuned and scratch per seed, and the gain."""
    target_rows = [s for s in ("finetune", "scratch") if s in summary]
    if not target_rows:
        return []
    f0 = summary[target_rows[0]]
    lines = [
        "## Stage two: target task", "",
        f"- dataset: `{cfg.finetune.data.source}`, {f0['num_classes']} classes, "
        f"{f0['shots_per_class'] or 'all'} shots per class ({f0['train_size']} training images), "
        f"{f0['test_size']} test images, {f0['img_size']} px, {f0['in_chans']} channel(s)",
        f"- {f0['steps']} steps per seed, seeds {f0['seeds']}; "
        f"steps-to-target counts evaluations every {cfg.finetune.eval_every} steps", "",
        "| run | init | test accuracy (mean ± std) | per seed | steps to "
        f"{_pct(f0['target_accuracy'])} | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for stage in target_rows:
        r = summary[stage]
        init = "random" if stage == "scratch" else f"pretrained ({strategy_label(r)})"
        seeds = ", ".join(_pct(s["test_accuracy"]) for s in r["per_seed"])
        steps = f"{_fmt(r['steps_to_target'])} ({r['reached_target']} seeds)"
        lines.append(f"| {stage} | {init} | {_pct(r['test_accuracy'])} ± {100 * r['test_accuracy_std']:.1f} "
                     f"| {seeds} | {steps} | {r['wall_s']:.1f} |")
    lines.append("")
    if "transfer_gain" in summary:
        saved = summary["steps_to_target_saved"]
        lines += [
            f"Transfer gain (fine-tune minus scratch test accuracy): **{100 * summary['transfer_gain']:+.1f} points**"
            + (f"; steps to target saved: **{saved:.0f}**." if saved is not None else "."), "",
        ]
    return lines


def _suite_markdown(cfg: RunConfig, suite: dict[str, Any]) -> list[str]:
    """Stage two of a suite: one row per target, fine-tuned vs its own from-scratch baseline."""
    first = next(iter(suite.values()))
    f0 = first.get("finetune") or first.get("scratch")
    lines = ["## Stage two: transfer suite", "",
             f"- {len(suite)} targets from one stage-one checkpoint, {f0['steps']} steps per seed, seeds {f0['seeds']}; "
             f"steps-to-target counts evaluations every {cfg.finetune.eval_every} steps; ± is the std over seeds", "",
             f"| target | dataset | classes | shots (train images) | strategy | fine-tuned | from scratch "
             f"| steps to {_pct(f0['target_accuracy'])} (fine-tuned / scratch) | gain over scratch |",
             "|---|---|---|---|---|---|---|---|---|"]

    def acc(r: dict[str, Any] | None) -> str:
        return f"{_pct(r['test_accuracy'])} ± {100 * r['test_accuracy_std']:.1f}" if r else "—"

    def steps(r: dict[str, Any] | None) -> str:
        return f"{_fmt(r['steps_to_target'])} ({r['reached_target']})" if r else "—"

    for name, t in suite.items():
        ft, sc = t.get("finetune"), t.get("scratch")
        r = ft or sc
        gain = f"**{100 * t['transfer_gain']:+.1f} points**" if "transfer_gain" in t else "—"
        lines.append(f"| {name} | `{t['source']}` | {r['num_classes']} | {r['shots_per_class'] or 'all'} "
                     f"({r['train_size']}) | {strategy_label(ft) if ft else '—'} | {acc(ft)} | {acc(sc)} "
                     f"| {steps(ft)} / {steps(sc)} | {gain} |")
    lines.append("")
    return lines


def strategy_label(r: dict[str, Any]) -> str:
    """A target summary's strategy, with what `auto` chose per seed (`auto: full x2, linear_probe`)."""
    choices = [s["auto"]["choice"] for s in r.get("per_seed", []) if s.get("auto")]
    if not choices:
        return r["strategy"]
    counts = {c: choices.count(c) for c in dict.fromkeys(choices)}
    return "auto: " + ", ".join(f"{c} x{n}" if n > 1 else c for c, n in counts.items())


#: Cross-validated choices a seed may record: its key in `per_seed`, and the report's heading.
SEARCHES = (("auto", "Strategy chosen by cross-validation"), ("recipe", "Data recipe chosen by cross-validation"))


def _auto_markdown(name: str, entry: dict[str, Any]) -> list[str]:
    """`strategy: auto` and `data.recipe: auto`: each seed's cross-validated accuracy per
    candidate, and its choice (the recipe for the scratch baseline too: it picks its own)."""
    lines: list[str] = []
    for key, title in SEARCHES:
        for stage in ("finetune", "scratch"):
            seeds = [s for s in (entry.get(stage) or {}).get("per_seed", []) if s.get(key)]
            if not seeds:
                continue
            first = seeds[0][key]
            labels = list(first["cv_accuracy"])
            which = f" ({stage})" if key == "recipe" else ""
            rule = ("" if "default" not in first else  # summaries written before the noise-aware rule
                    f", and in brackets the {100 * first['confidence']:.0f}% interval of each option's gain over the "
                    f"default ({first['default']}), paired fold by fold. The default is kept unless an interval "
                    "lies above zero")
            lines += [f"## {title}{which}{': ' + name if name else ''}", "",
                      f"Held-out accuracy on folds of each seed's training shots (the test split plays no part){rule}:",
                      "",
                      "| seed | " + " | ".join(labels) + " | chosen |", "|---|" + "---|" * (len(labels) + 1)]
            for s in seeds:
                cv, gaps = s[key]["cv_accuracy"], s[key].get("cv_gain_interval", {})
                cells = [_pct(cv[k]) + (f" ({100 * gaps[k][0]:+.0f} to {100 * gaps[k][1]:+.0f})" if k in gaps else "")
                         for k in labels]
                lines.append(f"| {s['seed']} | " + " | ".join(cells) + f" | {s[key]['choice']} |")
            lines.append("")
    return lines


def _assess_markdown(summary: dict[str, Any], title: str = "## Predicted vs measured") -> list[str]:
    """Transferability scores (predicted before fine-tuning) beside the gain that was measured."""
    a = summary.get("assess")
    if not a:
        return []
    lines = [title, "",
             f"Scores on frozen features of the {a['samples']} training images fine-tuning used "
             "(kNN and ridge probe cross-validated on them), pretrained backbone vs a random one:", "",
             "| backbone | kNN accuracy | linear probe | LogME |", "|---|---|---|---|"]
    for name in ("pretrained", "random"):
        r = a[name]
        lines.append(f"| {name} | {_pct(r['knn'])} | {_pct(r['linear_probe'])} | {r['logme']:.3f} |")
    g = a.get("vs_scratch")
    if g:
        lines += ["", f"Cross-validated on those images ({g['folds']} folds, {g['steps']} steps each), held-out "
                  f"accuracy per fold, {g['strategy']} / scratch: "
                  + ", ".join(f"{_pct(x)} / {_pct(y)}" for x, y in zip(g["finetuned"], g["scratch"])) + "."]
    lines += ["", f"Prediction: {a['verdict']}"]
    if "transfer_gain" in summary:
        lines.append(f"Measured: fine-tuning gained {100 * summary['transfer_gain']:+.1f} points over scratch.")
    lines.append("")
    return lines


def _tracking_markdown(summary: dict[str, Any]) -> list[str]:
    """Links to the W&B runs: URLs online; run ids, local dirs and `wandb sync` offline."""
    t = summary.get("tracking")
    if not t:
        return []
    group = f"[{t['group']}]({t['group_url']})" if t.get("group_url") else f"`{t['group']}`"
    lines = ["## Weights & Biases", "", f"Project `{t['project']}`, group {group}.", "",
             "| stage | run id | mode | run |", "|---|---|---|---|"]
    for stage, run in t["runs"].items():
        where = f"[{run['name']}]({run['url']})" if run.get("url") else f"`{run['dir']}`"
        lines.append(f"| {stage} | `{run['run_id']}` | {run['mode']} | {where} |")
    lines.append("")
    art = (summary.get("pretrain") or {}).get("artifact")
    if art:
        lines.append(f"- stage one's checkpoint: `model` artifact `{art['name']}` (digest `{art['digest']}`)")
    src = (summary.get("finetune") or {}).get("input_artifact")
    if src:
        ref = f", from `{src['ref']}`" if src.get("ref") else ""
        lines.append(f"- fine-tuning started from artifact `{src['name']}` (digest `{src['digest']}`{ref})")
    if t.get("sync_command"):
        lines.append(f"- offline runs: upload them with `{t['sync_command']}`")
    lines.append("")
    return lines


def plot_curves(results: dict[str, Any], path: Path, targets: list[SuiteTarget] | None = None) -> None:
    """Stage two's accuracy curves (one panel per target of a suite) and stage one's loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [(t.name, t.label("finetune"), t.label("scratch")) for t in targets or []] or [("", "finetune", "scratch")]
    fig, axes = plt.subplots(1, len(labels) + 1, figsize=(5.5 * (len(labels) + 1), 4))
    for ax, (name, ft_key, sc_key) in zip(axes, labels):
        _target_panel(ax, results, ft_key, sc_key, f"Target: {name}" if name else "Target task")
    _stage_one_panel(axes[-1], results)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _target_panel(ax: Any, results: dict[str, Any], ft_key: str, sc_key: str, title: str) -> None:
    for stage, colour in ((ft_key, "tab:blue"), (sc_key, "tab:orange")):
        if stage not in results:
            continue
        runs = results[stage]["runs"]
        steps = [s for s, _ in runs[0]["curve"]]
        by_step = _accuracy_by_step(runs)
        mean = [statistics.fmean(v) for v in by_step]
        label = "from scratch" if stage == sc_key else f"pretrained ({results[stage]['strategy']})"
        ax.plot(steps, mean, color=colour, label=f"{label}, mean of {len(runs)} seeds")
        ax.fill_between(steps, [min(v) for v in by_step], [max(v) for v in by_step], color=colour, alpha=0.2)
    if ft_key in results:
        ax.axhline(results[ft_key]["target_accuracy"], color="grey", ls=":", lw=1, label="target accuracy")
    if ft_key in results or sc_key in results:
        ax.set(xlabel="fine-tuning step", ylabel="test accuracy", title=title, ylim=(0, 1.01))
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "stage two not run", ha="center", va="center")
        ax.set_axis_off()


def _stage_one_panel(ax: Any, results: dict[str, Any]) -> None:
    if "pretrain" in results and results["pretrain"].get("loss_curve"):
        steps, losses = zip(*results["pretrain"]["loss_curve"])
        ax.plot(steps, losses, color="tab:green", label="training loss")
        ax.set(xlabel="pretraining step", ylabel="training loss", title="Stage one")
        monitor = results["pretrain"].get("monitor_curve")
        if monitor:
            # When does more pretraining stop paying for the target? kNN accuracy on a fixed subset.
            twin = ax.twinx()
            for name in monitor[0][1]:
                twin.plot([s for s, _ in monitor], [m[name] for _, m in monitor], color="tab:purple",
                          marker="o", ms=3, label=f"kNN accuracy on {name}")
            twin.set(ylabel="downstream kNN accuracy", ylim=(0, 1.01))
            twin.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "stage one not run", ha="center", va="center")
        ax.set_axis_off()


def write_report(cfg: RunConfig, results: dict[str, Any]) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    summary = build_summary(cfg, results)
    summary["outputs"] = {"summary": str(out / "summary.json"), "report": str(out / "report.md"),
                          "curves": str(out / "curves.png")}
    # A short W&B run (job type `report`) in the pipeline's group, opened here on the driver.
    tracker = start_report_tracker(cfg)
    try:
        links = tracking_links(cfg, {**results, "report": {"tracking": tracker.describe()}})
        if links:
            summary["tracking"] = links
        plot_curves(results, out / "curves.png", suite_targets(cfg))
        # Both are also logged to W&B: no secret that slipped into the config goes with them.
        write_text_atomic(out / "report.md", redact_text(render_markdown(cfg, summary)))
        write_text_atomic(out / "summary.json", redact_text(json.dumps(summary, indent=2)))
        tracker.log_report([out / "report.md", out / "curves.png", out / "summary.json"], summary)
    finally:
        tracker.finish()
    return summary
