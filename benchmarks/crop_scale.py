"""How often RandomResizedCrop cuts a labelled finding out of the image while its label stays (multi-label).

    python benchmarks/crop_scale.py                      # findings of 3% and 10% of the image, 20,000 crops each
    python benchmarks/crop_scale.py --areas 0.01,0.05 --crops 50000

A finding is a square of the given share of the image's area at a uniformly random place inside it; a crop is
drawn by torchvision's own RandomResizedCrop.get_params (aspect ratio 3/4..4/3) with scale (MIN, 1). The table
shows, per minimum scale, the share of crops that keep less than half of the finding: a multi-label image whose
target still says "present". This is what chose multi-label's default --crop-scale (recipe.py).
"""

import argparse

import numpy as np
import torch
from torchvision import transforms

SIZE = 224


def get_args_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--areas", default="0.03,0.10", help="comma-separated finding areas, as shares of the image")
    parser.add_argument("--scales", default="0.08,0.25,0.35,0.5,0.75", help="comma-separated minimum crop scales")
    parser.add_argument("--crops", type=int, default=20000, help="crops drawn per scale and area")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crops and the findings")
    return parser


def share_cut_out(area, min_scale, crops, rng):
    """Share of `crops` random crops at scale (min_scale, 1) keeping less than half of a finding of `area`."""
    image = torch.empty(3, SIZE, SIZE)
    side = SIZE * area**0.5
    cut_out = 0
    for _ in range(crops):
        top, left, height, width = transforms.RandomResizedCrop.get_params(image, (min_scale, 1.0), (3 / 4, 4 / 3))
        y, x = rng.uniform(0, SIZE - side, size=2)
        overlap_y = max(0.0, min(y + side, top + height) - max(y, top))
        overlap_x = max(0.0, min(x + side, left + width) - max(x, left))
        cut_out += overlap_y * overlap_x < 0.5 * side * side
    return cut_out / crops


def main(args):
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    areas = [float(a) for a in args.areas.split(",")]
    scales = [float(s) for s in args.scales.split(",")]
    print(f"share of crops keeping less than half of the finding ({args.crops} crops each)")
    print("finding area  " + "".join(f"  scale {s:<5}" for s in scales))
    for area in areas:
        shares = [share_cut_out(area, scale, args.crops, rng) for scale in scales]
        print(f"{area:>12.0%}  " + "".join(f"  {share:>11.1%}" for share in shares))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
