"""The official PatchCore's patch features (amazon-science/patchcore-inspection), in the form
the official code computes them; shared by reference.py and backbones.py."""
import torch
import torch.nn.functional as F


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
