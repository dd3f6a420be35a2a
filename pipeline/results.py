"""What a stage hands back: typed results, written (`to_dict`) and read (`from_dict`) here only.

Results travel as JSON (`result.json`, `finished.json`); `summary()` is the part summary.json
shows, derived from the fields, so no key list mirrors them elsewhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

T = TypeVar("T", bound="_Result")

#: Scratch accuracy from which a target leaves pretraining nothing to show (report and assess).
EASY_TARGET = 0.98


def monitor_readings(curve: list[list[Any]]) -> str:
    """The kNN monitor's curve (``[[step, {target: accuracy}], ...]``) as one line of text:
    ``digits 47.5% at 0, 70.0% at 400``; empty when there is none."""
    return "; ".join(f"{name} " + ", ".join(f"{100 * m[name]:.1f}% at {step}" for step, m in curve)
                     for name in (curve[0][1] if curve else {}))


class _Result:
    #: fields summary.json leaves out (curves, per-run detail, tracking handles)
    DETAIL: ClassVar[frozenset[str]] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Known fields only; fields a result of an older version lacks take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})

    def summary(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if f.name not in self.DETAIL}


@dataclass
class PretrainResult(_Result):
    DETAIL: ClassVar[frozenset[str]] = frozenset({"loss_curve", "monitor_s", "tracking", "checkpoint_s"})
    checkpoint: str | None = None
    model: str = ""
    objective: str = "supervised"
    """`pretrain.objective`: what the checkpoint learned from (labels, or `simclr`'s views)."""
    weights: str = "model"
    """Which weights the checkpoint holds (its meta's `weights`): `model`, `ema` (`pretrain.ema`), or DINO's
    `teacher` / `student`."""
    num_params: int = 0
    num_classes: int = 0
    steps: int = 0
    resumed_from_step: int = 0
    attempts: int = 1
    steps_redone: int = 0
    world_sizes: list[list[int]] = field(default_factory=list)
    """`[world_size, first_step, last_step]` per start of the loop in this run (an elastic run resizes
    between starts; a start that trained no step has last < first)."""
    samples_seen: int = 0
    final_loss: float = float("nan")
    samples_per_s: float = 0.0
    wall_s: float = 0.0
    world_size: int = 1
    device: str = ""
    data: dict[str, Any] | None = None
    train_flops_per_sample: float = 0.0
    tflops: float = 0.0
    mfu: float | None = None
    peak_tflops: float | None = None
    monitor_share: float | None = None
    peak_rss_mib: list[dict[str, float]] | None = None
    loss_curve: list[list[float]] = field(default_factory=list)
    checkpoint_s: list[list[float]] = field(default_factory=list)
    """`[step, seconds]` per checkpoint of this attempt: how long the step loop waited for it (state
    gathered, saved, reported; with `launcher.checkpoint_upload: sync`, uploaded)."""
    monitor_curve: list[list[Any]] = field(default_factory=list)
    monitor_s: float = 0.0
    tracking: dict[str, Any] | None = None


@dataclass
class SeedResult(_Result):
    """One seed of a target stage."""
    seed: int
    test_accuracy: float
    best_test_accuracy: float
    steps_to_target: int | None
    curve: list[list[float]]
    train_size: int
    test_size: int
    transferred_tensors: int = 0
    reinitialised_tensors: int = 0
    adapted_tensors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    auto: dict[str, Any] | None = None
    """`strategy: auto`: the candidate chosen and every candidate's cross-validated accuracy."""


@dataclass
class TargetResult(_Result):
    """`finetune` or `scratch` on one target, over its seeds."""
    DETAIL: ClassVar[frozenset[str]] = frozenset({"runs", "mean", "std", "tracking"})
    init_from: str | None = None
    architecture: str = ""
    strategy: str = ""
    shots_per_class: int = 0
    num_classes: int = 0
    train_size: int = 0
    test_size: int = 0
    steps: int = 0
    seeds: list[int] = field(default_factory=list)
    test_accuracy: float = 0.0
    test_accuracy_std: float = 0.0
    target_accuracy: float = 0.0
    steps_to_target: float | None = None
    reached_target: str = ""
    img_size: int = 0
    in_chans: int = 0
    normalize: str = "checkpoint"
    wall_s: float = 0.0
    world_size: int = 1
    input_artifact: dict[str, Any] | None = None
    peak_rss_mib: list[dict[str, float]] | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    tracking: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out["per_seed"] = [{"seed": s["seed"], "test_accuracy": s["test_accuracy"],
                            "steps_to_target": s["steps_to_target"],
                            **{k: s[k] for k in ("auto", "recipe") if s.get(k)}}
                           for s in self.runs]
        return out
