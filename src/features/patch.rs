//! Patch features: from the backbone's layer outputs to one `dim`-long vector per position of
//! the first layer's grid, as the official PatchCore computes them.
//!
//! Official recipe, per layer: take each position's 3x3 neighbourhood (stride 1, zero padding)
//! as a `C*9` vector (channel-major), bring every layer onto the first layer's grid by bilinear
//! upsampling, adaptive-average-pool each layer's vector to `dim`, stack the layers and pool the
//! stacked vector to `dim` again.
//!
//! All of that after the backbone is one fixed linear map, and a sparse one: an output dim
//! reads a few channels, each through a 3x3 kernel. We precompute those (output, channel,
//! kernel) triples once and apply them as a depthwise convolution of the gathered channels,
//! summed into the outputs, on each layer's own grid; only then is a layer upsampled (it is
//! linear, so the order does not matter). For the default WRN-50-2 layer2+layer3 this is the
//! closed form: dim j < 512 is layer2 channel j over its 3x3 neighbourhood weighted 1/10
//! (centre 2/10), dim 512+k the plain 3x3 mean of layer3 channels 2k and 2k+1.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use crate::util::records::PATCH_SIZE;

const TAPS: usize = (PATCH_SIZE * PATCH_SIZE) as usize;

/// Patch features for a batch: `[B, H*W, dim]` plus the grid `(H, W)` they live on.
pub struct PatchFeatures {
    pub features: Tensor,
    pub grid: (i64, i64),
}

/// `adaptive_avg_pool1d`'s windows: output `i` of `out` averages inputs `[start, end)`.
fn adaptive_windows(len: usize, out: usize) -> Vec<(usize, usize)> {
    (0..out)
        .map(|i| ((i * len) / out, ((i + 1) * len).div_ceil(out)))
        .collect()
}

/// The part of the map that reads one layer.
struct LayerMap {
    /// Channel read by each (output, channel) pair.
    channels: Tensor,
    /// 3x3 kernel of each pair, `[P, 1, 3, 3]`.
    kernels: Tensor,
    /// Output dim of each pair.
    outputs: Tensor,
}

/// The fixed linear map from layer outputs to patch features, for given channel counts.
pub struct Aggregator {
    layers: Vec<LayerMap>,
    channels: Vec<i64>,
    dim: i64,
}

impl Aggregator {
    /// Builds the map for layers of `channels` channels each, each layer pooled to `pretrain`
    /// dims (the official `--pretrain_embed_dimension`), the stacked layers to `dim` output
    /// dims (`--target_embed_dimension`).
    pub fn new(channels: &[i64], pretrain: i64, dim: i64, device: Device) -> Self {
        let d = pretrain as usize;
        let stacked = adaptive_windows(channels.len() * d, dim as usize);
        let mut layers = Vec::new();
        for (l, &c) in channels.iter().enumerate() {
            let per_layer = adaptive_windows(c as usize * TAPS, d);
            // weight[(output, channel)][tap]
            let mut weights: BTreeMap<(usize, usize), [f64; TAPS]> = BTreeMap::new();
            for (j, &(s, e)) in stacked.iter().enumerate() {
                for k in s.max(l * d)..e.min((l + 1) * d) {
                    let (ps, pe) = per_layer[k - l * d];
                    let w = 1.0 / ((e - s) * (pe - ps)) as f64;
                    for element in ps..pe {
                        weights.entry((j, element / TAPS)).or_insert([0.0; TAPS])
                            [element % TAPS] += w;
                    }
                }
            }
            let (mut outs, mut chans, mut kern) = (vec![], vec![], vec![]);
            for ((j, ch), taps) in weights {
                outs.push(j as i64);
                chans.push(ch as i64);
                kern.extend(taps.iter().map(|&w| w as f32));
            }
            let p = outs.len() as i64;
            layers.push(LayerMap {
                channels: Tensor::from_slice(&chans).to_device(device),
                kernels: Tensor::from_slice(&kern)
                    .reshape([p, 1, PATCH_SIZE, PATCH_SIZE])
                    .to_device(device),
                outputs: Tensor::from_slice(&outs).to_device(device),
            });
        }
        Aggregator {
            layers,
            channels: channels.to_vec(),
            dim,
        }
    }

    /// Aggregates layer outputs (`[B, C_l, h_l, w_l]`, the first sets the grid).
    pub fn apply(&self, layers: &[Tensor]) -> PatchFeatures {
        let (b, _, gh, gw) = layers[0].size4().expect("layer outputs are 4-D");
        let mut out = Tensor::zeros([b, self.dim, gh, gw], (Kind::Float, layers[0].device()));
        for ((x, map), &c) in layers.iter().zip(&self.layers).zip(&self.channels) {
            let (_, xc, h, w) = x.size4().expect("layer outputs are 4-D");
            assert_eq!(xc, c, "layer has the channels the map was built for");
            let pairs = map.outputs.size()[0];
            let gathered = x.to_kind(Kind::Float).index_select(1, &map.channels);
            let filtered = gathered.conv2d(
                &map.kernels,
                None::<Tensor>,
                [1, 1],
                [(PATCH_SIZE - 1) / 2; 2],
                [1, 1],
                pairs,
            );
            let partial = Tensor::zeros([b, self.dim, h, w], (Kind::Float, x.device())).index_add(
                1,
                &map.outputs,
                &filtered,
            );
            let on_grid = if (h, w) == (gh, gw) {
                partial
            } else {
                partial.upsample_bilinear2d([gh, gw], false, None, None)
            };
            out += on_grid;
        }
        let features = out.permute([0, 2, 3, 1]).reshape([b, gh * gw, self.dim]);
        PatchFeatures {
            features,
            grid: (gh, gw),
        }
    }
}

/// Aggregates layer outputs into patch features (builds the map each call: for one-off use).
pub fn aggregate(layers: &[Tensor], dim: i64) -> PatchFeatures {
    let channels: Vec<i64> = layers.iter().map(|t| t.size()[1]).collect();
    Aggregator::new(&channels, dim, dim, layers[0].device()).apply(layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The official order of operations, written plainly: unfold, upsample the unfolded
    /// planes, adaptive-average-pool per layer, stack, pool again.
    fn official(layers: &[Tensor], pretrain: i64, dim: i64) -> Tensor {
        let (b, _, gh, gw) = layers[0].size4().unwrap();
        let pooled: Vec<Tensor> = layers
            .iter()
            .map(|x| {
                let (_, c, h, w) = x.size4().unwrap();
                let u = x
                    .im2col([3, 3], [1, 1], [1, 1], [1, 1])
                    .reshape([b, c * 9, h, w]);
                let u = if (h, w) == (gh, gw) {
                    u
                } else {
                    u.upsample_bilinear2d([gh, gw], false, None, None)
                };
                u.permute([0, 2, 3, 1])
                    .reshape([b * gh * gw, 1, c * 9])
                    .adaptive_avg_pool1d(pretrain)
            })
            .collect();
        Tensor::cat(&pooled, 2)
            .adaptive_avg_pool1d(dim)
            .reshape([b, gh * gw, dim])
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        let scale = b.abs().max().double_value(&[]);
        (a - b).abs().max().double_value(&[]) / scale
    }

    #[test]
    fn matches_the_official_order_for_odd_channel_counts() {
        // Channel counts whose pooling windows straddle channels and layers.
        tch::manual_seed(4);
        let opts = (Kind::Float, Device::Cpu);
        // The last two pool each layer to another dimension than the stack (the official
        // ensemble's 1024 -> 384).
        for (c1, c2, c3, pretrain, dim) in [
            (96, 200, 0, 64, 64),
            (64, 128, 0, 100, 100),
            (48, 80, 112, 56, 56),
            (64, 128, 0, 100, 38),
            (48, 80, 112, 40, 56),
        ] {
            let mut layers = vec![
                Tensor::randn([2, c1, 8, 10], opts),
                Tensor::randn([2, c2, 4, 5], opts),
            ];
            if c3 > 0 {
                layers.push(Tensor::randn([2, c3, 2, 3], opts));
            }
            let channels: Vec<i64> = layers.iter().map(|t| t.size()[1]).collect();
            let ours = Aggregator::new(&channels, pretrain, dim, Device::Cpu)
                .apply(&layers)
                .features;
            let want = official(&layers, pretrain, dim);
            let err = max_rel_diff(&ours, &want);
            assert!(err < 1e-5, "{c1},{c2},{c3} -> {pretrain} -> {dim}: {err}");
        }
    }

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
