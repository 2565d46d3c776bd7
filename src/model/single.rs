//! A trained model loaded for scoring: its sidecar, its memory bank and the backbone that
//! makes the features, checked to belong together. Used by every command that scores
//! images against a saved model (predict, calibrate, mvtec evaluation); the scoring step
//! itself is `scoring::score_batch`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::Device;

use crate::features::backbone::Arch;
use crate::features::extractor::{Extractor, ExtractorOptions};
use crate::features::weights::WeightsSpec;
use crate::model::bank::{self, ModelInfo};

/// One backbone's trained model ready to score images: its sidecar, its bank and the backbone
/// it needs (an ensemble is several; [`crate::model::Model`] is either).
pub struct SingleModel {
    pub info: ModelInfo,
    pub knn: crate::model::knn::Knn,
    pub extractor: Extractor,
    /// Seconds spent reading and checking the index.
    pub index_s: f64,
}

impl SingleModel {
    /// Loads the model of `index` whose sidecar `info` has been read, checking that the
    /// sidecar, the index and the backbone weights belong together. When another run
    /// replaced the model since `info` was read, the new pair is loaded instead: callers take
    /// the sidecar from the returned model.
    pub fn load(
        index: &Path,
        mut info: ModelInfo,
        weights: Option<&WeightsSpec>,
        device: Device,
        quiet: bool,
    ) -> Result<SingleModel> {
        let t = std::time::Instant::now();
        let mut attempts = 0;
        let index_impl = loop {
            match bank::read_index(index, &info) {
                Ok(found) => break found,
                Err(e) => {
                    attempts += 1;
                    let fresh = bank::read_info(index)?;
                    let replaced = (&fresh.index_sha256, &fresh.index_blake3)
                        != (&info.index_sha256, &info.index_blake3);
                    if !replaced || attempts == 3 {
                        return Err(e);
                    }
                    info = fresh;
                }
            }
        };
        let projection = info
            .knn_projection
            .as_ref()
            .map(|p| {
                crate::model::knn::pruned::Projection::from_stored(p, info.feature_dim as usize)
            })
            .transpose()
            .with_context(|| format!("model sidecar {}", bank::sidecar_path(index).display()))?;
        let knn = crate::model::knn::Knn::new(index_impl, info.index)?.with_projection(projection);
        let index_s = t.elapsed().as_secs_f64();
        let extractor = extractor_for(index, &info, weights, device, quiet)?;
        Ok(SingleModel {
            info,
            knn,
            extractor,
            index_s,
        })
    }
}

/// The backbone that makes the features of the model `index` whose sidecar is `info`,
/// checked against the sidecar (layers' channels, weights' checksum). Also `merge`'s, to
/// score the held-out images against the merged bank before it is written.
pub fn extractor_for(
    index: &Path,
    info: &ModelInfo,
    weights: Option<&WeightsSpec>,
    device: Device,
    quiet: bool,
) -> Result<Extractor> {
    let side = bank::sidecar_path(index);
    let arch =
        Arch::parse(&info.backbone).with_context(|| format!("model sidecar {}", side.display()))?;
    let layers = info
        .layers
        .iter()
        .map(|l| arch.parse_layer(l))
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("model sidecar {}", side.display()))?;
    let channels: Vec<i64> = layers.iter().map(|&l| arch.channels(l)).collect();
    if channels != info.layer_channels {
        bail!(
            "model sidecar {} is inconsistent: {} {:?} has {channels:?} channels, the sidecar says {:?}",
            side.display(),
            info.backbone,
            info.layers,
            info.layer_channels
        );
    }
    let spec = model_weights(index, info, weights)?;
    let extractor = Extractor::new(&ExtractorOptions {
        arch,
        layers: &layers,
        weights: &spec,
        preprocess: info.preprocess,
        tile: info.tile,
        precision: info.precision,
        batchnorm_probe: info.batchnorm_probe,
        device,
        quiet,
    })?
    .with_dims(info.dims());
    if extractor.weights.sha256 != info.weights.sha256 {
        bail!(
            "backbone weights {} differ from the ones model {} was trained with (checksum {} \
             instead of {})",
            extractor.weights.source,
            index.display(),
            extractor.weights.sha256,
            info.weights.sha256
        );
    }
    Ok(extractor)
}

impl SingleModel {
    /// The model searching `nprobe` IVF lists per query instead of its own, when given.
    pub fn with_nprobe(mut self, nprobe: Option<u32>) -> Result<SingleModel> {
        if let Some(n) = nprobe {
            self.knn.set_nprobe(n)?;
        }
        Ok(self)
    }
}

/// The weights to load for the model `index` whose sidecar is `info`: the override if
/// given, else a self-contained model's own file (`weights_file`, never the spec, the network
/// or the cache), else what the spec names.
pub fn model_weights(
    index: &Path,
    info: &ModelInfo,
    overridden: Option<&WeightsSpec>,
) -> Result<WeightsSpec> {
    if let Some(w) = overridden {
        return Ok(w.clone());
    }
    if let Some(path) = info.weights_path(index) {
        if !path.is_file() {
            bail!(
                "backbone weights file {} of model {} does not exist: a self-contained model's \
                 folder must be copied whole (or pass the weights with --weights)",
                path.display(),
                index.display()
            );
        }
        let sha256 = info.weights.sha256.clone();
        return Ok(WeightsSpec::ModelFile { path, sha256 });
    }
    let spec = WeightsSpec::parse(&info.weights.spec)?;
    if let WeightsSpec::File(path) = &spec {
        if !path.exists() {
            bail!(
                "the model was trained with backbone weights {}, which no longer exist: pass \
                 their new location with --weights",
                path.display()
            );
        }
    }
    Ok(spec)
}
