//! Memory-bank subsampling: the approximate greedy coreset of the official PatchCore.
//!
//! Features are projected to 128 dimensions by a random linear map (uniform in +-1/sqrt(D), as
//! an untrained `torch.nn.Linear` without bias). Every point starts with its mean Euclidean
//! distance to 10 random starting points; then we repeatedly take the point farthest from
//! everything selected so far (the first one on exact ties) and lower every point's distance to
//! its distance from the new point.
//!
//! Each step is one pass over the projected matrix that updates the running minimum and finds
//! the next maximum at once, split across threads. We keep squared distances: the square is
//! monotonic, so the selections are the same as with the official Euclidean ones.

use ndarray::{Array2, ArrayView2};
use rand::{seq::index::sample, Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Dimension the features are projected to before the greedy search (official default).
pub const PROJECTION_DIM: usize = 128;
/// Number of random starting points (official default).
pub const STARTING_POINTS: usize = 10;

/// How many points a ratio keeps out of `n`: `int(n * ratio)`, as the official sampler.
pub fn coreset_size(n: usize, ratio: f64) -> usize {
    ((n as f64) * ratio).floor() as usize
}

/// Random projection matrix `[dim, out]`, deterministic for a seed.
pub fn projection(dim: usize, out: usize, seed: u64) -> Array2<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let bound = 1.0 / (dim as f32).sqrt();
    Array2::from_shape_fn((dim, out), |_| rng.gen_range(-bound..bound))
}

/// Projects `features` (`[N, D]`) to `[N, 128]`, or returns them as they are when `D == 128`.
pub fn project(features: ArrayView2<f32>, seed: u64) -> Array2<f32> {
    if features.ncols() == PROJECTION_DIM {
        return features.to_owned();
    }
    features.dot(&projection(features.ncols(), PROJECTION_DIM, seed))
}

/// Selects `count` rows of the projected matrix `points` (`[N, d]`), greedy farthest-first.
/// Returns indices in selection order. Deterministic for a seed.
pub fn greedy_select(points: ArrayView2<f32>, count: usize, seed: u64) -> Vec<usize> {
    greedy_select_with_progress(points, count, seed, &|| true)
}

/// Points of the bank-to-be, grouped by the selected point they are closest to (or not yet
/// assigned to any), each with its current squared distance to the selection.
struct Group {
    /// The selected point this group gathers around; `None` for not-yet-assigned points.
    center: Option<usize>,
    members: Vec<(u32, f32)>,
    /// Largest member distance and the lowest index that has it.
    max: (f32, u32),
}

impl Group {
    fn refresh_max(&mut self) {
        self.max = self
            .members
            .iter()
            .fold((f32::NEG_INFINITY, u32::MAX), |b, &(i, m)| {
                if m > b.0 || (m == b.0 && i < b.1) {
                    (m, i)
                } else {
                    b
                }
            });
    }
}

fn better(a: (f32, u32), b: (f32, u32)) -> (f32, u32) {
    if b.0 > a.0 || (b.0 == a.0 && b.1 < a.1) {
        b
    } else {
        a
    }
}

/// `greedy_select`, calling `step` after each selection (for a progress bar); when it returns
/// false, the selection stops early and what was selected so far is returned.
///
/// Exact, but it skips work the triangle inequality proves useless: a point `i` of the group
/// of selected point `c`, at distance `r_i <= R` (the group's largest), is at least
/// `d(c, s) - R` from a newly selected `s`; when `d(c, s) >= 2R` no member of the group can
/// come closer to `s` than it already is to `c`, and the group is not visited. Late in the
/// selection almost every group is skipped, so each step touches a small part of the data.
pub fn greedy_select_with_progress(
    points: ArrayView2<f32>,
    count: usize,
    seed: u64,
    step: &(dyn Fn() -> bool + Sync),
) -> Vec<usize> {
    let n = points.nrows();
    let count = count.min(n);
    if count == 0 {
        return Vec::new();
    }
    let points = points.as_standard_layout();
    let d = points.ncols();
    let flat = points.as_slice().expect("standard layout");
    let row = |i: usize| &flat[i * d..(i + 1) * d];

    // Start: each point's mean Euclidean distance to the random starting points, squared.
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(1));
    let starts: Vec<usize> = sample(&mut rng, n, STARTING_POINTS.min(n)).into_vec();
    let initial: Vec<(u32, f32)> = (0..n)
        .into_par_iter()
        .map(|i| {
            let mean = starts
                .iter()
                .map(|&s| (squared_distance(row(i), row(s)) as f64).sqrt())
                .sum::<f64>()
                / starts.len() as f64;
            (i as u32, (mean * mean) as f32)
        })
        .collect();
    // Unassigned points are always visited; split them so the threads share that work.
    let mut groups: Vec<Group> = initial
        .chunks(4096)
        .map(|c| {
            let mut g = Group {
                center: None,
                members: c.to_vec(),
                max: (0.0, 0),
            };
            g.refresh_max();
            g
        })
        .collect();

    // Relative slack on the pruning test, far above float rounding of the distances.
    const MARGIN: f32 = 1.0 + 4e-3;
    let mut selected = Vec::with_capacity(count);
    let mut next = groups
        .iter()
        .fold((f32::NEG_INFINITY, u32::MAX), |b, g| better(b, g.max))
        .1;
    for _ in 0..count {
        let s = next as usize;
        selected.push(s);
        if !step() {
            break;
        }
        let center = row(s);
        let moved: Vec<(u32, f32)> = groups
            .par_iter_mut()
            .filter(|g| match g.center {
                None => !g.members.is_empty(),
                Some(c) => squared_distance(row(c), center) < 4.0 * g.max.0 * MARGIN,
            })
            .flat_map_iter(|g| {
                let mut moved = Vec::new();
                g.members.retain(|&(i, m)| {
                    let dist = squared_distance(row(i as usize), center);
                    if dist < m {
                        moved.push((i, dist));
                        false
                    } else {
                        true
                    }
                });
                if !moved.is_empty() {
                    g.refresh_max();
                    // Points keep moving to newer groups: without this, the capacity every
                    // group once needed would pile up to many times the data.
                    if g.members.capacity() > 2 * g.members.len() + 64 {
                        g.members.shrink_to_fit();
                    }
                }
                moved
            })
            .collect();
        let mut moved = moved;
        moved.shrink_to_fit();
        let mut group = Group {
            center: Some(s),
            members: moved,
            max: (0.0, 0),
        };
        group.refresh_max();
        groups.push(group);
        groups.retain(|g| g.center.is_some() || !g.members.is_empty());
        next = groups
            .iter()
            .filter(|g| !g.members.is_empty())
            .fold((f32::NEG_INFINITY, u32::MAX), |b, g| better(b, g.max))
            .1;
    }
    selected
}

/// The whole sampler: project, then greedy selection of `coreset_size(N, ratio)` rows.
/// A ratio of 1 or more keeps every row (the official identity sampler).
pub fn select(features: ArrayView2<f32>, ratio: f64, seed: u64) -> Vec<usize> {
    let n = features.nrows();
    if ratio >= 1.0 {
        return (0..n).collect();
    }
    let projected = project(features, seed);
    greedy_select(projected.view(), coreset_size(n, ratio), seed)
}

/// Squared Euclidean distance with 16 independent accumulators so it vectorizes.
#[inline]
pub fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for k in 0..16 {
            let t = x[k] - y[k];
            acc[k] += t * t;
        }
    }
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += (x - y) * (x - y);
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    /// The algorithm written as directly as the official code states it: Euclidean distances,
    /// mean over starting points, running minimum, argmax (first on ties).
    fn direct(points: ArrayView2<f32>, count: usize, starts: &[usize]) -> Vec<usize> {
        let n = points.nrows();
        let dist = |i: usize, j: usize| {
            let d: f64 = points
                .row(i)
                .iter()
                .zip(points.row(j).iter())
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            d.sqrt()
        };
        let mut anchor: Vec<f64> = (0..n)
            .map(|i| starts.iter().map(|&s| dist(i, s)).sum::<f64>() / starts.len() as f64)
            .collect();
        let mut out = vec![];
        for _ in 0..count {
            let mut sel = 0;
            for i in 0..n {
                if anchor[i] > anchor[sel] {
                    sel = i;
                }
            }
            out.push(sel);
            for (i, a) in anchor.iter_mut().enumerate() {
                *a = a.min(dist(i, sel));
            }
        }
        out
    }

    #[test]
    fn picks_the_farthest_point() {
        // Four points near the origin and one far away: the far one is chosen first, then the
        // point farthest from it and the others.
        let pts = array![
            [0.0f32, 0.0],
            [1.0, 0.0],
            [0.0, 1.0],
            [0.5, 0.5],
            [10.0, 10.0]
        ];
        let sel = greedy_select(pts.view(), 3, 0);
        assert_eq!(sel[0], 4);
        assert_eq!(sel[1], 0);
        assert!(sel[2] == 1 || sel[2] == 2);
        // Exact tie between points 1 and 2 (both at distance 1 from 0, sqrt(181) from 4...):
        // the lower index wins.
        assert_eq!(sel[2], 1);
    }

    #[test]
    fn deterministic_for_a_seed_and_seed_matters() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let x = Array2::from_shape_fn((500, 40), |_| rng.gen::<f32>());
        let a = select(x.view(), 0.1, 5);
        let b = select(x.view(), 0.1, 5);
        assert_eq!(a, b);
        assert_eq!(a.len(), 50);
        let c = select(x.view(), 0.1, 6);
        assert_ne!(a, c);
        let mut uniq = a.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), a.len(), "no point is selected twice");
    }

    #[test]
    fn matches_the_direct_algorithm() {
        for seed in 0..5u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(100 + seed);
            let x = Array2::from_shape_fn((300 + 37 * seed as usize, 24), |_| rng.gen::<f32>());
            let fast = greedy_select(x.view(), 60, seed);
            let mut srng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(1));
            let starts = sample(&mut srng, x.nrows(), STARTING_POINTS).into_vec();
            assert_eq!(fast, direct(x.view(), 60, &starts), "seed {seed}");
        }
    }

    #[test]
    fn pruning_is_exact_on_clustered_data() {
        // Tight clusters make most groups prunable: the selection must still be the direct
        // algorithm's, step for step, including duplicates (exact ties).
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let centers = Array2::from_shape_fn((20, 16), |_| rng.gen_range(-5.0f32..5.0));
        let mut x = Array2::from_shape_fn((3000, 16), |(i, j)| {
            centers[[i % 20, j]] + rng.gen_range(-0.3f32..0.3)
        });
        for i in 0..50 {
            let copy = x.row(i).to_owned();
            x.row_mut(2000 + i).assign(&copy);
        }
        let fast = greedy_select(x.view(), 400, 2);
        let mut srng = ChaCha8Rng::seed_from_u64(3);
        let starts = sample(&mut srng, x.nrows(), STARTING_POINTS).into_vec();
        assert_eq!(fast, direct(x.view(), 400, &starts));
    }

    #[test]
    fn ratio_one_keeps_everything() {
        let x = Array2::<f32>::zeros((7, 3));
        assert_eq!(select(x.view(), 1.0, 0), (0..7).collect::<Vec<_>>());
        assert_eq!(coreset_size(250_880, 0.1), 25_088);
    }

    #[test]
    fn distance_handles_tails() {
        let a: Vec<f32> = (0..37).map(|i| i as f32).collect();
        let b = vec![0f32; 37];
        let want: f32 = a.iter().map(|v| v * v).sum();
        assert_eq!(squared_distance(&a, &b), want);
    }
}
