//! Patch features: from the backbone's layer outputs to one `dim`-long vector per position of
//! the first layer's grid, as the official PatchCore computes them.
//!
//! Official recipe, per layer: take each position's 3x3 neighbourhood (stride 1, zero padding)
//! as a `C*9` vector (channel-major), bring every layer onto the first layer's grid by bilinear
//! upsampling, adaptive-average-pool each layer's vector to `dim`, stack the layers and pool the
//! stacked vector to `dim` again.
//!
//! Everything after the unfold is linear, so we pool each layer on its *own* grid before
//! upsampling (upsampling `dim` planes instead of `C*9`), which is the same map with far less
//! work. For the default WRN-50-2 layer2+layer3 this gives the closed form: dim j < 512 is
//! layer2 channel j over its 3x3 neighbourhood weighted 1/10 (centre 2/10), dim 512+k the plain
//! 3x3 mean of layer3 channels 2k and 2k+1.

use tch::{Kind, Tensor};

/// Neighbourhood size of a patch (the official default).
pub const PATCH_SIZE: i64 = 3;

/// Patch features for a batch: `[B, H*W, dim]` plus the grid `(H, W)` they live on.
pub struct PatchFeatures {
    pub features: Tensor,
    pub grid: (i64, i64),
}

/// Aggregates layer outputs (`[B, C_l, h_l, w_l]`, first one sets the grid) into patch features.
pub fn aggregate(layers: &[Tensor], dim: i64) -> PatchFeatures {
    let (b, _, gh, gw) = layers[0].size4().expect("layer outputs are 4-D");
    let pad = (PATCH_SIZE - 1) / 2;
    let pooled: Vec<Tensor> = layers
        .iter()
        .map(|x| {
            let (_, c, h, w) = x.size4().expect("layer outputs are 4-D");
            // [B, C*9, h*w], channel-major within each neighbourhood like torch's Unfold.
            let unfolded = x.im2col([PATCH_SIZE, PATCH_SIZE], [1, 1], [pad, pad], [1, 1]);
            let per_position =
                unfolded
                    .transpose(1, 2)
                    .reshape([b * h * w, 1, c * PATCH_SIZE * PATCH_SIZE]);
            let reduced = per_position.adaptive_avg_pool1d(dim); // [B*h*w, 1, dim]
            let planes = reduced.reshape([b, h, w, dim]).permute([0, 3, 1, 2]);
            let on_grid = if (h, w) == (gh, gw) {
                planes
            } else {
                planes.upsample_bilinear2d([gh, gw], false, None, None)
            };
            on_grid.permute([0, 2, 3, 1]).reshape([b * gh * gw, 1, dim])
        })
        .collect();
    // Stack per patch in layer order, [B*H*W, 1, L*dim], then pool to dim.
    let stacked = Tensor::cat(&pooled, 2);
    let features = stacked
        .adaptive_avg_pool1d(dim)
        .reshape([b, gh * gw, dim])
        .to_kind(Kind::Float);
    PatchFeatures {
        features,
        grid: (gh, gw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The closed form stated for WRN-50-2 (512 and 1024 channels) must hold.
    #[test]
    fn closed_form_for_512_and_1024_channels() {
        tch::manual_seed(1);
        let opts = (Kind::Float, Device::Cpu);
        let l2 = Tensor::randn([1, 512, 6, 6], opts);
        let l3 = Tensor::randn([1, 1024, 3, 3], opts);
        let f = aggregate(&[l2.shallow_clone(), l3.shallow_clone()], 1024);
        assert_eq!(f.grid, (6, 6));
        // Position (2, 3) of the 6x6 grid; channel 5 of layer2.
        let (y, x, j) = (2i64, 3i64, 5i64);
        let mut expect = 0.0;
        for dy in -1..=1 {
            for dx in -1..=1 {
                let w = if dy == 0 && dx == 0 { 0.2 } else { 0.1 };
                expect += w * l2.double_value(&[0, j, y + dy, x + dx]);
            }
        }
        let got = f.features.double_value(&[0, y * 6 + x, j]);
        assert!((got - expect).abs() < 1e-5, "{got} vs {expect}");

        // Layer3 part: 3x3 mean (zero padded) of channels 2k, 2k+1, then bilinear upsampling.
        let k = 7;
        let pair = l3
            .narrow(1, 2 * k, 2)
            .mean_dim(Some([1].as_slice()), true, Kind::Float);
        let mean3 = pair.avg_pool2d([3, 3], [1, 1], [1, 1], false, true, None::<i64>);
        let up = mean3.upsample_bilinear2d([6, 6], false, None, None);
        let expect = up.double_value(&[0, 0, y, x]);
        let got = f.features.double_value(&[0, y * 6 + x, 512 + k]);
        assert!((got - expect).abs() < 1e-5, "{got} vs {expect}");
    }
}
