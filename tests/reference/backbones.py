"""Reference outputs of torchvision's ResNeXt, DeepLabV3, DenseNet and VGG backbones for the
parity tests (tests/backbones.rs), with seeded random weights and the official PatchCore's
layer extraction (forward hooks, stopped after the last layer listed) and patch features.

Usage:
  python backbones.py OUTDIR ARCH --size CROP --case NAME=LAYER,LAYER ... [--legacy-names]
    Writes weights.safetensors (the state dict with randomized BatchNorms, without the
    classifier; with --legacy-names DenseNet's names as torchvision's downloads have them:
    denselayerN.norm.1.weight ...), input.png, input.npy (resize CROP*256/224, centre crop
    CROP), and per case NAME_0.npy, NAME_1.npy ... (the layer outputs) and NAME_features.npy,
    then the same after the official code's BatchNorm probe as NAME_probe_*.npy.
  python backbones.py --shapes OUT.json ARCH ...
    Writes every state-dict tensor's shape per architecture, without a forward.
"""
import argparse
import json
import re
import sys

import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from official import extract, official_features, randomize_statistics, test_input


def build(arch):
    if arch.startswith("deeplabv3_"):
        return getattr(torchvision.models.segmentation, arch)(weights=None, weights_backbone=None)
    return getattr(torchvision.models, arch)(weights=None)


if len(sys.argv) > 1 and sys.argv[1] == "--shapes":
    with torch.device("meta"):  # shapes only: nothing is allocated or initialized
        shapes = {a: {k: list(v.shape) for k, v in build(a).state_dict().items()} for a in sys.argv[3:]}
    json.dump(shapes, open(sys.argv[2], "w"))
    sys.exit(0)

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("arch")
parser.add_argument("--size", type=int, default=224)
parser.add_argument("--case", action="append", default=[])
parser.add_argument("--legacy-names", action="store_true")
args = parser.parse_args()
out = args.out

torch.manual_seed(0)
net = build(args.arch)
randomize_statistics(net)
initial = {k: v.clone() for k, v in net.state_dict().items()}
skip = ("classifier", "aux_classifier", "fc.")
state = {k: v.contiguous() for k, v in initial.items() if not k.startswith(skip)}
if args.legacy_names:
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    state = {pattern.sub(r"\1.\2", k): v for k, v in state.items()}
save_file(state, f"{out}/weights.safetensors")

x, _ = test_input(out, args.size)

for case in args.case:
    name, layers = case.split("=")
    layers = layers.split(",")
    for probe in [False, True]:
        net.load_state_dict(initial)
        if probe:
            # The official probe (PatchCore.load -> feature_dimensions): ones through the
            # backbone in training mode, stopped after the last layer listed.
            net.train()
            extract(net, layers, torch.ones(1, 3, args.size, args.size))
        net.eval()
        outputs = extract(net, layers, x)
        suffix = "_probe" if probe else ""
        for i, t in enumerate(outputs):
            np.save(f"{out}/{name}{suffix}_{i}.npy", t.numpy())
        with torch.no_grad():
            np.save(f"{out}/{name}{suffix}_features.npy", official_features(outputs).numpy())
print("ok")
