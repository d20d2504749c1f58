"""load_model sources users bring: timm names, Hugging Face folders, ONNX files, safetensors.

All weights are random and every model is tiny; the references are the libraries' own
outputs (timm's transforms, torchvision's weight transforms, the original torch model of
an ONNX export, Hugging Face's logits).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

import convscope
from convscope.errors import CheckpointError, ConvscopeError, UnknownModelError
from convscope.images import load_image
from convscope.models import (
    UnsupportedOnnxError,
    load_model,
    logits_of,
    timm_preprocess,
    torchvision_preprocess,
)
from convscope.spatial import spatial_maps

X64 = (1, 3, 64, 64)

TIMM_MODELS = [
    # (name, model_kwargs, a layer to look at)
    ("convnext_atto", {}, "stages.1"),
    ("efficientnet_b0", {}, "blocks.2"),
    ("regnetx_002", {}, "s2"),
    ("vit_tiny_patch16_224", {"img_size": 64, "depth": 2}, "blocks.1"),
    ("deit_tiny_distilled_patch16_224", {"img_size": 64, "depth": 2}, "blocks.1"),
    ("vit_tiny_patch16_224", {"img_size": 64, "depth": 2, "reg_tokens": 4}, "blocks.1"),
    ("swin_tiny_patch4_window7_224", {"img_size": 64, "depths": (1, 1, 1, 1),
                                      "num_heads": (1, 1, 1, 1), "embed_dim": 16,
                                      "window_size": 2}, "layers.1"),
]


@pytest.mark.parametrize(("name", "kwargs", "layer"), TIMM_MODELS,
                         ids=["convnext", "efficientnet", "regnet", "vit", "deit", "vit-reg4",
                              "swin"])
def test_timm_models_load_by_name_and_capture(name, kwargs, layer):
    loaded = load_model(f"timm:{name}", device="cpu", model_kwargs=kwargs)
    assert loaded.source == "timm" and not loaded.pretrained
    assert "random weights" in loaded.name
    assert not loaded.module.training
    # the model's own pretrained_cfg preprocessing, pixel for pixel
    from timm.data import create_transform, resolve_model_data_config

    config = resolve_model_data_config(loaded.module)
    if "img_size" in kwargs:
        config["input_size"] = (3, kwargs["img_size"], kwargs["img_size"])
    image = load_image("sample:chelsea")
    torch.testing.assert_close(loaded.transform(image), create_transform(**config)(image))
    assert loaded.transform.interpolation == config["interpolation"]

    x = torch.randn(X64)
    with convscope.capture(loaded.module, [layer]) as acts, torch.no_grad():
        out = loaded.module(x)
    torch.testing.assert_close(out, loaded.module(x))
    maps = spatial_maps(acts[layer], model=loaded.module, input_hw=(64, 64), batch_size=1)
    assert maps.dim() == 4 and maps.shape[0] == 1 and maps.shape[-1] == maps.shape[-2]
    grid = convscope.feature_grid(maps[0], channels=8)
    assert grid.size[0] > 0


def test_timm_cnn_layer_table_has_receptive_fields_and_cam_runs():
    loaded = load_model("timm:convnext_atto", device="cpu")
    rows = {row.name: row for row in convscope.list_layers(loaded.module, (3, 64, 64))}
    stem = rows["stem.0"]  # 4x4 conv, stride 4
    assert stem.receptive_field.size == (4, 4) and stem.receptive_field.stride == (4, 4)
    assert rows["stages.3"].receptive_field.stride == (32, 32)
    x = torch.randn(X64)
    maps = convscope.cam(loaded.module, x, method="gradcam", layer="stages.3", target=3)
    assert maps.shape == (1, 64, 64) and float(maps.min()) >= 0 and float(maps.max()) <= 1


def test_timm_weights_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("convnext_atto", num_classes=3)
    path = tmp_path / "atto.safetensors"
    save_file(source.state_dict(), str(path), metadata={"class_names": json.dumps(["a", "b", "c"])})
    loaded = load_model("timm:convnext_atto", weights=path, device="cpu")
    assert loaded.pretrained and loaded.source == "timm"
    assert loaded.class_names == ["a", "b", "c"]  # head rebuilt for 3 classes, names read
    x = torch.randn(X64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), source.eval()(x))


def test_timm_bad_names_and_uncached_weights_are_one_clear_line():
    with pytest.raises(UnknownModelError) as info:
        load_model("timm:convnext_nanoo", device="cpu")
    assert "timm:convnext_nano" in info.value.suggestions
    with pytest.raises(ConvscopeError, match="not cached locally"):  # and no network request
        load_model("timm:convnext_atto", weights="pretrained", device="cpu")
    with pytest.raises(UnknownModelError, match="d2_in1k"):
        load_model("timm:convnext_atto", weights="d3_in1k", device="cpu")


@pytest.mark.parametrize("weights", ["EfficientNet_B0_Weights.IMAGENET1K_V1",
                                     "ResNet50_Weights.IMAGENET1K_V2",
                                     "ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1"])
def test_torchvision_weights_preprocessing_is_their_own(weights):
    """Bicubic for EfficientNet and SWAG ViT, resize 232 for ResNet50 V2 (not a fixed bilinear)."""
    enum_name, member = weights.split(".")
    chosen = getattr(torchvision.models, enum_name)[member]
    image = load_image("sample:chelsea")
    ours = torchvision_preprocess(chosen)
    # same pixels; only float rounding of the [0, 1] scaling differs (x/255 vs x*(1/255))
    torch.testing.assert_close(ours(image), chosen.transforms()(image), atol=1e-6, rtol=0)


def _hf_vit(folder: Path) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    labels = {0: "cat", 1: "dog", 2: "fox"}
    config = ViTConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=3,
                       id2label=labels, label2id={v: k for k, v in labels.items()})
    model = ViTForImageClassification(config).eval()
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 64, "width": 64}, resample=3).save_pretrained(folder)
    return model


@pytest.mark.slow
def test_hugging_face_vit_folder_loads_with_labels_and_processor(tmp_path):
    folder = tmp_path / "vit-small"
    reference = _hf_vit(folder)
    loaded = load_model(str(folder), device="cpu")
    assert loaded.source == "huggingface" and loaded.class_names == ["cat", "dog", "fox"]
    assert (loaded.transform.crop, loaded.transform.squash) == (64, True)
    assert loaded.transform.interpolation == "bicubic"
    assert loaded.transform.mean == (0.5, 0.5, 0.5)
    batch = loaded.preprocess(["sample:chelsea", "sample:coffee"])
    with torch.no_grad():
        logits = reference(batch).logits
    top = loaded.predict(batch, k=3)
    assert [p.label for p in top[0]] == [["cat", "dog", "fox"][i] for i in logits[0].argsort(
        descending=True)]
    torch.testing.assert_close(torch.tensor([p.probability for p in top[1]]),
                               logits[1].softmax(0).sort(descending=True).values)
    assert load_model(f"hf:{folder}", device="cpu").class_names == ["cat", "dog", "fox"]


def test_hugging_face_convnext_folder_and_bad_folders(tmp_path):
    from transformers import (
        ConvNextConfig,
        ConvNextForImageClassification,
        ConvNextImageProcessor,
    )

    torch.manual_seed(0)
    model = ConvNextForImageClassification(ConvNextConfig(
        hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_labels=2,
        id2label={0: "no", 1: "yes"}, label2id={"no": 0, "yes": 1})).eval()
    folder = tmp_path / "cnx"
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875).save_pretrained(folder)
    loaded = load_model(f"hf:{folder}", device="cpu")
    assert (loaded.transform.resize, loaded.transform.crop) == (73, 64)  # 64 / 0.875
    x = loaded.preprocess("sample:chelsea")
    with torch.no_grad():
        expected = model(x).logits.softmax(1)[0]
    top = loaded.predict(x, k=1)[0][0]
    assert top.label == ["no", "yes"][int(expected.argmax())]
    assert top.probability == pytest.approx(float(expected.max()), abs=1e-6)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConvscopeError, match=r"no config\.json"):
        load_model(str(empty), device="cpu")
    with pytest.raises(ConvscopeError, match="not in the local Hugging Face cache"):
        load_model("hf:nobody/no-such-model", device="cpu")


def _export(model: nn.Module, path: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(model, (torch.zeros(X64),), str(path), dynamo=False, opset_version=17)


@pytest.mark.slow
def test_onnx_export_loads_with_same_logits_and_conv_activations(tmp_path):
    torch.manual_seed(0)
    original = torchvision.models.squeezenet1_1(num_classes=10).eval()
    path = tmp_path / "squeeze.onnx"
    _export(original, path)
    loaded = load_model(str(path), device="cpu")
    assert loaded.source == "onnx" and loaded.pretrained
    assert loaded.transform.crop == 64  # the exported input size
    convs = [name for name, m in original.named_modules() if isinstance(m, nn.Conv2d)]
    names = dict(loaded.module.named_modules())
    assert set(convs) <= set(names)  # readable names: the original modules' names
    x = torch.randn(2, 3, 64, 64)
    with convscope.capture(original, convs) as ours, torch.no_grad():
        expected = original(x)
    with convscope.capture(loaded.module, convs) as theirs, torch.no_grad():
        logits = loaded.module(x)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    for name in convs:
        torch.testing.assert_close(theirs[name], ours[name], atol=1e-5, rtol=1e-5)
    # ResNet: conv+BN are fused by the exporter, so layer1.0.conv1 equals layer1.0.bn1
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    _export(resnet, tmp_path / "r18.onnx")
    converted = load_model(str(tmp_path / "r18.onnx"), device="cpu").module
    assert "layer2.0.downsample.0" in dict(converted.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(converted(x), resnet(x), atol=1e-4, rtol=0)


def test_onnx_errors_name_the_problem(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=1)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 1, 1])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])])
    path = tmp_path / "reduce.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    with pytest.raises(UnsupportedOnnxError, match=r"ReduceMean \(opset 18\)") as info:
        load_model(str(path), device="cpu")
    assert "\n" not in str(info.value)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ConvscopeError, match="not a readable ONNX file"):
        load_model(str(broken), device="cpu")


def test_safetensors_checkpoint_for_a_torchvision_architecture(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(2)
    source = torchvision.models.resnet18(num_classes=4)
    path = tmp_path / "tuned.safetensors"
    save_file({f"module.{k}": v for k, v in source.state_dict().items()}, str(path))
    loaded = load_model(str(path), arch="resnet18", device="cpu")
    assert loaded.module.fc.out_features == 4 and loaded.pretrained
    x = torch.randn(X64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), source.eval()(x))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(str(bad), arch="resnet18", device="cpu")


class DictNet(nn.Module):
    """A classifier that returns a dict, as many research codebases do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.conv(x).mean((2, 3))
        return {"features": features, "logits": self.fc(features)}


def test_logits_of_every_output_kind():
    from transformers.modeling_outputs import ImageClassifierOutput

    logits = torch.randn(2, 5)
    assert logits_of(logits) is logits
    assert logits_of(ImageClassifierOutput(logits=logits)) is logits
    assert logits_of({"aux": torch.zeros(1), "logits": logits}) is logits
    assert logits_of((logits, torch.zeros(1))) is logits
    assert logits_of({"out": logits, "aux": torch.zeros(1)}) is logits  # segmentation style
    assert logits_of({"scores": logits, "name": "x"}) is logits
    with pytest.raises(ConvscopeError, match="ambiguous"):
        logits_of({"a": logits, "b": logits})
    with pytest.raises(ConvscopeError, match="no logits"):
        logits_of("text")
    torch.manual_seed(0)
    model = load_model(DictNet(), device="cpu")
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = model.module(x)["logits"].softmax(1)[0]
    top = model.predict(x, k=3)[0]
    assert [p.index for p in top] == expected.argsort(descending=True).tolist()


def test_random_weights_are_never_silent(capsys):
    assert not load_model("resnet18", device="cpu").pretrained
    assert load_model(DictNet(), device="cpu").pretrained  # the user's own module
    from convscope.cli.main import main

    assert main(["layers", "resnet18", "--filter", "fc"]) == 0
    assert "random weights" in capsys.readouterr().err
    assert main(["layers", "timm:regnetx_002", "--filter", "head.fc"]) == 0
    captured = capsys.readouterr()
    assert "warning: random weights (timm:regnetx_002" in captured.err
    assert "head.fc" in captured.out


def test_models_command_lists_sources_and_timm_names(capsys):
    from convscope.cli.main import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "timm:convnext_nano" in out and "model.onnx" in out and "resnet50" in out
    assert main(["models", "convnext_a*", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["timm"] == [f"timm:{n}" for n in timm.list_models("convnext_a*")]
    assert "timm:convnext_atto" in listing["timm"] and listing["torchvision"] == []
    assert main(["models", "resnet1*"]) == 0
    lines = capsys.readouterr().out.split()
    assert "resnet18" in lines and "timm:resnet18" in lines
    assert main(["models", "no_such_net*"]) == 1


def test_timm_preprocess_reads_crop_pct_and_squash():
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=1)
    ours = timm_preprocess(model, img_size=224)
    assert (ours.resize, ours.crop, ours.interpolation) == (248, 224, "bicubic")  # 224 / 0.9
    assert timm_preprocess(model).crop == 64  # the size the model was built for


def test_timm_class_names_follow_the_head():
    from timm.data import ImageNetInfo

    assert load_model("timm:regnetx_002", device="cpu").class_names[281] == "tabby"
    in12k = load_model("timm:convnext_atto", device="cpu",
                       model_kwargs={"pretrained_cfg_overlay": {"num_classes": 11821},
                                     "num_classes": 11821})
    info = ImageNetInfo("imagenet-12k")
    assert in12k.class_names[7000] == info.index_to_description(7000)
    assert load_model("timm:regnetx_002", device="cpu", num_classes=7).class_names is None


def test_a_hugging_face_module_passed_as_is_predicts_with_its_labels(tmp_path):
    reference = _hf_vit(tmp_path / "vit")
    loaded = load_model(reference, device="cpu")
    assert loaded.class_names == ["cat", "dog", "fox"] and loaded.transform.crop == 64
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        best = int(reference(x).logits.argmax())
    assert loaded.predict(x, k=1)[0][0].label == ["cat", "dog", "fox"][best]
    timm_vit = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=1)
    transform = load_model(timm_vit, device="cpu").transform
    assert (transform.interpolation, transform.crop) == ("bicubic", 64)


@pytest.mark.parametrize("name", ["resnet18", "convnext_nano", "efficientnet_b0",
                                  "regnetx_002"])
def test_timm_cnns_get_receptive_fields(name):
    """list_layers on timm CNNs (their own conv and padding modules, NHWC blocks inside
    ConvNeXt) reports square fields that grow with depth; timm's ResNet18 equals
    torchvision's, layer by layer (the same architecture, built independently)."""
    import timm
    import torchvision

    from convscope import list_layers

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    table = {row.name: row for row in list_layers(model, (3, 96, 64))}
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)
             and table[n].output_shape and table[n].output_shape[-1] * table[n].output_shape[-2] > 1]
    assert convs and all(table[n].receptive_field is not None for n in convs)
    last = table[convs[-1]].receptive_field
    assert last.size[0] == last.size[1] and last.stride[0] == last.stride[1] >= 16
    if name == "resnet18":
        reference = {row.name: row for row in list_layers(torchvision.models.resnet18(),
                                                          (3, 96, 64))}
        for layer in ("conv1", "layer1.1", "layer2.0.conv1", "layer3", "layer4"):
            assert table[layer].receptive_field == reference[layer].receptive_field, layer


def test_hugging_face_vit_in_the_explorer_and_the_report(tmp_path):
    """The explorer and the report work unchanged for a Hugging Face model: id2label
    classes, token layers drawn as patch maps, Grad-CAM at the default layer."""
    from fastapi.testclient import TestClient

    from convscope import build_report, load_model
    from convscope.report import ReportOptions
    from convscope.server import Settings, create_app

    _hf_vit(tmp_path / "vit")
    loaded = load_model(str(tmp_path / "vit"))
    layer = "vit.layers.1"  # transformers 5 names its blocks vit.layers.N
    with TestClient(create_app(Settings(models={"hf": loaded})),
                    base_url="http://localhost") as client:
        rows = client.get("/api/predict", params={"image": "sample:coffee", "k": 3}).json()
        assert {row["label"] for row in rows} == {"cat", "dog", "fox"}
        table = {row["name"]: row for row in client.get("/api/layers").json()}
        assert table[layer]["spatial"] is True
        grid = client.get("/api/grid", params={"image": "sample:coffee", "layer": layer}).json()
        assert grid["stats"] and client.get(
            "/api/grid.png", params={"image": "sample:coffee", "layer": layer}
        ).status_code == 200
        assert client.get("/api/cam.png", params={"image": "sample:coffee"}).status_code == 200
    page = build_report(loaded, "sample:coffee", ReportOptions(layers=[layer], cam_topk=1))
    assert f"{layer} — 32×4×4" in page and ("cat" in page or "dog" in page or "fox" in page)
