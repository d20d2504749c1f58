"""CAM maps against independent implementations (Captum, pytorch-grad-cam, TorchCAM).

Agreement is the Pearson correlation of the maps upsampled to the input size after the
same min-max normalisation (>= 0.999). Peers run on the shared fixtures inside
:func:`lent`, which puts back what they change (pytorch-grad-cam and TorchCAM backpropagate
into the parameters' ``.grad``; pytorch-grad-cam calls ``model.eval()``); deep copies of
VGG16 would cost seconds each.

Where a definition differs, the test says why and compares with the peer that matches:
* Score-CAM: pytorch-grad-cam upsamples the activations with ``align_corners=True`` before
  normalising; TorchCAM (and convscope) normalise at the layer's resolution, then upsample
  with half-pixel centres. So Score-CAM is checked against TorchCAM.
* Eigen-CAM: the SVD sign is arbitrary; pytorch-grad-cam keeps whatever sign LAPACK gives,
  convscope orients the component to correlate positively with the mean activation. The
  test applies convscope's orientation to pytorch-grad-cam's projection.
* Grad-CAM++: pytorch-grad-cam adds eps = 1e-6 to the denominator 2 g^2 + sum(A) g^3.
  On EfficientNet-Lite0 the gradients are ~1e-4, so the eps is not negligible, and on a
  layer with signed activations (sum(A) < 0) the closed form has a pole where
  2 + sum(A) g = 0 that the eps shifts (r = 0.97-0.995 at the plain logit). The lite0
  comparison explains 1e4 x the logit on both sides, where the eps is negligible and the
  two closed forms agree (r > 0.99999); ResNet50's post-ReLU layer4 uses the plain logit.
* VGG16 ``features.28`` is followed by an in-place ReLU: pytorch-grad-cam and TorchCAM pair
  the post-ReLU gradient with modified activations there, Captum does not; compared with
  Captum, and the peers' deviation is shown to be real.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from convscope.methods.cam import cam

pgc = pytest.importorskip("pytorch_grad_cam")
captum_attr = pytest.importorskip("captum.attr")


def pearson(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a = torch.as_tensor(np.asarray(a, dtype=np.float64)).flatten()
    b = torch.as_tensor(np.asarray(b, dtype=np.float64)).flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@contextmanager
def lent(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Lend ``model`` to a peer library; restore flags, hooks and ``.grad`` afterwards."""
    training = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    hooks = [(dict(m._forward_hooks), dict(m._backward_hooks)) for m in model.modules()]
    try:
        yield model
    finally:
        for m, flag, (fwd, bwd) in zip(model.modules(), training, hooks, strict=True):
            m.training = flag
            m._forward_hooks.clear()
            m._forward_hooks.update(fwd)
            m._backward_hooks.clear()
            m._backward_hooks.update(bwd)
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
            p.grad = None


def _module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return dict(model.named_modules())[name]


class Scaled:
    """``scale`` x the logit of class ``index``, for a row (pytorch-grad-cam) or a batch."""

    def __init__(self, index: int, scale: float = 1e4):
        self.index, self.scale = index, scale

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return self.scale * (output[self.index] if output.ndim == 1 else output[:, self.index])


def pgc_maps(model, layer: str, x, targets, method: str) -> np.ndarray:
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM, XGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM,
           "layercam": LayerCAM}[method]
    with lent(model) as peer, cls(model=peer, target_layers=[_module(peer, layer)]) as extractor:
        return extractor(input_tensor=x.clone(), targets=[
            t if callable(t) else ClassifierOutputTarget(t) for t in targets])


def captum_gradcam(model, layer: str, x, targets) -> torch.Tensor:
    with lent(model) as peer:
        attr = captum_attr.LayerGradCam(peer, _module(peer, layer)).attribute(
            x.clone(), target=list(targets), relu_attributions=True)
    up = F.interpolate(attr.detach(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    flat = up.reshape(up.shape[0], -1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low)).reshape(up.shape)


@pytest.fixture(scope="module")
def lite_batch(lite0):
    x = lite0.preprocess(["sample:chelsea", "sample:astronaut"])
    top = lite0.module(x).argmax(1).tolist()
    return x, top


@pytest.fixture(scope="module")
def resnet50():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50().eval()


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "layercam"])
def test_lite0_gradient_cams_match_pytorch_grad_cam(lite0, lite_batch, method):
    x, top = lite_batch
    targets = [282, top[1]]  # 282 = tiger cat, the close runner-up on chelsea
    if method == "gradcam++":  # see the module docstring (pytorch-grad-cam's eps)
        targets = [Scaled(t) for t in targets]
    ours = cam(lite0, x, layer="_blocks.15", target=targets, method=method)
    theirs = pgc_maps(lite0.module, "_blocks.15", x, targets, method)
    for i in range(len(targets)):
        assert pearson(ours[i], theirs[i]) >= 0.999, (method, i)


def test_lite0_gradcam_matches_captum_on_shared_swish(lite0, lite_batch):
    """``_swish`` runs twice per forward (stem and head): default = last call, as Captum."""
    x, top = lite_batch
    ours = cam(lite0, x, layer="_swish", target=top)
    theirs = captum_gradcam(lite0.module, "_swish", x, top)
    for i in range(len(top)):
        assert pearson(ours[i], theirs[i]) >= 0.999
    # the first call is the stem (112x112 for 224 input); a different, valid map
    _, low = cam(lite0, x[:1], layer="_swish", call=0, target=top[:1], return_raw=True)
    assert low.shape[-2:] == (112, 112)


def test_lite0_default_layer_is_last_swish_call(lite0, lite_batch, caplog):
    x, top = lite_batch
    with caplog.at_level("INFO", logger="convscope.methods"):
        default = cam(lite0, x[:1])
    assert "'_swish'" in caplog.text
    torch.testing.assert_close(default, cam(lite0, x[:1], layer="_swish", target=top[:1]))


def test_lite0_string_target_resolves_through_class_names(lite0, lite_batch):
    x, _ = lite_batch
    by_name = cam(lite0, x[:1], layer="_blocks.15", target="tiger cat")
    by_index = cam(lite0, x[:1], layer="_blocks.15", target=282)
    torch.testing.assert_close(by_name, by_index)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])  # all four: lite0 above
def test_resnet50_random_weights_match_pytorch_grad_cam(resnet50, method):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 96, 64)  # non-square
    targets = [5, 6]  # classes whose map is not all negative with these random weights
    ours = cam(resnet50, x, layer="layer4", target=targets, method=method)
    theirs = pgc_maps(resnet50, "layer4", x, targets, method)
    assert ours.shape == (2, 96, 64)
    for i in range(2):
        assert pearson(ours[i], theirs[i]) >= 0.999, method


def test_resnet50_gradcam_matches_captum(resnet50):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 96, 64)
    ours = cam(resnet50, x, layer="layer4", target=[5, 6])
    theirs = captum_gradcam(resnet50, "layer4", x, [5, 6])
    for i in range(2):
        assert pearson(ours[i], theirs[i]) >= 0.999


@pytest.mark.slow
def test_vgg16_inplace_relu_layer_matches_captum_and_peers_deviate(vgg16):
    """features.28 (conv) is followed by ReLU(inplace=True): the true conv output and its
    gradient are used (Captum agrees); pytorch-grad-cam's map differs measurably."""
    torch.manual_seed(3)
    x = torch.randn(2, 3, 64, 64)
    targets = [5, 700]
    ours = cam(vgg16, x, layer="features.28", target=targets)
    theirs = captum_gradcam(vgg16, "features.28", x, targets)
    other = pgc_maps(vgg16, "features.28", x, targets, "gradcam")
    for i in range(2):
        assert pearson(ours[i], theirs[i]) >= 0.999
    assert min(pearson(ours[i], other[i]) for i in range(2)) < 0.999


def test_eigencam_matches_pytorch_grad_cam_projection(resnet18):
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    from convscope.hooks import capture

    torch.manual_seed(4)
    x = torch.randn(2, 3, 128, 96)
    _, low = cam(resnet18, x, layer="layer3", method="eigencam", return_raw=True)
    with capture(resnet18, "layer3") as acts, torch.no_grad():
        resnet18(x)
    a = acts["layer3"]
    projections = get_2d_projection(a.numpy())
    for i in range(2):
        p = torch.as_tensor(projections[i], dtype=torch.float64)
        mean_map = a[i].double().mean(0)
        if ((p - p.mean()) * (mean_map - mean_map.mean())).sum() < 0:  # convscope's orientation
            p = -p
        torch.testing.assert_close(low[i].double(), torch.relu(p), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_scorecam_matches_torchcam(resnet18):
    torchcam = pytest.importorskip("torchcam.methods")
    torch.manual_seed(5)
    x = torch.randn(2, 3, 32, 32)
    targets = [10, 20]
    ours = cam(resnet18, x, layer="layer2", target=targets, method="scorecam", batch_size=128)
    with lent(resnet18) as peer, torchcam.ScoreCAM(peer, target_layer="layer2", batch_size=128,
                                                   input_shape=(3, 32, 32)) as extractor:
        with torch.no_grad():
            scores = peer(x)
        theirs = extractor(targets, scores)[0]
    theirs = F.interpolate(theirs[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    for i in range(2):
        assert pearson(ours[i], theirs[i]) >= 0.999


@pytest.mark.slow
def test_ablationcam_matches_pytorch_grad_cam(resnet18):
    """pytorch-grad-cam zeroes the channel when the layer's minimum is 0 (a post-ReLU
    layer, as here), which is the paper's ablation and convscope's."""
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(6)
    x = torch.randn(1, 3, 64, 64)
    ours = cam(resnet18, x, layer="layer3", target=[7], method="ablationcam", batch_size=128)
    with lent(resnet18) as peer, AblationCAM(model=peer, target_layers=[peer.layer3]) as extractor:
        extractor.batch_size = 128
        theirs = extractor(input_tensor=x.clone(), targets=[ClassifierOutputTarget(7)])
    assert pearson(ours[0], theirs[0]) >= 0.999
