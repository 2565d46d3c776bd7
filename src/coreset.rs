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

/// "No point": loses to every real one in `better`.
const NONE: (f32, u32) = (f32::NEG_INFINITY, u32::MAX);

impl Group {
    fn new(center: Option<usize>, members: Vec<(u32, f32)>) -> Self {
        let mut g = Group {
            center,
            members,
            max: NONE,
        };
        g.refresh_max();
        g
    }

    fn refresh_max(&mut self) {
        self.max = self
            .members
            .iter()
            .fold(NONE, |b, &(i, m)| better(b, (m, i)));
    }

    /// The largest member's (Euclidean) distance to the centre; 0 when empty.
    fn radius(&self) -> f32 {
        self.max.0.max(0.0).sqrt()
    }

    /// Takes out the members closer to the new selection (`center`) than to the selection so
    /// far, with their new distance. `flat` holds the points, `d` floats each; `to_center` is
    /// the squared distance from the group's centre to the new selection (0 for unassigned
    /// points): a member at squared distance `m` with `to_center >= 4 m` cannot come closer,
    /// by the group test applied to that member alone, and costs no distance.
    fn take_closer(
        &mut self,
        flat: &[f32],
        d: usize,
        center: &[f32],
        to_center: f32,
    ) -> Vec<(u32, f32)> {
        let mut moved = Vec::new();
        self.members.retain(|&(i, m)| {
            if to_center >= 4.0 * m * MARGIN {
                return true;
            }
            let i0 = i as usize * d;
            let dist = squared_distance(&flat[i0..i0 + d], center);
            if dist < m {
                moved.push((i, dist));
                false
            } else {
                true
            }
        });
        if !moved.is_empty() {
            self.refresh_max();
            // Points keep moving to newer groups: without this, the capacity every group once
            // needed would pile up to many times the data.
            if self.members.capacity() > 2 * self.members.len() + 64 {
                self.members.shrink_to_fit();
            }
        }
        moved
    }
}

fn better(a: (f32, u32), b: (f32, u32)) -> (f32, u32) {
    if b.0 > a.0 || (b.0 == a.0 && b.1 < a.1) {
        b
    } else {
        a
    }
}

/// The groups filed under one "super-centre" (one of the first selected points): each with
/// `e`, its centre's distance to the super-centre, so that the triangle inequality can rule
/// groups out from the super-centre's distance to a new selection alone, and the whole
/// super-group at once from `reach`.
struct SuperGroup {
    center: usize,
    groups: Vec<(Group, f32)>,
    /// At least `e + 2 R` of every group (R: its radius). Radii only shrink, so a stale value
    /// stays an upper bound.
    reach: f32,
    /// The best point of all its groups (as `Group::max`).
    best: (f32, u32),
}

impl SuperGroup {
    /// Recomputes `reach` and `best`, dropping the groups that became empty.
    fn refresh(&mut self) {
        self.groups.retain(|(g, _)| !g.members.is_empty());
        self.reach = self
            .groups
            .iter()
            .map(|(g, e)| e + 2.0 * g.radius())
            .fold(0.0, f32::max);
        self.best = self.groups.iter().fold(NONE, |b, (g, _)| better(b, g.max));
    }
}

/// Relative slack on every pruning test, far above the float rounding of the distances
/// (about 1e-5 relative for 128 dimensions).
const SLACK: f32 = 2e-3;

/// Relative slack on the direct tests, in squared distances.
const MARGIN: f32 = 1.0 + 4e-3;

/// How many of the first selected points become super-centres.
const SUPER_CENTRES: usize = 1024;

/// `greedy_select`, calling `step` after each selection (for a progress bar); when it returns
/// false, the selection stops early and what was selected so far is returned.
///
/// Exact, but it skips work the triangle inequality proves useless: a point `i` of the group
/// of selected point `c`, at distance `r_i <= R` (the group's largest), is at least
/// `d(c, s) - R` from a newly selected `s`; when `d(c, s) >= 2R` no member of the group can
/// come closer to `s` than it already is to `c`, and the group is not visited. Late in the
/// selection almost every group is skipped, so each step touches a small part of the data.
///
/// Testing every group would still cost one distance per selected point and step (quadratic
/// in the coreset size), so groups are filed under the nearest of the first
/// `SUPER_CENTRES` selected points `q`, at distance `e = d(c, q)`: `d(c, s) >=
/// |d(q, s) - e|`, so a group is ruled out from `d(q, s)` alone, and all of `q`'s groups at
/// once when `d(q, s) >= max (e + 2R)`. Each step then costs `SUPER_CENTRES` distances plus
/// the groups near `s`. The selections are those of the plain algorithm: only work that
/// cannot change a distance is skipped.
pub fn greedy_select_with_progress(
    points: ArrayView2<f32>,
    count: usize,
    seed: u64,
    step: &(dyn Fn() -> bool + Sync),
) -> Vec<usize> {
    greedy_select_with_super_centres(points, count, seed, SUPER_CENTRES, step)
}

/// `greedy_select_with_progress` with `supers` super-centres instead of `SUPER_CENTRES`: for
/// tests (few, so that the second level is exercised on small data) and benchmarks
/// (`usize::MAX` makes every selected point a super-centre: one level, every group tested at
/// every step, as before the second level). The selections do not depend on `supers`.
pub fn greedy_select_with_super_centres(
    points: ArrayView2<f32>,
    count: usize,
    seed: u64,
    supers: usize,
    step: &(dyn Fn() -> bool + Sync),
) -> Vec<usize> {
    let n = points.nrows();
    let count = count.min(n);
    if count == 0 {
        return Vec::new();
    }
    let supers = supers.max(1);
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
    let mut loose: Vec<Group> = initial
        .chunks(4096)
        .map(|c| Group::new(None, c.to_vec()))
        .collect();
    drop(initial);
    let mut tree: Vec<SuperGroup> = Vec::new();

    let (lo, hi) = (1.0 - SLACK, 1.0 + SLACK);
    let mut selected = Vec::with_capacity(count);
    let mut next = loose.iter().fold(NONE, |b, g| better(b, g.max)).1;
    let mut to_super: Vec<f32> = Vec::new();
    for _ in 0..count {
        let s = next as usize;
        selected.push(s);
        if !step() {
            break;
        }
        let center = row(s);
        // Distances from the new selection to every super-centre.
        to_super.clear();
        tree.par_iter()
            .map(|t| squared_distance(row(t.center), center).sqrt())
            .collect_into_vec(&mut to_super);
        // The groups the triangle inequality cannot rule out.
        let mut visit: Vec<&mut Group> = loose.iter_mut().collect();
        let mut touched = Vec::new();
        for (k, (t, &dq)) in tree.iter_mut().zip(&to_super).enumerate() {
            if dq * lo >= t.reach * hi {
                continue;
            }
            touched.push(k);
            visit.extend(t.groups.iter_mut().filter_map(|(g, e)| {
                let r2 = 2.0 * g.radius() * hi;
                ((dq - *e).abs() - SLACK * (dq + *e) < r2).then_some(g)
            }));
        }
        let moved: Vec<(u32, f32)> = visit
            .into_par_iter()
            .filter_map(|g| {
                let to_center = g.center.map_or(0.0, |c| squared_distance(row(c), center));
                (to_center < 4.0 * g.max.0 * MARGIN).then_some((g, to_center))
            })
            .flat_map_iter(|(g, to_center)| g.take_closer(flat, d, center, to_center))
            .collect();
        let mut moved = moved;
        moved.shrink_to_fit();
        let group = Group::new(Some(s), moved);
        for &k in &touched {
            tree[k].refresh();
        }
        loose.retain(|g| !g.members.is_empty());
        if tree.len() < supers {
            let mut t = SuperGroup {
                center: s,
                groups: vec![(group, 0.0)],
                reach: 0.0,
                best: NONE,
            };
            t.refresh();
            tree.push(t);
        } else {
            // File the group under its nearest super-centre (the first on ties).
            let (k, e) = to_super
                .iter()
                .enumerate()
                .fold(
                    (0, f32::INFINITY),
                    |b, (k, &e)| if e < b.1 { (k, e) } else { b },
                );
            let t = &mut tree[k];
            t.reach = t.reach.max(e + 2.0 * group.radius());
            t.best = better(t.best, group.max);
            if !group.members.is_empty() {
                t.groups.push((group, e));
            }
        }
        next = tree
            .iter()
            .map(|t| t.best)
            .chain(loose.iter().map(|g| g.max))
            .fold(NONE, better)
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
            let want = direct(x.view(), 60, &starts_for(x.nrows(), seed));
            assert_eq!(fast, want, "seed {seed}");
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
        assert_eq!(fast, direct(x.view(), 400, &starts_for(x.nrows(), 2)));
    }

    /// The starting points `greedy_select_with_super_centres` draws for `n` points and `seed`.
    fn starts_for(n: usize, seed: u64) -> Vec<usize> {
        let mut srng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(1));
        sample(&mut srng, n, STARTING_POINTS.min(n)).into_vec()
    }

    #[test]
    fn super_centres_keep_the_direct_selection_on_random_data() {
        // Far more selections than super-centres, so most groups are filed under one.
        for (seed, supers) in [(0u64, 1), (1, 3), (2, 16), (3, 64)] {
            let mut rng = ChaCha8Rng::seed_from_u64(200 + seed);
            let x = Array2::from_shape_fn((1500, 20), |_| rng.gen::<f32>());
            let fast = greedy_select_with_super_centres(x.view(), 300, seed, supers, &|| true);
            let want = direct(x.view(), 300, &starts_for(x.nrows(), seed));
            assert_eq!(fast, want, "seed {seed}, {supers} super-centres");
        }
    }

    #[test]
    fn super_centres_keep_the_direct_selection_on_clustered_duplicated_data() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let centers = Array2::from_shape_fn((12, 32), |_| rng.gen_range(-4.0f32..4.0));
        let mut x = Array2::from_shape_fn((4000, 32), |(i, j)| {
            centers[[i % 12, j]] + rng.gen_range(-0.2f32..0.2)
        });
        // 300 exact duplicates: ties between equal points and zero-radius groups.
        for i in 0..300 {
            let copy = x.row(i).to_owned();
            x.row_mut(3000 + i).assign(&copy);
        }
        let want = direct(x.view(), 600, &starts_for(x.nrows(), 4));
        for supers in [2, 10, 50] {
            let fast = greedy_select_with_super_centres(x.view(), 600, 4, supers, &|| true);
            assert_eq!(fast, want, "{supers} super-centres");
        }
    }

    #[test]
    fn super_centres_keep_exact_ties_on_a_lattice() {
        // Points on an integer grid, each twice: distances tie exactly all the time, and the
        // lowest index must win every tie. Selecting every point runs down to zero radii.
        let x = Array2::from_shape_fn((2 * 343, 3), |(i, j)| {
            ((i % 343) / 7usize.pow(j as u32) % 7) as f32
        });
        let want = direct(x.view(), x.nrows(), &starts_for(x.nrows(), 7));
        for supers in [1, 5, 40, SUPER_CENTRES] {
            let fast = greedy_select_with_super_centres(x.view(), x.nrows(), 7, supers, &|| true);
            assert_eq!(fast, want, "{supers} super-centres");
        }
        // Each lattice point once, by its lower index; then (all distances 0) index 0 again,
        // as torch's argmax does.
        let mut first = want[..343].to_vec();
        first.sort();
        assert_eq!(first, (0..343).collect::<Vec<_>>());
        assert!(want[343..].iter().all(|&i| i == 0));
    }

    #[test]
    fn stops_when_asked() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let x = Array2::from_shape_fn((400, 8), |_| rng.gen::<f32>());
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let sel = greedy_select_with_progress(x.view(), 100, 0, &|| {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 9
        });
        assert_eq!(sel, greedy_select(x.view(), 10, 0));
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
