"""Reference numbers for the parity tests, computed with PyTorch, torchvision, Pillow, SciPy.

It follows the official PatchCore (amazon-science/patchcore-inspection) step by step, in the
form the official code computes it (unfold each layer, upsample the unfolded planes of the
other layers onto the first layer's grid, adaptive-average-pool per layer, stack, pool again),
which is deliberately *not* the shortcut the Rust code takes, so the test checks that the two
are the same map.

Usage: python reference.py OUTDIR ARCH [--size CROP] [--pt]
Writes into OUTDIR: weights.safetensors (seeded random weights, with randomized batch-norm
statistics, without layer4), input.png, input.npy (the preprocessed tensor: resize to
CROP*256/224, centre crop CROP; 224 by default), layer2.npy, layer3.npy, features.npy
(layer2+layer3), features_layer1_layer2.npy, features_layer3.npy, features_layer3_layer2.npy,
patch_map.npy and heatmap.npy; and the backbone outputs and features again after the official
code's BatchNorm probe, each named NAME_probe.npy (see below). With --pt also the same weights as torch.save writes them, as
torchvision's state_dict() (an OrderedDict with _metadata): weights.pt (zip format),
weights_legacy.pt (the format before PyTorch 1.6, as torchvision's and Facebook's 2019 files)
and weights_half_legacy.pt (that format in half precision, as torchvision's wide ResNet files).
"""
import argparse
from collections import OrderedDict

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from safetensors.torch import save_file

from official import official_features, randomize_statistics, test_input

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("arch")
parser.add_argument("--size", type=int, default=224)
parser.add_argument("--pt", action="store_true")
args = parser.parse_args()
out = args.out

torch.manual_seed(0)
net = getattr(torchvision.models, args.arch)(weights=None).eval()
randomize_statistics(net)
# layer4 is never used: leave it out to keep the files small (the classifier stays, to check
# that extra tensors are ignored).
full = net.state_dict()
state = OrderedDict((k, v.contiguous()) for k, v in full.items() if not k.startswith("layer4"))
state._metadata = full._metadata
save_file(dict(state), f"{out}/weights.safetensors")
if args.pt:
    torch.save(state, f"{out}/weights.pt")
    torch.save(state, f"{out}/weights_legacy.pt", _use_new_zipfile_serialization=False)
    half = OrderedDict((k, v.half() if v.is_floating_point() else v) for k, v in state.items())
    half._metadata = full._metadata
    torch.save(half, f"{out}/weights_half_legacy.pt", _use_new_zipfile_serialization=False)

x, rng = test_input(out, args.size)

def layers_up_to_3(t):
    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(t))))
        l1 = net.layer1(h)
        l2 = net.layer2(l1)
        return l1, l2, net.layer3(l2)


l1, l2, l3 = layers_up_to_3(x)
np.save(f"{out}/layer2.npy", l2.numpy())
np.save(f"{out}/layer3.npy", l3.numpy())


def save_features(suffix):
    with torch.no_grad():
        np.save(f"{out}/features{suffix}.npy", official_features([l2, l3]).numpy())
        np.save(f"{out}/features_layer1_layer2{suffix}.npy", official_features([l1, l2]).numpy())
        np.save(f"{out}/features_layer3{suffix}.npy", official_features([l3]).numpy())
        np.save(f"{out}/features_layer3_layer2{suffix}.npy", official_features([l3, l2]).numpy())


save_features("")

# The official code's probe (NetworkFeatureAggregator.feature_dimensions, called by
# PatchCore.load): torch.ones(1, 3, S, S) through the backbone in training mode, stopped after
# the last extracted layer, under no_grad, which still updates every BatchNorm's running
# statistics reached (momentum 0.1). The BatchNorms of layer L only see the layers before it,
# so one probe to layer3 gives the statistics of a probe stopped at layer2 for layers 1-2 too.
net.train()
layers_up_to_3(torch.ones(1, 3, args.size, args.size))
net.eval()
l1, l2, l3 = layers_up_to_3(x)
np.save(f"{out}/layer2_probe.npy", l2.numpy())
np.save(f"{out}/layer3_probe.npy", l3.numpy())
save_features("_probe")

# Heatmap of the official segmentor on a random patch-score map.
patch_map = rng.gamma(2.0, 1.0, size=(28, 28)).astype(np.float32)
np.save(f"{out}/patch_map.npy", patch_map)
up = F.interpolate(torch.from_numpy(patch_map)[None, None], size=(224, 224), mode="bilinear",
                   align_corners=False)[0, 0].numpy()
np.save(f"{out}/heatmap.npy", scipy.ndimage.gaussian_filter(up, sigma=4))
print("ok")
