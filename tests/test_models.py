"""load_model: bundled pretrained model, torchvision names, checkpoints, factories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from convscope.errors import CheckpointError, UnknownClassError, UnknownModelError
from convscope.models import load_model, read_checkpoint

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_bundled_pretrained_model_calls_the_cat_a_cat(lite0, chelsea):
    assert lite0.name.startswith("efficientnet_lite0")
    assert not lite0.module.training
    assert lite0.transform.mean == (0.5, 0.5, 0.5)
    top5 = lite0.predict(lite0.preprocess(chelsea), k=5)[0]
    assert top5[0].index in CAT_CLASSES
    # Egyptian cat (0.378) and tiger cat (0.376) are 0.002 apart: the order may follow BLAS.
    assert {p.label for p in top5[:2]} == {"Egyptian cat", "tiger cat"}
    assert abs(top5[0].probability - 0.378) < 5e-3
    assert sum(p.probability for p in top5 if p.index in CAT_CLASSES) > 0.8
    assert lite0.class_index("tabby") == 281
    with pytest.raises(UnknownClassError, match="Egyptian cat"):
        lite0.class_index("egyptian kat")


def test_unknown_model_name_suggests(tmp_path):
    with pytest.raises(UnknownModelError) as info:
        load_model("resnet51", device="cpu")
    assert "resnet50" in info.value.suggestions
    with pytest.raises(UnknownModelError, match="IMAGENET1K_V1"):
        load_model("vgg16", weights="IMAGENET2K", device="cpu")


def _resnet18_state(seed: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.resnet18().state_dict()


def test_torchvision_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    """torchvision's own pretrained path, with the cache filled by hand (no download)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = tmp_path / "hub" / "checkpoints" / Path(weights.url).name
    cached.parent.mkdir(parents=True)
    state = _resnet18_state()
    torch.save(state, cached)
    loaded = load_model("resnet18", weights="DEFAULT", device="cpu")
    torch.testing.assert_close(loaded.module.state_dict()["fc.weight"], state["fc.weight"])
    assert loaded.class_names[281] == "tabby"
    assert (loaded.transform.resize, loaded.transform.crop) == (256, 224)
    assert "IMAGENET1K_V1" in loaded.name


def test_checkpoint_paths_and_wrappers(tmp_path):
    state = _resnet18_state()
    plain = tmp_path / "plain.pth"
    torch.save(state, plain)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in state.items()}},
               wrapped)
    for path in (plain, wrapped):
        loaded = load_model(str(path), arch="resnet18", device="cpu")
        torch.testing.assert_close(loaded.module.state_dict()["layer4.1.conv2.weight"],
                                   state["layer4.1.conv2.weight"])
    same = load_model("resnet18", weights=plain, device="cpu")
    torch.testing.assert_close(same.module.conv1.weight, state["conv1.weight"])
    with pytest.raises(CheckpointError, match="--arch"):
        load_model(str(plain), device="cpu")


def test_fine_tuned_head_is_rebuilt_and_class_names_read(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    path = tmp_path / "tuned.pth"
    torch.save({"state_dict": model.state_dict(), "classes": ["a", "b", "c", "d"]}, path)
    loaded = load_model(str(path), arch="resnet18", device="cpu")
    assert loaded.module.fc.out_features == 4
    assert loaded.class_names == ["a", "b", "c", "d"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model.eval()(x))


@pytest.mark.slow
def test_checkpoint_that_does_not_fit_lists_keys(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg11().state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_model(str(path), arch="resnet18", device="cpu")
    message = str(info.value)
    assert "missing keys" in message and "conv1.weight" in message
    assert "unexpected keys" in message and "features.0.weight" in message


def test_weights_only_refuses_smuggled_objects(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"fc.weight": torch.zeros(2, 2), "extra": Evil()}, path, pickle_protocol=2)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_checkpoint(path)
    assert not marker.exists()
    whole = tmp_path / "whole.pth"
    torch.save(torchvision.models.resnet18(), whole)
    with pytest.raises(CheckpointError, match="state_dict"):
        load_model(str(whole), arch="resnet18", device="cpu")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        read_checkpoint(corrupt)


def test_factory_spec_builds_user_models(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch.nn as nn\n"
        "def small(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(8, num_classes))\n"
        "def not_a_model():\n"
        "    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model("my_models:small", device="cpu")
    assert loaded.module[4].out_features == 10
    assert loaded.class_names is None and loaded.label(3) == "class 3"
    with pytest.raises(UnknownModelError, match="my_models:small"):
        load_model("my_models:smal", device="cpu")
    with pytest.raises(Exception, match=r"not an nn\.Module"):
        load_model("my_models:not_a_model", device="cpu")


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from convscope.errors import ConvscopeError

    with pytest.raises(ConvscopeError, match="no CUDA device"):
        load_model("resnet18", device="cuda")


def test_preprocess_resizes_the_pil_image_with_its_interpolation():
    """Resize and crop run on the PIL image (as torchvision's and timm's transforms do),
    with the configured interpolation; arrays and tensors give the same result."""
    import numpy as np
    from PIL import Image

    from convscope.errors import ConvscopeError
    from convscope.images import load_image
    from convscope.models import Preprocess

    image = load_image("sample:chelsea")  # 451 x 300
    transform = Preprocess(resize=80, crop=64, interpolation="bicubic", mean=(0, 0, 0),
                           std=(1, 1, 1))
    by_hand = image.resize((120, 80), Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (120 - 64) // 2, (80 - 64) // 2
    expected = np.asarray(by_hand.crop((left, top, left + 64, top + 64)), dtype=np.float32) / 255
    out = transform(image)
    torch.testing.assert_close(out, torch.from_numpy(expected).permute(2, 0, 1), atol=1e-6, rtol=0)
    squashed = Preprocess(resize=64, crop=64, squash=True, mean=(0, 0, 0), std=(1, 1, 1))
    assert squashed(image).shape == (3, 64, 64)
    as_tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    assert transform(as_tensor).shape == (3, 64, 64)
    with pytest.raises(ConvscopeError, match="bicubic"):
        Preprocess(interpolation="bicubicc")
