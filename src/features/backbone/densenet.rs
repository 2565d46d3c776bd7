//! torchvision's DenseNet (`features.conv0` .. `features.denseblock4`), cut after the deepest
//! dense block asked for. Layer N is the output of `features.denseblockN`: every input
//! feature of its last dense layer concatenated with that layer's output.

use tch::nn::{self, ModuleT};
use tch::Tensor;

use super::{bn, conv, Outputs};

/// Growth rate, dense layers per block, channels of the stem (`bn_size` is 4 in all four).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    growth: i64,
    blocks: [i64; 4],
    init: i64,
}

pub(super) const fn spec(growth: i64, blocks: [i64; 4], init: i64) -> Spec {
    Spec {
        growth,
        blocks,
        init,
    }
}

const BN_SIZE: i64 = 4;

impl Spec {
    /// Channels into dense block `block` (1-based) and out of it.
    fn block_io(&self, block: usize) -> (i64, i64) {
        let mut cin = self.init;
        for b in 0..block {
            let cout = cin + self.blocks[b] * self.growth;
            if b + 1 == block {
                return (cin, cout);
            }
            cin = cout / 2;
        }
        unreachable!("blocks are 1-based")
    }

    pub fn channels(&self, block: usize) -> i64 {
        self.block_io(block).1
    }
}

/// norm1, relu, conv1 (1x1 to 4 x growth), norm2, relu, conv2 (3x3 to growth).
#[derive(Debug)]
struct DenseLayer {
    norm1: nn::BatchNorm,
    conv1: nn::Conv2D,
    norm2: nn::BatchNorm,
    conv2: nn::Conv2D,
}

impl DenseLayer {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let y = self
            .conv1
            .forward_t(&self.norm1.forward_t(x, train).relu(), train);
        self.conv2
            .forward_t(&self.norm2.forward_t(&y, train).relu(), train)
    }
}

/// norm, relu, 1x1 conv halving the channels, 2x2 average pool.
#[derive(Debug)]
struct Transition {
    norm: nn::BatchNorm,
    conv: nn::Conv2D,
}

/// A DenseNet truncated after dense block `layers.max()`.
#[derive(Debug)]
pub struct DenseNet {
    conv0: nn::Conv2D,
    norm0: nn::BatchNorm,
    /// Each block's layers, and the transition after it (none after the deepest built).
    blocks: Vec<(Vec<DenseLayer>, Option<Transition>)>,
    layers: Vec<usize>,
}

impl DenseNet {
    pub(super) fn build(p: &nn::Path, spec: Spec, layers: &[usize], init: nn::Init) -> Self {
        let f = p / "features";
        let deepest = *layers.iter().max().expect("layers were checked");
        let conv0 = conv(&f / "conv0", (3, spec.init), 7, 2, 3, init);
        let norm0 = bn(&f / "norm0", spec.init);
        let mut blocks = Vec::new();
        for b in 1..=deepest {
            let (cin, cout) = spec.block_io(b);
            let bp = &f / format!("denseblock{b}");
            let dense = (0..spec.blocks[b - 1])
                .map(|i| {
                    let lp = &bp / format!("denselayer{}", i + 1);
                    let c = cin + i * spec.growth;
                    let mid = BN_SIZE * spec.growth;
                    DenseLayer {
                        norm1: bn(&lp / "norm1", c),
                        conv1: conv(&lp / "conv1", (c, mid), 1, 1, 0, init),
                        norm2: bn(&lp / "norm2", mid),
                        conv2: conv(&lp / "conv2", (mid, spec.growth), 3, 1, 1, init),
                    }
                })
                .collect();
            let transition = (b < deepest).then(|| {
                let tp = &f / format!("transition{b}");
                Transition {
                    norm: bn(&tp / "norm", cout),
                    conv: conv(&tp / "conv", (cout, cout / 2), 1, 1, 0, init),
                }
            });
            blocks.push((dense, transition));
        }
        DenseNet {
            conv0,
            norm0,
            blocks,
            layers: layers.to_vec(),
        }
    }

    /// The forward pass; `train` = true uses and updates the batch statistics (the probe).
    pub(super) fn forward_t(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        let mut y = self
            .norm0
            .forward_t(&self.conv0.forward_t(x, train), train)
            .relu()
            .max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        let mut out = Outputs::new(&self.layers);
        for (i, (dense, transition)) in self.blocks.iter().enumerate() {
            let mut features = vec![y];
            for layer in dense {
                let new = layer.forward_t(&Tensor::cat(&features, 1), train);
                features.push(new);
            }
            y = Tensor::cat(&features, 1);
            out.offer(i + 1, &y);
            if let Some(t) = transition {
                y = t
                    .conv
                    .forward_t(&t.norm.forward_t(&y, train).relu(), train)
                    .avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None);
            }
        }
        out.finish()
    }
}
