"""Reference numbers for the parity tests, computed with PyTorch, torchvision, Pillow, SciPy.

It follows the official PatchCore (amazon-science/patchcore-inspection) step by step, in the
form the official code computes it (unfold each layer, upsample layer3's unfolded planes,
adaptive-average-pool per layer, stack, pool again), which is deliberately *not* the shortcut
the Rust code takes, so the test checks that the two are the same map.

Usage: python reference.py OUTDIR ARCH
Writes into OUTDIR: weights.safetensors, weights.pt (the same seeded random weights, with
randomized batch-norm statistics), input.png, input.npy (the preprocessed tensor), layer*.npy,
features.npy, patch_map.npy and heatmap.npy.
"""
import sys

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from safetensors.torch import save_file

out, arch = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
net = getattr(torchvision.models, arch)(weights=None).eval()
# torchvision leaves batch norms at identity; randomize them so loading them is tested too.
with torch.no_grad():
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
# layer4 is never used: leave it out to keep the files small (the classifier stays, to check
# that extra tensors are ignored).
state = {k: v.contiguous() for k, v in net.state_dict().items() if not k.startswith("layer4")}
save_file(state, f"{out}/weights.safetensors")
torch.save(state, f"{out}/weights.pt")

# A non-square test image with structure and noise, saved losslessly.
rng = np.random.default_rng(0)
yy, xx = np.mgrid[0:300, 0:260]
img = np.stack([128 + 60 * np.sin(xx / 7.0), 128 + 60 * np.cos(yy / 5.0), (xx + yy) % 256], -1)
img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
Image.fromarray(img).save(f"{out}/input.png")

# The official preprocessing (paper protocol).
transform = torchvision.transforms.Compose([
    torchvision.transforms.Resize(256),
    torchvision.transforms.CenterCrop(224),
    torchvision.transforms.ToTensor(),
    torchvision.transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
])
x = transform(Image.open(f"{out}/input.png").convert("RGB")).unsqueeze(0)
np.save(f"{out}/input.npy", x.numpy())

with torch.no_grad():
    h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    l1 = net.layer1(h)
    l2 = net.layer2(l1)
    l3 = net.layer3(l2)
np.save(f"{out}/layer2.npy", l2.numpy())
np.save(f"{out}/layer3.npy", l3.numpy())


def neighbourhoods(t):
    """[B, C, H, W] -> [B, H*W, C, 3, 3] (3x3 neighbourhoods, stride 1, zero padding)."""
    b, c, hh, ww = t.shape
    u = F.unfold(t, kernel_size=3, padding=1, stride=1)  # [B, C*9, H*W]
    return u.reshape(b, c, 3, 3, hh * ww).permute(0, 4, 1, 2, 3), (hh, ww)


with torch.no_grad():
    p2, g2 = neighbourhoods(l2)
    p3, g3 = neighbourhoods(l3)
    # Bring layer3's unfolded planes onto layer2's grid, plane by plane.
    b = p3.shape[0]
    planes = p3.reshape(b, g3[0], g3[1], -1).permute(0, 3, 1, 2)  # [B, C*9, h3, w3]
    planes = F.interpolate(planes, size=g2, mode="bilinear", align_corners=False)
    p3 = planes.permute(0, 2, 3, 1).reshape(b, g2[0] * g2[1], *p3.shape[2:])
    per_layer = []
    for p in (p2, p3):
        flat = p.reshape(-1, 1, p.shape[2] * 9)
        per_layer.append(F.adaptive_avg_pool1d(flat, 1024).squeeze(1))
    stacked = torch.stack(per_layer, dim=1).reshape(-1, 1, 2048)
    feats = F.adaptive_avg_pool1d(stacked, 1024).reshape(-1, 1024)
np.save(f"{out}/features.npy", feats.numpy())

# Heatmap of the official segmentor on a random patch-score map.
patch_map = rng.gamma(2.0, 1.0, size=(28, 28)).astype(np.float32)
np.save(f"{out}/patch_map.npy", patch_map)
up = F.interpolate(torch.from_numpy(patch_map)[None, None], size=(224, 224), mode="bilinear",
                   align_corners=False)[0, 0].numpy()
np.save(f"{out}/heatmap.npy", scipy.ndimage.gaussian_filter(up, sigma=4))
print("ok")
