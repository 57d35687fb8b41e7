"""Model registry: ``build_model(arch, init)`` for MobileNetV2, ResNet18 and a Sequential CNN.

``init`` is ``scratch``, ``imagenet`` (torchvision's ``weights=`` API and the torch hub cache at
``TORCH_HOME``), or a path / ``s3://`` URI of a state_dict or of one of our checkpoints.
Weights are always loaded with ``weights_only=True``: checkpoints are data, not code.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath

import torch
from torch import nn

from catdog.config import ARCHITECTURES
from catdog.storage import ReadError, Storage, StorageError, StorageNotFound, join

logger = logging.getLogger(__name__)

# torchvision is imported where a model is built, not here: importing it pulls in torch._dynamo
# (about 2 CPU-s), and every Ray process that unpickles a catdog function imports this module,
# Train's controller and dataset manager included, which never build a model.
_IMAGENET_WEIGHTS = {"mobilenet_v2": "MobileNet_V2_Weights", "resnet18": "ResNet18_Weights"}
MODEL_FILE = "model.pt"
META_FILE = "meta.json"


class InitError(Exception):
    """Initial weights that cannot be had, phrased as one line."""


def sequential_cnn(num_classes: int = 2, width: int = 32) -> nn.Sequential:
    """A plain conv/BN/ReLU/pool stack with a linear head; works at any input size >= 32 px."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]

    widths = [3, width, width * 2, width * 4, width * 8]
    layers: list[nn.Module] = []
    for c_in, c_out in zip(widths, widths[1:]):
        layers += block(c_in, c_out)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(widths[-1], num_classes)]
    return nn.Sequential(*layers)


def _torchvision_model(arch: str, num_classes: int) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None)
    if arch == "resnet18":
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:
        model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)
    return model


def head_prefix(arch: str) -> str:
    """State-dict prefix of the classifier head (what a fine-tune replaces and trains first)."""
    return {"resnet18": "fc.", "mobilenet_v2": "classifier.", "sequential_cnn": "31."}[arch]


def split_parameters(model: nn.Module, arch: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone, head) parameters, for discriminative learning rates and backbone freezing."""
    prefix = head_prefix(arch)
    backbone, head = [], []
    for name, param in model.named_parameters():
        (head if name.removeprefix("module.").startswith(prefix) else backbone).append(param)
    return backbone, head


def _imagenet_weights(arch: str):
    import torchvision

    return getattr(torchvision.models, _IMAGENET_WEIGHTS[arch]).IMAGENET1K_V1


def imagenet_weights_path(arch: str) -> str:
    weights = _imagenet_weights(arch)
    return os.path.join(torch.hub.get_dir(), "checkpoints", posixpath.basename(weights.url))


def imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights, from the hub cache or downloaded; never a silent fallback."""
    if arch not in _IMAGENET_WEIGHTS:
        raise InitError(f"init: imagenet: {arch} has no ImageNet weights; use init: scratch or a checkpoint path")
    weights = _imagenet_weights(arch)
    path = imagenet_weights_path(arch)
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:
        raise InitError(
            f"init: imagenet: {arch} weights not found at {path} and could not be downloaded "
            f"({type(exc).__name__}); copy {posixpath.basename(weights.url)} from {weights.url} into "
            f"{os.path.dirname(path)} (or set TORCH_HOME), or use init: scratch"
        ) from None


def load_weights_file(storage: Storage, uri: str) -> dict[str, torch.Tensor]:
    """A state_dict from a .pt file or from one of our checkpoint folders, safely."""
    if storage.is_dir(uri):
        uri = join(uri, MODEL_FILE)
    try:
        data = storage.read_bytes(uri)
    except StorageNotFound:
        raise InitError(f"{uri}: weights not found") from None
    except ReadError:  # a storage fault that outlived the retries, not a bad init: say so as it is
        raise
    except StorageError as exc:  # already one line naming the URI
        raise InitError(f"cannot read weights: {exc}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InitError(f"{uri}: refused to load weights (not a plain tensor file: {first_line[:200]})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise InitError(f"{uri}: expected a state_dict, found {type(state).__name__}")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _load_backbone(model: nn.Module, arch: str, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every matching tensor; the head is replaced when its shape differs (e.g. 1000 → 2 classes)."""
    own = model.state_dict()
    head = head_prefix(arch)
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not k.startswith(head)]
    if missing:
        raise InitError(
            f"{source}: weights do not fit {arch} ({len(missing)} tensors missing or mis-shaped, e.g. {missing[0]})"
        )
    model.load_state_dict(usable, strict=False)
    logger.info("loaded %d tensors into %s from %s", len(usable), arch, source)


def build_model(arch: str, init: str = "scratch", num_classes: int = 2, storage: Storage | None = None) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise InitError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    model = sequential_cnn(num_classes) if arch == "sequential_cnn" else _torchvision_model(arch, num_classes)
    if init == "scratch":
        return model
    if init == "imagenet":
        _load_backbone(model, arch, imagenet_state_dict(arch), f"imagenet ({imagenet_weights_path(arch)})")
    else:
        _load_backbone(model, arch, load_weights_file(storage or Storage(), init), init)
    return model


def batchnorm_folded(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with each BatchNorm folded into the convolution before it
    (torch.fx): the same function with fewer ops.  On 2 cores in fp32 it scored ResNet18 1.15x as
    fast at 128 px and MobileNetV2 1.27-1.90x (bench/NOTES.md, "Folding BatchNorm for scoring").
    A model that fx cannot trace is returned unchanged, with a warning: slower, never wrong."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model.eval())  # a deep copy: ``model`` keeps its BatchNorm layers
    except Exception as exc:  # noqa: BLE001 - any tracing failure leaves the model as it was
        logger.warning("scoring %s without folding BatchNorm: %s", type(model).__name__, exc)
        return model


def check_init(arch: str, init: str, storage: Storage) -> None:
    """Fail before any training when initial weights cannot be had."""
    if init == "scratch":
        return
    if init == "imagenet":
        imagenet_state_dict(arch)
    elif not storage.exists(init):
        raise InitError(f"{init}: init weights not found")
