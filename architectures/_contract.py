"""The model contract every architecture follows, and a base class implementing its shared parts.

The pipeline treats models as black boxes that answer a few questions: where the classifier
is (to drop or reset it), which parameters form which block (partial transfer, layer-wise LR
decay), which conv sees the input channels (1 <-> 3 channel adaptation) and which parameters
skip weight decay. `check_contract` verifies a model can answer them, so a user's own model
named by import path fails at creation with a clear message instead of deep in training.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import Tensor, nn

REQUIRED_ATTRIBUTES: tuple[str, ...] = (
    "num_classes",
    "in_chans",
    "num_features",
    "head_prefix",
    "input_conv_name",
)
REQUIRED_METHODS: tuple[str, ...] = (
    "forward",
    "forward_features",
    "forward_head",
    "get_classifier",
    "reset_classifier",
    "transfer_blocks",
    "no_weight_decay",
)


def param_in_prefix(param_name: str, prefix: str) -> bool:
    """Whether `param_name` lies under the module path `prefix`.

    Matches only at a "." boundary, so "stages.1" owns "stages.1.blocks.0.weight" but not
    "stages.10.weight". A trailing "." in the prefix (as in `head_prefix = "head."`) is
    accepted and means the same.
    """
    prefix = prefix.rstrip(".")
    return param_name == prefix or param_name.startswith(prefix + ".")


@dataclass(frozen=True)
class ParamPartition:
    """Parameter names grouped by transfer block (in `transfer_blocks()` order) and the head."""

    blocks: dict[str, list[str]]
    head: list[str]


def partition_parameters(model: nn.Module) -> ParamPartition:
    """Assign every parameter to exactly one transfer block or to the head.

    Raises ValueError listing parameters that belong to no block, or to more than one,
    since either would silently break partial transfer and layer-wise LR decay.
    """
    prefixes: list[str] = list(model.transfer_blocks())
    head_prefix: str = model.head_prefix
    blocks: dict[str, list[str]] = {p: [] for p in prefixes}
    head: list[str] = []
    orphans: list[str] = []
    ambiguous: list[str] = []
    for name, _ in model.named_parameters():
        owners = [p for p in prefixes if param_in_prefix(name, p)]
        in_head = param_in_prefix(name, head_prefix)
        if len(owners) + int(in_head) == 0:
            orphans.append(name)
        elif len(owners) + int(in_head) > 1:
            ambiguous.append(f"{name} (in {owners + ([head_prefix] if in_head else [])})")
        elif in_head:
            head.append(name)
        else:
            blocks[owners[0]].append(name)
    problems = []
    if orphans:
        problems.append(f"parameters in no transfer block nor the head: {orphans}")
    if ambiguous:
        problems.append(f"parameters in more than one block: {ambiguous}")
    if problems:
        raise ValueError(f"{type(model).__name__}: " + "; ".join(problems))
    return ParamPartition(blocks=blocks, head=head)


def check_contract(model: object) -> None:
    """Verify `model` follows the contract; raise naming everything that is wrong.

    TypeError when it is not an nn.Module or lacks contract members; ValueError when
    `input_conv_name` is not a conv weight or the block partition is broken.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory returned {type(model).__name__}, not a torch.nn.Module")
    missing = [a for a in REQUIRED_ATTRIBUTES if not hasattr(model, a)]
    missing += [m for m in REQUIRED_METHODS if not callable(getattr(model, m, None))]
    if missing:
        raise TypeError(
            f"{type(model).__name__} does not follow the model contract; missing: {', '.join(missing)}"
        )
    params = dict(model.named_parameters())
    conv = params.get(model.input_conv_name)
    if conv is None or conv.ndim != 4 or conv.shape[1] != model.in_chans:
        shape = None if conv is None else tuple(conv.shape)
        raise ValueError(
            f"{type(model).__name__}.input_conv_name={model.input_conv_name!r} must name a conv "
            f"weight [out, in_chans={model.in_chans}, kh, kw]; found shape {shape}"
        )
    partition_parameters(model)


class TransferModel(nn.Module, ABC):
    """Base class with the family-independent parts of the contract.

    Subclasses build `self.head` with `_make_head`, set `num_classes`, `in_chans`,
    `num_features` and `input_conv_name`, and implement `forward_features`,
    `forward_head` and `transfer_blocks`.
    """

    head_prefix: str = "head."
    input_conv_name: str
    num_classes: int
    in_chans: int
    num_features: int
    head: nn.Module

    @abstractmethod
    def forward_features(self, x: Tensor) -> Tensor:
        """Input [B, in_chans, H, W] -> unpooled features (a map or tokens)."""

    @abstractmethod
    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool features -> logits, or pooled [B, num_features] when `pre_logits`."""

    @abstractmethod
    def transfer_blocks(self) -> list[str]:
        """Ordered module-name prefixes from input to output, excluding the head."""

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one (Identity for 0 classes)."""
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)

    def no_weight_decay(self) -> set[str]:
        """Names exempt from weight decay beyond the pipeline's `ndim <= 1` rule; none by default."""
        return set()

    def _make_head(self, num_classes: int) -> nn.Module:
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if num_classes == 0:
            return nn.Identity()
        # Create on the device/dtype of the backbone, so resetting a model already moved to a
        # GPU (stage two) does not leave a CPU head behind.
        ref = next(self.parameters(), None)
        head = nn.Linear(self.num_features, num_classes)
        if ref is not None:
            head = head.to(device=ref.device, dtype=ref.dtype)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, in_chans={self.in_chans}, num_features={self.num_features}"
