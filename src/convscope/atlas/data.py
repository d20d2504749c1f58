"""Read the images of an atlas: a folder, a list file, a list of paths or a Dataset.

Bad files never stop a run: an image that cannot be decoded is returned as a failure by
:class:`ImageFiles` and dropped from its batch by :func:`collate`, so the caller can count
and list it. Indices always refer to the order of the listed files, which is what makes
shards, checkpoints and merges line up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from convscope.errors import ConvscopeError

from .errors import EmptyDatasetError

#: Extensions that a folder scan treats as images. Other files are listed as skipped.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
})


@dataclass
class Listing:
    """The files of a dataset, in a fixed order, with optional class labels.

    ``paths[i]`` is image ``i``; ``labels[i]`` its ImageFolder class (sub-folder name) or
    None; ``ignored`` are files a folder scan saw that do not have an image extension.
    """

    paths: list[str]
    labels: list[str | None]
    source: str
    ignored: list[str]


def list_images(source: str | os.PathLike | Sequence[str | os.PathLike]) -> Listing:
    """List a dataset: a folder (recursive, sorted), a text file with one path per line
    (relative paths are relative to the file; blank lines and ``#`` comments skipped) or a
    sequence of paths.

    In a folder whose images all sit in direct sub-folders (torchvision ImageFolder style),
    the sub-folder names are read as labels. Raises :class:`EmptyDatasetError` when nothing
    is listed and ``FileNotFoundError`` for a missing source.
    """
    if isinstance(source, (list, tuple)):
        paths = [str(p) for p in source]
        listing = Listing(paths, [None] * len(paths), f"{len(paths)} paths", [])
    else:
        root = Path(source)
        if not root.exists():
            raise FileNotFoundError(f"no such dataset folder or list file: {root}")
        listing = _scan_folder(root) if root.is_dir() else _read_list(root)
    if not listing.paths:
        extra = f" ({len(listing.ignored)} non-image files ignored)" if listing.ignored else ""
        raise EmptyDatasetError(f"the dataset {listing.source} holds no image file{extra}")
    return listing


def _scan_folder(root: Path) -> Listing:
    paths: list[str] = []
    ignored: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                paths.append(full)
            else:
                ignored.append(full)
    labels: list[str | None] = [None] * len(paths)
    relative = [Path(p).relative_to(root).parts for p in paths]
    if relative and all(len(parts) == 2 for parts in relative):
        labels = [parts[0] for parts in relative]
    return Listing(paths, labels, str(root), ignored)


def _read_list(path: Path) -> Listing:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConvscopeError(
            f"{path} is neither a folder nor a text file listing image paths ({error})"
        ) from error
    base = path.parent
    paths = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        item = Path(line)
        paths.append(str(item if item.is_absolute() else base / item))
    return Listing(paths, [None] * len(paths), str(path), [])


class ImageFiles(torch.utils.data.Dataset):
    """Map-style dataset of image files: item ``i`` is ``(tensor | None, i, error | None)``.

    A file that cannot be read (missing, truncated, not an image, too large) gives
    ``(None, i, message)`` instead of raising, so DataLoader workers keep going.
    """

    def __init__(self, paths: Sequence[str], transform: Callable[[Any], torch.Tensor],
                 max_pixels: int | None = None):
        self.paths = list(paths)
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str | None]:
        from convscope.images import DEFAULT_MAX_PIXELS, load_image

        limit = self.max_pixels if self.max_pixels is not None else DEFAULT_MAX_PIXELS
        try:
            image = load_image(self.paths[index], max_pixels=limit)
            return self.transform(image), index, None
        except (ConvscopeError, OSError, ValueError) as error:
            return None, index, f"{type(error).__name__}: {error}"


class IndexedDataset(torch.utils.data.Dataset):
    """Wraps any map-style dataset (items ``x`` or ``(x, label, ...)``) into the
    ``(tensor, index, None)`` items :func:`collate` expects."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, None]:
        item = self.dataset[index]
        if isinstance(item, (tuple, list)):
            item = item[0]
        if not isinstance(item, torch.Tensor):
            raise TypeError(
                f"dataset item {index} is a {type(item).__name__}; an atlas needs (C,H,W) "
                "tensors (pass transform= to your dataset) or image paths"
            )
        return item, index, None


def dataset_names(dataset: Any) -> list[str]:
    """Names of a dataset's items: file paths when it has them (ImageFolder ``samples``),
    else ``item[i]``."""
    samples = getattr(dataset, "samples", None) or getattr(dataset, "imgs", None)
    if isinstance(samples, list) and len(samples) == len(dataset):
        return [str(s[0]) if isinstance(s, (tuple, list)) else str(s) for s in samples]
    return [f"item[{i}]" for i in range(len(dataset))]


def collate(items: list[tuple[torch.Tensor | None, int, str | None]]
            ) -> tuple[torch.Tensor | None, torch.Tensor, list[tuple[int, str]]]:
    """Stack the readable items of a batch: ``(images | None, indices, failures)``."""
    good = [(x, i) for x, i, _ in items if x is not None]
    failures = [(i, error or "unreadable") for x, i, error in items if x is None]
    if not good:
        return None, torch.empty(0, dtype=torch.long), failures
    images = torch.stack([x for x, _ in good])
    indices = torch.tensor([i for _, i in good], dtype=torch.long)
    return images, indices, failures


def shard(count: int, rank: int, world: int) -> range:
    """Contiguous, disjoint slice of ``range(count)`` for ``rank`` of ``world`` processes."""
    return range(count * rank // world, count * (rank + 1) // world)
