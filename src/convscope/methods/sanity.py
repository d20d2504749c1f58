"""Model-randomisation sanity check for saliency maps (Adebayo et al., 2018).

A map that explains the *model* must change when the model's weights are destroyed. The
check re-initialises the layers of a copy of the model from the top (output side) down,
cascading, and after each step reports the Spearman rank correlation of the new map with
the original. A method that passes shows correlations falling towards 0; a method that
mostly reflects the input (an edge detector) keeps them high.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..progress import ProgressCallback, track
from .cam import METHODS as CAM_METHODS
from .cam import _one_layer, cam, method_name
from .common import borrowed, check_input
from .gradients import METHODS as SALIENCY_METHODS
from .gradients import heatmap, saliency
from .targets import OutputSpec, TargetSpec, resolve_targets, select_output, unwrap_model


@dataclass(frozen=True)
class SanityStep:
    """One cascading step: the modules randomised so far end with ``layers``."""

    step: int
    layers: str
    randomized: int
    spearman: float  # mean over samples; NaN when every map became constant


@dataclass
class SanityReport:
    """Rank correlations with the original map as the model is randomised top-down."""

    method: str
    layer: str | None
    steps: list[SanityStep] = field(default_factory=list)
    threshold: float = 0.5

    @property
    def final(self) -> float:
        """Correlation once every parameterised layer is random (NaN counts as 0)."""
        value = self.steps[-1].spearman if self.steps else math.nan
        return 0.0 if math.isnan(value) else value

    @property
    def passed(self) -> bool:
        """True when the fully randomised model's map has rank correlation below
        ``threshold`` with the original (the map depends on the weights)."""
        return abs(self.final) < self.threshold

    def table(self) -> str:
        """A plain-text table (the CLI prints it)."""
        head = f"sanity check for {self.method}" + (f" at {self.layer}" if self.layer else "")
        lines = [head, f"{'step':>4}  {'randomised (top-down, up to)':<48} {'modules':>7}  spearman"]
        for row in self.steps:
            value = "n/a (constant map)" if math.isnan(row.spearman) else f"{row.spearman:+.3f}"
            lines.append(f"{row.step:>4}  {row.layers:<48} {row.randomized:>7}  {value}")
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"{verdict}: final rank correlation {self.final:+.3f} "
                     f"({'<' if self.passed else '>='} {self.threshold})")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """Notebook view: the steps as a table and the verdict."""
        import html

        rows = "".join(
            f"<tr><td>{row.step}</td><td><code>{html.escape(row.layers)}</code></td>"
            f"<td>{row.randomized}</td><td>"
            + ("n/a (constant map)" if math.isnan(row.spearman) else f"{row.spearman:+.3f}")
            + "</td></tr>"
            for row in self.steps
        )
        verdict = "PASS" if self.passed else "FAIL"
        where = f" at <code>{html.escape(self.layer)}</code>" if self.layer else ""
        return (f"<p>sanity check for {html.escape(self.method)}{where}: <strong>{verdict}"
                f"</strong>, final rank correlation {self.final:+.3f} "
                f"({'&lt;' if self.passed else '&ge;'} {self.threshold})</p><table><thead><tr>"
                "<th>step</th><th>randomised (top-down, up to)</th><th>modules</th>"
                f"<th>spearman</th></tr></thead><tbody>{rows}</tbody></table>")

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "layer": self.layer, "passed": self.passed,
                "final": self.final, "steps": [vars(s) for s in self.steps]}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two maps (average ranks for ties); NaN if either map is
    constant."""
    from scipy.stats import rankdata

    ra = rankdata(a.detach().double().flatten().cpu().numpy())
    rb = rankdata(b.detach().double().flatten().cpu().numpy())
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def _parameterised(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in module.named_modules()
            if name and any(True for _ in m.parameters(recurse=False))]


@torch.no_grad()
def _randomize(module: nn.Module, seed: int) -> None:
    """Re-initialise one module's own parameters (its default initialiser when it has one)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        else:
            for p in module.parameters(recurse=False):
                p.normal_(0.0, float(p.std()) if p.numel() > 1 else 1.0)


def sanity_check(
    model: Any,
    x: torch.Tensor,
    *,
    method: str = "gradcam",
    layer: Any = None,
    target: TargetSpec = None,
    call: int = -1,
    output: OutputSpec = None,
    steps: int = 8,
    seed: int = 0,
    threshold: float = 0.5,
    progress: ProgressCallback | None = None,
    **options: Any,
) -> SanityReport:
    """Cascading model-randomisation check of ``method`` (a CAM or saliency method).

    >>> report = convscope.sanity_check(model, x, method="gradcam")
    >>> print(report.table()); report.passed

    The parameterised modules of a deep copy are re-initialised from the output side in
    ``steps`` contiguous groups (cumulatively); after each group the map is recomputed for
    the same target (the original model's top-1 when ``target`` is None) and compared with
    the original by Spearman rank correlation, averaged over the batch. The caller's model
    is never modified. Extra ``options`` go to :func:`cam` or :func:`saliency`.
    ``progress(phase, done, total)`` hears of each randomisation step.
    """
    module, class_names = unwrap_model(model)
    x = check_input(x, module)
    is_cam = str(method).strip().lower() not in SALIENCY_METHODS
    kind = method_name(method) if is_cam else str(method).strip().lower()
    if is_cam and kind not in CAM_METHODS:  # pragma: no cover - method_name raised already
        raise ValueError(kind)
    with borrowed(module, what="sanity check"), torch.no_grad():
        logits = select_output(module(x), output)
    fn = resolve_targets(target, logits, class_names=class_names)
    fixed = logits.argmax(dim=1).tolist() if target is None else fn
    layer_name = _one_layer(module, layer, x)[0] if is_cam else None

    def explain(net: nn.Module) -> torch.Tensor:
        if is_cam:
            return cam(net, x, layer=layer_name, target=fixed, method=kind, call=call,
                       output=output, **options)
        return heatmap(saliency(net, x, fixed, method=kind, output=output, **options))

    original = explain(module)
    work = copy.deepcopy(module)
    named = dict(work.named_modules())
    order = [name for name, _ in _parameterised(work)][::-1]  # output side first
    groups = [list(g) for g in np.array_split(np.array(order, dtype=object),
                                              max(1, min(steps, len(order)))) if len(g)]
    report = SanityReport(method=kind, layer=layer_name, threshold=threshold)
    done = 0
    for i, group in enumerate(track(groups, progress, "sanity: randomisation steps"), start=1):
        for j, name in enumerate(group):
            _randomize(named[name], seed + done + j)
        done += len(group)
        maps = explain(work)
        values = [spearman(a, b) for a, b in zip(original, maps, strict=True)]
        finite = [v for v in values if not math.isnan(v)]
        mean = float(np.mean(finite)) if finite else math.nan
        report.steps.append(SanityStep(i, f"{group[0]} .. {group[-1]}" if len(group) > 1
                                       else group[0], done, mean))
    return report

