//! Types shared by several stages and recorded in the model, kept below the stages so that
//! none has to import another (later) stage for them.

use serde::{Deserialize, Serialize};
use tch::Kind;

/// Per-layer and final feature dimension of the official recipe: the defaults of its
/// `--pretrain_embed_dimension` and `--target_embed_dimension` (our `--embed-dim`,
/// `--target-dim`).
pub const EMBED_DIM: i64 = 1024;

/// The feature dimensions of a model: each layer's patch vectors pooled to `pretrain`, the
/// stacked layers pooled to `target`, the bank's dimension (the official ensemble uses
/// 1024 -> 384).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedDims {
    pub pretrain: i64,
    pub target: i64,
}

impl Default for EmbedDims {
    fn default() -> Self {
        EmbedDims {
            pretrain: EMBED_DIM,
            target: EMBED_DIM,
        }
    }
}

/// Neighbourhood size of a patch (the official default).
pub const PATCH_SIZE: i64 = 3;

/// Arithmetic of the backbone (and, at predict time, of the nearest-neighbour search).
/// bfloat16 pays off on CPUs with AMX; float32 is the official and the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
}

impl Precision {
    pub fn kind(self) -> Kind {
        match self {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
        }
    }
}

/// What weights were loaded, recorded in the model so predict can check it uses the same
/// weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightsInfo {
    /// How to get them again, in `--weights` syntax ("imagenet", "ssl:pth", "random:0", a
    /// path, a URL).
    pub spec: String,
    /// Where they came from: "random:0", a file path, or a URL.
    pub source: String,
    /// SHA-256 of the weights file, or of the spec for random weights.
    pub sha256: String,
}

/// How a list of good images' scores becomes a threshold (`calibration` applies it); stored in the sidecar as
/// `{"name": "quantile"}` or `{"name": "sigma", "coef": K}` (absent in models from before
/// there was a choice, which used the quantile rule).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum Rule {
    /// `q99 + 0.1 * (q99 - median)`.
    #[default]
    Quantile,
    /// `mean + coef * std` (population standard deviation, ddof = 0).
    Sigma { coef: f64 },
}

/// What the sidecar stores about the calibration images (`calibration` computes it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Calibration {
    pub images: usize,
    /// The rule in words.
    pub rule: String,
    /// The rule and its parameter; absent (older models) means the quantile rule.
    #[serde(default)]
    pub method: Rule,
    /// The folder of good images given to `patchcore calibrate`; absent when the images
    /// were held out of training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folder: Option<String>,
    /// Image scores of the calibration images, ascending.
    pub image_scores: Vec<f32>,
    /// Largest heatmap value of each calibration image, ascending.
    pub heatmap_maxima: Vec<f32>,
    pub image_threshold: f32,
    pub pixel_threshold: f32,
    /// Upper bound on the share of good images (like the calibration ones) whose image score
    /// exceeds the threshold: `(c + 1) / (n + 1)`, see `calibration`'s documentation.
    #[serde(default)]
    pub false_alarm_bound: f64,
    /// Each calibration image with its scores, highest image score first (absent in
    /// sidecars written before the names were kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scored_images: Vec<ScoredFile>,
}

/// One calibration image: its file (relative to the folder it was found in) and scores.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScoredFile {
    pub file: String,
    pub score: f32,
    pub heatmap_max: f32,
}

/// The pruned kNN search's projection as the sidecar stores it (`knn::pruned::Projection`):
/// the bank's mean then `rank` principal directions, float32 little-endian, base64, with the
/// BLAKE3 of those bytes (checked at load).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredProjection {
    pub rank: usize,
    pub blake3: String,
    pub mean_basis_f32le: String,
}
