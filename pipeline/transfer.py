"""Weight transfer from a stage-one checkpoint into a stage-two model, and freezing plans.

The model follows the architectures/ contract: ``head_prefix`` names the classifier (never
transferred: its class count differs), ``transfer_blocks()`` orders the backbone from input to
output (partial transfer keeps the first N), ``input_conv_name`` is the weight adapted between
1 and 3 input channels (timm's load_pretrained / adapt_input_conv ideas).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from architectures import param_in_prefix
from pipeline.distributed import unwrap_model

_LIST_LIMIT = 10
_MISMATCH_LIMIT = 50
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class IncompatibleCheckpointError(ValueError):
    """The checkpoint's backbone does not fit the model: names and shapes are in the message."""


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes a foreign checkpoint may carry."""
    cleaned = dict(state_dict)
    for prefix in _WRAPPER_PREFIXES:
        if cleaned and all(key.startswith(prefix) for key in cleaned):
            cleaned = {key[len(prefix) :]: value for key, value in cleaned.items()}
    return cleaned


def adapt_input_conv(weight: torch.Tensor, in_chans: int, *, name: str = "input conv") -> torch.Tensor:
    """Adapt a first-layer weight ``[out, C, ...]`` to ``in_chans`` input channels.

    3 -> 1 sums the colour filters: a grey image g gives exactly the activation the RGB model gave
    for (g, g, g). 1 -> 3 repeats the filter and divides by 3, so an RGB image with equal channels
    gives the grey model's activation. Other changes have no faithful mapping and raise.
    """
    if weight.ndim < 2:
        raise ValueError(f"cannot adapt {name}: expected a [out, in, ...] weight, got shape {tuple(weight.shape)}")
    src = weight.shape[1]
    if src == in_chans:
        return weight
    if src == 3 and in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    if src == 1 and in_chans == 3:
        repeats = [1, 3] + [1] * (weight.ndim - 2)
        return weight.repeat(*repeats) / 3.0
    raise ValueError(
        f"cannot adapt {name} from {src} to {in_chans} input channels (only 1 <-> 3 is supported); "
        f"weight shape {tuple(weight.shape)}"
    )


def _head_prefix(model: nn.Module) -> str:
    prefix = getattr(model, "head_prefix", None)
    if not prefix:
        raise ValueError(f"{type(model).__name__} has no head_prefix; it does not follow the model contract")
    return prefix


def _shape(tensor: torch.Tensor) -> str:
    return str(tuple(tensor.shape))


def _listing(title: str, names: list[str], limit: int) -> list[str]:
    if not names:
        return []
    shown = ", ".join(names[:limit])
    more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return [f"  {len(names)} {title}: {shown}{more}"]


def _describe_arch(name: Any, kwargs: Any) -> str:
    return f"{name!r} {kwargs!r}" if kwargs else repr(name)


def check_compatible(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    ignore_prefixes: Iterable[str] | None = None,
    adapt_input: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Raise :class:`IncompatibleCheckpointError` unless ``state_dict`` fits ``model`` outside the ignored prefixes.

    ``ignore_prefixes`` defaults to the model's head (class counts differ between stages).
    ``adapt_input`` names the weight compared after 1 <-> 3 channel adaptation (default: the
    model's ``input_conv_name``). ``meta`` (the checkpoint's meta.json) only adds the recorded
    architecture to the message.
    """
    model = unwrap_model(model)
    state_dict = clean_state_dict(state_dict)
    ignored = tuple(ignore_prefixes) if ignore_prefixes is not None else (_head_prefix(model),)
    if adapt_input is None:
        adapt_input = getattr(model, "input_conv_name", None)

    def kept(name: str) -> bool:
        return not any(param_in_prefix(name, prefix) for prefix in ignored)

    model_sd = {k: v for k, v in model.state_dict().items() if kept(k)}
    ckpt_sd = {k: v for k, v in state_dict.items() if kept(k)}
    missing = [k for k in model_sd if k not in ckpt_sd]
    unexpected = [k for k in ckpt_sd if k not in model_sd]
    mismatched = []
    for key, target in model_sd.items():
        if key not in ckpt_sd:
            continue
        source = ckpt_sd[key]
        note = ""
        if key == adapt_input and source.ndim >= 2 and source.shape[1] != target.shape[1]:
            try:
                compared = adapt_input_conv(source, target.shape[1], name=key)
            except ValueError:
                compared, note = source, " (input channels cannot be adapted)"
        else:
            compared = source
        if compared.shape != target.shape:
            mismatched.append(f"{key}: checkpoint {_shape(source)} vs model {_shape(target)}{note}")

    if not (missing or unexpected or mismatched):
        return
    lines = [f"checkpoint does not fit {type(model).__name__} (ignoring {', '.join(ignored)}):"]
    if meta is not None:
        model_cfg = getattr(model, "pretrained_cfg", None) or {}
        lines.append(
            f"  architecture: checkpoint meta says {_describe_arch(meta.get('name'), meta.get('kwargs'))} "
            f"vs model {_describe_arch(model_cfg.get('name', type(model).__name__), model_cfg.get('kwargs'))}"
        )
        if meta.get("name") == model_cfg.get("name") and (meta.get("kwargs") or {}) == (model_cfg.get("kwargs") or {}):
            lines.append("  the same name and kwargs build another model now: the architecture's code or defaults "
                         "changed since this checkpoint was written; pretrain it again with this version")
    if mismatched:
        lines.append(f"  {len(mismatched)} mismatched shapes:")
        lines.extend(f"    {line}" for line in mismatched[:_MISMATCH_LIMIT])
        if len(mismatched) > _MISMATCH_LIMIT:
            lines.append(f"    ... (+{len(mismatched) - _MISMATCH_LIMIT} more)")
    lines += _listing("missing from checkpoint", missing, _LIST_LIMIT)
    lines += _listing("unexpected in checkpoint", unexpected, _LIST_LIMIT)
    raise IncompatibleCheckpointError("\n".join(lines))


def load_backbone(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    keep_blocks: int | None = None,
    meta: Mapping[str, Any] | None = None,
    shrink: float = 1.0,
    perturb: float = 0.0,
) -> dict[str, list[str]]:
    """Copy the checkpoint's backbone into ``model`` in place; the head is never touched.

    With ``keep_blocks=N`` only the params and buffers of the first N ``transfer_blocks()`` are
    copied; the rest keep the model's fresh init. ``shrink``/``perturb`` (shrink and perturb, Ash &
    Adams 2020) start each copied parameter at ``shrink * checkpoint + perturb * fresh init``. The
    whole backbone must still be compatible (the checkpoint is the same architecture), which
    :func:`check_compatible` enforces first.
    Returns names: ``loaded`` (copied), ``adapted`` (copied after channel adaptation, also in
    ``loaded``) and ``reinitialised`` (left at the model's own init, the head included).
    """
    model = unwrap_model(model)
    state_dict = clean_state_dict(state_dict)
    check_compatible(model, state_dict, meta=meta)
    head = _head_prefix(model)
    input_conv = getattr(model, "input_conv_name", None)
    blocks = list(model.transfer_blocks())
    if keep_blocks is None:
        copied_prefixes = None
    elif 0 <= keep_blocks <= len(blocks):
        copied_prefixes = blocks[:keep_blocks]
    else:
        raise ValueError(f"keep_blocks={keep_blocks} is outside 0..{len(blocks)}; the model's blocks are {blocks}")

    parameters = {name for name, _ in model.named_parameters()}
    mixed = (shrink, perturb) != (1.0, 0.0)
    report: dict[str, list[str]] = {"loaded": [], "reinitialised": [], "adapted": []}
    with torch.no_grad():
        # state_dict() tensors alias the live params/buffers, so copy_ writes into the model.
        for name, target in model.state_dict().items():
            is_head = param_in_prefix(name, head)
            in_kept_block = copied_prefixes is None or any(param_in_prefix(name, p) for p in copied_prefixes)
            if is_head or not in_kept_block:
                report["reinitialised"].append(name)
                continue
            source = state_dict[name]
            if name == input_conv and source.shape != target.shape:
                source = adapt_input_conv(source, target.shape[1], name=name)
                report["adapted"].append(name)
            if mixed and name in parameters:
                source = shrink * source.to(target.dtype) + perturb * target
            target.copy_(source)
            report["loaded"].append(name)
    return report


def apply_freeze(model: nn.Module, trainable: Literal["head", "all"]) -> int:
    """Set requires_grad for a freezing plan; returns the number of trainable parameter elements.

    ``"head"``: linear probe, only the classifier learns (pair with :func:`set_backbone_eval`).
    ``"all"``: full fine-tuning.
    """
    if trainable not in ("head", "all"):
        raise ValueError(f"trainable must be 'head' or 'all', got {trainable!r}")
    model = unwrap_model(model)
    head = _head_prefix(model)
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(trainable == "all" or param_in_prefix(name, head))
        count += param.numel() if param.requires_grad else 0
    if count == 0:
        raise ValueError(f"freezing plan {trainable!r} leaves no trainable parameters (head_prefix {head!r})")
    return count


def set_backbone_eval(model: nn.Module) -> None:
    """Put every submodule outside the head in eval mode; call it after each ``model.train()``.

    requires_grad=False does not stop BatchNorm from updating running stats, nor dropout from
    perturbing features; eval does. The root module and the head keep their mode, so a
    linear probe's backbone stays bit-identical while its head trains.
    """
    model = unwrap_model(model)  # DDP/compile wrappers would hide the head prefix
    head = _head_prefix(model)
    for name, module in model.named_modules():
        if name and not param_in_prefix(name, head):
            # Per module, not .eval(): that recurses, and the root (an ancestor of the head) must not.
            module.training = False
