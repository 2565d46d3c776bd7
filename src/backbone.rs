//! The feature extractor: torchvision's ResNet family (v1.5, stride on the 3x3 convolution),
//! with torchvision's parameter names so its state dicts load by name. The forward pass stops
//! after the deepest layer that is asked for.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::Tensor;

/// Architectures we can build. The names are torchvision's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    Resnet18,
    Resnet34,
    Resnet50,
    Resnet101,
    Resnet152,
    WideResnet50_2,
    WideResnet101_2,
}

impl Arch {
    pub const ALL: [Arch; 7] = [
        Arch::Resnet18,
        Arch::Resnet34,
        Arch::Resnet50,
        Arch::Resnet101,
        Arch::Resnet152,
        Arch::WideResnet50_2,
        Arch::WideResnet101_2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Arch::Resnet18 => "resnet18",
            Arch::Resnet34 => "resnet34",
            Arch::Resnet50 => "resnet50",
            Arch::Resnet101 => "resnet101",
            Arch::Resnet152 => "resnet152",
            Arch::WideResnet50_2 => "wide_resnet50_2",
            Arch::WideResnet101_2 => "wide_resnet101_2",
        }
    }

    pub fn parse(s: &str) -> Result<Arch> {
        match Arch::ALL.iter().find(|a| a.name() == s) {
            Some(a) => Ok(*a),
            None => bail!(
                "unknown backbone '{s}' (known: {})",
                Arch::ALL.map(|a| a.name()).join(", ")
            ),
        }
    }

    fn spec(self) -> (bool, [i64; 4], i64) {
        // (bottleneck?, blocks per layer, width per group)
        match self {
            Arch::Resnet18 => (false, [2, 2, 2, 2], 64),
            Arch::Resnet34 => (false, [3, 4, 6, 3], 64),
            Arch::Resnet50 => (true, [3, 4, 6, 3], 64),
            Arch::Resnet101 => (true, [3, 4, 23, 3], 64),
            Arch::Resnet152 => (true, [3, 8, 36, 3], 64),
            Arch::WideResnet50_2 => (true, [3, 4, 6, 3], 128),
            Arch::WideResnet101_2 => (true, [3, 4, 23, 3], 128),
        }
    }

    /// Output channels of `layer1`..`layer4`.
    pub fn channels(self, layer: usize) -> i64 {
        let (bottleneck, _, _) = self.spec();
        let planes = 64 << (layer - 1);
        if bottleneck {
            planes * 4
        } else {
            planes
        }
    }
}

/// Parses "layer2" into 2.
pub fn parse_layer(name: &str) -> Result<usize> {
    match name
        .strip_prefix("layer")
        .and_then(|n| n.parse::<usize>().ok())
    {
        Some(n @ 1..=4) => Ok(n),
        _ => bail!("unknown layer '{name}' (expected layer1 .. layer4)"),
    }
}

fn conv(
    p: nn::Path,
    io: (i64, i64),
    k: i64,
    stride: i64,
    padding: i64,
    init: nn::Init,
) -> nn::Conv2D {
    let (cin, cout) = io;
    let cfg = nn::ConvConfig {
        stride,
        padding,
        bias: false,
        ws_init: init,
        ..Default::default()
    };
    nn::conv2d(p, cin, cout, k, cfg)
}

fn bn(p: nn::Path, c: i64) -> nn::BatchNorm {
    nn::batch_norm2d(p, c, Default::default())
}

/// One residual block, basic (two 3x3) or bottleneck (1x1, 3x3, 1x1).
#[derive(Debug)]
struct Block {
    convs: Vec<(nn::Conv2D, nn::BatchNorm)>,
    downsample: Option<(nn::Conv2D, nn::BatchNorm)>,
}

impl Block {
    fn new(
        p: &nn::Path,
        bottleneck: bool,
        (cin, planes): (i64, i64),
        stride: i64,
        wpg: i64,
        init: nn::Init,
    ) -> Self {
        let (convs, cout) = if bottleneck {
            let width = planes * wpg / 64;
            let cout = planes * 4;
            (
                vec![
                    (
                        conv(p / "conv1", (cin, width), 1, 1, 0, init),
                        bn(p / "bn1", width),
                    ),
                    (
                        conv(p / "conv2", (width, width), 3, stride, 1, init),
                        bn(p / "bn2", width),
                    ),
                    (
                        conv(p / "conv3", (width, cout), 1, 1, 0, init),
                        bn(p / "bn3", cout),
                    ),
                ],
                cout,
            )
        } else {
            (
                vec![
                    (
                        conv(p / "conv1", (cin, planes), 3, stride, 1, init),
                        bn(p / "bn1", planes),
                    ),
                    (
                        conv(p / "conv2", (planes, planes), 3, 1, 1, init),
                        bn(p / "bn2", planes),
                    ),
                ],
                planes,
            )
        };
        let downsample = (stride != 1 || cin != cout).then(|| {
            let d = p / "downsample";
            (
                conv(&d / "0", (cin, cout), 1, stride, 0, init),
                bn(&d / "1", cout),
            )
        });
        Block { convs, downsample }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = x.shallow_clone();
        let last = self.convs.len() - 1;
        for (i, (c, b)) in self.convs.iter().enumerate() {
            y = b.forward_t(&c.forward_t(&y, train), train);
            if i != last {
                y = y.relu();
            }
        }
        let identity = match &self.downsample {
            Some((c, b)) => b.forward_t(&c.forward_t(x, train), train),
            None => x.shallow_clone(),
        };
        (y + identity).relu()
    }
}

/// A ResNet truncated after `layers.max()`; `forward` returns the requested layers' outputs.
#[derive(Debug)]
pub struct ResNet {
    pub arch: Arch,
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    stages: Vec<Vec<Block>>,
    layers: Vec<usize>,
}

impl ResNet {
    /// Creates the variables under `p` (named as torchvision names them), convolutions
    /// randomly initialized as tch does. `layers` are the 1-based layer numbers to return, in
    /// the order given.
    pub fn new(p: &nn::Path, arch: Arch, layers: &[usize]) -> Result<Self> {
        Self::build(p, arch, layers, nn::ConvConfig::default().ws_init)
    }

    /// As [`ResNet::new`], with every convolution weight zero: for weights loaded right after,
    /// which saves drawing ~25 M random numbers (0.1 s for wide_resnet50_2) at every start.
    pub fn unfilled(p: &nn::Path, arch: Arch, layers: &[usize]) -> Result<Self> {
        Self::build(p, arch, layers, nn::Init::Const(0.0))
    }

    fn build(p: &nn::Path, arch: Arch, layers: &[usize], init: nn::Init) -> Result<Self> {
        if layers.is_empty() {
            bail!("at least one layer must be extracted");
        }
        let (bottleneck, blocks, wpg) = arch.spec();
        let deepest = *layers.iter().max().unwrap();
        let mut cin = 64;
        let mut stages = Vec::new();
        for (i, &n) in blocks.iter().enumerate().take(deepest) {
            let planes = 64 << i;
            let stride = if i == 0 { 1 } else { 2 };
            let lp = p / format!("layer{}", i + 1);
            let mut stage = Vec::new();
            for b in 0..n {
                let s = if b == 0 { stride } else { 1 };
                stage.push(Block::new(
                    &(&lp / b),
                    bottleneck,
                    (cin, planes),
                    s,
                    wpg,
                    init,
                ));
                cin = arch.channels(i + 1);
            }
            stages.push(stage);
        }
        Ok(ResNet {
            arch,
            conv1: conv(p / "conv1", (3, 64), 7, 2, 3, init),
            bn1: bn(p / "bn1", 64),
            stages,
            layers: layers.to_vec(),
        })
    }

    /// Runs the network in inference mode on a normalized `[B, 3, H, W]` batch.
    pub fn forward(&self, x: &Tensor) -> Vec<Tensor> {
        self.forward_t(x, false)
    }

    /// The official code's BatchNorm probe. Its `PatchCore.load` measures the feature sizes by
    /// sending `torch.ones(1, 3, S, S)` (not normalized) through the backbone while it is
    /// still in training mode, so every BatchNorm the forward reaches (stem to the deepest
    /// extracted layer; the forward stops there) moves its running mean and variance once:
    /// momentum 0.1, unbiased batch variance. Every published result includes this update, so
    /// we repeat it, on the float32 weights, before any feature is extracted.
    pub fn batchnorm_probe(&self, side: i64, device: tch::Device) {
        let ones = Tensor::ones([1, 3, side, side], (tch::Kind::Float, device));
        tch::no_grad(|| {
            self.forward_t(&ones, true);
        });
    }

    /// The forward pass; `train` = true uses and updates the batch statistics (the probe).
    fn forward_t(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        let mut y = self
            .bn1
            .forward_t(&self.conv1.forward_t(x, train), train)
            .relu();
        y = y.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        let mut out: Vec<Option<Tensor>> = self.layers.iter().map(|_| None).collect();
        for (i, stage) in self.stages.iter().enumerate() {
            for block in stage {
                y = block.forward_t(&y, train);
            }
            for (slot, &l) in out.iter_mut().zip(&self.layers) {
                if l == i + 1 {
                    *slot = Some(y.shallow_clone());
                }
            }
        }
        out.into_iter()
            .map(|t| t.expect("every layer is built"))
            .collect()
    }
}
