//! The feature extractor: torchvision's ResNet family (v1.5, stride on the 3x3 convolution;
//! ResNeXt's grouped convolutions; DeepLabV3's dilated ResNet), DenseNet and VGG, with
//! torchvision's parameter names so its state dicts load by name. The forward pass stops
//! after the deepest layer that is asked for.
//!
//! Layers are numbered per family and named by torchvision's module names (`--layers`):
//! ResNets `layer1`..`layer4` (DeepLabV3 also `backbone.layerN`), DenseNets
//! `features.denseblock1`..`4` (also `denseblockN`), VGGs `features.N`, the output of module
//! N of `features` (also `poolK`, the K-th max-pool).

mod densenet;
mod vgg;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::Tensor;

pub use densenet::DenseNet;
pub use vgg::Vgg;

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
    Resnext50_32x4d,
    Resnext101_32x8d,
    Deeplabv3Resnet50,
    Deeplabv3Resnet101,
    Densenet121,
    Densenet161,
    Densenet169,
    Densenet201,
    Vgg11,
    Vgg11Bn,
    Vgg13,
    Vgg13Bn,
    Vgg16,
    Vgg16Bn,
    Vgg19,
    Vgg19Bn,
}

/// How an architecture is built, per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    ResNet(ResNetSpec),
    DenseNet(densenet::Spec),
    Vgg(vgg::Spec),
}

/// A torchvision ResNet: block kind, blocks per layer, grouped 3x3 convolutions of
/// `width_per_group` channels per group, and DeepLabV3's dilation in place of the stride of
/// layer3 and layer4 (`replace_stride_with_dilation=[False, True, True]`, its tensors under
/// `backbone.`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResNetSpec {
    pub bottleneck: bool,
    pub blocks: [i64; 4],
    pub groups: i64,
    pub width_per_group: i64,
    pub deeplab: bool,
}

const fn resnet(bottleneck: bool, blocks: [i64; 4], groups: i64, wpg: i64) -> Family {
    Family::ResNet(ResNetSpec {
        bottleneck,
        blocks,
        groups,
        width_per_group: wpg,
        deeplab: false,
    })
}

const fn deeplab(blocks: [i64; 4]) -> Family {
    Family::ResNet(ResNetSpec {
        bottleneck: true,
        blocks,
        groups: 1,
        width_per_group: 64,
        deeplab: true,
    })
}

impl Arch {
    pub const ALL: [Arch; 23] = [
        Arch::Resnet18,
        Arch::Resnet34,
        Arch::Resnet50,
        Arch::Resnet101,
        Arch::Resnet152,
        Arch::WideResnet50_2,
        Arch::WideResnet101_2,
        Arch::Resnext50_32x4d,
        Arch::Resnext101_32x8d,
        Arch::Deeplabv3Resnet50,
        Arch::Deeplabv3Resnet101,
        Arch::Densenet121,
        Arch::Densenet161,
        Arch::Densenet169,
        Arch::Densenet201,
        Arch::Vgg11,
        Arch::Vgg11Bn,
        Arch::Vgg13,
        Arch::Vgg13Bn,
        Arch::Vgg16,
        Arch::Vgg16Bn,
        Arch::Vgg19,
        Arch::Vgg19Bn,
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
            Arch::Resnext50_32x4d => "resnext50_32x4d",
            Arch::Resnext101_32x8d => "resnext101_32x8d",
            Arch::Deeplabv3Resnet50 => "deeplabv3_resnet50",
            Arch::Deeplabv3Resnet101 => "deeplabv3_resnet101",
            Arch::Densenet121 => "densenet121",
            Arch::Densenet161 => "densenet161",
            Arch::Densenet169 => "densenet169",
            Arch::Densenet201 => "densenet201",
            Arch::Vgg11 => "vgg11",
            Arch::Vgg11Bn => "vgg11_bn",
            Arch::Vgg13 => "vgg13",
            Arch::Vgg13Bn => "vgg13_bn",
            Arch::Vgg16 => "vgg16",
            Arch::Vgg16Bn => "vgg16_bn",
            Arch::Vgg19 => "vgg19",
            Arch::Vgg19Bn => "vgg19_bn",
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

    pub fn family(self) -> Family {
        match self {
            Arch::Resnet18 => resnet(false, [2, 2, 2, 2], 1, 64),
            Arch::Resnet34 => resnet(false, [3, 4, 6, 3], 1, 64),
            Arch::Resnet50 => resnet(true, [3, 4, 6, 3], 1, 64),
            Arch::Resnet101 => resnet(true, [3, 4, 23, 3], 1, 64),
            Arch::Resnet152 => resnet(true, [3, 8, 36, 3], 1, 64),
            Arch::WideResnet50_2 => resnet(true, [3, 4, 6, 3], 1, 128),
            Arch::WideResnet101_2 => resnet(true, [3, 4, 23, 3], 1, 128),
            Arch::Resnext50_32x4d => resnet(true, [3, 4, 6, 3], 32, 4),
            Arch::Resnext101_32x8d => resnet(true, [3, 4, 23, 3], 32, 8),
            Arch::Deeplabv3Resnet50 => deeplab([3, 4, 6, 3]),
            Arch::Deeplabv3Resnet101 => deeplab([3, 4, 23, 3]),
            Arch::Densenet121 => Family::DenseNet(densenet::spec(32, [6, 12, 24, 16], 64)),
            Arch::Densenet161 => Family::DenseNet(densenet::spec(48, [6, 12, 36, 24], 96)),
            Arch::Densenet169 => Family::DenseNet(densenet::spec(32, [6, 12, 32, 32], 64)),
            Arch::Densenet201 => Family::DenseNet(densenet::spec(32, [6, 12, 48, 32], 64)),
            Arch::Vgg11 => Family::Vgg(vgg::spec(vgg::A, false)),
            Arch::Vgg11Bn => Family::Vgg(vgg::spec(vgg::A, true)),
            Arch::Vgg13 => Family::Vgg(vgg::spec(vgg::B, false)),
            Arch::Vgg13Bn => Family::Vgg(vgg::spec(vgg::B, true)),
            Arch::Vgg16 => Family::Vgg(vgg::spec(vgg::D, false)),
            Arch::Vgg16Bn => Family::Vgg(vgg::spec(vgg::D, true)),
            Arch::Vgg19 => Family::Vgg(vgg::spec(vgg::E, false)),
            Arch::Vgg19Bn => Family::Vgg(vgg::spec(vgg::E, true)),
        }
    }

    /// The `--weights` name of the default pretrained weights: torchvision's ImageNet ones,
    /// or for DeepLabV3 its only published ones (`COCO_WITH_VOC_LABELS_V1`).
    pub fn default_weights(self) -> &'static str {
        match self {
            Arch::Deeplabv3Resnet50 | Arch::Deeplabv3Resnet101 => "coco",
            _ => "imagenet",
        }
    }

    /// The default `--layers`: ResNets layer2 + layer3 (as the paper), DenseNets the outputs
    /// of denseblock2 + denseblock3, VGGs the outputs of the 2nd and 3rd max-pool counted from
    /// the end of `features` (strides 8 and 16, as ResNet's layer2 and layer3).
    pub fn default_layers(self) -> Vec<usize> {
        match self.family() {
            Family::ResNet(_) | Family::DenseNet(_) => vec![2, 3],
            Family::Vgg(s) => {
                let pools = s.pools();
                vec![pools[pools.len() - 3], pools[pools.len() - 2]]
            }
        }
    }

    /// An upper bound of a layer's stride in input pixels (numbered as [`Arch::parse_layer`]
    /// returns them): a ResNet's or DenseNet's layer L: 2^(L+1), at most 32; a VGG's: 32. For
    /// estimates that must stay low, such as the patches an image gives.
    pub fn stride_at_most(self, layer: usize) -> u64 {
        match self.family() {
            Family::Vgg(_) => 32,
            _ => 1u64 << (layer as u32 + 1).clamp(2, 5),
        }
    }

    /// Output channels of a layer (numbered as [`Arch::parse_layer`] returns them).
    pub fn channels(self, layer: usize) -> i64 {
        match self.family() {
            Family::ResNet(s) => {
                let planes = 64 << (layer - 1);
                if s.bottleneck {
                    planes * 4
                } else {
                    planes
                }
            }
            Family::DenseNet(s) => s.channels(layer),
            Family::Vgg(s) => s.channels(layer),
        }
    }

    /// Parses a `--layers` entry into the family's layer number: "layer2" into 2 (ResNets),
    /// "features.denseblock2" into 2 (DenseNets), "features.10" into 10 (VGGs).
    pub fn parse_layer(self, name: &str) -> Result<usize> {
        let found = match self.family() {
            Family::ResNet(s) => {
                let n = if s.deeplab {
                    name.strip_prefix("backbone.").unwrap_or(name)
                } else {
                    name
                };
                number(n.strip_prefix("layer")).filter(|n| (1..=4).contains(n))
            }
            Family::DenseNet(_) => {
                let n = name.strip_prefix("features.").unwrap_or(name);
                number(n.strip_prefix("denseblock")).filter(|n| (1..=4).contains(n))
            }
            Family::Vgg(s) => match name.strip_prefix("pool") {
                Some(k) => number(Some(k))
                    .filter(|&k| k >= 1)
                    .and_then(|k| s.pools().get(k - 1).copied()),
                None => number(name.strip_prefix("features.")).filter(|&n| n < s.module_count()),
            },
        };
        match found {
            Some(n) => Ok(n),
            None => bail!(
                "unknown layer '{name}' for {} (expected {})",
                self.name(),
                self.layer_names_help()
            ),
        }
    }

    /// The canonical name of a layer, as models record it.
    pub fn layer_name(self, layer: usize) -> String {
        match self.family() {
            Family::ResNet(_) => format!("layer{layer}"),
            Family::DenseNet(_) => format!("features.denseblock{layer}"),
            Family::Vgg(_) => format!("features.{layer}"),
        }
    }

    fn layer_names_help(self) -> String {
        match self.family() {
            Family::ResNet(s) if s.deeplab => "layer1 .. layer4, or backbone.layerN".into(),
            Family::ResNet(_) => "layer1 .. layer4".into(),
            Family::DenseNet(_) => "features.denseblock1 .. features.denseblock4".into(),
            Family::Vgg(s) => format!(
                "features.0 .. features.{}, or pool1 .. pool{}",
                s.module_count() - 1,
                s.pools().len()
            ),
        }
    }
}

fn number(s: Option<&str>) -> Option<usize> {
    s.filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
}

/// A 2-D convolution without bias, as every convolution of torchvision's ResNets and DenseNets.
pub(crate) fn conv(
    p: nn::Path,
    io: (i64, i64),
    k: i64,
    stride: i64,
    padding: i64,
    init: nn::Init,
) -> nn::Conv2D {
    conv_cfg(p, io, k, stride, padding, 1, 1, init)
}

#[allow(clippy::too_many_arguments)]
fn conv_cfg(
    p: nn::Path,
    io: (i64, i64),
    k: i64,
    stride: i64,
    padding: i64,
    dilation: i64,
    groups: i64,
    init: nn::Init,
) -> nn::Conv2D {
    let (cin, cout) = io;
    let cfg = nn::ConvConfig {
        stride,
        padding,
        dilation,
        groups,
        bias: false,
        ws_init: init,
        ..Default::default()
    };
    nn::conv2d(p, cin, cout, k, cfg)
}

pub(crate) fn bn(p: nn::Path, c: i64) -> nn::BatchNorm {
    nn::batch_norm2d(p, c, Default::default())
}

/// One residual block, basic (two 3x3) or bottleneck (1x1, 3x3, 1x1).
#[derive(Debug)]
struct Block {
    convs: Vec<(nn::Conv2D, nn::BatchNorm)>,
    downsample: Option<(nn::Conv2D, nn::BatchNorm)>,
}

impl Block {
    /// `dilation` of the 3x3 convolution (DeepLabV3's layers 3 and 4), as torchvision's
    /// `_make_layer` passes it: the first block of a dilated layer keeps the previous one.
    fn new(
        p: &nn::Path,
        spec: &ResNetSpec,
        (cin, planes): (i64, i64),
        (stride, dilation): (i64, i64),
        init: nn::Init,
    ) -> Self {
        let (convs, cout) = if spec.bottleneck {
            let width = planes * spec.width_per_group / 64 * spec.groups;
            let cout = planes * 4;
            (
                vec![
                    (
                        conv(p / "conv1", (cin, width), 1, 1, 0, init),
                        bn(p / "bn1", width),
                    ),
                    (
                        conv_cfg(
                            p / "conv2",
                            (width, width),
                            3,
                            stride,
                            dilation,
                            dilation,
                            spec.groups,
                            init,
                        ),
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

    /// `folded`: the BatchNorms are folded into the convolutions ([`ResNet::fold_batchnorm`]).
    fn forward_t(&self, x: &Tensor, train: bool, folded: bool) -> Tensor {
        let conv_bn = |(c, b): &(nn::Conv2D, nn::BatchNorm), x: &Tensor| {
            let y = c.forward_t(x, train);
            if folded {
                y
            } else {
                b.forward_t(&y, train)
            }
        };
        let mut y = x.shallow_clone();
        let last = self.convs.len() - 1;
        for (i, pair) in self.convs.iter().enumerate() {
            y = conv_bn(pair, &y);
            if i != last {
                y = y.relu();
            }
        }
        let identity = match &self.downsample {
            Some(pair) => conv_bn(pair, x),
            None => x.shallow_clone(),
        };
        (y + identity).relu()
    }

    fn pairs_mut(&mut self) -> impl Iterator<Item = &mut (nn::Conv2D, nn::BatchNorm)> {
        self.convs.iter_mut().chain(self.downsample.as_mut())
    }
}

/// Folds inference-mode BatchNorm `b` into the convolution `c` before it: weights scaled by
/// `gamma / sqrt(var + eps)` per output channel (computed in f64), bias `beta - mean * scale`;
/// the weights get channels-last strides (NHWC), which libtorch's CPU convolutions run faster.
fn fold_into(c: &mut nn::Conv2D, b: &nn::BatchNorm) {
    let f64_of = |t: &Tensor| t.to_kind(tch::Kind::Double);
    let gamma =
        b.ws.as_ref()
            .map_or_else(|| b.running_var.ones_like(), f64_of);
    let beta =
        b.bs.as_ref()
            .map_or_else(|| b.running_var.zeros_like(), f64_of);
    let scale = gamma / (f64_of(&b.running_var) + BN_EPS).sqrt();
    let weights = (f64_of(&c.ws) * scale.reshape([-1, 1, 1, 1])).to_kind(c.ws.kind());
    let bias = (beta - f64_of(&b.running_mean) * &scale).to_kind(c.ws.kind());
    c.ws.set_data(&channels_last(&weights));
    c.bs = Some(bias);
}

/// torchvision's (and tch's default) BatchNorm epsilon.
const BN_EPS: f64 = 1e-5;

/// The same 4-D tensor with channels-last (NHWC) strides.
fn channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// A ResNet truncated after `layers.max()`; `forward` returns the requested layers' outputs.
#[derive(Debug)]
pub struct ResNet {
    pub arch: Arch,
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    stages: Vec<Vec<Block>>,
    layers: Vec<usize>,
    /// Set once the BatchNorms are folded into the convolutions (inference only).
    folded: bool,
}

impl ResNet {
    /// Creates the variables under `p` (named as torchvision names them; DeepLabV3's under
    /// `backbone.`, as in its checkpoints), convolutions randomly initialized as tch does.
    /// `layers` are the 1-based layer numbers to return, in the order given.
    pub fn new(p: &nn::Path, arch: Arch, layers: &[usize]) -> Result<Self> {
        Self::build(p, arch, layers, nn::ConvConfig::default().ws_init)
    }

    /// As [`ResNet::new`], with every convolution weight zero: for weights loaded right after,
    /// which saves drawing ~25 M random numbers (0.1 s for wide_resnet50_2) at every start.
    pub fn unfilled(p: &nn::Path, arch: Arch, layers: &[usize]) -> Result<Self> {
        Self::build(p, arch, layers, nn::Init::Const(0.0))
    }

    fn build(p: &nn::Path, arch: Arch, layers: &[usize], init: nn::Init) -> Result<Self> {
        let Family::ResNet(spec) = arch.family() else {
            bail!("{} is not a ResNet", arch.name());
        };
        check_layers(arch, layers)?;
        let root = if spec.deeplab {
            p / "backbone"
        } else {
            p.clone()
        };
        let p = &root;
        let deepest = *layers.iter().max().unwrap();
        let mut cin = 64;
        let mut dilation = 1;
        let mut stages = Vec::new();
        for (i, &n) in spec.blocks.iter().enumerate().take(deepest) {
            let planes = 64 << i;
            let mut stride = if i == 0 { 1 } else { 2 };
            let first_dilation = dilation;
            if spec.deeplab && i >= 2 {
                dilation *= stride;
                stride = 1;
            }
            let lp = p / format!("layer{}", i + 1);
            let mut stage = Vec::new();
            for b in 0..n {
                let sd = if b == 0 {
                    (stride, first_dilation)
                } else {
                    (1, dilation)
                };
                stage.push(Block::new(&(&lp / b), &spec, (cin, planes), sd, init));
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
            folded: false,
        })
    }

    /// Folds every BatchNorm into the convolution before it, after the probe, for inference:
    /// one convolution with a bias instead of a convolution and a BatchNorm, in channels-last
    /// layout (14% less time per forward on this project's CPUs, experiments/knn-pruned/;
    /// features within 3e-6 of the unfolded network's, tests/parity.rs and
    /// tests/official_screw.rs). The probe (training mode) must not run after this.
    pub fn fold_batchnorm(&mut self) {
        if self.folded {
            return;
        }
        tch::no_grad(|| {
            fold_into(&mut self.conv1, &self.bn1);
            for block in self.stages.iter_mut().flatten() {
                for (c, b) in block.pairs_mut() {
                    fold_into(c, b);
                }
            }
        });
        self.folded = true;
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
        probe_with(side, device, |x| self.forward_t(x, true));
    }

    /// The forward pass; `train` = true uses and updates the batch statistics (the probe).
    fn forward_t(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        assert!(
            !(train && self.folded),
            "the probe runs before the BatchNorms are folded"
        );
        let mut y = if self.folded {
            self.conv1.forward_t(&channels_last(x), train)
        } else {
            self.bn1.forward_t(&self.conv1.forward_t(x, train), train)
        }
        .relu();
        y = y.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        let mut out = Outputs::new(&self.layers);
        for (i, stage) in self.stages.iter().enumerate() {
            for block in stage {
                y = block.forward_t(&y, train, self.folded);
            }
            out.offer(i + 1, &y);
        }
        out.finish()
    }
}

/// Refuses an empty layer list or a layer the architecture does not have.
fn check_layers(arch: Arch, layers: &[usize]) -> Result<()> {
    if layers.is_empty() {
        bail!("at least one layer must be extracted");
    }
    for &l in layers {
        arch.parse_layer(&arch.layer_name(l))?;
    }
    Ok(())
}

/// Runs `forward` on the probe input, `ones(1, 3, side, side)`, without gradients.
fn probe_with(side: i64, device: tch::Device, forward: impl FnOnce(&Tensor) -> Vec<Tensor>) {
    let ones = Tensor::ones([1, 3, side, side], (tch::Kind::Float, device));
    tch::no_grad(|| {
        forward(&ones);
    });
}

/// The requested layers' outputs, collected in the order asked for as the forward reaches
/// them.
struct Outputs<'a> {
    layers: &'a [usize],
    slots: Vec<Option<Tensor>>,
}

impl<'a> Outputs<'a> {
    fn new(layers: &'a [usize]) -> Self {
        Outputs {
            layers,
            slots: layers.iter().map(|_| None).collect(),
        }
    }

    /// Records `y` as the output of layer `layer`, if it is requested (again: a later offer
    /// for the same layer replaces the earlier one).
    fn offer(&mut self, layer: usize, y: &Tensor) {
        for (slot, &l) in self.slots.iter_mut().zip(self.layers) {
            if l == layer {
                *slot = Some(y.shallow_clone());
            }
        }
    }

    fn finish(self) -> Vec<Tensor> {
        self.slots
            .into_iter()
            .map(|t| t.expect("every layer is built"))
            .collect()
    }
}

/// Any supported backbone, built from its [`Arch`].
#[derive(Debug)]
pub enum Backbone {
    ResNet(ResNet),
    DenseNet(DenseNet),
    Vgg(Vgg),
}

impl Backbone {
    /// The network of `arch` up to the deepest of `layers`, its variables under `p` with
    /// torchvision's names, convolutions randomly initialized as tch does.
    pub fn new(p: &nn::Path, arch: Arch, layers: &[usize]) -> Result<Self> {
        Self::build(p, arch, layers, nn::ConvConfig::default().ws_init)
    }

    /// As [`Backbone::new`] with zero convolution weights, for weights loaded right after.
    pub fn unfilled(p: &nn::Path, arch: Arch, layers: &[usize]) -> Result<Self> {
        Self::build(p, arch, layers, nn::Init::Const(0.0))
    }

    fn build(p: &nn::Path, arch: Arch, layers: &[usize], init: nn::Init) -> Result<Self> {
        Ok(match arch.family() {
            Family::ResNet(_) => Backbone::ResNet(ResNet::build(p, arch, layers, init)?),
            Family::DenseNet(spec) => {
                check_layers(arch, layers)?;
                Backbone::DenseNet(DenseNet::build(p, spec, layers, init))
            }
            Family::Vgg(spec) => {
                check_layers(arch, layers)?;
                Backbone::Vgg(Vgg::build(p, spec, layers, init))
            }
        })
    }

    /// Runs the network in inference mode on a normalized `[B, 3, H, W]` batch; returns the
    /// requested layers' outputs in the order asked for.
    pub fn forward(&self, x: &Tensor) -> Vec<Tensor> {
        match self {
            Backbone::ResNet(n) => n.forward(x),
            Backbone::DenseNet(n) => n.forward_t(x, false),
            Backbone::Vgg(n) => n.forward_t(x, false),
        }
    }

    /// The official code's BatchNorm probe (see [`ResNet::batchnorm_probe`]): one forward of
    /// ones in training mode up to the deepest extracted layer. Without BatchNorms (VGG) it
    /// changes nothing and is skipped.
    pub fn batchnorm_probe(&self, side: i64, device: tch::Device) {
        match self {
            Backbone::ResNet(n) => n.batchnorm_probe(side, device),
            Backbone::DenseNet(n) => probe_with(side, device, |x| n.forward_t(x, true)),
            Backbone::Vgg(n) if n.has_batchnorm() => {
                probe_with(side, device, |x| n.forward_t(x, true))
            }
            Backbone::Vgg(_) => {}
        }
    }

    /// Ready for inference in float32: a ResNet's BatchNorms folded into its convolutions
    /// ([`ResNet::fold_batchnorm`]). DenseNet (BatchNorm before its convolutions) and VGG
    /// are left as they are.
    pub fn fold_batchnorm(&mut self) {
        if let Backbone::ResNet(n) = self {
            n.fold_batchnorm();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Folding the BatchNorms changes the outputs only by float32 rounding, with statistics
    /// and affine parameters far from the identity (as after the probe).
    #[test]
    fn folded_batchnorm_gives_the_same_outputs() {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let mut net = ResNet::new(&vs.root(), Arch::parse("resnet18").unwrap(), &[2, 3]).unwrap();
        tch::no_grad(|| {
            for (name, mut t) in vs.variables() {
                let shape = t.size();
                let r = Tensor::rand(&shape, (tch::Kind::Float, tch::Device::Cpu));
                if name.ends_with("running_var") {
                    t.copy_(&(r * 2.0 + 0.05));
                } else if name.ends_with("running_mean") || name.ends_with("bias") {
                    t.copy_(&(r - 0.5));
                } else if name.contains("bn") || name.ends_with("downsample.1.weight") {
                    t.copy_(&(r + 0.5));
                }
            }
        });
        let x = Tensor::randn([2, 3, 64, 64], (tch::Kind::Float, tch::Device::Cpu));
        let before = tch::no_grad(|| net.forward(&x));
        net.fold_batchnorm();
        let after = tch::no_grad(|| net.forward(&x));
        for (a, b) in before.iter().zip(&after) {
            let scale = a.abs().max().double_value(&[]);
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff <= 1e-5 * scale, "differs by {diff} (max {scale})");
        }
    }

    #[test]
    fn layer_names_per_family_round_trip() {
        for arch in Arch::ALL {
            for l in arch.default_layers() {
                let name = arch.layer_name(l);
                assert_eq!(
                    arch.parse_layer(&name).unwrap(),
                    l,
                    "{} {name}",
                    arch.name()
                );
                assert!(arch.channels(l) > 0);
            }
        }
        let a = Arch::Resnet50;
        assert_eq!(a.parse_layer("layer4").unwrap(), 4);
        assert!(a.parse_layer("layer5").is_err());
        assert!(a.parse_layer("backbone.layer2").is_err());
        assert_eq!(
            Arch::Deeplabv3Resnet50
                .parse_layer("backbone.layer3")
                .unwrap(),
            3
        );
        let d = Arch::Densenet121;
        assert_eq!(d.parse_layer("denseblock4").unwrap(), 4);
        assert_eq!(d.parse_layer("features.denseblock1").unwrap(), 1);
        assert!(d.parse_layer("layer2").is_err());
        assert_eq!(
            (d.channels(1), d.channels(2), d.channels(4)),
            (256, 512, 1024)
        );
        assert_eq!(Arch::Densenet161.channels(3), 2112);
        let v = Arch::Vgg16Bn;
        assert_eq!(v.default_layers(), [23, 33]);
        assert_eq!(v.parse_layer("pool1").unwrap(), 6);
        assert_eq!(v.parse_layer("features.43").unwrap(), 43);
        assert!(v.parse_layer("features.44").is_err());
        assert!(v.parse_layer("pool6").is_err());
        assert!(v.parse_layer("pool0").is_err());
        assert_eq!(
            (v.channels(0), v.channels(1), v.channels(23)),
            (64, 64, 256)
        );
        let e = Arch::Vgg11.parse_layer("layer2").unwrap_err().to_string();
        assert_eq!(
            e,
            "unknown layer 'layer2' for vgg11 (expected features.0 .. features.20, or pool1 .. pool5)"
        );
    }

    #[test]
    fn unknown_layers_are_refused_when_building() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        assert!(Backbone::new(&vs.root(), Arch::Vgg11, &[21]).is_err());
        assert!(Backbone::new(&vs.root(), Arch::Densenet121, &[5]).is_err());
        assert!(Backbone::new(&vs.root(), Arch::Resnet18, &[]).is_err());
    }
}
