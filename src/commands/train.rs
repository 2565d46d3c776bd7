//! `patchcore train`: good images in, memory bank (FAISS index + sidecar) out, and with a
//! calibration its figure `INDEX.calibration.svg`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ndarray::{Array2, ArrayView2, CowArray, Ix2};
use tch::Device;

use crate::features::backbone::Arch;
use crate::features::extractor::{Extractor, ExtractorOptions};
use crate::features::images::{self, ImageFile, Preprocess, IMAGENET_MEAN, IMAGENET_STD};
use crate::features::weights::{self, WeightsSpec};
use crate::model::bank::{self, IndexKind, ModelInfo, TrainTimings, TrainingSummary};
use crate::model::knn::Knn;
use crate::outputs::plots;
use crate::training::calibration;
use crate::training::coreset;
use crate::training::feature_store::{self, FeatureStore};
use crate::training::memory;
use crate::training::shard::{Shard, ShardPatches};
use crate::util::fsutil;
use crate::util::log::{self, Level};
use crate::util::progress;
use crate::util::records::Calibration;
use crate::util::records::PATCH_SIZE;
use crate::util::records::{EmbedDims, Precision};

pub(crate) mod plan;
use plan::{MemoryPlan, PROJECTION_BYTES};

#[derive(Clone)]
pub struct TrainOptions {
    pub input: PathBuf,
    /// The images to train on instead of every image of `input` (the library's
    /// [`crate::api::train`]); empty: every image of `input`.
    pub images: Vec<PathBuf>,
    pub output: PathBuf,
    pub arch: Arch,
    pub layers: Vec<usize>,
    pub weights: WeightsSpec,
    pub preprocess: Preprocess,
    /// Cut images into square tiles of this side (original pixels) before preprocessing.
    pub tile: Option<u32>,
    pub sampling_ratio: f64,
    /// Share of the good images held out of the bank to calibrate thresholds (0 = none).
    pub calibration_ratio: f64,
    /// How the held-out images' scores become thresholds.
    pub calibration_rule: crate::util::records::Rule,
    pub n_neighbors: usize,
    pub seed: u64,
    pub batch_size: usize,
    pub precision: Precision,
    /// Feature dimensions (`--embed-dim`, `--target-dim`; official 1024 / 1024).
    pub dims: EmbedDims,
    /// The FAISS index of the bank (`--index`, `--nlist`, `--nprobe`).
    pub index: bank::IndexRequest,
    /// Repeat the official code's BatchNorm probe before extracting features
    /// (`backbone::ResNet::batchnorm_probe`), as its published results do.
    pub batchnorm_probe: bool,
    /// The paper's Eq. 7 re-weighting of image scores over this many bank neighbours.
    pub score_reweighting: Option<usize>,
    /// Memory budget in bytes; features beyond it go to a temporary file.
    pub max_memory: u64,
    pub device: Device,
    pub quiet: bool,
    /// Train one shard of the input into a partial model for `patchcore merge`
    /// (`--shard I/N`; `--partial` is `0/1`); `None` trains a complete model.
    pub shard: Option<Shard>,
    /// A shard keeps the full features of this many times `sampling_ratio` of its patches;
    /// `None`: of every patch.
    pub shard_oversample: Option<f64>,
    /// Copy the backbone weights file beside the index and record it in the sidecar
    /// (`weights_file`), so the model loads without network or cache (`--self-contained`).
    pub self_contained: bool,
}

/// Trains a model: reads the images, extracts their patch features, selects the coreset,
/// calibrates the thresholds on the held-out images and writes the model.
pub fn run(opts: &TrainOptions) -> Result<ModelInfo> {
    check_options(opts)?;
    let t0 = Instant::now();
    let (files, held_out) = read_inputs(opts)?;
    let input_images = files.len() + held_out.len();
    let files = match opts.shard {
        Some(shard) => shard_files(shard, files)?,
        None => files,
    };
    // Before the backbone loads: the model's folder takes a file, and has room for the bank.
    let folder = fsutil::OutputFolder::prepare(
        fsutil::folder(&opts.output),
        Some(&bank_space(opts, files.len())),
    )?;
    let extractor = load_backbone(opts)?;
    // `--max-memory` is a hard limit: the runtime and a batch's activations measured, every
    // stage's arrays from the estimated patch count; refused here, before any extraction,
    // when the largest stage cannot fit.
    let plan = MemoryPlan::measure(opts, &extractor, &files, held_out.len())?;
    folder.keep();

    // Stage 1: patch features of every training image, with their coreset projections.
    let (store, sizes) = extract_features(opts, &extractor, &files, &plan)?;
    let t_features = t0.elapsed().as_secs_f64();
    memory::trim();

    // Stage 2: coreset.
    let t1 = Instant::now();
    let patches = store.len();
    let ratio = opts.shard.map_or(opts.sampling_ratio, |_| {
        Shard::kept_ratio(opts.sampling_ratio, opts.shard_oversample)
    });
    let (bank, shard_patches) = select_coreset(opts, ratio, store, &plan)?;
    let t_coreset = t1.elapsed().as_secs_f64();
    memory::trim();

    let training = TrainingSummary {
        folder: opts.input.display().to_string(),
        images: files.len(),
        patches,
        image_sizes: sizes.into_iter().map(|((w, h), n)| (w, h, n)).collect(),
    };
    let timings = TrainTimings {
        feature_extraction_s: t_features,
        coreset_s: t_coreset,
        ..Default::default()
    };
    // A partial model stays flat: merge reads its vectors back.
    let kind = match opts.shard {
        Some(_) => IndexKind::Flat,
        None => opts.index.resolve(bank.nrows()),
    };
    let mut info = model_info(opts, &extractor, training, timings);
    info.index = kind;

    // Stage 3: thresholds from the held-out images, scored against the finished bank (a
    // partial model records the held-out images for `merge` to score instead).
    let t2 = Instant::now();
    let index = bank::build(bank.view(), kind)?;
    drop(bank);
    memory::trim();
    let mut knn = Knn::with_choice(index, kind, plan.knn_choice(opts)?)?;
    match opts.shard {
        Some(shard) => {
            let patches = shard_patches.expect("a shard keeps its patches' projections");
            let patches_blake3 = Some(patches.write(&opts.output)?);
            info.format = bank::PARTIAL_FORMAT.to_string();
            info.partial = Some(partial(
                opts,
                shard,
                input_images,
                ratio,
                &held_out,
                patches_blake3,
            )?);
        }
        None => {
            let rule = opts.calibration_rule;
            info.calibration = calibrate(
                &extractor,
                &mut knn,
                &held_out,
                &info,
                rule,
                opts.batch_size,
                opts.quiet,
            )?;
        }
    }
    info.timings.calibration_s = t2.elapsed().as_secs_f64();

    // Stage 4: index and sidecar (and with --self-contained, first the weights file).
    write_outputs(opts, &mut knn, &mut info, t0)?;
    Ok(info)
}

/// Writes the model: with `--self-contained` first the weights file beside it, then the
/// index and the sidecar.
fn write_outputs(
    opts: &TrainOptions,
    knn: &mut Knn,
    info: &mut ModelInfo,
    t0: Instant,
) -> Result<()> {
    let t3 = Instant::now();
    if opts.self_contained {
        info.weights_file = weights::keep_beside(
            &opts.output,
            opts.arch,
            &opts.weights,
            &info.weights.sha256,
            opts.quiet,
        )?;
    }
    write_model(&opts.output, knn, info, t0, t3)
}

/// The backbone that makes the training features.
fn load_backbone(opts: &TrainOptions) -> Result<Extractor> {
    Ok(Extractor::new(&ExtractorOptions {
        arch: opts.arch,
        layers: &opts.layers,
        weights: &opts.weights,
        preprocess: opts.preprocess,
        tile: opts.tile,
        precision: opts.precision,
        batchnorm_probe: opts
            .batchnorm_probe
            .then(|| crate::features::extractor::probe_side(&opts.preprocess)),
        device: opts.device,
        quiet: opts.quiet,
    })?
    .with_dims(opts.dims))
}

/// What a partial model (`--shard`) records for `merge`: its share, its held-out images
/// (for `merge` to score) and its patches file's checksum.
fn partial(
    opts: &TrainOptions,
    shard: Shard,
    input_images: usize,
    kept_ratio: f64,
    held_out: &[ImageFile],
    patches_blake3: Option<String>,
) -> Result<bank::Partial> {
    Ok(bank::Partial {
        shard: shard.index,
        shards: shard.count,
        input_images,
        kept_ratio,
        calibration_ratio: opts.calibration_ratio,
        calibration_rule: opts.calibration_rule,
        // Absolute, for a merge run from another folder.
        held_out: held_out
            .iter()
            .map(|f| std::path::absolute(&f.path))
            .collect::<std::io::Result<_>>()?,
        patches_blake3,
    })
}

/// The images of `shard`, refused when it has none.
fn shard_files(shard: Shard, files: Vec<ImageFile>) -> Result<Vec<ImageFile>> {
    let total = files.len();
    let mine = shard.select(files);
    if mine.is_empty() {
        bail!(
            "shard {shard} has no image: the input holds {total} training images (besides the \
             held-out ones), fewer than {} shards",
            shard.count
        );
    }
    Ok(mine)
}

/// Refuses options no model can be trained with, before any work (also every member's of an
/// ensemble, before the first is trained).
pub fn check_options(opts: &TrainOptions) -> Result<()> {
    if !(opts.sampling_ratio > 0.0 && opts.sampling_ratio <= 1.0) {
        bail!(
            "--sampling-ratio must be in (0, 1], got {}",
            opts.sampling_ratio
        );
    }
    if opts.n_neighbors == 0 {
        bail!("--n-neighbors must be at least 1");
    }
    let d = opts.dims;
    if d.pretrain < 1 || !(1..=d.pretrain * opts.layers.len() as i64).contains(&d.target) {
        bail!(
            "--embed-dim {} and --target-dim {} do not fit: both at least 1, the target at most \
             the embedding dimension times the {} layers",
            d.pretrain,
            d.target,
            opts.layers.len()
        );
    }
    if opts.score_reweighting == Some(0) {
        bail!("--score-reweighting needs at least 1 neighbour");
    }
    if let Some(t) = opts.tile {
        if t < 32 {
            bail!("--tile must be at least 32 pixels, got {t}");
        }
        if opts.preprocess.crop.is_some() {
            bail!("--tile and --crop cannot be combined: tiles are scored whole");
        }
    }
    if !(0.0..1.0).contains(&opts.calibration_ratio) {
        bail!(
            "--calibration-ratio must be in [0, 1), got {}",
            opts.calibration_ratio
        );
    }
    Ok(())
}

/// The disk space the memory bank of `images` training images will take, estimated low
/// (so that no run that fits is refused): a square input of the crop (else resize) side,
/// its patch grid at the first feature layer's stride ([`crate::features::backbone::Arch::stride_at_most`]),
/// one tile per image, times the kept ratio, the bank's dimension and 4 bytes per float.
pub fn bank_space(opts: &TrainOptions, images: usize) -> fsutil::SpaceNeed {
    let side = opts.preprocess.crop.unwrap_or(opts.preprocess.resize) as u64;
    let first = opts.layers.iter().copied().min().unwrap_or(4);
    let stride = opts.arch.stride_at_most(first);
    let grid = (side / stride).max(1);
    let ratio = opts.shard.map_or(opts.sampling_ratio, |_| {
        Shard::kept_ratio(opts.sampling_ratio, opts.shard_oversample)
    });
    let dim = opts.dims.target.max(1) as u64;
    let kept = ((images as u64 * grid * grid) as f64 * ratio).floor() as u64;
    fsutil::SpaceNeed {
        bytes: kept * dim * 4,
        what: format!(
            "the memory bank ({images} images x {} patches x ratio {ratio} x {dim} dims x 4 \
             bytes, at least)",
            grid * grid
        ),
    }
}

/// Finds the training images: the bank's and the held-out ones.
fn read_inputs(opts: &TrainOptions) -> Result<(Vec<ImageFile>, Vec<ImageFile>)> {
    let found = match opts.images.is_empty() {
        true => images::find_images(&opts.input)?,
        false => images::find_inputs(&opts.images)?,
    };
    for s in found.skipped.iter().filter(|_| !opts.quiet) {
        log::info(&format!("skipping {} (not an image file)", s.display()));
    }
    let (files, held_out) = split_calibration(found.images, opts.calibration_ratio, opts.seed);
    if held_out.is_empty() && opts.calibration_ratio > 0.0 && !opts.quiet {
        log::info(&format!(
            "only {} images: none held out to calibrate a threshold (needs at least {}); \
             predict will give scores without verdicts unless given --threshold",
            files.len(),
            2 * calibration::MIN_IMAGES
        ));
    }
    Ok((files, held_out))
}

/// Images per original `(width, height)`.
type SizeCounts = BTreeMap<(u32, u32), usize>;

/// The patch features of `files` in the feature store (within `--max-memory`), with the
/// number of images of each original size.
fn extract_features(
    opts: &TrainOptions,
    extractor: &Extractor,
    files: &[ImageFile],
    plan: &MemoryPlan,
) -> Result<(FeatureStore, SizeCounts)> {
    let dim = opts.dims.target as usize;
    let projection = (opts.sampling_ratio < 1.0)
        .then(|| coreset::projection(dim, coreset::PROJECTION_DIM, opts.seed));
    // Features beyond the memory budget go to a hidden temporary file beside the model
    // (`.MODEL.features.tmp-PID-XXXXXX`); a killed run's is removed here.
    let mut features = opts.output.as_os_str().to_owned();
    features.push(".features");
    let features = PathBuf::from(features);
    fsutil::remove_stale_temps(&features);
    let mut store = FeatureStore::new(dim, opts.max_memory, projection, &features)
        .with_reserve(plan.reserve(), plan.footprint.runtime);
    let bar = progress::items(files.len() as u64, "extracting features", opts.quiet);
    let mut sizes = SizeCounts::new();
    let mut batches = 0usize;
    extractor.extract(files, opts.batch_size, |batch| {
        crate::util::interrupt::check()?;
        batches += 1;
        pause_for_tests(batches);
        for e in batch {
            if store.is_empty() {
                // Room for every image's projections, assuming they are like the first.
                store.reserve(e.features.nrows() * e.tile.count * files.len());
            }
            store.push(e.features.view())?;
            if e.tile.is_last() {
                *sizes.entry(e.original.dimensions()).or_default() += 1;
                bar.inc(1);
            }
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    if store.spilled() && std::env::var_os(feature_store::RAM_FEATURES_ENV).is_some() {
        log::info(&format!(
            "features on disk ({})",
            feature_store::RAM_FEATURES_ENV
        ));
    }
    if store.over_budget() && !opts.quiet {
        log::info(&format!(
            "the features of {} patches exceed --max-memory {:.1} GiB: kept on disk beside the model",
            store.len(),
            feature_store::gib(opts.max_memory)
        ));
    }
    Ok((store, sizes))
}

/// The memory bank: the coreset's patches (every patch at `--sampling-ratio 1`), read out of
/// the store, which is dropped (its spill file removed) before the bank is used; for a shard,
/// also what merge needs of every patch (`ShardPatches`).
fn select_coreset(
    opts: &TrainOptions,
    ratio: f64,
    mut store: FeatureStore,
    plan: &MemoryPlan,
) -> Result<(Array2<f32>, Option<ShardPatches>)> {
    let patches = store.len();
    let keep = coreset::coreset_size(patches, ratio);
    if keep == 0 {
        bail!(
            "--sampling-ratio {} keeps no patch out of {patches}: use a larger ratio or more images",
            opts.sampling_ratio,
        );
    }
    // A shard keeps its projections for the merge; a complete model gives them to the greedy
    // search, which frees them (half its peak memory on large inputs).
    let mut projected = Some(store.take_projected());
    let picked: Vec<usize> = if ratio >= 1.0 {
        (0..patches).collect()
    } else {
        let all = projected.as_ref().expect("taken above");
        dump_projections(all.view())?;
        let points: CowArray<f32, Ix2> = match opts.shard {
            Some(_) => all.view().into(),
            None => projected.take().expect("taken above").into(),
        };
        let bar = progress::items(keep as u64, "selecting coreset", opts.quiet);
        let picked = coreset::greedy_select_with_progress(points, keep, opts.seed, &|_| {
            bar.inc(1);
            !crate::util::interrupt::requested()
        });
        bar.finish_and_clear();
        crate::util::interrupt::check()?;
        picked
    };
    memory::trim();
    // The patch count was estimated from the first image: the bank of the real one, beside
    // FAISS's copy (and a shard's projections), checked again.
    let bank_bytes = (picked.len() * opts.dims.target as usize * 4) as u64;
    let kept_projections = match (opts.shard, &projected) {
        (Some(_), Some(p)) => {
            (p.len() * 4 + p.nrows() * 8) as u64 + 2 * picked.len() as u64 * PROJECTION_BYTES
        }
        _ => 0,
    };
    if 2 * bank_bytes + kept_projections + plan.footprint.runtime > opts.max_memory {
        let remedy = match opts.shard {
            // A shard's bank holds its candidates: every patch by default.
            Some(_) => {
                "use more shards, keep fewer candidates (--shard-oversample) or raise --max-memory"
            }
            None => "lower --sampling-ratio or raise --max-memory",
        };
        bail!(
            "the memory bank of {} patches needs {:.1} GiB, more than --max-memory {:.1} GiB \
             allows: {remedy}",
            picked.len(),
            feature_store::gib(bank_bytes),
            feature_store::gib(opts.max_memory)
        );
    }
    let shard_patches = match (opts.shard, projected) {
        (Some(_), Some(projected)) => Some(ShardPatches::new(projected, &picked)?),
        _ => None,
    };
    Ok((store.gather(&picked)?, shard_patches))
}

/// Debugging aid for coreset benchmarks (examples/coreset_scaling.rs): with
/// `PATCHCORE_DUMP_PROJECTIONS=FILE.npy`, writes the 128-d projections the greedy search runs
/// on, so it can be timed again without extracting features.
fn dump_projections(projected: ArrayView2<f32>) -> Result<()> {
    if let Some(path) = std::env::var_os(DUMP_PROJECTIONS) {
        let path = PathBuf::from(path);
        ndarray_npy::write_npy(&path, &projected)
            .with_context(|| format!("cannot write projections {}", path.display()))?;
        log::info(&format!("projections written to {}", path.display()));
    }
    Ok(())
}

/// Environment variable naming the file `dump_projections` writes.
pub const DUMP_PROJECTIONS: &str = "PATCHCORE_DUMP_PROJECTIONS";

/// Test-only hook (tests/interrupt.rs, tests/model_integrity.rs), unset in normal use: set to
/// a file path, training appends a line to that file for every batch of features it keeps
/// and, after the first, waits (at most 5 minutes) until Ctrl-C is requested. The tests then
/// signal or kill a run known to be mid-extraction, with the old model in place, instead of
/// sleeping for a guessed share of a run's time (which other tests' load stretches); the
/// lines say how many batches were kept, so a stop later than the next batch shows.
pub const PAUSE_FOR_TESTS: &str = "PATCHCORE_TEST_PAUSE_TRAIN";

/// See [`PAUSE_FOR_TESTS`]; `batches` counts the batches kept so far, this one included.
fn pause_for_tests(batches: usize) {
    let Some(path) = std::env::var_os(PAUSE_FOR_TESTS) else {
        return;
    };
    use std::io::Write;
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "batch {batches}"));
    if appended.is_err() || batches != 1 {
        return;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !crate::util::interrupt::requested() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The held-out images' thresholds by `rule` (none without held-out images), scored against
/// the bank in `knn` as predict scores with the model `info` (its k and re-weighting). Also
/// `merge`'s calibration of the merged bank.
pub fn calibrate(
    extractor: &Extractor,
    knn: &mut Knn,
    held_out: &[ImageFile],
    info: &ModelInfo,
    rule: crate::util::records::Rule,
    batch_size: usize,
    quiet: bool,
) -> Result<Option<Calibration>> {
    if held_out.is_empty() {
        return Ok(None);
    }
    let scores = calibration::score_images(
        extractor,
        knn,
        held_out,
        info.n_neighbors,
        info.score_reweighting,
        batch_size,
        quiet,
    )?;
    Ok(Some(Calibration::from_scores(scores, rule)))
}

/// The sidecar's record of the model, the bank's size and checksum left for the write.
fn model_info(
    opts: &TrainOptions,
    extractor: &Extractor,
    training: TrainingSummary,
    timings: TrainTimings,
) -> ModelInfo {
    ModelInfo {
        format: bank::FORMAT.to_string(),
        format_version: bank::FORMAT_VERSION,
        program_version: env!("CARGO_PKG_VERSION").to_string(),
        backbone: opts.arch.name().to_string(),
        layers: opts
            .layers
            .iter()
            .map(|&l| opts.arch.layer_name(l))
            .collect(),
        layer_channels: extractor.layer_channels.clone(),
        weights: extractor.weights.clone(),
        weights_file: None,
        preprocess: opts.preprocess,
        tile: opts.tile,
        normalize_mean: IMAGENET_MEAN,
        normalize_std: IMAGENET_STD,
        patch_size: PATCH_SIZE,
        pretrain_embed_dim: opts.dims.pretrain,
        feature_dim: opts.dims.target,
        n_neighbors: opts.n_neighbors,
        precision: opts.precision,
        index: bank::IndexKind::Flat,
        batchnorm_probe: opts
            .batchnorm_probe
            .then(|| crate::features::extractor::probe_side(&opts.preprocess)),
        score_reweighting: opts.score_reweighting,
        sampling_ratio: opts.sampling_ratio,
        seed: opts.seed,
        bank_size: 0,
        index_sha256: String::new(),
        index_blake3: None,
        training,
        calibration: None,
        timings,
        partial: None,
        knn_projection: None,
    }
}

/// Writes the index `output` and its sidecar, then the calibration figure. `t0` started the
/// run (training or merge), `t3` this step.
pub fn write_model(
    output: &Path,
    knn: &mut Knn,
    info: &mut ModelInfo,
    t0: Instant,
    t3: Instant,
) -> Result<()> {
    // A complete flat model keeps its kNN projection (partial ones are only merged).
    if info.partial.is_none() {
        info.knn_projection = knn.projection()?.map(|p| p.to_stored());
    }
    // The write time is known only after writing; it is recorded as the time to build and
    // write the index, and the sidecar is written last with it.
    bank::write(output, knn.index(), info)?;
    info.timings.index_write_s = t3.elapsed().as_secs_f64();
    info.timings.total_s = t0.elapsed().as_secs_f64();
    bank::write_info(output, info)?;
    plots::write_calibration_svg(output, info.calibration.as_ref())?;
    Ok(())
}

/// Splits the training images into the bank's and the calibration's: a seeded random choice
/// of `calibration::held_out_count` images, both lists keeping the folder order.
fn split_calibration(
    files: Vec<ImageFile>,
    ratio: f64,
    seed: u64,
) -> (Vec<ImageFile>, Vec<ImageFile>) {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let k = calibration::held_out_count(files.len(), ratio);
    let mut order: Vec<usize> = (0..files.len()).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xca11_b4a7e);
    order.shuffle(&mut rng);
    let mut held = vec![false; files.len()];
    for &i in &order[..k] {
        held[i] = true;
    }
    let (mut bank, mut cal) = (Vec::new(), Vec::new());
    for (f, h) in files.into_iter().zip(held) {
        if h {
            cal.push(f)
        } else {
            bank.push(f)
        }
    }
    (bank, cal)
}

/// The end-of-run message of `train` (plain text, or a JSON line with every figure).
pub fn log_summary(info: &ModelInfo, output: &Path) {
    let t = &info.timings;
    let threshold = match &info.partial {
        Some(p) => format!(
            "partial model of shard {}/{} ({} held-out images recorded for `patchcore merge`)",
            p.shard,
            p.shards,
            p.held_out.len()
        ),
        None => info
            .calibration
            .as_ref()
            .map_or("no calibrated threshold".to_string(), |c| {
                format!(
                    "threshold {} from {} held-out images{} (good images like them \
                     exceed it at most {:.1}% of the time; plotted in {})",
                    c.image_threshold,
                    c.images,
                    c.highest()
                        .map_or(String::new(), |h| format!(", the highest {h}")),
                    100.0 * c.false_alarm_bound,
                    plots::calibration_svg_path(output).display()
                )
            }),
    };
    let msg = format!(
        "trained on {} images: {} of {} patches kept in {}, {threshold} \
         (features {:.1} s, coreset {:.1} s, calibration {:.1} s, index {:.1} s, total {:.1} s)",
        info.training.images,
        info.bank_size,
        info.training.patches,
        output.display(),
        t.feature_extraction_s,
        t.coreset_s,
        t.calibration_s,
        t.index_write_s,
        t.total_s
    );
    if let Some(w) = info.calibration.as_ref().and_then(|c| c.loose_warning()) {
        log::warn(&w);
    }
    log::emit(
        Level::Info,
        &msg,
        serde_json::json!({
            "event": "trained",
            "model": output.display().to_string(),
            "images": info.training.images,
            "bank_size": info.bank_size,
            "calibration": info.calibration,
            "calibration_plot": info.calibration.as_ref()
                .map(|_| plots::calibration_svg_path(output)),
            "timings": info.timings,
        }),
    );
}
