"""Feature-grid rendering speed against the seed's matplotlib loop and torchvision."""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import torch

from timing import median_time

TITLE = "Rendering a 512-channel 14x14 feature grid"


def run(quick: bool = False) -> str:
    """Markdown section with the timings and ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid, save_image

    from convscope.render.grid import feature_grid

    torch.manual_seed(0)
    act = torch.randn(1, 512, 14, 14)
    out = Path(tempfile.mkdtemp())
    repeats = 5 if quick else 20

    def seed_loop() -> None:
        # The tutorial's code: one add_subplot per channel, then save.
        fig = plt.figure(figsize=(20, 50))
        fig.subplots_adjust(left=0, right=1, bottom=0, top=0.8, hspace=0, wspace=0.2)
        for i in range(512):
            ax = fig.add_subplot(52, 10, i + 1, xticks=[], yticks=[])
            ax.imshow(act[0][i])
        fig.savefig(out / "seed.png")
        plt.close(fig)

    def ours_png() -> None:
        feature_grid(act[0]).save(out / "ours.png")

    def ours_memory() -> None:
        feature_grid(act[0])

    def torchvision_png() -> None:
        grid = make_grid(act[0].unsqueeze(1), nrow=23, normalize=True, scale_each=True, padding=1)
        save_image(grid, out / "tv.png")

    def ours_png_labelled() -> None:
        feature_grid(act[0], labels=True, tile_size=42).save(io.BytesIO(), format="PNG")

    seed = median_time(seed_loop, 1)
    rows = [
        ("seed tutorial: matplotlib add_subplot loop + savefig", seed),
        ("torchvision make_grid + save_image (grayscale, per-channel scaling)",
         median_time(torchvision_png, repeats)),
        ("convscope feature_grid + PNG save (viridis, per-channel scaling)",
         median_time(ours_png, repeats)),
        ("convscope feature_grid in memory, no encoding", median_time(ours_memory, repeats)),
        ("convscope feature_grid, labelled, 42 px tiles, PNG in memory",
         median_time(ours_png_labelled, repeats)),
    ]
    ours = rows[2][1]
    lines = [
        f"Median of {repeats} runs (the seed loop: 1 run), random activations.",
        "",
        "| method | ms | seed loop / this |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {sec * 1000:.1f} | {seed / sec:.0f}x |" for name, sec in rows]
    lines += [
        "",
        f"convscope with PNG encoding is {seed / ours:.0f}x faster than the seed loop and "
        f"{rows[1][1] / ours:.2f}x the speed of torchvision's grayscale grid.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
