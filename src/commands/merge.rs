//! `patchcore merge`: partial models in (the shards of one `train --shard I/N` run, or the
//! partial model of new good images with an existing model as `--base`), one complete model
//! out, as `train` writes it.
//!
//! The merge runs train's greedy selection (`coreset::greedy_select_with_progress`, the same
//! projection and seed) over every training patch the parts stood for, in folder order (the
//! base's bank first), from the projections the shards recorded (`shard::ShardPatches`). A
//! selected patch that its shard did not keep as a candidate is stood in for by the candidate
//! nearest to it; the selection goes on until the training ratio of all the patches is
//! reached in distinct candidates. The merged bank is then calibrated on the held-out images
//! the shards recorded, exactly as `train` calibrates, and written. Deterministic: the same
//! parts give the same files; with every patch a candidate, the unsharded training's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use ndarray::{Array2, Axis};
use tch::Device;

use crate::commands::train;
use crate::features::images::ImageFile;
use crate::features::weights::{self, WeightsSpec};
use crate::model::bank::{self, ModelInfo, TrainTimings, TrainingSummary};
use crate::model::knn::Knn;
use crate::model::single;
use crate::training::coreset;
use crate::training::memory;
use crate::training::shard::ShardPatches;
use crate::util::log;
use crate::util::progress;

pub struct MergeOptions {
    /// The partial models (index paths), in any order.
    pub parts: Vec<PathBuf>,
    /// A complete model whose bank joins the parts' (a model update).
    pub base: Option<PathBuf>,
    pub output: PathBuf,
    /// Where the backbone weights are, if not where the parts recorded them.
    pub weights: Option<WeightsSpec>,
    pub batch_size: usize,
    /// Memory budget in bytes, a hard limit (refused up front when the merge cannot fit).
    pub max_memory: u64,
    pub device: Device,
    pub quiet: bool,
}

/// One input of the merge: its index path and sidecar.
struct Input {
    index: PathBuf,
    info: ModelInfo,
}

/// What a merge wrote: the model's sidecar, and with `--base` the base's calibration (the
/// thresholds it had before).
pub struct Merged {
    pub info: ModelInfo,
    pub previous: Option<crate::util::records::Calibration>,
}

/// Merges the parts into a complete model; returns its sidecar and the base's calibration.
pub fn run(opts: &MergeOptions) -> Result<Merged> {
    let t0 = Instant::now();
    // Cheap checks first: every sidecar, before any bank is read.
    let base = match &opts.base {
        Some(index) => Some(Input {
            index: index.clone(),
            info: bank::read_info(index)?,
        }),
        None => None,
    };
    let parts = read_parts(&opts.parts)?;
    if let Some(b) = &base {
        check_agree(&parts[0], b, &model_fields)?;
    }
    let first = &parts[0].info;
    let partial = first.partial.clone().expect("checked partial");
    let held_out = held_out_images(&partial, &parts[0].index)?;
    // Before the coreset and the backbone: the model's folder takes a file and has room for
    // the merged bank.
    let space = bank_space(base.as_ref(), &parts);
    let _folder = crate::util::fsutil::OutputFolder::prepare(
        crate::util::fsutil::folder(&opts.output),
        Some(&space),
    )?;

    // The backbone first (it scores the held-out images at the end), so that what it holds
    // is measured before the memory plan is checked, before any projection is read.
    let inputs: Vec<&Input> = base.iter().chain(&parts).collect();
    let patches: usize = inputs.iter().map(|p| p.info.training.patches).sum();
    let extractor = match held_out.is_empty() {
        true => None,
        false => Some(single::extractor_for(
            &parts[0].index,
            first,
            opts.weights.as_ref(),
            opts.device,
            opts.quiet,
        )?),
    };
    let shortlist = check_memory(opts, &inputs, patches, extractor.as_ref())?;

    // Every training patch the inputs stand for, selected as one training would select them.
    let t1 = Instant::now();
    let selection = select(&inputs, patches, opts.quiet)?;
    if selection.stood_in > 0 && !opts.quiet {
        log::info(&format!(
            "{} of the {} selected patches were not kept by their shard (--shard-oversample) \
             and are stood in for by the nearest kept patch",
            selection.stood_in, selection.selected
        ));
    }
    memory::trim();
    let bank = gather(&inputs, &selection.chosen)?;
    let t_coreset = t1.elapsed().as_secs_f64();

    let mut info = merged_info(base.as_ref(), &parts, patches);
    info.timings.coreset_s = t_coreset;
    let t2 = Instant::now();
    let index = bank::build(bank.view(), info.index)?;
    drop(bank);
    memory::trim();
    let mut choice = crate::model::knn::Choice::from_env()?;
    if !shortlist && !choice.forced {
        choice.cpu_flags.clear();
    }
    let mut knn = Knn::with_choice(index, info.index, choice)?;
    // A model update keeps the base's rule and coefficient (`calibrate --rule` changes them);
    // without a calibrated base, the rule the parts were trained with.
    let previous = base.as_ref().and_then(|b| b.info.calibration.clone());
    let rule = previous
        .as_ref()
        .map_or(partial.calibration_rule, |c| c.method);
    if let Some(extractor) = &extractor {
        info.calibration = train::calibrate(
            extractor,
            &mut knn,
            &held_out,
            &info,
            rule,
            opts.batch_size,
            opts.quiet,
        )?;
    } else {
        // Every new image is in the bank (`train --partial` holds none out unless told):
        // the base's thresholds stay, as the summary says.
        info.calibration = previous.clone();
    }
    info.timings.calibration_s = t2.elapsed().as_secs_f64();
    info.weights_file = kept_weights(opts, &inputs, &info)?;
    train::write_model(&opts.output, &mut knn, &mut info, t0, Instant::now())?;
    Ok(Merged { info, previous })
}

/// The held-out images recorded by the partial model `index` (`partial`), refused when one
/// cannot be read.
fn held_out_images(partial: &bank::Partial, index: &Path) -> Result<Vec<ImageFile>> {
    partial
        .held_out
        .iter()
        .map(|path| {
            if !path.is_file() {
                bail!(
                    "held-out image {} recorded by {} cannot be read: merge scores the held-out \
                     images where the shards found them",
                    path.display(),
                    bank::sidecar_path(index).display()
                );
            }
            Ok(ImageFile {
                path: path.clone(),
                relative: path.file_name().map(PathBuf::from).unwrap_or_default(),
            })
        })
        .collect()
}

/// The room the merged bank needs: every input's patches x the sampling ratio x dims x 4
/// bytes.
fn bank_space(base: Option<&Input>, parts: &[Input]) -> crate::util::fsutil::SpaceNeed {
    let first = &parts[0].info;
    let patches: usize = base
        .into_iter()
        .chain(parts)
        .map(|p| p.info.training.patches)
        .sum();
    let kept = (patches as f64 * first.sampling_ratio).floor() as u64;
    let dim = first.feature_dim.max(1) as u64;
    crate::util::fsutil::SpaceNeed {
        bytes: kept * dim * 4,
        what: format!(
            "the memory bank ({patches} patches x ratio {} x {dim} dims x 4 bytes)",
            first.sampling_ratio
        ),
    }
}

/// Checks `--max-memory` before any projection is read: the runtime (and the backbone with a
/// batch's activations, measured, when the held-out images are to be scored), the projections
/// of every patch and the coreset's copy of them, the merged bank beside FAISS's copy, and the
/// calibration's kNN search. Returns whether that search may build its bf16 shortlist.
fn check_memory(
    opts: &MergeOptions,
    inputs: &[&Input],
    patches: usize,
    extractor: Option<&crate::features::extractor::Extractor>,
) -> Result<bool> {
    let first = &inputs[0].info;
    let footprint = match extractor {
        Some(e) => {
            let side = first.preprocess.crop.unwrap_or(first.preprocess.resize);
            memory::probe(e, (side, side))?
        }
        None => {
            memory::trim();
            memory::Footprint {
                runtime: memory::resident(),
                per_image: 0,
                patches_per_input: 0,
            }
        }
    };
    let batch = footprint.per_image * opts.batch_size.max(1) as u64;
    // Rows of projections: every patch of a part, a base's bank.
    let row_count = |i: &Input| match i.info.partial {
        Some(_) => i.info.training.patches,
        None => i.info.bank_size,
    };
    let rows: usize = inputs.iter().map(|i| row_count(i)).sum();
    let largest = inputs.iter().map(|i| row_count(i)).max().unwrap_or(0);
    let candidates: usize = inputs.iter().map(|i| i.info.bank_size).sum();
    let keep = coreset::coreset_size(patches, first.sampling_ratio).min(candidates);
    let d = first.feature_dim.max(1) as u64;
    let one = if first.sampling_ratio < 1.0 {
        coreset::PROJECTION_DIM as u64 * 4
    } else {
        0
    };
    let bank = keep as u64 * d * 4;
    let n = rows as u64;
    let projections = format!("the 128-d projections of {} patches", memory::count(rows));
    let merged = format!("the merged bank of {} patches", memory::count(keep));
    let stages = |shortlist: bool| {
        let mut stages = vec![
            memory::Stage {
                name: "coreset selection",
                items: vec![
                    (projections.clone(), n * one),
                    ("the coreset's copy of them".into(), n * one),
                    (
                        "one part's projections as read".into(),
                        largest as u64 * one,
                    ),
                    (
                        "the coreset's working arrays and each patch's candidate".into(),
                        n * 24 + keep as u64 * (one + 64) + candidates as u64 * 5,
                    ),
                ],
            },
            memory::Stage {
                name: "memory bank",
                items: vec![(merged.clone(), bank), ("FAISS's copy of it".into(), bank)],
            },
        ];
        if extractor.is_some() {
            let (kept, fitting) = train::plan::knn_search_bytes(keep as u64, d, shortlist);
            stages.push(memory::Stage {
                name: "calibration",
                items: vec![
                    (merged.clone(), bank),
                    ("the kNN search's structures".into(), kept),
                    (
                        "a batch's activations or the kNN search's PCA sample".into(),
                        batch.max(fitting),
                    ),
                    (
                        "a batch's features, their queries and search".into(),
                        train::plan::scoring_bytes(footprint, opts.batch_size, d),
                    ),
                ],
            });
        }
        stages
    };
    let fits = |s: bool| memory::check(opts.max_memory, footprint.runtime, &stages(s), "").is_ok();
    let shortlist = fits(true) || !fits(false);
    memory::check(
        opts.max_memory,
        footprint.runtime,
        &stages(shortlist),
        " (a merge holds the projections of every shard's patches at once)",
    )?;
    Ok(shortlist)
}

/// The merged model's weights file: when an input is self-contained (`weights_file`), its
/// weights (or `--weights`) copied beside the output unless there already, so the merged
/// model is self-contained too.
fn kept_weights(
    opts: &MergeOptions,
    inputs: &[&Input],
    info: &ModelInfo,
) -> Result<Option<String>> {
    let Some(input) = inputs.iter().find(|i| i.info.weights_file.is_some()) else {
        return Ok(None);
    };
    let spec = single::model_weights(&input.index, &input.info, opts.weights.as_ref())?;
    let arch = crate::features::backbone::Arch::parse(&info.backbone)?;
    weights::keep_beside(&opts.output, arch, &spec, &info.weights.sha256, opts.quiet)
}

/// The partial models' sidecars, in shard order, checked to be every shard of one sharded
/// training exactly once and to agree on everything the merged model records.
fn read_parts(paths: &[PathBuf]) -> Result<Vec<Input>> {
    if paths.is_empty() {
        bail!("no partial model given: merge needs the parts written by `patchcore train --shard I/N` or `--partial`");
    }
    let mut parts = paths
        .iter()
        .map(|p| {
            Ok(Input {
                index: p.clone(),
                info: bank::read_info_as(p, bank::PARTIAL_FORMAT)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    for p in &parts[1..] {
        check_agree(&parts[0], p, &partial_fields)?;
    }
    parts.sort_by_key(|p| shard_of(&p.info).0);
    let count = shard_of(&parts[0].info).1;
    for pair in parts.windows(2) {
        if shard_of(&pair[0].info) == shard_of(&pair[1].info) {
            bail!(
                "partial models {} and {} are both shard {}/{count}: give each shard once",
                pair[0].index.display(),
                pair[1].index.display(),
                shard_of(&pair[0].info).0
            );
        }
    }
    let present: Vec<usize> = parts.iter().map(|p| shard_of(&p.info).0).collect();
    if let Some(missing) = (0..count).find(|i| !present.contains(i)) {
        bail!(
            "shard {missing}/{count} is missing (given: {}): merge needs every shard of the \
             sharded training",
            present
                .iter()
                .map(|i| format!("{i}/{count}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(parts)
}

/// `(shard, shards)` of a partial model.
fn shard_of(info: &ModelInfo) -> (usize, usize) {
    info.partial
        .as_ref()
        .map_or((0, 1), |p| (p.shard, p.shards))
}

/// Refuses `other` when one of `fields` of its sidecar differs from `first`'s, naming its
/// sidecar, the field and both values.
fn check_agree(
    first: &Input,
    other: &Input,
    fields: &dyn Fn(&ModelInfo) -> Vec<(&'static str, serde_json::Value)>,
) -> Result<()> {
    for ((name, a), (_, b)) in fields(&first.info).into_iter().zip(fields(&other.info)) {
        if a != b {
            bail!(
                "{} disagrees with {} on {name} ({b} instead of {a}): the parts must come from \
                 the same training options",
                bank::sidecar_path(&other.index).display(),
                bank::sidecar_path(&first.index).display()
            );
        }
    }
    Ok(())
}

/// The fields that must agree between a base model and the parts: everything that makes
/// the features, scores them or sizes the bank.
fn model_fields(i: &ModelInfo) -> Vec<(&'static str, serde_json::Value)> {
    use serde_json::json;
    vec![
        ("backbone", json!(i.backbone)),
        ("layers", json!(i.layers)),
        ("layer_channels", json!(i.layer_channels)),
        ("weights (sha256)", json!(i.weights.sha256)),
        ("preprocess", json!(i.preprocess)),
        ("tile", json!(i.tile)),
        ("normalize_mean", json!(i.normalize_mean)),
        ("normalize_std", json!(i.normalize_std)),
        ("patch_size", json!(i.patch_size)),
        ("pretrain_embed_dim", json!(i.pretrain_embed_dim)),
        ("feature_dim", json!(i.feature_dim)),
        ("n_neighbors", json!(i.n_neighbors)),
        ("precision", json!(i.precision)),
        ("batchnorm_probe", json!(i.batchnorm_probe)),
        ("score_reweighting", json!(i.score_reweighting)),
        ("sampling_ratio", json!(i.sampling_ratio)),
        ("seed", json!(i.seed)),
    ]
}

/// The fields that must agree between the parts: the model's, and those of the sharded
/// training they belong to (shard count, input, held-out images, calibration rule).
fn partial_fields(i: &ModelInfo) -> Vec<(&'static str, serde_json::Value)> {
    use serde_json::json;
    let p = i.partial.as_ref();
    let mut fields = model_fields(i);
    fields.extend([
        ("the shard count", json!(p.map(|p| p.shards))),
        ("the input folder", json!(i.training.folder)),
        ("the input's image count", json!(p.map(|p| p.input_images))),
        ("the shards' kept ratio", json!(p.map(|p| p.kept_ratio))),
        ("calibration_ratio", json!(p.map(|p| p.calibration_ratio))),
        ("calibration_rule", json!(p.map(|p| p.calibration_rule))),
        ("the held-out images", json!(p.map(|p| &p.held_out))),
    ]);
    fields
}

/// The patches of every input, one after the other (the base's, then the shards' in order:
/// folder order for a sharded training): their projections and the candidate standing for
/// each, numbered across the inputs' banks.
struct Pool {
    projected: Array2<f32>,
    nearest: Vec<u32>,
    /// The patch (numbered across the inputs) each candidate holds.
    kept: Vec<u32>,
}

fn read_pool(inputs: &[&Input]) -> Result<Pool> {
    let first = &inputs[0].info;
    let project = first.sampling_ratio < 1.0;
    let cols = if project { coreset::PROJECTION_DIM } else { 0 };
    // Room for every shard's patches (a base model adds fewer rows: its bank).
    let rows: usize = inputs.iter().map(|p| p.info.training.patches).sum();
    let mut projected = Array2::<f32>::zeros((0, cols));
    projected.reserve_rows(rows)?;
    let (mut nearest, mut kept) = (Vec::with_capacity(rows), Vec::new());
    let (mut offset, mut first_patch) = (0usize, 0usize);
    for input in inputs {
        let patches = match &input.info.partial {
            Some(partial) => {
                let blake3 = partial.patches_blake3.as_deref().ok_or_else(|| {
                    anyhow!(
                        "partial model {} was written by an older patchcore, without the \
                         projections of its patches that merge needs: train the shard again",
                        input.index.display()
                    )
                })?;
                ShardPatches::read(
                    &input.index,
                    blake3,
                    input.info.training.patches,
                    input.info.bank_size,
                )?
            }
            // A complete model (`--base`): its bank, every vector its own candidate.
            None => ShardPatches::of_bank(read_vectors(input)?.view(), first.seed, project),
        };
        if patches.projected.ncols() != cols {
            bail!(
                "{} holds {}-d patch projections where merge expects {cols}",
                ShardPatches::path(&input.index).display(),
                patches.projected.ncols()
            );
        }
        projected.append(Axis(0), patches.projected.view())?;
        nearest.extend(
            patches
                .nearest
                .iter()
                .map(|&row| (offset + row as usize) as u32),
        );
        kept.extend(
            patches
                .kept
                .iter()
                .map(|&p| (first_patch + p as usize) as u32),
        );
        offset += input.info.bank_size;
        first_patch += patches.nearest.len();
    }
    Ok(Pool {
        projected,
        nearest,
        kept,
    })
}

/// The merged bank's candidates (numbered as in `Pool`), in the order they are chosen: train's
/// greedy selection over every patch, each selected patch stood in for by its nearest
/// candidate, until the training ratio of all the patches is reached in distinct candidates.
/// When every patch is a candidate, these are exactly the unsharded training's selections.
fn select(inputs: &[&Input], patches: usize, quiet: bool) -> Result<Selection> {
    let first = &inputs[0].info;
    let pool = read_pool(inputs)?;
    // Every candidate stands for itself (`ShardPatches::read` checks it), so the selection
    // reaches `keep` distinct ones.
    let candidates = pool.kept.len();
    let keep = coreset::coreset_size(patches, first.sampling_ratio).min(candidates);
    if keep == candidates {
        return Ok(Selection {
            chosen: (0..candidates as u32).collect(),
            ..Default::default()
        });
    }
    let bar = progress::items(keep as u64, "selecting coreset", quiet);
    let state = std::sync::Mutex::new((vec![false; candidates], Selection::default()));
    let Pool {
        projected,
        nearest,
        kept,
    } = pool;
    let rows = projected.nrows();
    coreset::greedy_select_with_progress(projected, rows, first.seed, &|patch| {
        let (taken, sel) = &mut *state.lock().expect("not poisoned");
        let c = nearest[patch];
        sel.selected += 1;
        sel.stood_in += usize::from(kept[c as usize] as usize != patch);
        if !std::mem::replace(&mut taken[c as usize], true) {
            sel.chosen.push(c);
            bar.inc(1);
        }
        sel.chosen.len() < keep && !crate::util::interrupt::requested()
    });
    bar.finish_and_clear();
    crate::util::interrupt::check()?;
    Ok(state.into_inner().expect("not poisoned").1)
}

/// What `select` chose, and how.
#[derive(Default)]
struct Selection {
    /// The bank's candidates, in the order chosen.
    chosen: Vec<u32>,
    /// Patches the greedy search selected (0 when it kept every candidate without one).
    selected: usize,
    /// Of those, the ones their shard had not kept, stood in for by their nearest candidate.
    stood_in: usize,
}

/// The full features of the chosen candidates, in the order given, read from the inputs'
/// indexes one input at a time.
fn gather(inputs: &[&Input], chosen: &[u32]) -> Result<Array2<f32>> {
    let dim = inputs[0].info.feature_dim as usize;
    let mut bank = Array2::<f32>::zeros((chosen.len(), dim));
    let mut start = 0usize;
    for input in inputs {
        let end = start + input.info.bank_size;
        let wanted: Vec<(usize, usize)> = chosen
            .iter()
            .enumerate()
            .filter(|(_, &c)| (start..end).contains(&(c as usize)))
            .map(|(at, &c)| (at, c as usize - start))
            .collect();
        if !wanted.is_empty() {
            let index = bank::read_index(&input.index, &input.info)?;
            for (at, row) in wanted {
                let out = bank.row_mut(at).into_slice().expect("standard layout");
                faiss::Index::reconstruct(&index, faiss::Idx::new(row as u64), out).map_err(
                    |e| anyhow!("cannot read the vectors of {}: {e}", input.index.display()),
                )?;
            }
        }
        start = end;
    }
    Ok(bank)
}

/// A complete model's bank vectors, as `[M, D]`.
fn read_vectors(input: &Input) -> Result<Array2<f32>> {
    let (m, dim) = (input.info.bank_size, input.info.feature_dim as usize);
    let index = bank::read_index(&input.index, &input.info)?;
    let mut vectors = vec![0f32; m * dim];
    faiss::Index::reconstruct_n(&index, faiss::Idx::new(0), m, &mut vectors)
        .map_err(|e| anyhow!("cannot read the vectors of {}: {e}", input.index.display()))?;
    Ok(Array2::from_shape_vec((m, dim), vectors)?)
}

/// The merged model's sidecar before its bank is written: the parts' options, a complete
/// model's format, and the training summed over base and parts. Timings: the parts'
/// feature extraction summed (the base's included), the merge's own coreset, calibration
/// and write.
fn merged_info(base: Option<&Input>, parts: &[Input], patches: usize) -> ModelInfo {
    let all: Vec<&ModelInfo> = base.into_iter().chain(parts).map(|p| &p.info).collect();
    let mut sizes: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    for i in &all {
        for &(w, h, n) in &i.training.image_sizes {
            *sizes.entry((w, h)).or_default() += n;
        }
    }
    let mut folders: Vec<&str> = Vec::new();
    for i in &all {
        if !folders.contains(&i.training.folder.as_str()) {
            folders.push(&i.training.folder);
        }
    }
    ModelInfo {
        format: bank::FORMAT.to_string(),
        program_version: env!("CARGO_PKG_VERSION").to_string(),
        training: TrainingSummary {
            folder: folders.join(" + "),
            images: all.iter().map(|i| i.training.images).sum(),
            patches,
            image_sizes: sizes.into_iter().map(|((w, h), n)| (w, h, n)).collect(),
        },
        timings: TrainTimings {
            feature_extraction_s: all.iter().map(|i| i.timings.feature_extraction_s).sum(),
            ..Default::default()
        },
        calibration: None,
        partial: None,
        knn_projection: None,
        bank_size: 0,
        index_sha256: String::new(),
        index_blake3: None,
        ..parts[0].info.clone()
    }
}

/// The end-of-run message of `merge`: what was merged, and where the thresholds come from.
/// With a base, its thresholds old -> new (as `calibrate` says them) when the new images held
/// some out, else that the base's are kept.
pub fn log_summary(merged: &Merged, output: &Path, parts: &[PathBuf], base: bool) {
    let (info, previous) = (&merged.info, merged.previous.as_ref());
    let t = &info.timings;
    let thresholds =
        match (&info.calibration, base) {
            (None, _) => "no calibrated threshold".to_string(),
            (Some(c), true) if previous.is_some_and(|p| p == c) => format!(
            "the base's thresholds kept (image {}, pixel {}, {} rule from {} images): every new \
             image joined the bank and none was held out to calibrate; renew them with \
             `patchcore calibrate --index {} -i GOOD_IMAGES` on good images not in the bank",
            c.image_threshold,
            c.pixel_threshold,
            c.method.short(),
            c.images,
            output.display()
        ),
            (Some(c), _) => format!(
            "thresholds from the {} images held out of the new images ({}) by {} {} rule: image \
             threshold {} -> {}, pixel threshold {} -> {}; good images like them exceed it at \
             most {:.1}% of the time (was {})",
            c.images,
            parts
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            if previous.is_some() { "the base's" } else { "the" },
            c.method.short(),
            previous.map_or("none".to_string(), |p| p.image_threshold.to_string()),
            c.image_threshold,
            previous.map_or("none".to_string(), |p| p.pixel_threshold.to_string()),
            c.pixel_threshold,
            100.0 * c.false_alarm_bound,
            previous.map_or("none".to_string(), |p| format!(
                "{:.1}% from {} images, {} rule",
                100.0 * p.false_alarm_bound,
                p.images,
                p.method.short()
            )),
        ),
        };
    let n = parts.len();
    let msg = format!(
        "merged {n} partial model{}{}: {} of {} patches of {} images kept in {}, {} \
         (coreset {:.1} s, calibration {:.1} s, index {:.1} s, total {:.1} s)",
        if n == 1 { "" } else { "s" },
        if base { " into the base model" } else { "" },
        info.bank_size,
        info.training.patches,
        info.training.images,
        output.display(),
        thresholds,
        t.coreset_s,
        t.calibration_s,
        t.index_write_s,
        t.total_s
    );
    if let Some(w) = info.calibration.as_ref().and_then(|c| c.loose_warning()) {
        log::warn(&w);
    }
    log::emit(
        log::Level::Info,
        &msg,
        serde_json::json!({
            "event": "merged",
            "model": output.display().to_string(),
            "parts": n,
            "base": base,
            "previous_calibration": previous,
            "images": info.training.images,
            "patches": info.training.patches,
            "bank_size": info.bank_size,
            "calibration": info.calibration,
            "timings": info.timings,
        }),
    );
}
