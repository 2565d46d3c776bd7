//! torchvision's VGG (`features` only: 3x3 convolutions with bias, optional BatchNorm, ReLU,
//! 2x2 max-pools), cut after the deepest module asked for. Layer N is the output of
//! `features[N]`, as the official code's forward hooks see it.

use tch::nn::{self, ModuleT};
use tch::Tensor;

use super::{bn, Outputs};

/// torchvision's configurations: output channels of each 3x3 convolution, 0 for a max-pool.
pub(super) const A: &[i64] = &[64, 0, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0];
pub(super) const B: &[i64] = &[
    64, 64, 0, 128, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0,
];
pub(super) const D: &[i64] = &[
    64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0,
];
pub(super) const E: &[i64] = &[
    64, 64, 0, 128, 128, 0, 256, 256, 256, 256, 0, 512, 512, 512, 512, 0, 512, 512, 512, 512, 0,
];

/// A configuration, with or without BatchNorm after each convolution (`vggNN_bn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    cfg: &'static [i64],
    batchnorm: bool,
}

pub(super) const fn spec(cfg: &'static [i64], batchnorm: bool) -> Spec {
    Spec { cfg, batchnorm }
}

/// One module of `features`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Conv { cin: i64, cout: i64 },
    Norm(i64),
    Relu,
    Pool,
}

impl Spec {
    /// The modules of `features`, in torchvision's order (so its indices are theirs).
    fn modules(&self) -> Vec<Kind> {
        let mut m = Vec::new();
        let mut cin = 3;
        for &c in self.cfg {
            if c == 0 {
                m.push(Kind::Pool);
                continue;
            }
            m.push(Kind::Conv { cin, cout: c });
            if self.batchnorm {
                m.push(Kind::Norm(c));
            }
            m.push(Kind::Relu);
            cin = c;
        }
        m
    }

    /// Number of modules in `features`.
    pub fn module_count(&self) -> usize {
        self.modules().len()
    }

    /// Indices of the max-pools in `features`.
    pub fn pools(&self) -> Vec<usize> {
        let m = self.modules();
        (0..m.len()).filter(|&i| m[i] == Kind::Pool).collect()
    }

    /// Channels of `features[index]`'s output.
    pub fn channels(&self, index: usize) -> i64 {
        self.modules()[..=index]
            .iter()
            .rev()
            .find_map(|k| match k {
                Kind::Conv { cout, .. } => Some(*cout),
                _ => None,
            })
            .expect("features starts with a convolution")
    }
}

#[derive(Debug)]
enum Module {
    Conv(nn::Conv2D),
    Norm(nn::BatchNorm),
    Relu,
    Pool,
}

/// A VGG's `features` up to module `layers.max()`.
#[derive(Debug)]
pub struct Vgg {
    modules: Vec<Module>,
    layers: Vec<usize>,
}

impl Vgg {
    pub(super) fn build(p: &nn::Path, spec: Spec, layers: &[usize], init: nn::Init) -> Self {
        let f = p / "features";
        let deepest = *layers.iter().max().expect("layers were checked");
        let modules = spec.modules()[..=deepest]
            .iter()
            .enumerate()
            .map(|(i, k)| match *k {
                Kind::Conv { cin, cout } => {
                    let cfg = nn::ConvConfig {
                        padding: 1,
                        ws_init: init,
                        ..Default::default()
                    };
                    Module::Conv(nn::conv2d(&f / i, cin, cout, 3, cfg))
                }
                Kind::Norm(c) => Module::Norm(bn(&f / i, c)),
                Kind::Relu => Module::Relu,
                Kind::Pool => Module::Pool,
            })
            .collect();
        Vgg {
            modules,
            layers: layers.to_vec(),
        }
    }

    pub fn has_batchnorm(&self) -> bool {
        self.modules.iter().any(|m| matches!(m, Module::Norm(_)))
    }

    /// The forward pass; `train` = true uses and updates the batch statistics (the probe).
    /// torchvision's ReLUs work in place: the official code's hook on the module before a
    /// ReLU keeps a tensor that the ReLU then overwrites when the forward goes on past it, so
    /// such a layer's output is taken after the ReLU, as there.
    pub(super) fn forward_t(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        let mut y = x.shallow_clone();
        let mut out = Outputs::new(&self.layers);
        for (i, m) in self.modules.iter().enumerate() {
            y = match m {
                Module::Conv(c) => c.forward_t(&y, train),
                Module::Norm(b) => b.forward_t(&y, train),
                Module::Relu => {
                    let r = y.relu();
                    out.offer(i - 1, &r);
                    r
                }
                Module::Pool => y.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false),
            };
            out.offer(i, &y);
        }
        out.finish()
    }
}
