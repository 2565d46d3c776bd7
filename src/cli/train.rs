//! `patchcore train`'s options: how a model is built (`ModelArgs`, shared with `mvtec runall`)
//! and where from and to, converted into [`TrainOptions`].

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use clap::{Args, ValueEnum};
use tch::Device;

use super::{Outcome, Runtime};
use crate::commands::train::{self, TrainOptions};
use crate::features::backbone::Arch;
use crate::features::images::Preprocess;
use crate::features::weights::WeightsSpec;
use crate::model::bank::IndexRequest;
use crate::training::feature_store;
use crate::training::shard::Shard;
use crate::util::records::Precision;
use crate::util::records::Rule;

#[derive(Clone, Copy, ValueEnum)]
pub enum PrecisionArg {
    Fp32,
    Bf16,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum IndexArg {
    Flat,
    Ivf,
}

#[derive(Args)]
pub struct TrainArgs {
    /// Folder of good images (searched recursively; png, jpg, bmp, tiff).
    #[arg(short, long)]
    pub input: PathBuf,
    /// Index file to write (FAISS); the sidecar INDEX.json is written beside it.
    #[arg(short, long, default_value = "index.faiss")]
    pub output: PathBuf,
    /// Backbone architecture (torchvision name): resnet18/34/50/101/152, wide_resnet50_2/101_2,
    /// resnext50_32x4d, resnext101_32x8d, deeplabv3_resnet50/101, densenet121/161/169/201,
    /// vgg11/13/16/19 and their _bn forms, optionally with its layers: NAME:LAYER,LAYER (e.g.
    /// densenet201:features.denseblock2,features.denseblock3). Repeat the option to train an
    /// ensemble: one memory bank per backbone (models STEM.I-NAME.faiss beside the
    /// ensemble's sidecar INDEX.json), whose scores predict combines as the mean of each
    /// backbone's score divided by its calibrated threshold (anomalous above 1, as a single
    /// model is above its threshold; exactly 1 is good).
    #[arg(long, default_value = "wide_resnet50_2", value_name = "NAME[:LAYERS]")]
    pub backbone: Vec<String>,
    /// Train shard I of N (0 <= I < N) into a partial model for `patchcore merge`: the
    /// training images (after the held-out ones are chosen from the whole folder) are cut
    /// into N runs in folder order; every shard must be given the same folder and options.
    #[arg(long, value_name = "I/N", conflicts_with = "partial")]
    pub shard: Option<String>,
    /// Write a partial model of the whole folder (shard 0/1), e.g. new good images to add
    /// to a model with `patchcore merge --base`. Every image joins the bank (no held-out
    /// images, so the base's thresholds are kept) unless --calibration-ratio is given: then
    /// the held-out share renews the thresholds by the base's rule.
    #[arg(long)]
    pub partial: bool,
    /// A shard keeps the full features of only F times --sampling-ratio of its patches
    /// (its own coreset) instead of all of them: smaller parts, but the merge stands in for
    /// the other selected patches with their nearest kept one, which costs accuracy
    /// (experiments/sharded-training.md). Default: every patch, and the merged model is the
    /// unsharded one.
    #[arg(long, value_name = "F")]
    pub shard_oversample: Option<f64>,
    /// Write a self-contained model, as `patchcore export` does: the backbone weights file
    /// (BACKBONE-SHA8.safetensors or .pth, from --weights or the cache) is copied beside the
    /// index and recorded in the sidecar, so the model's folder loads on another machine
    /// without network or cache. Random weights need no file.
    #[arg(long)]
    pub self_contained: bool,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub runtime: Runtime,
}

/// How a model is built; shared by `train` and `mvtec runall` (whose defaults follow the
/// paper protocol where noted).
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Backbone weights: "imagenet" (torchvision's ImageNet weights for the backbone,
    /// downloaded once into the cache and checked by checksum), "coco" (deeplabv3_*: its
    /// COCO-trained segmentation weights), "ssl" or "swsl" (resnet18, resnet50 and the
    /// ResNeXts: Facebook's semi-supervised / semi-weakly supervised ImageNet models, licence
    /// CC-BY-NC), each also as NAME:pth for the original PyTorch file instead of the Hugging
    /// Face safetensors; a safetensors or PyTorch state-dict file; an http(s)
    /// URL[#sha256=HEX]; or random:SEED [default: imagenet; coco for deeplabv3_*]. With
    /// several --backbone: given once for all of them, or once per backbone in their order.
    #[arg(long)]
    pub weights: Vec<String>,
    /// Layers whose features are used, comma-separated, by the backbone's module names:
    /// layer1..layer4 (ResNets), features.denseblock1..4 (DenseNets), features.N or poolK
    /// (VGGs) [default: layer2,layer3; features.denseblock2,features.denseblock3; the 2nd
    /// and 3rd max-pool from the end of a VGG's features]. For one --backbone only; with
    /// several, give each its layers as NAME:LAYER,LAYER.
    #[arg(long)]
    pub layers: Option<String>,
    /// Dimension each layer's patch vectors are pooled to (the official
    /// --pretrain_embed_dimension). Recorded in the model.
    #[arg(long, default_value_t = crate::util::records::EMBED_DIM, value_name = "D")]
    pub embed_dim: i64,
    /// Dimension of the memory bank's features, the stacked layers pooled to it (the
    /// official --target_embed_dimension; its ensemble uses 384). Recorded in the model.
    #[arg(long, default_value_t = crate::util::records::EMBED_DIM, value_name = "D")]
    pub target_dim: i64,
    /// Fraction of patches kept in the memory bank (greedy coreset); 1.0 keeps all.
    #[arg(short, long, default_value_t = 0.1)]
    pub sampling_ratio: f64,
    /// Share of the good images held out of the memory bank to calibrate the thresholds
    /// predict uses for verdicts and masks (at least 5 images, at most 1000; 0 = none)
    /// [default: 0.1; --partial and mvtec runall: 0, every image in the bank].
    #[arg(long)]
    pub calibration_ratio: Option<f64>,
    /// How the held-out images' scores become the thresholds: quantile (q99 + 0.1 * (q99 -
    /// median)) or sigma (mean + K population standard deviations, K = --calibration-coef).
    #[arg(long, default_value = "quantile", value_parser = ["quantile", "sigma"])]
    pub calibration_rule: String,
    /// K of --calibration-rule sigma [default: 5].
    #[arg(long)]
    pub calibration_coef: Option<f64>,
    /// Nearest neighbours averaged into a patch score.
    #[arg(short = 'k', long, default_value_t = 1)]
    pub n_neighbors: usize,
    /// Seed of the coreset's projection and starting points.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Resize the shorter image side to this many pixels (aspect ratio kept)
    /// [default: 224; mvtec runall: 256].
    #[arg(long)]
    pub resize: Option<u32>,
    /// Center-crop a square of this side after resizing; 0 = no crop, the whole image
    /// [default: none; mvtec runall: 224]. The paper protocol is --resize 256 --crop 224.
    #[arg(long)]
    pub crop: Option<u32>,
    /// Cut each image into square tiles of this many original pixels (overlapping by at
    /// least 1/8) and score every tile at --resize, so small defects on large images keep
    /// their detail; heatmaps are put back together at full resolution. Not with --crop.
    #[arg(long)]
    pub tile: Option<u32>,
    /// Arithmetic of the backbone: fp32 (official) or bf16 (faster on CPUs with AMX or
    /// AVX-512 BF16, slower where bf16 is emulated; stored in the model). The
    /// nearest-neighbour search is exact float32 either way.
    #[arg(long, value_enum, default_value = "fp32")]
    pub precision: PrecisionArg,
    /// FAISS index of the memory bank: flat (exact search, the official one) or ivf
    /// (IVF-Flat: approximate, for banks of millions of patches; see --nlist, --nprobe).
    /// Recorded in the model. (The model file itself is -o/--output.)
    #[arg(long, value_enum, default_value = "flat", value_name = "KIND")]
    pub bank_index: IndexArg,
    /// The former spelling of --bank-index, still accepted as flat or ivf; any other value
    /// (a model path, as --index means in the other commands) is refused pointing at -o.
    #[arg(
        long = "index",
        hide = true,
        conflicts_with = "bank_index",
        value_name = "KIND",
        value_parser = old_index_kind
    )]
    pub old_index: Option<IndexArg>,
    /// --bank-index ivf: k-means lists of the bank [default: 4 sqrt(bank size)].
    #[arg(long)]
    pub nlist: Option<u32>,
    /// --bank-index ivf: lists searched per query, recorded as the model's default (predict
    /// --nprobe overrides it); nprobe = nlist is exact [default: nlist / 16].
    #[arg(long)]
    pub nprobe: Option<u32>,
    /// Skip the official code's BatchNorm probe. By default, as the official implementation
    /// does when it loads a backbone (and so in all its published results), one all-ones
    /// image of the network input size (1x3xSxS, S = --crop, else --resize) is sent through
    /// the backbone in training mode before anything else, which moves every BatchNorm's
    /// running statistics up to the deepest extracted layer once (momentum 0.1). With this
    /// flag the weights' own statistics are used as they are. Recorded in the model.
    #[arg(long)]
    pub no_batchnorm_probe: bool,
    /// Weight the image score as in the paper's Eq. 7 over B bank neighbours of the nearest
    /// bank patch (anomalib uses 9): a defect whose nearest normal patch is itself rare scores
    /// higher. Off by default, as in the official implementation. Recorded in the model.
    #[arg(long, value_name = "B")]
    pub score_reweighting: Option<usize>,
    /// Memory budget (e.g. 4G): the training features that do not fit go to a temporary file
    /// beside the model [default: 80% of available memory].
    #[arg(long)]
    pub max_memory: Option<String>,
}

/// Defaults that differ between `train` and `mvtec runall`.
pub struct ModelDefaults {
    pub resize: u32,
    pub crop: Option<u32>,
    pub calibration_ratio: f64,
}

/// A `--backbone NAME[:LAYER,LAYER]` parsed: the architecture and its layers (given, else
/// `--layers` for a single backbone, else its defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct BackboneArg {
    pub arch: Arch,
    pub layers: Vec<usize>,
}

/// Parses every `--backbone` (with `--layers`, for a single one); errors name the option.
pub fn parse_backbones(list: &[String], layers: Option<&str>) -> Result<Vec<BackboneArg>> {
    if list.len() > 1 && layers.is_some() {
        bail!(
            "--layers is for a single --backbone: give each backbone its layers as \
             --backbone NAME:LAYER,LAYER"
        );
    }
    list.iter()
        .map(|b| {
            let (name, own) = match b.split_once(':') {
                Some((n, l)) => (n, Some(l)),
                None => (b.as_str(), None),
            };
            let arch = Arch::parse(name.trim()).map_err(|e| anyhow!("--backbone {b}: {e}"))?;
            let layers = match own.or(layers) {
                Some(list) => list
                    .split(',')
                    .map(|l| arch.parse_layer(l.trim()))
                    .collect::<Result<Vec<_>>>()
                    .map_err(|e| anyhow!("--backbone {b}: {e}"))?,
                None => arch.default_layers(),
            };
            Ok(BackboneArg { arch, layers })
        })
        .collect()
}

/// The former `--index` of train: flat or ivf. Any other value is most likely a model path
/// (what `--index` means in predict, calibrate, serve...): refused, naming -o.
fn old_index_kind(v: &str) -> Result<IndexArg, String> {
    IndexArg::from_str(v, true).map_err(|_| {
        format!(
            "the model file to write is -o/--output (train -o {v}); the memory bank's index \
             kind is --bank-index flat|ivf"
        )
    })
}

impl ModelArgs {
    /// `--weights` of backbone `i` of `n` (once for all, or once per backbone), else the
    /// backbone's default pretrained weights.
    pub fn weights_arg(&self, i: usize, n: usize, arch: Arch) -> Result<&str> {
        match self.weights.len() {
            0 => Ok(arch.default_weights()),
            1 => Ok(&self.weights[0]),
            k if k == n => Ok(&self.weights[i]),
            k => bail!("--weights is given {k} times for {n} backbones: give it once for all, or once per backbone"),
        }
    }

    /// `--bank-index`, or its former spelling `--index`.
    fn bank_index_kind(&self) -> Result<IndexArg> {
        Ok(self.old_index.unwrap_or(self.bank_index))
    }

    /// Train options for backbone `i` of `n`, with the input and output left to the caller.
    pub fn train_options(
        &self,
        (i, n, backbone): (usize, usize, &BackboneArg),
        defaults: ModelDefaults,
        runtime: &Runtime,
        device: Device,
    ) -> Result<TrainOptions> {
        let arch = backbone.arch;
        Ok(TrainOptions {
            input: PathBuf::new(),
            images: Vec::new(),
            output: PathBuf::new(),
            arch,
            layers: backbone.layers.clone(),
            weights: WeightsSpec::parse(self.weights_arg(i, n, arch)?)?,
            dims: crate::util::records::EmbedDims {
                pretrain: self.embed_dim,
                target: self.target_dim,
            },
            preprocess: Preprocess {
                resize: self.resize.unwrap_or(defaults.resize),
                crop: match self.crop {
                    Some(0) => None,
                    Some(c) => Some(c),
                    None => defaults.crop,
                },
            },
            tile: self.tile,
            sampling_ratio: self.sampling_ratio,
            calibration_ratio: self.calibration_ratio.unwrap_or(defaults.calibration_ratio),
            calibration_rule: Rule::parse(
                &self.calibration_rule,
                self.calibration_coef,
                "--calibration-coef",
            )?,
            n_neighbors: self.n_neighbors,
            seed: self.seed,
            batch_size: runtime.batch_size,
            precision: match self.precision {
                PrecisionArg::Fp32 => Precision::Fp32,
                PrecisionArg::Bf16 => Precision::Bf16,
            },
            index: match self.bank_index_kind()? {
                IndexArg::Flat if self.nlist.is_some() || self.nprobe.is_some() => {
                    anyhow::bail!("--nlist and --nprobe need --bank-index ivf")
                }
                IndexArg::Flat => IndexRequest::Flat,
                IndexArg::Ivf => IndexRequest::Ivf {
                    nlist: self.nlist,
                    nprobe: self.nprobe,
                },
            },
            batchnorm_probe: !self.no_batchnorm_probe,
            score_reweighting: self.score_reweighting,
            max_memory: match &self.max_memory {
                Some(s) => feature_store::parse_size(s)?,
                None => feature_store::default_budget(),
            },
            device,
            quiet: runtime.quiet,
            shard: None,
            shard_oversample: None,
            self_contained: false,
        })
    }
}

/// The defaults of `patchcore train`.
const TRAIN_DEFAULTS: ModelDefaults = ModelDefaults {
    resize: 224,
    crop: None,
    calibration_ratio: 0.1,
};

impl TrainArgs {
    /// The options of this training run on `device`: one per backbone (several for an
    /// ensemble), each writing to `--output` (the ensemble moves them beside it).
    pub fn options(&self, device: Device) -> Result<Vec<TrainOptions>> {
        let backbones = parse_backbones(&self.backbone, self.model.layers.as_deref())?;
        if let Some(f) = self.shard_oversample.filter(|f| f.is_nan() || *f < 1.0) {
            bail!("--shard-oversample must be at least 1, got {f}");
        }
        let shard = match (&self.shard, self.partial) {
            (Some(s), _) => Some(Shard::parse(s)?),
            (None, true) => Some(Shard { index: 0, count: 1 }),
            (None, false) => None,
        };
        let n = backbones.len();
        backbones
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut model =
                    self.model
                        .train_options((i, n, b), TRAIN_DEFAULTS, &self.runtime, device)?;
                if self.partial && self.model.calibration_ratio.is_none() {
                    // New good images for `merge --base` all join the bank (the false alarms
                    // an inspector marked good are what the bank lacks); the base keeps its
                    // thresholds unless --calibration-ratio holds some out to renew them.
                    model.calibration_ratio = 0.0;
                }
                Ok(TrainOptions {
                    input: self.input.clone(),
                    output: self.output.clone(),
                    shard,
                    shard_oversample: self.shard_oversample,
                    self_contained: self.self_contained,
                    ..model
                })
            })
            .collect()
    }
}

/// `patchcore train`: builds the model, then says what it wrote (unless `--quiet`).
pub fn run(a: &TrainArgs) -> Result<Outcome> {
    let device = a.runtime.setup()?;
    let opts = a.options(device)?;
    if opts.len() > 1 {
        let info = crate::model::ensemble::train(&opts, &a.output)?;
        if !a.runtime.quiet {
            crate::model::ensemble::log_summary(&info, &a.output);
        }
        return Ok(Outcome::Done);
    }
    let info = train::run(&opts[0])?;
    if !a.runtime.quiet {
        train::log_summary(&info, &opts[0].output);
    }
    Ok(Outcome::Done)
}
