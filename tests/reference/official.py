"""The test input and the official PatchCore's patch features (amazon-science/patchcore-inspection), in the form
the official code computes them; shared by reference.py and backbones.py."""
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image


def neighbourhoods(t):
    """[B, C, H, W] -> [B, H*W, C, 3, 3] (3x3 neighbourhoods, stride 1, zero padding)."""
    b, c, hh, ww = t.shape
    u = F.unfold(t, kernel_size=3, padding=1, stride=1)  # [B, C*9, H*W]
    return u.reshape(b, c, 3, 3, hh * ww).permute(0, 4, 1, 2, 3), (hh, ww)


def official_features(layers, dim=1024):
    """PatchCore's patch features of `layers` (in that order; the first sets the grid)."""
    patches = [neighbourhoods(t) for t in layers]
    ref = patches[0][1]
    per_layer = []
    for p, grid in patches:
        if grid != ref:
            # Bring the unfolded planes onto the first layer's grid, plane by plane.
            b = p.shape[0]
            planes = p.reshape(b, grid[0], grid[1], -1).permute(0, 3, 1, 2)  # [B, C*9, h, w]
            planes = F.interpolate(planes, size=ref, mode="bilinear", align_corners=False)
            p = planes.permute(0, 2, 3, 1).reshape(b, ref[0] * ref[1], *p.shape[2:])
        flat = p.reshape(-1, 1, p.shape[2] * 9)
        per_layer.append(F.adaptive_avg_pool1d(flat, dim).squeeze(1))
    stacked = torch.stack(per_layer, dim=1).reshape(-1, 1, dim * len(layers))
    return F.adaptive_avg_pool1d(stacked, dim).reshape(-1, dim)


class LastLayerReached(Exception):
    pass


def extract(model, names, x):
    """The official NetworkFeatureAggregator: a forward hook on each named module (BLOCK.IDX:
    an index into a Sequential or a child's name), the forward stopped by an exception in the
    hook of the last name listed; outputs as the hooks kept them (later in-place ReLUs
    included)."""
    outputs, handles = {}, []
    for name in names:
        block, idx = name.split(".") if "." in name else (name, None)
        module = model._modules[block]
        if idx is not None:
            module = module[int(idx)] if idx.isnumeric() else module._modules[idx]

        def hook(_m, _i, out, name=name):
            outputs[name] = out
            if name == names[-1]:
                raise LastLayerReached()

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    except LastLayerReached:
        pass
    for h in handles:
        h.remove()
    return [outputs[n] for n in names]


def test_input(out, size):
    """Writes a non-square test image with structure and noise (losslessly, input.png) and
    its official preprocessing (paper protocol, resize 256 and crop 224, scaled to `size`) as
    input.npy; returns the preprocessed [1, 3, size, size] tensor and the random generator,
    for what the caller draws after the image."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:260]
    img = np.stack([128 + 60 * np.sin(xx / 7.0), 128 + 60 * np.cos(yy / 5.0), (xx + yy) % 256], -1)
    img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(f"{out}/input.png")
    transform = torchvision.transforms.Compose([
        torchvision.transforms.Resize(size * 256 // 224),
        torchvision.transforms.CenterCrop(size),
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    x = transform(Image.open(f"{out}/input.png").convert("RGB")).unsqueeze(0)
    np.save(f"{out}/input.npy", x.numpy())
    return x, rng


def randomize_statistics(net):
    """torchvision leaves batch norms at identity and convolution biases (VGG's) at zero:
    randomize them in place (from torch's seed) so that loading them is tested too."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-0.1, 0.1)
