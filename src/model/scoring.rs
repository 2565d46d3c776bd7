//! Scoring: from patch scores to an image score and a heatmap, as the official PatchCore does:
//! the image score is the largest patch score; the heatmap is the patch map bilinearly
//! upsampled to the network input (PyTorch's `align_corners=False`) and smoothed with
//! `scipy.ndimage.gaussian_filter(sigma=4)` (reflect border, truncate 4), then mapped back
//! onto the original image's pixels.
//!
//! Two levels, each written once: [`score_batch`] scores network inputs (images or tiles) at
//! the network's resolution (mvtec evaluation uses it as is); [`ImageScorer`] turns its
//! results into whole images, heatmaps at the original pixels and tiles put back together,
//! for predict, serve, train's calibration and `calibrate`.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use image::RgbImage;
use ndarray::{Array2, ArrayView2, Axis};
use rayon::prelude::*;

use crate::features::extractor::Extracted;
use crate::features::images::{Geometry, ImageFile};
use crate::model::knn::Knn;

/// Gaussian smoothing of the official segmentor.
pub const HEATMAP_SIGMA: f64 = 4.0;

/// The image score: the maximum of its patch scores.
pub fn image_score(patch_scores: &[f32]) -> f32 {
    patch_scores
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// What the scoring step makes of one network input (an image, or one tile of it).
pub struct InputScore {
    /// The image score (of this tile, with `--tile`).
    pub image_score: f32,
    /// The heatmap over the part of the input the network saw (`Geometry::window`).
    pub heatmap: Array2<f32>,
}

/// A scored batch, with the seconds spent in the nearest-neighbour search and in the
/// heatmaps (the benchmarks report them apart).
pub struct ScoredBatch {
    pub inputs: Vec<InputScore>,
    pub knn_s: f64,
    pub heatmaps_s: f64,
}

/// The one scoring step of every command (predict, train's calibration, `calibrate`, mvtec
/// evaluation): a batch of extracted inputs -> patch scores from one search of the bank for
/// the whole batch (a bigger, more efficient distance GEMM) -> per input its image score
/// (`image_scores`) and heatmap (`window_heatmap`, one input per thread).
pub fn score_batch(
    knn: &mut Knn,
    batch: &[Extracted],
    k: usize,
    reweighting: Option<usize>,
) -> Result<ScoredBatch> {
    let t = Instant::now();
    let views: Vec<_> = batch.iter().map(|e| e.features.view()).collect();
    let queries = ndarray::concatenate(Axis(0), &views)?;
    let patch = knn.patch_scores(queries.view(), k)?;
    let per_input = patch.len() / batch.len();
    let image_scores = image_scores(knn, queries.view(), &patch, per_input, reweighting)?;
    let knn_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let inputs = batch
        .par_iter()
        .zip(patch.par_chunks(per_input))
        .zip(image_scores)
        .map(|((e, patch), image_score)| {
            Ok(InputScore {
                image_score,
                heatmap: window_heatmap(patch, e.grid, &e.geometry)?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(ScoredBatch {
        inputs,
        knn_s,
        heatmaps_s: t.elapsed().as_secs_f64(),
    })
}

/// One image scored whole: its score and heatmap, its tiles (with `--tile`) put back together.
pub struct ScoredImage {
    pub file: ImageFile,
    pub original: Arc<RgbImage>,
    /// The image score: the largest over its tiles.
    pub score: f32,
    /// The heatmap at the original pixels, `(height, width)`; where tiles overlap, the larger
    /// value. `None` when the scorer was asked for the maximum only.
    pub heatmap: Option<Array2<f32>>,
    /// The largest heatmap value over its network inputs, before mapping back to the original
    /// pixels: the statistic the calibrated pixel threshold is computed from.
    pub input_heatmap_max: f32,
}

impl ScoredImage {
    fn whole(e: &Extracted, score: f32, max: f32, heatmap: Option<Array2<f32>>) -> Self {
        ScoredImage {
            file: e.file.clone(),
            original: Arc::clone(&e.original),
            score,
            heatmap,
            input_heatmap_max: max,
        }
    }

    /// The image of tile `e`, before any tile is added.
    fn start(e: &Extracted, heatmap: bool) -> Self {
        let (w, h) = e.original.dimensions();
        let heat = heatmap.then(|| Array2::zeros((h as usize, w as usize)));
        Self::whole(e, f32::NEG_INFINITY, f32::NEG_INFINITY, heat)
    }

    /// Adds a tile's score, heatmap maximum and heatmap at original pixels (`map`, the size
    /// of the tile at `rect`): where tiles overlap, the larger value wins, as the image score
    /// is the largest patch score.
    fn add_tile(
        &mut self,
        rect: (u32, u32, u32, u32),
        score: f32,
        max: f32,
        map: Option<Array2<f32>>,
    ) {
        self.score = self.score.max(score);
        self.input_heatmap_max = self.input_heatmap_max.max(max);
        let (Some(heat), Some(map)) = (self.heatmap.as_mut(), map) else {
            return;
        };
        let (x, y, w, h) = (
            rect.0 as usize,
            rect.1 as usize,
            rect.2 as usize,
            rect.3 as usize,
        );
        let mut dst = heat.slice_mut(ndarray::s![y..y + h, x..x + w]);
        dst.zip_mut_with(&map, |d, &v| *d = d.max(v));
    }
}

/// Images finished in one batch, with the seconds spent in the nearest-neighbour search and
/// in the heatmaps (predict reports them apart).
pub struct ScoredImages {
    pub images: Vec<ScoredImage>,
    pub knn_s: f64,
    pub heatmaps_s: f64,
}

/// The per-image scoring step of every command that scores images against a model
/// (predict, serve, train's calibration, `calibrate`): fed the extractor's batches in order,
/// it returns each image once its last tile has been scored.
pub struct ImageScorer<'a> {
    knn: &'a mut Knn,
    k: usize,
    reweighting: Option<usize>,
    /// Map heatmaps back to the original pixels (calibration needs only their maxima).
    heatmaps: bool,
    /// The image whose tiles are arriving (with `--tile`).
    assembling: Option<ScoredImage>,
}

impl<'a> ImageScorer<'a> {
    pub fn new(knn: &'a mut Knn, k: usize, reweighting: Option<usize>, heatmaps: bool) -> Self {
        ImageScorer {
            knn,
            k,
            reweighting,
            heatmaps,
            assembling: None,
        }
    }

    /// Scores a batch of extracted inputs ([`score_batch`]), maps the heatmaps back to the
    /// original pixels (one input per thread) and returns the images whose last input was in
    /// the batch, in order.
    pub fn score(&mut self, batch: &[Extracted]) -> Result<ScoredImages> {
        let scored = score_batch(self.knn, batch, self.k, self.reweighting)?;
        let t = Instant::now();
        let heatmaps = self.heatmaps;
        let inputs: Vec<(f32, f32, Option<Array2<f32>>)> = batch
            .par_iter()
            .zip(scored.inputs)
            .map(|(e, input)| {
                let max = input
                    .heatmap
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
                let map = heatmaps.then(|| to_original(input.heatmap.view(), &e.geometry));
                (input.image_score, max, map)
            })
            .collect();
        let mut images = Vec::new();
        for (e, (score, max, map)) in batch.iter().zip(inputs) {
            if e.tile.count == 1 {
                images.push(ScoredImage::whole(e, score, max, map));
                continue;
            }
            let image = self
                .assembling
                .get_or_insert_with(|| ScoredImage::start(e, heatmaps));
            image.add_tile(e.tile.rect, score, max, map);
            if e.tile.is_last() {
                images.extend(self.assembling.take());
            }
        }
        Ok(ScoredImages {
            images,
            knn_s: scored.knn_s,
            heatmaps_s: scored.heatmaps_s + t.elapsed().as_secs_f64(),
        })
    }
}

/// Image scores of consecutive network inputs of `per_input` patches each, from their
/// patch scores (`patch_scores`, of `queries`): the largest patch score (the official score),
/// or with `reweighting = Some(b)` that score times the paper's Eq. 7 weight over `b` bank
/// neighbours (`reweighting_factor`), from exact float32 searches of the bank.
pub fn image_scores(
    knn: &mut Knn,
    queries: ArrayView2<f32>,
    patch_scores: &[f32],
    per_input: usize,
    reweighting: Option<usize>,
) -> Result<Vec<f32>> {
    patch_scores
        .chunks(per_input)
        .enumerate()
        .map(|(i, patch)| {
            let score = image_score(patch);
            let Some(b) = reweighting else {
                return Ok(score);
            };
            let worst = queries.row(i * per_input + argmax(patch)).to_vec();
            let nearest = knn.neighbours(&worst, 1)?[0];
            let m_star = knn.vector(nearest)?;
            let support = knn
                .neighbours(&m_star, b)?
                .into_iter()
                .map(|label| Ok(euclidean(&knn.vector(label)?, &worst)))
                .collect::<Result<Vec<_>>>()?;
            let weight = reweighting_factor(euclidean(&m_star, &worst), &support);
            Ok((weight * score as f64) as f32)
        })
        .collect()
}

fn euclidean(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// The paper's Eq. 7 weight of an image score (Roth et al. 2022, off in the official code,
/// on in anomalib): `1 - exp(d*) / sum_{m in N_b(m*)} exp(d_m)`, with `d*` the Euclidean
/// distance from the image's most anomalous patch to its nearest bank patch `m*` and `d_m` its
/// distances to `m*`'s `b` nearest bank patches (`m*` among them). A test patch whose nearest
/// bank patch sits in a sparse part of the bank is weighted up. Computed as a softmax with the
/// largest exponent taken out, so large distances do not overflow.
pub fn reweighting_factor(nearest: f64, support: &[f64]) -> f64 {
    let top = support.iter().copied().fold(nearest, f64::max);
    let sum: f64 = support.iter().map(|d| (d - top).exp()).sum();
    1.0 - (nearest - top).exp() / sum
}

/// Index of the first largest patch score (the patch the image score comes from).
pub fn argmax(patch_scores: &[f32]) -> usize {
    patch_scores
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}

/// The heatmap over the network input (`out_h x out_w`) for one image's patch map.
pub fn heatmap(patch_map: ArrayView2<f32>, out_h: usize, out_w: usize) -> Array2<f32> {
    let up = resize_bilinear(patch_map, out_h, out_w);
    gaussian_filter(up.view(), HEATMAP_SIGMA)
}

/// The heatmap of one image's patch scores (`grid` rows x columns) over the part of the
/// image the network saw (the resized image, or its crop).
pub fn window_heatmap(
    patch_scores: &[f32],
    grid: (usize, usize),
    geometry: &crate::features::images::Geometry,
) -> anyhow::Result<Array2<f32>> {
    let map = ArrayView2::from_shape(grid, patch_scores)?;
    let (_, _, w, h) = geometry.window;
    Ok(heatmap(map, h as usize, w as usize))
}

/// Maps a heatmap over the network input back onto the original image's pixels (bilinear,
/// pixel centres aligned). Pixels outside a center crop were never seen by the model: they are
/// set to 0, the lowest possible score.
pub fn to_original(heat: ArrayView2<f32>, g: &Geometry) -> Array2<f32> {
    let (ow, oh) = g.original;
    let (rw, rh) = g.resized;
    let (left, top, cw, ch) = g.window;
    // Per column and per row: the source position inside the window, or None outside it.
    let axis = |n: u32, resized: u32, offset: u32, size: u32| -> Vec<Option<(usize, usize, f32)>> {
        let scale = resized as f32 / n as f32;
        (0..n)
            .map(|i| {
                let p = (i as f32 + 0.5) * scale - 0.5 - offset as f32;
                (p >= -0.5 && p <= size as f32 - 0.5).then(|| bilinear_taps(p, size as usize))
            })
            .collect()
    };
    let cols = axis(ow, rw, left, cw);
    let rows = axis(oh, rh, top, ch);
    let mut out = Array2::<f32>::zeros((oh as usize, ow as usize));
    for (y, row) in rows.iter().enumerate() {
        let Some((y0, y1, ly)) = *row else { continue };
        for (x, col) in cols.iter().enumerate() {
            let Some((x0, x1, lx)) = *col else { continue };
            let top = (1.0 - lx) * heat[[y0, x0]] + lx * heat[[y0, x1]];
            let bottom = (1.0 - lx) * heat[[y1, x0]] + lx * heat[[y1, x1]];
            out[[y, x]] = (1.0 - ly) * top + ly * bottom;
        }
    }
    out
}

/// Bilinear resize with PyTorch's `align_corners=False` convention.
pub fn resize_bilinear(src: ArrayView2<f32>, out_h: usize, out_w: usize) -> Array2<f32> {
    let (h, w) = src.dim();
    let sy = h as f32 / out_h as f32;
    let sx = w as f32 / out_w as f32;
    Array2::from_shape_fn((out_h, out_w), |(y, x)| {
        sample_bilinear(
            src,
            (y as f32 + 0.5) * sy - 0.5,
            (x as f32 + 0.5) * sx - 0.5,
        )
    })
}

/// Samples `src` at a fractional position; coordinates are clamped to the array, so the edge
/// values extend outwards (PyTorch's behaviour at the borders).
pub fn sample_bilinear(src: ArrayView2<f32>, y: f32, x: f32) -> f32 {
    let (h, w) = src.dim();
    let (y0, y1, ly) = bilinear_taps(y, h);
    let (x0, x1, lx) = bilinear_taps(x, w);
    let top = (1.0 - lx) * src[[y0, x0]] + lx * src[[y0, x1]];
    let bottom = (1.0 - lx) * src[[y1, x0]] + lx * src[[y1, x1]];
    (1.0 - ly) * top + ly * bottom
}

/// The two source indices and the weight of the second for a fractional position on an axis
/// of `n` samples, clamped like PyTorch's `align_corners=False` interpolation.
pub fn bilinear_taps(pos: f32, n: usize) -> (usize, usize, f32) {
    let pos = pos.max(0.0);
    let i0 = (pos.floor() as usize).min(n - 1);
    let i1 = (i0 + 1).min(n - 1);
    let l = if i0 == n - 1 { 0.0 } else { pos - i0 as f32 };
    (i0, i1, l)
}

/// `scipy.ndimage.gaussian_filter` on a float32 image: separable, rows then columns, each
/// pass accumulated in f64 and stored as f32, 'reflect' border (`d c b a | a b c d`), kernel
/// radius `int(4 * sigma + 0.5)`.
pub fn gaussian_filter(src: ArrayView2<f32>, sigma: f64) -> Array2<f32> {
    let radius = (4.0 * sigma + 0.5) as i64;
    let kernel: Vec<f64> = {
        let k: Vec<f64> = (-radius..=radius)
            .map(|x| (-0.5 / (sigma * sigma) * (x * x) as f64).exp())
            .collect();
        let s: f64 = k.iter().sum();
        k.into_iter().map(|v| v / s).collect()
    };
    let pass0 = correlate_axis(src, &kernel, radius, Axis(0));
    correlate_axis(pass0.view(), &kernel, radius, Axis(1))
}

fn correlate_axis(src: ArrayView2<f32>, kernel: &[f64], radius: i64, axis: Axis) -> Array2<f32> {
    let mut out = Array2::<f32>::zeros(src.dim());
    let n = src.len_of(axis) as i64;
    for (lane_in, mut lane_out) in src.lanes(axis).into_iter().zip(out.lanes_mut(axis)) {
        for i in 0..n {
            let mut acc = 0f64;
            for (t, &k) in kernel.iter().enumerate() {
                let j = reflect(i + t as i64 - radius, n);
                acc += k * lane_in[j] as f64;
            }
            lane_out[i as usize] = acc as f32;
        }
    }
    out
}

/// scipy's 'reflect' extension: the edge sample is repeated (`d c b a | a b c d | d c b a`).
fn reflect(mut i: i64, n: i64) -> usize {
    let period = 2 * n;
    i = i.rem_euclid(period);
    if i >= n {
        i = period - 1 - i;
    }
    i as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn crop_border_is_zero_and_inside_follows_heatmap() {
        let p = crate::features::images::Preprocess {
            resize: 8,
            crop: Some(4),
        };
        let g = p.geometry((16, 16)).unwrap();
        let heat = Array2::from_elem((4, 4), 5.0f32);
        let full = to_original(heat.view(), &g);
        assert_eq!(full.dim(), (16, 16));
        assert_eq!(full[[0, 0]], 0.0);
        assert_eq!(full[[8, 8]], 5.0);
        assert_eq!(full[[15, 8]], 0.0);
    }

    #[test]
    fn whole_image_maps_back_without_loss_of_shape() {
        let p = crate::features::images::Preprocess {
            resize: 4,
            crop: None,
        };
        let g = p.geometry((12, 8)).unwrap();
        assert_eq!(g.resized, (6, 4));
        let heat = Array2::from_shape_fn((4, 6), |(y, x)| (y * 10 + x) as f32);
        let full = to_original(heat.view(), &g);
        assert_eq!(full.dim(), (8, 12));
        // Corners come from the heatmap's corners.
        assert_eq!(full[[0, 0]], 0.0);
        assert_eq!(full[[7, 11]], 35.0);
    }

    #[test]
    fn reflect_repeats_the_edge() {
        assert_eq!(reflect(-1, 4), 0);
        assert_eq!(reflect(-2, 4), 1);
        assert_eq!(reflect(4, 4), 3);
        assert_eq!(reflect(5, 4), 2);
        assert_eq!(reflect(-5, 4), 3);
        assert_eq!(reflect(9, 4), 1);
    }

    #[test]
    fn gaussian_preserves_constants_and_mass() {
        let c = Array2::from_elem((20, 30), 3.5f32);
        let g = gaussian_filter(c.view(), 4.0);
        assert!(g.iter().all(|v| (v - 3.5).abs() < 1e-5));
        let mut d = Array2::<f32>::zeros((64, 64));
        d[[32, 32]] = 1.0;
        let g = gaussian_filter(d.view(), 4.0);
        assert!((g.sum() - 1.0).abs() < 1e-4);
        // Peak stays in place and is the 2-D Gaussian's centre value.
        let peak = 1.0 / (2.0 * std::f32::consts::PI * 16.0);
        assert!((g[[32, 32]] - peak).abs() < 2e-4);
    }

    #[test]
    fn bilinear_matches_torch_convention() {
        // torch.nn.functional.interpolate(x, size=4, mode='bilinear', align_corners=False)
        // on [[0, 1], [2, 3]] gives rows [0, .25, .75, 1], [.5, .75, 1.25, 1.5], ...
        let x = array![[0f32, 1.0], [2.0, 3.0]];
        let y = resize_bilinear(x.view(), 4, 4);
        let want = array![
            [0.0f32, 0.25, 0.75, 1.0],
            [0.5, 0.75, 1.25, 1.5],
            [1.5, 1.75, 2.25, 2.5],
            [2.0, 2.25, 2.75, 3.0]
        ];
        assert_eq!(y, want);
    }

    #[test]
    fn image_score_is_max() {
        assert_eq!(image_score(&[0.5, 3.0, 1.0]), 3.0);
        assert_eq!(argmax(&[0.5, 3.0, 1.0, 3.0]), 1);
    }

    /// Eq. 7 through the bank's searches against brute force over a random bank with
    /// clusters of different density.
    #[test]
    fn reweighted_image_scores_match_a_direct_computation() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let d = 8;
        let bank: Array2<f32> = Array2::from_shape_fn((200, d), |(i, _)| {
            // Two clusters: a tight one (rows < 150) and a loose one.
            let spread = if i < 150 { 0.1 } else { 3.0 };
            spread * rng.gen_range(-1.0f32..1.0) + if i < 150 { 0.0 } else { 5.0 }
        });
        let queries: Array2<f32> = Array2::from_shape_fn((12, d), |_| rng.gen_range(-6.0f32..6.0));
        // Every exact method: FAISS, the bf16 shortlist re-ranked in float32, the pruned one.
        for method in [
            crate::model::knn::Method::Faiss,
            crate::model::knn::Method::Shortlist,
            crate::model::knn::Method::Pruned,
        ] {
            let choice = crate::model::knn::Choice {
                method,
                cpu_flags: vec![],
                forced: true,
            };
            let kind = crate::model::bank::IndexKind::Flat;
            let mut knn = Knn::with_choice(
                crate::model::bank::build(bank.view(), kind).unwrap(),
                kind,
                choice,
            )
            .unwrap();
            check_reweighting(&mut knn, &bank, &queries);
        }
    }

    fn check_reweighting(knn: &mut Knn, bank: &Array2<f32>, queries: &Array2<f32>) {
        let sq = |a: ndarray::ArrayView1<f32>, b: ndarray::ArrayView1<f32>| -> f64 {
            a.iter()
                .zip(b)
                .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
                .sum()
        };
        let patch: Vec<f32> = queries
            .rows()
            .into_iter()
            .map(|q| {
                bank.rows()
                    .into_iter()
                    .map(|m| sq(q, m))
                    .fold(f64::INFINITY, f64::min) as f32
            })
            .collect();
        let b = 5;
        let got = image_scores(knn, queries.view(), &patch, 4, Some(b)).unwrap();
        let plain = image_scores(knn, queries.view(), &patch, 4, None).unwrap();
        for (i, chunk) in patch.chunks(4).enumerate() {
            let at = i * 4 + argmax(chunk);
            let q = queries.row(at);
            let nearest = |v: ndarray::ArrayView1<f32>, n: usize| -> Vec<usize> {
                let mut order: Vec<usize> = (0..bank.nrows()).collect();
                order.sort_by(|&x, &y| sq(v, bank.row(x)).total_cmp(&sq(v, bank.row(y))));
                order.truncate(n);
                order
            };
            let m_star = nearest(q, 1)[0];
            let support = nearest(bank.row(m_star), b);
            let exp_sum: f64 = support
                .iter()
                .map(|&m| sq(q, bank.row(m)).sqrt().exp())
                .sum();
            let weight = 1.0 - sq(q, bank.row(m_star)).sqrt().exp() / exp_sum;
            let s_star = chunk.iter().copied().fold(f32::MIN, f32::max) as f64;
            let want = weight * s_star;
            assert!(
                (got[i] as f64 - want).abs() <= 1e-4 * want.abs().max(1e-6),
                "input {i}: {} vs {want}",
                got[i]
            );
            assert_eq!(plain[i] as f64, s_star);
            assert!(weight > 0.0 && weight < 1.0);
        }
    }

    #[test]
    fn reweighting_factor_is_eq7() {
        // Direct: 1 - e^d* / sum e^d_m.
        let (nearest, support) = (1.5f64, [1.5f64, 2.0, 4.0]);
        let direct = 1.0 - nearest.exp() / support.iter().map(|d| d.exp()).sum::<f64>();
        assert!((reweighting_factor(nearest, &support) - direct).abs() < 1e-12);
        // Large distances do not overflow: exp(800) is inf in f64.
        let w = reweighting_factor(800.0, &[800.0, 801.0]);
        let want = 1.0 - 1.0 / (1.0 + 1f64.exp());
        assert!((w - want).abs() < 1e-12, "{w}");
        // A lone nearest patch (b = 1) weighs the score to 0, as the formula does.
        assert_eq!(reweighting_factor(3.0, &[3.0]), 0.0);
    }
}
