"""build(): results equal a brute-force computation holding every activation; bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from convscope.atlas import (
    Atlas,
    AtlasExistsError,
    EmptyDatasetError,
    TopKTooLargeError,
    build,
    list_images,
)
from convscope.errors import UnknownLayerError
from convscope.hooks import capture
from convscope.images import load_image

LAYERS = ["0", "3", "7"]  # conv (pre-ReLU), second conv, the Linear head (C,) -> (C, 1, 1)


def brute_force(loaded, paths: list[str], layers: list[str], k: int, batch_size: int,
                edges: np.ndarray) -> tuple[list[str], dict]:
    """Every activation of every readable image in memory, reduced with numpy.

    Batches are formed like build() forms them (consecutive listed files, unreadable ones
    dropped) so the forward passes are bit-identical and only the reductions differ."""
    readable, chunks = [], []
    for start in range(0, len(paths), batch_size):
        batch = []
        for path in paths[start:start + batch_size]:
            try:
                batch.append(loaded.transform(load_image(path)))
                readable.append(path)
            except Exception:
                continue
        if batch:
            with torch.no_grad(), capture(loaded.module, layers) as acts:
                loaded.module(torch.stack(batch))
            chunks.append({name: acts[name].numpy() for name in layers})
    expected = {}
    for name in layers:
        acts = np.concatenate([chunk[name] for chunk in chunks])
        if acts.ndim == 2:
            acts = acts[:, :, None, None]
        n, c, h, w = acts.shape
        flat = acts.reshape(n, c, h * w)
        spatial_max, arg = flat.max(-1), flat.argmax(-1)
        spatial_mean = flat.astype(np.float64).mean(-1)
        result = {}
        for by, score in (("max", spatial_max), ("mean", spatial_mean)):
            index = np.empty((c, k), np.int64)
            for ch in range(c):
                order = np.lexsort((np.arange(n), -score[:, ch]))  # value desc, index asc
                index[ch] = order[:k]
            value = np.take_along_axis(score.T, index, 1)
            where = np.take_along_axis(arg.T, index, 1)
            result[by] = (index, value, np.stack([where // w, where % w], -1))
        values = acts.transpose(1, 0, 2, 3).reshape(c, -1).astype(np.float64)
        bins = np.searchsorted(edges, values, side="left")
        result["stats"] = {
            "count": np.full(c, values.shape[1]),
            "mean": values.mean(1), "std": values.std(1), "max": values.max(1),
            "frac_positive": (values > 0).mean(1), "dead": ~(values > 0).any(1),
            "saturated": (values > 0).all(1),
            "histogram": np.stack([np.bincount(b, minlength=len(edges) + 1) for b in bins]),
        }
        expected[name] = result
    return readable, expected


@pytest.fixture(scope="module")
def built(image_folder: Path, tmp_path_factory: pytest.TempPathFactory, factory_dir: Path):
    import dataclasses
    import sys

    from convscope.models import Preprocess, load_model

    sys.path.insert(0, str(factory_dir))
    try:
        loaded = load_model("tinyatlas:build", device="cpu")
    finally:
        sys.path.remove(str(factory_dir))
    loaded = dataclasses.replace(loaded, transform=Preprocess(resize=48, crop=40))
    out = tmp_path_factory.mktemp("atlas-out") / "atlas"
    atlas = build(loaded, image_folder, LAYERS, topk=4, rank_by=("max", "mean"),
                  batch_size=5, out=out, crop_size=16)
    return loaded, atlas, out


def test_topk_stats_and_locations_equal_brute_force(built, image_folder):
    loaded, atlas, _ = built
    paths = list_images(image_folder).paths
    readable, expected = brute_force(loaded, paths, LAYERS, 4, 5, atlas.histogram_edges)
    assert atlas.images == readable
    for name in LAYERS:
        for by in ("max", "mean"):
            index, value, location = atlas.topk(name, by)
            want_index, want_value, want_location = expected[name][by]
            np.testing.assert_array_equal(index, want_index)
            np.testing.assert_allclose(value, want_value, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(location, want_location)
            assert np.all(np.diff(value, axis=1) <= 0)  # sorted descending
        stats = atlas.stats(name)
        want = expected[name]["stats"]
        for key in ("count", "dead", "saturated"):
            np.testing.assert_array_equal(stats[key], want[key], err_msg=key)
        for key in ("mean", "std", "max", "frac_positive"):
            np.testing.assert_allclose(stats[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
        np.testing.assert_array_equal(atlas.histogram(name)[0], want["histogram"])


def test_ties_prefer_the_lower_image_index(built):
    _, atlas, _ = built
    original = atlas.images.index(next(p for p in atlas.images if p.endswith("s03.png")))
    duplicate = atlas.images.index(next(p for p in atlas.images if "duplicate" in p))
    ties = 0
    for layer in LAYERS:
        for by in ("max", "mean"):
            index, value, _ = atlas.topk(layer, by)
            for ch in range(index.shape[0]):
                row = list(index[ch])
                if original in row and duplicate in row:
                    ties += 1
                    first, second = row.index(min(original, duplicate)), row.index(
                        max(original, duplicate))
                    assert second == first + 1
                    assert value[ch, first] == value[ch, second]
    assert ties >= 3  # the duplicate image really tied (the test checks something)


def test_bad_files_are_skipped_listed_and_labels_read(built):
    _, atlas, out = built
    skipped = {Path(s["path"]).name: s["error"] for s in atlas.skipped}
    assert set(skipped) == {"broken.png", "fake.jpg", "README.txt"}
    assert "image" in skipped["fake.jpg"].lower()
    assert len(atlas.images) == 18
    assert atlas.labels[0] == "patterns"
    assert atlas.labels[-1] == "photos"
    meta = json.loads((out / "atlas.json").read_text())
    assert meta["dataset"] == {"source": str(meta["dataset"]["source"]), "listed": 20,
                               "images": 18, "skipped": 3}


def test_save_load_roundtrip_crops_and_html(built):
    loaded, atlas, out = built
    again = Atlas.load(out)
    assert again.images == atlas.images
    assert again.layers == LAYERS
    for name in LAYERS:
        for x, y in zip(again.topk(name), atlas.topk(name), strict=True):
            np.testing.assert_array_equal(x, y)
    # A crop is the receptive-field box of the preprocessed view, scaled into its tile.
    index, _, location = atlas.topk("0")
    boxes = atlas.boxes("0")
    rf = atlas.meta["layers"]["0"]["receptive_field"]
    row, col = location[1, 0]
    centre = (rf["start"][0] + row * rf["stride"][0], rf["start"][1] + col * rf["stride"][1])
    top, left, bottom, right = boxes[1, 0]
    assert rf["size"] == [5, 5]
    assert rf["stride"] == [4, 4]
    assert top <= centre[0] < bottom
    assert left <= centre[1] < right
    assert bottom - top <= 5
    strip = np.asarray(Image.open(out / "crops" / "0" / "1.jpg")).astype(float)
    assert strip.shape == (16, 16 * 4, 3)
    from convscope.atlas.crops import _fit

    def tile_of(image_index: int) -> np.ndarray:
        view = loaded.transform.to_display(loaded.transform(load_image(atlas.images[image_index])))
        pixels = (view.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        return _fit(pixels[top:bottom, left:right], 16).astype(float)

    error = np.abs(tile_of(index[1, 0]) - strip[:, :16]).mean()
    other = next(i for i in range(len(atlas.images)) if i not in index[1])
    assert error < 6 < np.abs(tile_of(other) - strip[:, :16]).mean()  # JPEG loss only
    html = (out / "index.html").read_text()
    assert "layers/3.html" in html
    assert "broken.png" in html
    assert "crops/3/5.jpg" in (out / "layers" / "3.html").read_text()
    assert atlas.top_classes("3", 0)[0][1] >= 1


def test_dataset_and_dataloader_inputs_match_folder(tiny_loaded):
    torch.manual_seed(1)
    images = torch.randn(10, 3, 40, 40)
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(10))
    from_dataset = build(tiny_loaded, dataset, ["3"], topk=3, batch_size=4)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    from_loader = build(tiny_loaded, loader, ["3"], topk=3)
    with torch.no_grad(), capture(tiny_loaded.module, "3") as acts:
        tiny_loaded.module(images)
    spatial_max = acts["3"].flatten(2).amax(-1)  # (10, 6)
    want = torch.argsort(spatial_max.T, dim=1, descending=True, stable=True)[:, :3]
    for atlas in (from_dataset, from_loader):
        index, value, _ = atlas.topk("3")
        np.testing.assert_array_equal(index, want.numpy())
        np.testing.assert_allclose(value, spatial_max.T.gather(1, want).numpy(), rtol=1e-5)
    assert from_dataset.images[0] == "item[0]"


def test_model_left_as_it_was(tiny_loaded, image_folder):
    module = tiny_loaded.module
    module.train()
    module[0].eval()
    flags = [m.training for m in module.modules()]
    build(tiny_loaded, image_folder, ["0"], topk=2, batch_size=8)
    assert [m.training for m in module.modules()] == flags
    assert all(not m._forward_hooks for m in module.modules())


def test_clear_errors(tiny_loaded, image_folder, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(EmptyDatasetError, match="no image"):
        build(tiny_loaded, empty, ["0"])
    with pytest.raises(UnknownLayerError, match="did you mean"):
        build(tiny_loaded, image_folder, ["33"])
    with pytest.raises(TopKTooLargeError, match="larger than the dataset"):
        build(tiny_loaded, image_folder, ["0"], topk=50)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "a.png").write_text("x")
    with pytest.raises(EmptyDatasetError, match="could be read"):
        build(tiny_loaded, only_bad, ["0"], topk=1)
    out = tmp_path / "out"
    build(tiny_loaded, image_folder, ["0"], topk=2, out=out, crops=False)
    first = build(tiny_loaded, image_folder, ["0"], topk=2, out=out, crops=False)
    build(tiny_loaded, image_folder, ["0"], topk=2, out=out, crops=False)  # same atlas: fine
    # --resume of a finished atlas loads it instead of running again.
    import importlib

    build_module = importlib.import_module("convscope.atlas.build")

    def no_pass(*args, **kwargs):
        raise AssertionError("should not run a pass")

    monkeypatch.setattr(build_module._Run, "execute", no_pass)
    resumed = build(tiny_loaded, image_folder, ["0"], topk=2, out=out, crops=False, resume=True)
    np.testing.assert_array_equal(resumed.topk("0")[0], first.topk("0")[0])
    monkeypatch.undo()
    with pytest.raises(AtlasExistsError, match="--force"):
        build(tiny_loaded, image_folder, ["3"], topk=2, out=out, crops=False)
    atlas = build(tiny_loaded, image_folder, ["3"], topk=2, out=out, crops=False, force=True)
    assert Atlas.load(out).layers == ["3"] == atlas.layers
    with pytest.raises(UnknownLayerError):
        atlas.topk("0")


@pytest.mark.slow
def test_pretrained_lite0_block_outputs_equal_brute_force(lite0, tmp_path):
    """The real model: EfficientNet-Lite0 block outputs over photo crops."""
    from skimage import data

    paths = []
    for name in ("chelsea", "coffee", "rocket"):
        image = getattr(data, name)()
        for i, part in enumerate((image, image[:, ::-1], image[image.shape[0] // 4:])):
            path = tmp_path / f"{name}{i}.png"
            Image.fromarray(np.ascontiguousarray(part)).save(path)
            paths.append(str(path))
    layers = ["_blocks.0", "_blocks.15", "_conv_head"]
    atlas = build(lite0, paths, layers, topk=3, batch_size=4)
    readable, expected = brute_force(lite0, paths, layers, 3, 4, atlas.histogram_edges)
    assert atlas.images == readable == paths
    for name in layers:
        index, value, location = atlas.topk(name)
        np.testing.assert_array_equal(index, expected[name]["max"][0])
        np.testing.assert_allclose(value, expected[name]["max"][1], rtol=1e-5)
        np.testing.assert_array_equal(location, expected[name]["max"][2])
        for key in ("mean", "std", "max", "frac_positive"):
            np.testing.assert_allclose(atlas.stats(name)[key], expected[name]["stats"][key],
                                       rtol=1e-4, atol=1e-5, err_msg=key)
    assert atlas.stats("_conv_head")["mean"].shape == (1280,)
    # The cat photos are predicted as cats (Egyptian cat / tiger cat / tabby).
    cats = {lite0.class_index(n) for n in ("Egyptian cat", "tiger cat", "tabby")}
    assert set(atlas.predictions[:3].tolist()) <= cats


def _boxes_by_hand(rf: dict, location: np.ndarray, height: int, width: int) -> np.ndarray:
    """Receptive-field boxes worked out per axis: rows against the height, columns
    against the width."""
    (size_r, size_c), (stride_r, stride_c), (start_r, start_c) = (
        rf["size"], rf["stride"], rf["start"])
    top = np.floor(start_r + location[..., 0] * stride_r - (size_r - 1) / 2)
    left = np.floor(start_c + location[..., 1] * stride_c - (size_c - 1) / 2)
    return np.stack([np.clip(top, 0, height), np.clip(left, 0, width),
                     np.clip(top + size_r, 0, height), np.clip(left + size_c, 0, width)],
                    -1).astype(np.int32)


def test_non_square_images_in_multi_image_batches(tiny_loaded, tmp_path):
    """36 x 60 inputs, batches of 3 (the last one short): top-k, locations, statistics,
    receptive-field boxes (clipped per axis) and crops all match an independent
    computation. Square inputs would hide a swapped height/width anywhere."""
    from convscope.atlas.crops import _fit

    torch.manual_seed(5)
    # Smooth images (upsampled noise): their crops survive JPEG, so a wrong box shows.
    images = torch.nn.functional.interpolate(torch.randn(7, 3, 9, 15) * 1.5, size=(36, 60),
                                             mode="bilinear", align_corners=False)
    images[4] = images[1]  # a tie across batches
    dataset = torch.utils.data.TensorDataset(images)
    layers = ["0", "3"]
    out = tmp_path / "wide"
    atlas = build(tiny_loaded, dataset, layers, topk=3, batch_size=3, rank_by=("max", "mean"),
                  out=out, crop_size=16)
    assert atlas.meta["input_size"] == [3, 36, 60]
    with torch.no_grad(), capture(tiny_loaded.module, layers) as acts:
        tiny_loaded.module(images)
    clipped_bottom = clipped_right = 0
    for name in layers:
        act = acts[name].double()
        n, c, h, w = act.shape
        assert h != w
        flat = act.flatten(2)
        spatial_max, arg = flat.max(-1)
        for by, score in (("max", spatial_max), ("mean", flat.mean(-1))):
            want = torch.tensor(np.stack([np.lexsort((np.arange(n), -score[:, ch].numpy()))[:3]
                                          for ch in range(c)]))
            index, value, location = atlas.topk(name, by)
            np.testing.assert_array_equal(index, want.numpy())
            np.testing.assert_allclose(value, score.T.gather(1, want).numpy(), rtol=1e-5,
                                       atol=1e-6)
            where = arg.T.gather(1, want).numpy()
            np.testing.assert_array_equal(location, np.stack([where // w, where % w], -1))
        stats = atlas.stats(name)
        values = act.transpose(0, 1).reshape(c, -1).numpy()
        np.testing.assert_allclose(stats["mean"], values.mean(1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["std"], values.std(1), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(stats["count"], np.full(c, n * h * w))
        _, _, location = atlas.topk(name)
        rf = atlas.meta["layers"][name]["receptive_field"]
        boxes = atlas.boxes(name)
        np.testing.assert_array_equal(boxes, _boxes_by_hand(rf, location, 36, 60))
        clipped_bottom += int((boxes[..., 2] == 36).sum())
        clipped_right += int((boxes[..., 3] == 60).sum())
    assert clipped_bottom and clipped_right  # both clips are exercised
    # A crop tile is the receptive-field box of the example's image; take an example whose
    # box is not on the diagonal, so that a transposed box would show another region.
    index, _, _ = atlas.topk("3")
    boxes = atlas.boxes("3")
    channel, j = next((c, j) for c in range(index.shape[0]) for j in range(index.shape[1])
                      if boxes[c, j, 0] != boxes[c, j, 1])
    top, left, bottom, right = boxes[channel, j]

    def tile_of(image: int, box: tuple[int, int, int, int]) -> np.ndarray:
        view = tiny_loaded.transform.to_display(images[image])
        pixels = (view.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        return _fit(pixels[box[0]:box[2], box[1]:box[3]], 16).astype(float)

    strip = np.asarray(Image.open(out / "crops" / "3" / f"{channel}.jpg")).astype(float)
    strip = strip[:, j * 16:(j + 1) * 16]
    error = np.abs(strip - tile_of(index[channel, j], (top, left, bottom, right))).mean()
    swapped = np.abs(strip - tile_of(index[channel, j], (left, top, right, bottom))).mean()
    others = [np.abs(strip - tile_of(i, (top, left, bottom, right))).mean()
              for i in range(len(images)) if not torch.equal(images[i], images[index[channel, j]])]
    # JPEG (with chroma subsampling) loses some colour; the right crop is still far closer
    # than the same box of another image or the transposed box of the same image.
    assert error < 0.5 * min([swapped, *others])


def _interrupted(loaded, image_folder, out, monkeypatch, **kwargs) -> None:
    """A run with a checkpoint after every batch, stopped (like a crash) after 2 batches."""

    class Stop(Exception):
        pass

    def stop(done, total, elapsed):
        if done >= 10:
            raise Stop

    monkeypatch.setenv("CONVSCOPE_ATLAS_CHECKPOINT_BATCHES", "1")
    with pytest.raises(Stop):
        build(loaded, image_folder, ["0", "3"], topk=2, batch_size=5, out=out, crops=False,
              progress=stop, **kwargs)
    monkeypatch.delenv("CONVSCOPE_ATLAS_CHECKPOINT_BATCHES")
    assert (out / "checkpoint.pt").exists()


def test_resume_refuses_other_preprocessing_and_keeps_its_reduction(tiny_loaded, image_folder,
                                                                    tmp_path, monkeypatch):
    import dataclasses

    from convscope.models import Preprocess

    out = tmp_path / "atlas"
    _interrupted(tiny_loaded, image_folder, out, monkeypatch, fused="eager")
    others = {
        "resize": dataclasses.replace(tiny_loaded, transform=Preprocess(resize=50, crop=40)),
        "mean": dataclasses.replace(tiny_loaded, transform=Preprocess(
            resize=48, crop=40, mean=(0.5, 0.5, 0.5))),
        "std": dataclasses.replace(tiny_loaded, transform=Preprocess(
            resize=48, crop=40, std=(0.2, 0.2, 0.2))),
    }
    for what, other in others.items():
        with pytest.raises(AtlasExistsError, match="different atlas"):
            build(other, image_folder, ["0", "3"], topk=2, batch_size=5, out=out, crops=False,
                  resume=True)
        assert (out / "checkpoint.pt").exists(), what
    with pytest.raises(AtlasExistsError, match="different atlas"):
        build(tiny_loaded, image_folder, ["0", "3"], topk=2, batch_size=5, out=out,
              crops=False, resume=True, max_pixels=10**6)
    # The same settings resume; the run keeps the reduction it started with.
    resumed = build(tiny_loaded, image_folder, ["0", "3"], topk=2, batch_size=5, out=out,
                    crops=False, resume=True, fused="compile")
    assert resumed.meta["settings"]["reduction"] == "eager"
    assert not (out / "checkpoint.pt").exists()
    whole = build(tiny_loaded, image_folder, ["0", "3"], topk=2, batch_size=5)
    for layer in ("0", "3"):
        for x, y in zip(resumed.topk(layer), whole.topk(layer), strict=True):
            np.testing.assert_array_equal(x, y)
        for key, value in whole.stats(layer).items():
            np.testing.assert_array_equal(resumed.stats(layer)[key], value, err_msg=key)
        np.testing.assert_array_equal(resumed.histogram(layer)[0], whole.histogram(layer)[0])


def test_one_reduction_per_run_chosen_from_the_whole_run(monkeypatch):
    """auto counts the batches of the whole run (not those left after a resume); a
    resumed run keeps its checkpoint's reduction; a failed compile is an error only when
    asked for explicitly."""
    import importlib

    build_module = importlib.import_module("convscope.atlas.build")
    probes: list[str] = []
    monkeypatch.setattr(build_module, "_probe_compile", lambda device: probes.append("ok"))
    choose = build_module._choose_reduction
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    threshold = build_module.AUTO_COMPILE_BATCHES["cuda"]
    assert choose("auto", threshold - 1, cuda, None, 1) is False
    assert choose("auto", threshold, cuda, None, 1) is True
    assert choose("auto", 10**6, cpu, None, 1) is False  # CPU: eager is the faster one
    assert choose("eager", 10**6, cpu, None, 1) is False
    assert choose("auto", 1, cpu, True, 1) is True  # resumed: the recorded reduction
    assert choose("compile", 10**6, cpu, False, 1) is False
    assert probes == ["ok", "ok"]
    # The C kernel (nothing to compile): auto spreads its rows over the threads at once.
    assert choose("auto", 1, cpu, None, 1, probe=False) is True
    assert choose("eager", 1, cpu, None, 1, probe=False) is False
    assert choose("auto", 1, cpu, False, 1, probe=False) is False  # resumed: recorded
    assert probes == ["ok", "ok"]

    def broken(device):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(build_module, "_probe_compile", broken)
    assert choose("auto", threshold, cuda, None, 1) is False
    with pytest.raises(build_module.AtlasError, match="no compiler"):
        choose("compile", 1, cpu, None, 1)
    source = build_module._Source(None, [f"item[{i}]" for i in range(41)], None, "x", (3, 8, 8))
    assert build_module._batch_count(source, 20) == 3


@pytest.mark.slow
def test_reduction_threads_and_compiled_kernel_change_no_number(monkeypatch):
    """The pass can share the eager tiles among Python threads (reduction_threads=2; the
    default 1: none) and the compiled reduction uses other kernels: every array of the
    atlas is identical in all three runs, and the threads really ran."""
    from convscope.atlas.stats import ChannelStats

    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 12, 3, stride=2, padding=1)).eval()
    images = torch.randn(10, 3, 64, 64)  # batches of 4 x 16 x 64 x 64: shared among threads
    images[3, :, :8, :8] = 0.0  # flat regions: ties and zeros
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(10))
    pools: list[bool] = []
    update = ChannelStats.update

    def recording(self, activation, indices, *, compiled=False, pool=None):
        pools.append(pool is not None)
        return update(self, activation, indices, compiled=compiled, pool=pool)

    monkeypatch.setattr(ChannelStats, "update", recording)
    results = []
    for threads, fused in ((1, "eager"), (2, "eager"), (2, "compile")):
        pools.clear()
        atlas = build(model, dataset, ["0", "2"], topk=3, batch_size=4, fused=fused,
                      rank_by=("max", "mean"), reduction_threads=threads)
        results.append((atlas, list(pools)))
    (one, one_pools), (shared, shared_pools), (compiled, compiled_pools) = results
    assert not any(one_pools) and all(shared_pools) and not any(compiled_pools)
    assert shared.meta["settings"]["reduction"] == "eager"
    assert compiled.meta["settings"]["reduction"] == "compiled"
    for other in (shared, compiled):
        assert sorted(other._arrays) == sorted(one._arrays)
        for key, value in one._arrays.items():
            np.testing.assert_array_equal(other._arrays[key], value, err_msg=key)


def test_reduction_threads_must_be_positive():
    from convscope.atlas.build import AtlasError

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).eval()
    dataset = torch.utils.data.TensorDataset(torch.randn(2, 3, 16, 16), torch.zeros(2))
    with pytest.raises(AtlasError, match="reduction_threads must be at least 1, got 0"):
        build(model, dataset, ["0"], topk=1, reduction_threads=0)


# Cases a mutation run (stop 20) found unpinned.


def _tensor_data(seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(5, 3, 36, 60, generator=g))


def test_a_finished_atlas_with_other_histogram_edges_is_not_resumed(tiny_loaded: Any,
                                                                    tmp_path: Path) -> None:
    """The histogram edges change every histogram: an atlas built with other edges is a
    different atlas. Without the edges in the fingerprint, ``resume=True`` would hand
    back the old atlas (its histograms on the old edges) as if it were the one asked for."""
    out = tmp_path / "atlas"
    data = _tensor_data(1)
    custom = (-1.0, 0.0, 1.0)
    first = build(tiny_loaded, data, ["3"], topk=2, batch_size=2, out=out, crops=False,
                  html=False, edges=custom)
    np.testing.assert_array_equal(first.histogram_edges, custom)
    with pytest.raises(AtlasExistsError, match="different atlas"):
        build(tiny_loaded, data, ["3"], topk=2, batch_size=2, out=out, crops=False,
              html=False, resume=True)


def _write_images(folder: Path, seeds: list[int]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        pixels = np.random.default_rng(seed).integers(0, 256, (30, 44, 3), dtype=np.uint8)
        path = folder / f"img{seed}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def test_a_finished_atlas_of_another_image_list_is_not_resumed(tiny_loaded: Any,
                                                               tmp_path: Path) -> None:
    """Same model, settings and image count, one image replaced: the atlas of the old list
    must not be handed back on ``resume=True`` (its top images name other files)."""
    out = tmp_path / "atlas"
    old = _write_images(tmp_path / "images", [1, 2, 3])
    new = old[:2] + _write_images(tmp_path / "images", [4])
    build(tiny_loaded, old, ["0"], topk=2, batch_size=2, out=out, crops=False, html=False)
    with pytest.raises(AtlasExistsError, match="different atlas"):
        build(tiny_loaded, new, ["0"], topk=2, batch_size=2, out=out, crops=False,
              html=False, resume=True)


def test_a_finished_atlas_of_other_weights_is_not_resumed(tiny_loaded: Any,
                                                          tmp_path: Path) -> None:
    """Same architecture and data, one weight changed: every activation differs, so the
    old atlas must not be handed back on ``resume=True``."""
    import copy

    out = tmp_path / "atlas"
    data = _tensor_data(2)
    build(tiny_loaded, data, ["0"], topk=2, batch_size=2, out=out, crops=False, html=False)
    module = copy.deepcopy(tiny_loaded.module)
    with torch.no_grad():
        module[0].weight[0, 0, 0, 0] += 1.0
    other = dataclasses.replace(tiny_loaded, module=module)
    with pytest.raises(AtlasExistsError, match="different atlas"):
        build(other, data, ["0"], topk=2, batch_size=2, out=out, crops=False, html=False,
              resume=True)

def test_layers_without_a_receptive_field_crop_the_whole_non_square_input(
        tiny_loaded: Any) -> None:
    """The Linear head has no receptive field: its boxes are the whole 36 x 60 input,
    (top, left, bottom, right) = (0, 0, 36, 60), not a transposed 60 x 36 box."""
    atlas = build(tiny_loaded, _tensor_data(3), ["7"], topk=2, batch_size=2, crops=False,
                  html=False)
    assert atlas.meta["layers"]["7"]["receptive_field"] is None
    boxes = atlas.boxes("7")
    assert boxes.shape == (5, 2, 4)
    assert (boxes == np.array([0, 0, 36, 60])).all()
