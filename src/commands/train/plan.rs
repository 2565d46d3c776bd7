//! Train's memory plan for `--max-memory` (issue 32): what each stage holds, from the
//! measured runtime and the estimated patch count; also the kNN search's and a scored batch's
//! bytes, which `merge` and `calibrate` plan with too.

use anyhow::Result;

use super::TrainOptions;
use crate::features::extractor::Extractor;
use crate::features::images::{self, ImageFile};
use crate::training::coreset;
use crate::training::memory::{self, Footprint, Stage};
use crate::training::shard::Shard;
use crate::util::log;

/// What a training run holds at each stage, for `--max-memory` (issue 32): the runtime and a
/// batch's activations measured on the loaded backbone ([`memory::probe`]), the rest from the
/// patch count, estimated from the image count and the first image's patch grid.
pub struct MemoryPlan {
    pub footprint: Footprint,
    /// Bytes a batch of `--batch-size` images adds while the network runs.
    pub batch: u64,
    /// Whether the kNN search of the calibration may build its bf16 shortlist (half the
    /// bank again) within the budget.
    pub shortlist: bool,
}

/// Bytes of one patch's coreset projection.
pub(crate) const PROJECTION_BYTES: u64 = 4 * coreset::PROJECTION_DIM as u64;

impl MemoryPlan {
    /// Measures the backbone, plans every stage and refuses when the largest cannot fit.
    pub(crate) fn measure(
        opts: &TrainOptions,
        extractor: &Extractor,
        files: &[ImageFile],
        held_out: usize,
    ) -> Result<MemoryPlan> {
        let (input, tiles, decoded) = first_input(opts, files);
        let footprint = memory::probe(extractor, input)?;
        // The network's peak on one image, and the decoded images of the batch being run,
        // the one waiting and the one being decoded.
        let images = opts.batch_size.max(1) as u64;
        let batch = (footprint.per_image + 3 * decoded) * images;
        let patches = files.len() * tiles * footprint.patches_per_input;
        let mut plan = MemoryPlan {
            footprint,
            batch,
            shortlist: true,
        };
        let stages = plan.stages(opts, patches, held_out);
        let without = plan.stages_without_shortlist(opts, patches, held_out);
        let fits = |stages: &[Stage]| {
            memory::check(opts.max_memory, footprint.runtime, stages, "").is_ok()
        };
        if !fits(&stages) && fits(&without) {
            plan.shortlist = false;
        }
        let stages = if plan.shortlist { stages } else { without };
        // How many images would fit: every stage grows linearly with the images.
        let fitting = {
            let per = |images: usize| {
                let n = images * tiles * footprint.patches_per_input;
                let s = plan.stages_without_shortlist(opts, n, held_out);
                s.iter().map(Stage::bytes).max().unwrap_or(0)
            };
            let room = opts.max_memory.saturating_sub(footprint.runtime);
            let (mut lo, mut hi) = (0usize, files.len());
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if per(mid) <= room {
                    lo = mid
                } else {
                    hi = mid - 1
                }
            }
            lo
        };
        let what = if opts.shard.is_some() {
            "in this shard"
        } else {
            "in one training"
        };
        let alternative = match fitting {
            0 => format!(
                ", and not even one image fits at --batch-size {}",
                opts.batch_size
            ),
            n => format!(
                ", or train on at most {} of these {} images ({} patches) {what}",
                memory::count(n),
                memory::count(files.len()),
                memory::count(patches)
            ),
        };
        memory::check(opts.max_memory, footprint.runtime, &stages, &alternative)?;
        if !opts.quiet && std::env::var_os(MEMORY_PLAN_ENV).is_some() {
            for s in &stages {
                log::info(&format!(
                    "memory plan: {} {} + runtime {}",
                    s.name,
                    memory::human(s.bytes()),
                    memory::human(footprint.runtime)
                ));
            }
        }
        Ok(plan)
    }

    /// Bytes besides the features that the budget must keep for extraction: the runtime and
    /// a batch's activations.
    pub fn reserve(&self) -> u64 {
        self.footprint.runtime + self.batch
    }

    fn stages_without_shortlist(
        &self,
        opts: &TrainOptions,
        patches: usize,
        held_out: usize,
    ) -> Vec<Stage> {
        let plan = MemoryPlan {
            shortlist: false,
            ..*self
        };
        plan.stages(opts, patches, held_out)
    }

    /// What each stage holds besides the runtime, for `patches` patches.
    fn stages(&self, opts: &TrainOptions, patches: usize, held_out: usize) -> Vec<Stage> {
        let ratio = opts.shard.map_or(opts.sampling_ratio, |_| {
            Shard::kept_ratio(opts.sampling_ratio, opts.shard_oversample)
        });
        let keep = coreset::coreset_size(patches, ratio);
        let d = opts.dims.target.max(1) as u64;
        let n = patches as u64;
        let projections = if opts.sampling_ratio < 1.0 {
            n * PROJECTION_BYTES
        } else {
            0
        };
        let bank = keep as u64 * d * 4;
        let of_patches = |what: &str| format!("{what} of {} patches", memory::count(patches));
        let activations = format!(
            "a batch's activations and decoded images ({} images)",
            opts.batch_size.max(1)
        );
        let mut stages = vec![Stage {
            name: "feature extraction",
            items: vec![
                (activations.clone(), self.batch),
                (of_patches("the 128-d projections"), projections),
            ],
        }];
        if ratio < 1.0 {
            stages.push(Stage {
                name: "coreset selection",
                items: vec![
                    (of_patches("the 128-d projections"), projections),
                    ("the coreset's copy of them".into(), projections),
                    // Distances, nearest selections, group members (u32 + f32 each) and the
                    // selected points' tree (their rows again, links, bounds).
                    (
                        "the coreset's working arrays".into(),
                        n * 16 + keep as u64 * (PROJECTION_BYTES + 64),
                    ),
                ],
            });
        }
        let kept = format!("the memory bank of {} patches", memory::count(keep));
        let mut gathered = vec![(kept.clone(), bank), ("FAISS's copy of it".into(), bank)];
        if opts.shard.is_some() {
            gathered.extend([
                (
                    of_patches("the 128-d projections kept for merge"),
                    projections,
                ),
                (
                    "the nearest candidates' search".into(),
                    n * 8 + 2 * keep as u64 * PROJECTION_BYTES,
                ),
            ]);
        }
        stages.push(Stage {
            name: "memory bank",
            items: gathered,
        });
        if opts.shard.is_none() && held_out > 0 {
            let (kept_by_search, fitting) = knn_search_bytes(keep as u64, d, self.shortlist);
            // The search is built at the first batch's search, after its activations are
            // freed: the larger of the two, beside what it keeps.
            let (transient, what) = if self.batch >= fitting {
                (self.batch, activations)
            } else {
                (fitting, "the kNN search's PCA sample".to_string())
            };
            stages.push(Stage {
                name: "calibration",
                items: vec![
                    (kept, bank),
                    ("the kNN search's structures".into(), kept_by_search),
                    (what, transient),
                    (
                        "a batch's features, their queries and search".into(),
                        scoring_bytes(self.footprint, opts.batch_size, d),
                    ),
                ],
            });
        }
        stages
    }

    /// The kNN search of the calibration: `auto` unless the budget leaves no room for the
    /// bf16 shortlist, then without it (the same neighbours, the other exact methods).
    pub(crate) fn knn_choice(&self, opts: &TrainOptions) -> Result<crate::model::knn::Choice> {
        let mut choice = crate::model::knn::Choice::from_env()?;
        if !self.shortlist && !choice.forced {
            if !opts.quiet && !choice.cpu_flags.is_empty() {
                log::info(&format!(
                    "--max-memory {}: the kNN search runs without its bf16 shortlist",
                    memory::flag_size(opts.max_memory)
                ));
            }
            choice.cpu_flags.clear();
        }
        Ok(choice)
    }
}

/// What a flat bank's kNN search builds beside the bank of `keep` rows of `d` floats: what it
/// keeps (the pruned search's projections, 64 floats a row, and where the CPU has bf16
/// products and `shortlist` allows, the bf16 copy of the bank), and what fitting the
/// projection holds for a moment (its PCA sample of at most 32,768 rows, twice, and the
/// covariance).
pub fn knn_search_bytes(keep: u64, d: u64, shortlist: bool) -> (u64, u64) {
    let bf16 = if shortlist && !crate::model::knn::cpu_bf16_flags().is_empty() {
        keep * d * 2
    } else {
        0
    };
    (
        keep * 64 * 4 + bf16,
        2 * keep.min(32_768) * d * 4 + 2 * d * d * 8,
    )
}

/// What scoring a batch holds besides the network: its features, their copy as the kNN
/// queries and the search's per-query results and fallbacks, about three times the features.
pub fn scoring_bytes(footprint: Footprint, batch_size: usize, d: u64) -> u64 {
    3 * batch_size.max(1) as u64 * footprint.patches_per_input as u64 * d * 4
}

/// Set to print the memory plan's stages (tests/memory_limit.rs, benchmarks).
pub const MEMORY_PLAN_ENV: &str = "PATCHCORE_MEMORY_PLAN";

/// The network input of the first image (its size, how many inputs an image makes with
/// `--tile`, and the bytes of one decoded image with its preprocessed inputs), from its header
/// alone; a square of the crop (else resize) side when it cannot be read.
fn first_input(opts: &TrainOptions, files: &[ImageFile]) -> ((u32, u32), usize, u64) {
    let side = opts.preprocess.crop.unwrap_or(opts.preprocess.resize);
    let input = |(w, h): (u32, u32)| (w as u64 * h as u64) * 3 * (1 + 4 + 4);
    let square = ((side, side), 1, input((side, side)));
    let Some(first) = files.first() else {
        return square;
    };
    let Ok((w, h)) = image::image_dimensions(&first.path) else {
        return square;
    };
    let rects = match opts.tile {
        Some(t) => images::tile_rects(w, h, t),
        None => vec![(0, 0, w, h)],
    };
    let Some(&(_, _, tw, th)) = rects.first() else {
        return square;
    };
    match opts.preprocess.geometry((tw, th)) {
        // The decoded RGB image, and per input its resized copy, the crop and the
        // normalized floats (twice: the batch's and the tensor's).
        Ok(g) => (
            (g.window.2, g.window.3),
            rects.len(),
            (w as u64 * h as u64) * 3
                + rects.len() as u64 * (g.resized.0 as u64 * g.resized.1 as u64 * 3)
                + rects.len() as u64 * input((g.window.2, g.window.3)),
        ),
        Err(_) => square,
    }
}
