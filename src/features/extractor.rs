//! Images to patch features: decoding and preprocessing (in parallel), the backbone forward
//! pass in batches, and aggregation into patch features. Shared by train and predict.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use image::RgbImage;
use ndarray::Array2;
use rayon::prelude::*;
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::features::backbone::{Arch, Backbone};
use crate::features::images::{self, Geometry, ImageFile, Preprocess};
use crate::features::patch;
use crate::features::probe;
use crate::features::weights::{self, WeightsSpec};
use crate::util::records::{EmbedDims, Precision, WeightsInfo, EMBED_DIM};

/// Side of the official code's BatchNorm probe input (`Backbone::batchnorm_probe`) for a
/// preprocessing: the network input size, i.e. the crop, or the resize side without a crop
/// (then images, and tiles, are resized so their short side has that length).
pub fn probe_side(preprocess: &Preprocess) -> u32 {
    preprocess.crop.unwrap_or(preprocess.resize)
}

/// A backbone with its weights, ready to turn images into patch features.
pub struct Extractor {
    net: Backbone,
    precision: Precision,
    aggregator: patch::Aggregator,
    vs: VarStore,
    pub device: Device,
    pub preprocess: Preprocess,
    /// Side of the square tiles large images are cut into, in original pixels (`--tile`).
    pub tile: Option<u32>,
    pub weights: WeightsInfo,
    pub layer_channels: Vec<i64>,
    /// Dimensions of the patch features (official 1024 / 1024 unless `with_dims`).
    pub dims: EmbedDims,
    pub load_timings: LoadTimings,
}

/// Seconds [`Extractor::new`] took: part of every scoring command's start.
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LoadTimings {
    /// Building the network and filling it with its weights (read, checked, converted).
    pub weights_s: f64,
    /// The BatchNorm probe (or reading its outcome from the cache), and the switch to the
    /// run's precision.
    pub probe_s: f64,
    /// Whether the probe's outcome came from the cache (`probe`).
    pub probe_cached: bool,
}

/// Which part of its image a network input is: the whole image (one tile), or one of the
/// tiles of `--tile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    /// `(left, top, width, height)` in the original image.
    pub rect: (u32, u32, u32, u32),
    pub index: usize,
    /// Tiles of the image; they arrive in order, one after another.
    pub count: usize,
}

impl Tile {
    pub fn is_last(&self) -> bool {
        self.index + 1 == self.count
    }
}

/// A decoded image's tile and its network input, ready for the network (cloned for each
/// backbone of an ensemble).
#[derive(Clone)]
pub struct Prepared {
    file: ImageFile,
    original: Arc<RgbImage>,
    input: RgbImage,
    /// Geometry of the tile (the whole image without tiling) in the network input.
    geometry: Geometry,
    tile: Tile,
}

/// The smallest network input side the backbones take.
const MIN_INPUT: u32 = 32;

fn too_small(file: &Path, (w, h): (u32, u32)) -> String {
    format!(
        "image {} becomes {w}x{h} after preprocessing, too small for the backbone (at least \
         {MIN_INPUT}x{MIN_INPUT})",
        file.display()
    )
}

/// Refuses an image's inputs that are too small for the backbone, as
/// [`Extractor::features`] would refuse their batch.
fn check_size(tiles: &[Prepared]) -> Result<()> {
    for t in tiles {
        let (w, h) = t.input.dimensions();
        if w < MIN_INPUT || h < MIN_INPUT {
            bail!(too_small(&t.file.path, (w, h)));
        }
    }
    Ok(())
}

fn prepare(file: &ImageFile, preprocess: Preprocess, tile: Option<u32>) -> Result<Vec<Prepared>> {
    let original = Arc::new(images::load_rgb(&file.path)?);
    prepare_decoded(file, original, preprocess, tile)
}

/// A decoded image's network inputs: the whole image, or its tiles with `tile`, resized and
/// cropped; errors name `file`. Public for images decoded elsewhere (`serve`'s request
/// bodies), which then go through [`Extractor::run_prepared`].
pub fn prepare_decoded(
    file: &ImageFile,
    original: Arc<RgbImage>,
    preprocess: Preprocess,
    tile: Option<u32>,
) -> Result<Vec<Prepared>> {
    let (w, h) = original.dimensions();
    let rects = match tile {
        Some(t) => images::tile_rects(w, h, t),
        None => vec![(0, 0, w, h)],
    };
    let count = rects.len();
    rects
        .into_iter()
        .enumerate()
        .map(|(index, rect)| {
            let (input, geometry) = if count == 1 {
                preprocess.apply(&original)
            } else {
                let (x, y, tw, th) = rect;
                preprocess.apply(&image::imageops::crop_imm(&*original, x, y, tw, th).to_image())
            }
            .map_err(|e| anyhow::anyhow!("cannot preprocess image {}: {e}", file.path.display()))?;
            Ok(Prepared {
                file: file.clone(),
                original: Arc::clone(&original),
                input,
                geometry,
                tile: Tile { rect, index, count },
            })
        })
        .collect()
}

/// One decoded image (or one tile of it) and what the network made of it.
pub struct Extracted {
    pub file: ImageFile,
    /// The whole image, shared by its tiles.
    pub original: Arc<RgbImage>,
    /// Where the network input sits in the tile (the whole image without tiling).
    pub geometry: Geometry,
    pub tile: Tile,
    /// `[H*W, dims.target]` patch features on the grid `grid`.
    pub features: Array2<f32>,
    pub grid: (usize, usize),
}

/// What an [`Extractor`] is built from.
pub struct ExtractorOptions<'a> {
    pub arch: Arch,
    /// The backbone's layers whose features are used.
    pub layers: &'a [usize],
    pub weights: &'a WeightsSpec,
    pub preprocess: Preprocess,
    pub tile: Option<u32>,
    pub precision: Precision,
    /// The input side of the official BatchNorm probe ([`probe_side`]), or none for no probe.
    pub batchnorm_probe: Option<u32>,
    pub device: Device,
    pub quiet: bool,
}

impl Extractor {
    /// Builds the backbone, loads its weights, runs (or reads from the cache) the BatchNorm
    /// probe and sets the precision.
    pub fn new(opts: &ExtractorOptions) -> Result<Self> {
        let ExtractorOptions {
            arch,
            layers,
            weights: spec,
            preprocess,
            tile,
            precision,
            batchnorm_probe,
            device,
            quiet,
        } = *opts;
        let t = Instant::now();
        let mut vs = VarStore::new(device);
        // Every variable is overwritten by the weights (or their random initialization).
        let mut net = Backbone::unfilled(&vs.root(), arch, layers)?;
        let weights = weights::load(&mut vs, arch, spec, quiet)?;
        let weights_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let probe_cached = batchnorm_probe.is_some_and(|side| {
            let key = probe::ProbeKey {
                arch,
                layers,
                side,
                device,
                weights: &weights,
            };
            let cache = spec.uses_cache().then(weights::cache_dir);
            probe::apply(&net, &vs, &key, cache.as_deref())
        });
        vs.set_kind(precision.kind());
        vs.freeze();
        if precision == Precision::Fp32 {
            net.fold_batchnorm();
        }
        let layer_channels: Vec<i64> = layers.iter().map(|&l| arch.channels(l)).collect();
        Ok(Extractor {
            net,
            precision,
            aggregator: patch::Aggregator::new(&layer_channels, EMBED_DIM, EMBED_DIM, device),
            dims: EmbedDims::default(),
            vs,
            device,
            preprocess,
            tile,
            weights,
            layer_channels,
            load_timings: LoadTimings {
                weights_s,
                probe_s: t.elapsed().as_secs_f64(),
                probe_cached,
            },
        })
    }

    /// The extractor making features of dimensions `dims` instead of the default 1024 / 1024.
    pub fn with_dims(mut self, dims: EmbedDims) -> Self {
        if dims != self.dims {
            self.aggregator = patch::Aggregator::new(
                &self.layer_channels,
                dims.pretrain,
                dims.target,
                self.device,
            );
            self.dims = dims;
        }
        self
    }

    /// The backbone's named tensors (torchvision's names), running statistics included, as
    /// they are used: after the BatchNorm probe and in the extractor's precision (a float32
    /// ResNet's convolution weights with its BatchNorms folded in).
    pub fn variables(&self) -> std::collections::HashMap<String, Tensor> {
        self.vs.variables()
    }

    /// Decodes and preprocesses `files` in parallel, `batch_size` at a time, and runs the
    /// network on runs of images (or tiles, with `--tile`) that share an input size. Calls
    /// `sink` once per such run (at most `batch_size` inputs), in input order; an image's tiles
    /// come one after another, possibly over several calls. A loader thread decodes the next batch
    /// while the network runs on the current one; at most three batches of decoded images
    /// exist at a time.
    pub fn extract(
        &self,
        files: &[ImageFile],
        batch_size: usize,
        sink: impl FnMut(Vec<Extracted>) -> Result<()>,
    ) -> Result<()> {
        self.extract_skipping(files, batch_size, None, sink)
    }

    /// As [`Extractor::extract`]; with `skipped`, an image that cannot be decoded or
    /// preprocessed (or is too small for the backbone) does not end the run: it is added to
    /// `skipped` with its reason, and the others are extracted (`predict --on-error skip`).
    pub fn extract_skipping(
        &self,
        files: &[ImageFile],
        batch_size: usize,
        mut skipped: Option<&mut Vec<(ImageFile, anyhow::Error)>>,
        mut sink: impl FnMut(Vec<Extracted>) -> Result<()>,
    ) -> Result<()> {
        let (preprocess, tile) = (self.preprocess, self.tile);
        let batch_size = batch_size.max(1);
        let skip = skipped.is_some();
        type Decoded = (Vec<Prepared>, Vec<(ImageFile, anyhow::Error)>);
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Decoded>>(1);
            scope.spawn(move || {
                for chunk in files.chunks(batch_size) {
                    let each: Vec<Result<Vec<Prepared>>> = chunk
                        .par_iter()
                        .map(|f| {
                            let tiles = prepare(f, preprocess, tile)?;
                            if skip {
                                check_size(&tiles)?;
                            }
                            Ok(tiles)
                        })
                        .collect();
                    let (mut prepared, mut bad) = (Vec::new(), Vec::new());
                    let mut failed = None;
                    for (f, r) in chunk.iter().zip(each) {
                        match r {
                            Ok(tiles) => prepared.extend(tiles),
                            Err(e) if skip => bad.push((f.clone(), e)),
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                    let failed_now = failed.is_some();
                    let decoded = match failed {
                        Some(e) => Err(e),
                        None => Ok((prepared, bad)),
                    };
                    // A closed channel means the consumer stopped: so do we.
                    if tx.send(decoded).is_err() || failed_now {
                        return;
                    }
                }
            });
            for decoded in rx {
                let (prepared, bad) = decoded?;
                if let Some(list) = skipped.as_mut() {
                    list.extend(bad);
                }
                self.run_prepared(prepared, batch_size, &mut sink)?;
            }
            Ok(())
        })
    }

    /// Runs the network on prepared inputs, in order, on runs of at most `batch_size` that
    /// share an input size; calls `sink` once per run.
    pub fn run_prepared(
        &self,
        mut prepared: Vec<Prepared>,
        batch_size: usize,
        mut sink: impl FnMut(Vec<Extracted>) -> Result<()>,
    ) -> Result<()> {
        while !prepared.is_empty() {
            let dims = prepared[0].input.dimensions();
            let run = prepared
                .iter()
                .take(batch_size.max(1))
                .take_while(|p| p.input.dimensions() == dims)
                .count();
            let rest = prepared.split_off(run);
            sink(self.run_network(prepared)?)?;
            prepared = rest;
        }
        Ok(())
    }

    /// Features for same-sized prepared images, split back per image.
    fn run_network(&self, prepared: Vec<Prepared>) -> Result<Vec<Extracted>> {
        let inputs: Vec<&RgbImage> = prepared.iter().map(|p| &p.input).collect();
        let (feats, grid) = self.features(&inputs, &prepared[0].file.path)?;
        let per_image = grid.0 * grid.1;
        Ok(prepared
            .into_iter()
            .enumerate()
            .map(|(i, p)| Extracted {
                file: p.file,
                original: p.original,
                geometry: p.geometry,
                tile: p.tile,
                features: feats
                    .slice(ndarray::s![i * per_image..(i + 1) * per_image, ..])
                    .to_owned(),
                grid,
            })
            .collect())
    }

    /// Patch features of same-sized network inputs: `[B*H*W, dims.target]` and the grid.
    /// Inputs under 32x32 are refused ([`check_size`]).
    pub fn features(
        &self,
        inputs: &[&RgbImage],
        first: &Path,
    ) -> Result<(Array2<f32>, (usize, usize))> {
        let (w, h) = inputs[0].dimensions();
        if w < MIN_INPUT || h < MIN_INPUT {
            bail!(too_small(first, (w, h)));
        }
        let mut data = Vec::with_capacity(inputs.len() * 3 * (w * h) as usize);
        for img in inputs {
            data.extend(images::normalize_chw(img));
        }
        let batch = Tensor::from_slice(&data)
            .reshape([inputs.len() as i64, 3, h as i64, w as i64])
            .to_kind(self.precision.kind())
            .to_device(self.device);
        let pf = tch::no_grad(|| {
            let layers = self.net.forward(&batch);
            self.aggregator.apply(&layers)
        });
        let (gh, gw) = pf.grid;
        let dim = self.dims.target;
        let flat = pf
            .features
            .reshape([-1, dim])
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous();
        let n = flat.size()[0] as usize;
        let mut out = Array2::<f32>::zeros((n, dim as usize));
        flat.copy_data(out.as_slice_mut().expect("fresh array"), n * dim as usize);
        Ok((out, (gh as usize, gw as usize)))
    }
}
