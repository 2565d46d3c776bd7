//! Types shared by several stages and recorded in the model, kept below the stages so that
//! none has to import another (later) stage for them.

use tch::Kind;

/// Per-layer and final feature dimension of the official recipe.
pub const EMBED_DIM: i64 = 1024;

/// Arithmetic of the backbone (and, at predict time, of the nearest-neighbour search).
/// bfloat16 pays off on CPUs with AMX; float32 is the official and the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WeightsInfo {
    /// How to get them again, in `--weights` syntax ("imagenet", "ssl:pth", "random:0", a
    /// path, a URL).
    pub spec: String,
    /// Where they came from: "random:0", a file path, or a URL.
    pub source: String,
    /// SHA-256 of the weights file, or of the spec for random weights.
    pub sha256: String,
}
