//! Memory-bank subsampling: the approximate greedy coreset of the official PatchCore.
//!
//! Features are projected to 128 dimensions by a random linear map (uniform in +-1/sqrt(D), as
//! an untrained `torch.nn.Linear` without bias). Every point starts with its mean Euclidean
//! distance to 10 random starting points; then we repeatedly take the point farthest from
//! everything selected so far (the first one on exact ties) and lower every point's distance to
//! its distance from the new point.
//!
//! The official code makes one pass over all points per step. We make the same selections
//! while skipping or putting off the work that provably cannot change a distance (lazy blocks
//! first, then groups in a tree of the selected points, and distances stopped as soon as a
//! partial sum rules them out: see `greedy_select_with_progress`), so a step touches a small
//! part of the data. We keep squared distances: the square is monotonic, so
//! the selections are the same as with the official Euclidean ones.

use ndarray::{Array2, ArrayView2, CowArray, Ix2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

mod lazy;
mod rotation;

use lazy::{lazy_phase, start, switch, Lazy};
use rotation::Rotation;

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
    greedy_select_with_progress(points, count, seed, &|_| true)
}

/// Points of the bank-to-be, grouped by the selected point they are closest to (or not yet
/// assigned to any), each with its current squared distance to the selection.
struct Group {
    /// Row index and squared distance of each member.
    members: Vec<(u32, f32)>,
    /// The members' rows, in the order of `members`: visiting a group streams them from one
    /// place instead of fetching rows scattered over the whole matrix, which made the visits
    /// wait on memory.
    rows: Vec<f32>,
    /// Largest member distance and the lowest index that has it.
    max: (f32, u32),
}

/// "No point": loses to every real one in `better`.
const NONE: (f32, u32) = (f32::NEG_INFINITY, u32::MAX);

/// Members leaving a group, with their rows (as `Group`'s fields).
#[derive(Default)]
struct Moved {
    members: Vec<(u32, f32)>,
    rows: Vec<f32>,
}

impl Group {
    fn new(moved: Moved) -> Self {
        let mut g = Group {
            members: moved.members,
            rows: moved.rows,
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

    /// The row of member `i`.
    fn row_of(&self, i: u32) -> &[f32] {
        let k = self
            .members
            .iter()
            .position(|&(j, _)| j == i)
            .expect("a member of the group");
        let d = self.rows.len() / self.members.len();
        &self.rows[k * d..(k + 1) * d]
    }

    /// The largest member's (Euclidean) distance to the centre; 0 when empty.
    fn radius(&self) -> f32 {
        self.max.0.max(0.0).sqrt()
    }

    /// Takes out the members closer to the new selection (`center`) than to the selection so
    /// far, with their new distance. `to_center` is the squared distance from the group's
    /// centre to the new selection (0 for unassigned points): a member at squared distance `m`
    /// with `to_center >= 4 m` cannot come closer, by the group test applied to that member
    /// alone, and costs no distance.
    fn take_closer(&mut self, center: &[f32], to_center: f32) -> Moved {
        let d = center.len();
        let mut moved = Moved::default();
        let mut kept = 0;
        // The rows a distance will be computed for, asked from memory all at once, so that
        // their fetches overlap instead of each waiting for the one before.
        for (k, &(_, m)) in self.members.iter().enumerate() {
            if to_center < 4.0 * m * MARGIN {
                prefetch(&self.rows[k * d..(k + 1) * d]);
            }
        }
        for k in 0..self.members.len() {
            let (i, m) = self.members[k];
            let row = k * d..(k + 1) * d;
            if to_center < 4.0 * m * MARGIN {
                // Exact: a distance left unfinished would not have been below `m`.
                if let Some(dist) = distance_below(&self.rows[row.clone()], center, m) {
                    if dist < m {
                        moved.members.push((i, dist));
                        moved.rows.extend_from_slice(&self.rows[row]);
                        continue;
                    }
                }
            }
            if kept != k {
                self.members[kept] = (i, m);
                self.rows.copy_within(row, kept * d);
            }
            kept += 1;
        }
        if !moved.members.is_empty() {
            self.members.truncate(kept);
            self.rows.truncate(kept * d);
            self.refresh_max();
            // Points keep moving to newer groups: without this, the capacity every group once
            // needed would pile up to many times the data. Tight, because late groups are
            // small and many: a slack of even a few rows each doubled the copy at 2.35 M
            // patches (peak RSS 4.9 GiB under --max-memory 4G).
            let len = self.members.len();
            if self.members.capacity() > len + len / 4 + 2 {
                self.members.shrink_to_fit();
                self.rows.shrink_to_fit();
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

/// A selected point of the group phase: its group, and its place in the tree of selected
/// points that lets one distance rule out a whole subtree of groups.
struct Node {
    group: Group,
    /// Its ancestors in the tree, parent first, each with its (Euclidean) distance to them.
    up: Vec<(u32, f32)>,
    children: Children,
}

/// A node's children: ids, distances to the node (each child's `up[0]` too, kept here so a
/// search reads them in a row), and rows, so that a search streams the rows of the children
/// it cannot rule out from one place.
#[derive(Default)]
struct Children {
    ids: Vec<u32>,
    e: Vec<f32>,
    rows: Vec<f32>,
}

/// The selected points of the group phase as a tree: the first `roots` are roots; the next
/// `roots * (fanout - 1)` hang under the nearest root the search found, and so on, a level
/// `fanout` times larger each time, so the tree stays shallow and each node has about
/// `fanout` children. The node of the `j`-th selected point has id `j`.
struct Tree {
    nodes: Vec<Node>,
    /// Per node: at least `d(node, c) + 2 R_c` for every node `c` of its subtree, itself
    /// included (`R_c`: radius of `c`'s group). Radii only shrink, so a stale value stays an
    /// upper bound; `tighten` brings them down from time to time.
    reach: Vec<f32>,
    /// The roots, ids and rows (every node without a parent).
    root_ids: Vec<u32>,
    root_rows: Vec<f32>,
    d: usize,
    roots: usize,
    fanout: usize,
    /// Best point of every node's group.
    best: Tournament,
    /// Node count at the last `tighten`.
    tightened: usize,
    /// Per node: the number of the search that last computed its distance, and that squared
    /// distance, so `push` finds the new point's distances to its ancestors.
    seen: Vec<(u32, f32)>,
    searches: u32,
    /// The rows the tree keeps (roots' and children's) are turned by this (`rotation.rs`):
    /// every distance the search computes is off the true one by at most `error` (plus a
    /// relative rounding the slack covers), and every bound allows for it.
    rotation: Rotation,
}

/// One search of the tree for a new selection.
struct Search {
    /// Every node whose distance to the new selection was computed, with that squared distance.
    computed: Vec<(u32, f32)>,
    /// Those whose subtree the distance could not rule out (indices into `computed`).
    open: Vec<usize>,
}

impl Tree {
    fn new(d: usize, capacity: usize, tuning: Tuning, rotation: Rotation) -> Self {
        Tree {
            nodes: Vec::with_capacity(capacity),
            reach: Vec::with_capacity(capacity),
            root_ids: Vec::new(),
            root_rows: Vec::new(),
            d,
            roots: tuning.roots.max(1),
            fanout: tuning.fanout.max(2),
            best: Tournament::new(capacity),
            tightened: 0,
            seen: Vec::with_capacity(capacity),
            searches: 0,
            rotation,
        }
    }

    /// First node id of `level`.
    fn start(&self, level: usize) -> usize {
        match level {
            0 => 0,
            _ => (1..level).fold(self.roots, |end, _| end.saturating_mul(self.fanout)),
        }
    }

    /// Level of node `j`: 0 for roots, then one more each time the count grows `fanout` times.
    fn level(&self, j: usize) -> usize {
        let (mut level, mut end) = (0, self.roots);
        while j >= end {
            end = end.saturating_mul(self.fanout);
            level += 1;
        }
        level
    }

    /// Computes the distances from `center` to the nodes the triangle inequality cannot rule
    /// out, from the roots down: a child `c` at distance `e` from its parent `a` is at least
    /// `|d(a, s) - e|` from `s`, so it is skipped, subtree and all, when that reaches
    /// `reach_c`; otherwise its distance is computed and tested the same way. The roots'
    /// subtrees are searched in parallel.
    fn search(&mut self, center: &[f32]) -> Search {
        self.searches += 1;
        let d = self.d;
        let tree = &*self;
        let parts: Vec<Search> = tree
            .root_ids
            .par_iter()
            .zip(tree.root_rows.par_chunks_exact(d))
            .map(|(&j, row)| tree.search_from(j, squared_distance(row, center), center))
            .collect();
        let mut out = Search {
            computed: Vec::with_capacity(parts.iter().map(|p| p.computed.len()).sum()),
            open: Vec::new(),
        };
        for part in parts {
            let offset = out.computed.len();
            out.open.extend(part.open.iter().map(|k| k + offset));
            out.computed.extend(part.computed);
        }
        for &(j, sq) in &out.computed {
            self.seen[j as usize] = (self.searches, sq);
        }
        out
    }

    /// `search` within the subtree of `root`, at squared distance `sq` from `center`.
    fn search_from(&self, root: u32, sq: f32, center: &[f32]) -> Search {
        let (lo, hi) = (1.0 - SLACK, 1.0 + SLACK);
        let (d, err) = (self.d, self.rotation.error);
        let mut out = Search {
            computed: vec![(root, sq)],
            open: Vec::new(),
        };
        let mut k = 0;
        while k < out.computed.len() {
            let (a, sq) = out.computed[k];
            let da = sq.sqrt();
            if (da - err) * lo < self.reach[a as usize] * hi {
                out.open.push(k);
                let children = &self.nodes[a as usize].children;
                for (i, (&c, &e)) in children.ids.iter().zip(&children.e).enumerate() {
                    let reach = self.reach[c as usize] * hi;
                    if (da - e).abs() - 2.0 * err - SLACK * (da + e) < reach {
                        // Too far to be opened once its distance reaches this.
                        let far = reach / lo + err;
                        let row = &children.rows[i * d..(i + 1) * d];
                        if let Some(sq) = distance_below(row, center, far * far * ABANDON) {
                            out.computed.push((c, sq));
                        }
                    }
                }
            }
            k += 1;
        }
        out
    }

    /// Adds the group of the `j`-th selected point (`j == self.nodes.len()`), under the
    /// nearest node one level up among `computed` (else the nearest one higher up: any parent
    /// keeps the bounds true, a near one keeps them tight). The latest search (or `note`) must
    /// have computed the distances to that node's ancestors too, as a search does.
    fn push(&mut self, group: Group, row: &[f32], computed: &[(u32, f32)]) {
        let j = self.nodes.len();
        let level = self.level(j);
        let mut up = Vec::new();
        if level > 0 {
            // Ids are in selection order, so a level is a range of ids: the level of a node
            // is only worked out for the few from higher up.
            let (above, here) = (self.start(level - 1), self.start(level));
            let up_by = |a: usize| if a >= above { 1 } else { level - self.level(a) };
            let parent = computed
                .iter()
                .filter(|&&(a, _)| (a as usize) < here)
                .min_by(|x, y| {
                    let key = |&(a, sq): &(u32, f32)| (up_by(a as usize), sq);
                    key(x).partial_cmp(&key(y)).expect("distances are numbers")
                });
            if let Some(&(p, _)) = parent {
                let dist = |a: u32| {
                    let (search, sq) = self.seen[a as usize];
                    assert_eq!(search, self.searches, "the search reached every ancestor");
                    sq.sqrt()
                };
                up.push((p, dist(p)));
                for &(a, _) in &self.nodes[p as usize].up {
                    up.push((a, dist(a)));
                }
            }
        }
        self.best.set(j, group.max);
        let reach = 2.0 * group.radius();
        let err = self.rotation.error;
        for &(a, e) in &up {
            self.reach[a as usize] = self.reach[a as usize].max(e + err + reach);
        }
        match up.first() {
            Some(&(p, e)) => {
                let children = &mut self.nodes[p as usize].children;
                children.ids.push(j as u32);
                children.e.push(e);
                children.rows.extend_from_slice(row);
            }
            None => {
                self.root_ids.push(j as u32);
                self.root_rows.extend_from_slice(row);
            }
        }
        self.nodes.push(Node {
            group,
            up,
            children: Children::default(),
        });
        self.reach.push(reach);
        self.seen.push((0, 0.0));
    }

    /// Starts a search by hand: `computed` holds the squared distances from the next point to
    /// nodes, as `search` would have computed them.
    fn note(&mut self, computed: &[(u32, f32)]) {
        self.searches += 1;
        for &(j, sq) in computed {
            self.seen[j as usize] = (self.searches, sq);
        }
    }

    /// After the groups of `changed` lost members: their best points.
    fn refresh(&mut self, changed: &[u32]) {
        for &j in changed {
            self.best.set(j as usize, self.nodes[j as usize].group.max);
        }
    }

    /// Recomputes every reach from the current radii once the tree has grown by a
    /// `TIGHTEN` fraction since the last time: a whole pass, rare enough to cost little.
    fn tighten(&mut self) {
        let n = self.nodes.len();
        if n < self.tightened + (self.tightened / TIGHTEN).max(256) {
            return;
        }
        self.tightened = n;
        for (reach, node) in self.reach.iter_mut().zip(&self.nodes) {
            *reach = 2.0 * node.group.radius();
        }
        let err = self.rotation.error;
        for node in &self.nodes {
            let reach = 2.0 * node.group.radius();
            for &(a, e) in &node.up {
                self.reach[a as usize] = self.reach[a as usize].max(e + err + reach);
            }
        }
    }
}

/// Group members a selection's visits must reach before they are shared between threads.
const PARALLEL_VISIT: usize = 2048;

/// `Tree::tighten` runs each time the tree grew by 1 / `TIGHTEN` of its size.
const TIGHTEN: usize = 64;

/// The best of many values (as `better`), kept up to date under changes to single values.
struct Tournament {
    leaves: usize,
    /// Each value with the position it was set at.
    tree: Vec<((f32, u32), u32)>,
}

impl Tournament {
    fn new(capacity: usize) -> Self {
        let leaves = capacity.max(1).next_power_of_two();
        Tournament {
            leaves,
            tree: vec![(NONE, u32::MAX); 2 * leaves],
        }
    }

    fn set(&mut self, i: usize, value: (f32, u32)) {
        let mut at = self.leaves + i;
        self.tree[at] = (value, i as u32);
        while at > 1 {
            at /= 2;
            let (a, b) = (self.tree[2 * at], self.tree[2 * at + 1]);
            self.tree[at] = if beats(b.0, a.0) { b } else { a };
        }
    }

    /// The best value, and the position it was set at.
    fn top(&self) -> ((f32, u32), u32) {
        self.tree[1]
    }
}

/// Mutable references to the elements of `slice` at `sorted` (increasing, distinct) indices.
fn several_mut<'a, T>(mut slice: &'a mut [T], sorted: &[u32]) -> Vec<&'a mut T> {
    let mut out = Vec::with_capacity(sorted.len());
    let mut offset = 0;
    for &i in sorted {
        let rest = std::mem::take(&mut slice);
        let (item, rest) = rest[i as usize - offset..]
            .split_first_mut()
            .expect("indices within the slice");
        out.push(item);
        slice = rest;
        offset = i as usize + 1;
    }
    out
}

/// Relative slack on every pruning test, far above the float rounding of the distances
/// (about 1e-5 relative for 128 dimensions).
const SLACK: f32 = 2e-3;

/// Relative slack on the direct tests, in squared distances.
const MARGIN: f32 = 1.0 + 4e-3;

/// How many of the first selected points are roots of the group phase's tree.
const ROOTS: usize = 64;

/// How many times larger each level of the tree is than the one above it.
const FANOUT: usize = 8;

/// How many selections the lazy block phase makes before the points are filed into groups.
const LAZY_STEPS: usize = 1024;

/// Rows per block of the lazy phase: small enough that a block's stale maximum is close to
/// its points' distances, large enough that choosing blocks costs little.
const BLOCK: usize = 256;

/// Knobs of the exact greedy search: they change its speed, never its selections.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Selections made by the lazy block phase before switching to groups (0: none).
    pub lazy_steps: usize,
    /// How many of the first selected points are roots of the group phase's tree.
    pub roots: usize,
    /// How many times larger each level of that tree is than the one above it.
    pub fanout: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            lazy_steps: LAZY_STEPS,
            roots: ROOTS,
            fanout: FANOUT,
        }
    }
}

/// `greedy_select`, calling `step` with each selected row (for a progress bar, or to stop on
/// a condition of the selection); when it returns false, the selection stops early and what
/// was selected so far is returned.
///
/// Exact: only work that provably cannot change a distance is skipped or put off, so the
/// selections are those of the plain algorithm (one pass over all points per step). Two phases:
///
/// * **Lazy blocks** (the first `LAZY_STEPS` selections). Early on, a new point can come
///   closer to nearly every point, so nothing can be ruled out, and the plain pass streams the
///   whole matrix from memory at every step. Instead, points sit in fixed blocks of `BLOCK`
///   rows, each remembering how many selections it has taken into account and its largest
///   distance then, which only overstates the current one. The next selection is found by
///   bringing up to date only the blocks whose stale maximum beats the best up-to-date one,
///   until none does; a block catching up applies all the selections it missed in one pass,
///   its rows staying in cache, and skips a selection `t` for a point whose nearest selected
///   point `a` has `d(a, t) >= 2 d(p, a)` (Elkan's test; the selected points' distances to one
///   another are kept for this phase).
/// * **Groups** (afterwards). A point `i` of the group of selected point `c`, at distance
///   `r_i <= R` (the group's largest), is at least `d(c, s) - R` from a newly selected `s`;
///   when `d(c, s) >= 2R` no member of the group can come closer to `s` than it already is to
///   `c`, and the group is not visited. Late in the selection almost every group is skipped.
///   Testing every group would still cost one distance per selected point and step (quadratic
///   in the coreset size), so the selected points form a shallow tree (`Tree`: `ROOTS` roots,
///   each level `FANOUT` times larger, each point under the nearest point one level up that
///   the search met). Each node keeps `reach`, a bound on `d(node, c) + 2 R_c` over its
///   subtree: when `d(node, s) >= reach`, no group of the subtree needs a visit, and a child
///   at distance `e` from its parent is ruled out without computing its distance when
///   `|d(parent, s) - e| >= reach`. A step computes the distances to a few thousand of the
///   selected points instead of all of them.
/// * **Partial sums** (both phases). A distance that is only compared with a bound stops as
///   soon as the sum of squares over its first coordinates reaches the bound
///   (`distance_below`): exactly, for a point's distance to a new selection, since a sum of
///   non-negative f32 terms never falls. The tree keeps its own copy of the selected points
///   turned to their principal axes (`rotation.rs`: on real projections the first 16 of 128
///   carry about 97% of the variance), so most of its distances stop after 16 or 32
///   coordinates; its bounds allow for the copy's rounding (`Rotation::error`).
///
/// `points` may be lent or given: a given matrix is freed as soon as the groups hold a copy of
/// every row, which halves the peak memory of a large selection.
pub fn greedy_select_with_progress<'a>(
    points: impl Into<CowArray<'a, f32, Ix2>>,
    count: usize,
    seed: u64,
    step: &(dyn Fn(usize) -> bool + Sync),
) -> Vec<usize> {
    greedy_select_tuned(points, count, seed, Tuning::default(), step)
}

/// Whether `a` beats `b` as the next selection: farther, or as far with a lower index.
fn beats(a: (f32, u32), b: (f32, u32)) -> bool {
    a.0 > b.0 || (a.0 == b.0 && a.1 < b.1)
}

/// `greedy_select_with_progress` with other `Tuning`: for tests (small trees and short
/// lazy phases, so that every phase and the switch are exercised on small data) and
/// benchmarks. The selections do not depend on `tuning`.
pub fn greedy_select_tuned<'a>(
    points: impl Into<CowArray<'a, f32, Ix2>>,
    count: usize,
    seed: u64,
    tuning: Tuning,
    step: &(dyn Fn(usize) -> bool + Sync),
) -> Vec<usize> {
    let mut points: CowArray<f32, Ix2> = points.into();
    let n = points.nrows();
    let count = count.min(n);
    if count == 0 {
        return Vec::new();
    }
    if !points.is_standard_layout() {
        points = points.as_standard_layout().into_owned().into();
    }
    let d = points.ncols();
    let (mut selected, mut tree, mut loose) = {
        let flat = points.as_slice().expect("standard layout");
        let initial = start(flat, n, d, seed);
        let (selected, blocks, sel) = match lazy_phase(initial, flat, d, count, tuning, step) {
            Lazy::Done(selected) => return selected,
            Lazy::Switch(selected, blocks, sel) => (selected, blocks, sel),
        };
        let (tree, loose) = switch(blocks, sel, flat, count, tuning);
        (selected, tree, loose)
    };
    // The groups hold every row now: an owned matrix goes (half the memory at 2.35 M patches).
    drop(points);
    group_phase(&mut tree, &mut loose, &mut selected, count, step);
    selected
}

/// Group phase: the remaining selections, each taking from the groups it could come closer
/// to the points that it does, into a new group of its own.
fn group_phase(
    tree: &mut Tree,
    loose: &mut Vec<Group>,
    selected: &mut Vec<usize>,
    count: usize,
    step: &(dyn Fn(usize) -> bool + Sync),
) {
    while selected.len() < count {
        let (best, holder) = next_best(tree, loose);
        let s = best.1 as usize;
        selected.push(s);
        if !step(s) {
            break;
        }
        let center = match holder {
            Holder::Node(j) => tree.nodes[j].group.row_of(best.1),
            Holder::Loose(k) => loose[k].row_of(best.1),
        }
        .to_vec();
        group_step(tree, loose, &center);
    }
}

/// One selection of the group phase, at `center`: the points it comes closer to move out of
/// their groups into its own.
fn group_step(tree: &mut Tree, loose: &mut Vec<Group>, center: &[f32]) {
    let turned = tree.rotation.apply(center);
    let search = tree.search(&turned);
    // The groups whose members could come closer: every loose group, and the open nodes'
    // groups that pass the group test, each with the least its centre's squared distance to
    // `center` can be.
    let err = tree.rotation.error;
    let mut open: Vec<(u32, f32)> = search
        .open
        .iter()
        .map(|&k| {
            let (j, sq) = search.computed[k];
            (j, (sq.sqrt() - err).max(0.0).powi(2))
        })
        .filter(|&(j, sq)| sq < 4.0 * tree.nodes[j as usize].group.max.0 * MARGIN)
        .collect();
    open.sort_unstable_by_key(|&(j, _)| j);
    let ids: Vec<u32> = open.iter().map(|&(j, _)| j).collect();
    let visit: Vec<(Option<u32>, &mut Group, f32)> = several_mut(&mut tree.nodes, &ids)
        .into_iter()
        .zip(&open)
        .map(|(node, &(j, sq))| (Some(j), &mut node.group, sq))
        .chain(loose.iter_mut().map(|g| (None, g, 0.0)))
        .collect();
    // Sharing out a few small groups costs more than it saves.
    let size: usize = visit.iter().map(|(_, g, _)| g.members.len()).sum();
    let take =
        |(id, g, to_center): (Option<u32>, &mut Group, f32)| (id, g.take_closer(center, to_center));
    let parts: Vec<(Option<u32>, Moved)> = if size < PARALLEL_VISIT {
        visit.into_iter().map(take).collect()
    } else {
        visit.into_par_iter().map(take).collect()
    };
    let parts: Vec<(Option<u32>, Moved)> = parts
        .into_iter()
        .filter(|(_, m)| !m.members.is_empty())
        .collect();
    let changed: Vec<u32> = parts.iter().filter_map(|(id, _)| *id).collect();
    let mut moved = Moved::default();
    moved
        .members
        .reserve_exact(parts.iter().map(|(_, m)| m.members.len()).sum());
    moved
        .rows
        .reserve_exact(parts.iter().map(|(_, m)| m.rows.len()).sum());
    for (_, part) in parts {
        moved.members.extend(part.members);
        moved.rows.extend(part.rows);
    }
    tree.refresh(&changed);
    tree.tighten();
    loose.retain(|g| !g.members.is_empty());
    tree.push(Group::new(moved), &turned, &search.computed);
}

/// Where the next selection is: in a node's group or in a chunk of unassigned points.
enum Holder {
    Node(usize),
    Loose(usize),
}

/// The next selection of the group phase (the best point of every group) and its group.
fn next_best(tree: &Tree, loose: &[Group]) -> ((f32, u32), Holder) {
    let (mut best, node) = tree.best.top();
    let mut holder = Holder::Node(node as usize);
    for (k, g) in loose.iter().enumerate() {
        if beats(g.max, best) {
            (best, holder) = (g.max, Holder::Loose(k));
        }
    }
    (best, holder)
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

/// Asks for `row` to be brought into the cache: a hint, nothing on other architectures.
#[inline]
fn prefetch(row: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in row.chunks(16) {
        // SAFETY: a prefetch reads nothing and faults on no address; `line` is in bounds.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// Relative margin over f32 rounding when a partial sum of squares rules a node out.
const ABANDON: f32 = 1.0 + 1e-4;

/// `squared_distance`, the same arithmetic and the same result, or `None` as soon as a
/// partial sum over the first 16, 32, 64 or 96 coordinates reaches `limit`. Then the whole
/// sum reaches it too, exactly: f32 addition of a non-negative term never lowers a sum, and
/// the final sum only adds non-negative terms to each accumulator. In the tree's turned
/// coordinates (largest variance first) most of a far point's distance is in the first ones.
#[inline]
pub(crate) fn distance_below(a: &[f32], b: &[f32], limit: f32) -> Option<f32> {
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (n, (x, y)) in (&mut ca).zip(&mut cb).enumerate() {
        for k in 0..16 {
            let t = x[k] - y[k];
            acc[k] += t * t;
        }
        if matches!(n, 0 | 1 | 3 | 5) && acc.iter().sum::<f32>() >= limit {
            return None;
        }
    }
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += (x - y) * (x - y);
    }
    Some(acc.iter().sum::<f32>() + tail)
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
    use rand::seq::index::sample;

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

    /// `greedy_select_tuned` with `lazy` lazy steps and a tree of `roots` roots and `fanout`.
    fn tuned(
        x: ArrayView2<f32>,
        count: usize,
        seed: u64,
        lazy: usize,
        (roots, fanout): (usize, usize),
    ) -> Vec<usize> {
        let tuning = Tuning {
            lazy_steps: lazy,
            roots,
            fanout,
        };
        greedy_select_tuned(x, count, seed, tuning, &|_| true)
    }

    /// The starting points `greedy_select_tuned` draws for `n` points and `seed`.
    fn starts_for(n: usize, seed: u64) -> Vec<usize> {
        let mut srng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(1));
        sample(&mut srng, n, STARTING_POINTS.min(n)).into_vec()
    }

    #[test]
    fn tree_keeps_the_direct_selection_on_random_data() {
        // Far more selections than roots, so the tree has several levels.
        for (seed, shape) in [(0u64, (1, 2)), (1, (3, 8)), (2, (16, 3)), (3, (64, 8))] {
            let mut rng = ChaCha8Rng::seed_from_u64(200 + seed);
            let x = Array2::from_shape_fn((1500, 20), |_| rng.gen::<f32>());
            let want = direct(x.view(), 300, &starts_for(x.nrows(), seed));
            for lazy in [0, 5, 100, usize::MAX] {
                let fast = tuned(x.view(), 300, seed, lazy, shape);
                assert_eq!(fast, want, "seed {seed}, tree {shape:?}, {lazy} lazy");
            }
        }
    }

    #[test]
    fn tree_keeps_the_direct_selection_on_clustered_duplicated_data() {
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
        for shape in [(2, 2), (10, 4), (50, 8)] {
            for lazy in [0, 37, usize::MAX] {
                let fast = tuned(x.view(), 600, 4, lazy, shape);
                assert_eq!(fast, want, "tree {shape:?}, {lazy} lazy");
            }
        }
    }

    #[test]
    fn tree_keeps_exact_ties_on_a_lattice() {
        // Points on an integer grid, each twice: distances tie exactly all the time, and the
        // lowest index must win every tie. Selecting every point runs down to zero radii.
        let x = Array2::from_shape_fn((2 * 343, 3), |(i, j)| {
            ((i % 343) / 7usize.pow(j as u32) % 7) as f32
        });
        let want = direct(x.view(), x.nrows(), &starts_for(x.nrows(), 7));
        for shape in [(1, 2), (5, 3), (40, 8), (ROOTS, FANOUT)] {
            for lazy in [0, 50, usize::MAX] {
                let fast = tuned(x.view(), x.nrows(), 7, lazy, shape);
                assert_eq!(fast, want, "tree {shape:?}, {lazy} lazy");
            }
        }
        // Each lattice point once, by its lower index; then (all distances 0) index 0 again,
        // as torch's argmax does.
        let mut first = want[..343].to_vec();
        first.sort();
        assert_eq!(first, (0..343).collect::<Vec<_>>());
        assert!(want[343..].iter().all(|&i| i == 0));
    }

    #[test]
    fn owned_and_strided_inputs_select_the_same() {
        // A given matrix is freed after the switch to groups; rows then come from the groups.
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        let x = Array2::from_shape_fn((600, 12), |_| rng.gen::<f32>());
        let want = direct(x.view(), 150, &starts_for(x.nrows(), 3));
        let small = Tuning {
            lazy_steps: 20,
            roots: 4,
            fanout: 3,
        };
        assert_eq!(
            greedy_select_tuned(x.clone(), 150, 3, small, &|_| true),
            want
        );
        let transposed = x.t().to_owned();
        assert_eq!(greedy_select(transposed.t(), 150, 3), want);
    }

    #[test]
    fn stops_when_asked() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let x = Array2::from_shape_fn((400, 8), |_| rng.gen::<f32>());
        let seen = std::sync::Mutex::new(Vec::new());
        let sel = greedy_select_with_progress(x.view(), 100, 0, &|s| {
            let mut seen = seen.lock().unwrap();
            seen.push(s);
            seen.len() < 10
        });
        assert_eq!(sel, greedy_select(x.view(), 10, 0));
        assert_eq!(
            seen.into_inner().unwrap(),
            sel,
            "step is told every selected row"
        );
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

    /// The plain algorithm in this module's own arithmetic: f32 squared distances
    /// (`squared_distance`), the same starting distances, a running minimum over every point
    /// at every step, argmax with the lowest index on ties. The fast search must make exactly
    /// these selections, bit for bit, whatever the scale of the data.
    fn naive(points: ArrayView2<f32>, count: usize, seed: u64) -> Vec<usize> {
        let (n, d) = points.dim();
        let flat = points.as_slice().expect("standard layout");
        let mut dist = lazy::start(flat, n, d, seed);
        let mut out = Vec::new();
        for _ in 0..count.min(n) {
            let s = (0..n).fold(0, |b, i| if dist[i] > dist[b] { i } else { b });
            out.push(s);
            for (i, m) in dist.iter_mut().enumerate() {
                *m = m.min(squared_distance(
                    &flat[i * d..(i + 1) * d],
                    &flat[s * d..(s + 1) * d],
                ));
            }
        }
        out
    }

    /// Far-apart clusters (offsets of 50 along a few axes) with spreads from 1e-4 to 1 that
    /// differ by axis (so the tree's principal axes matter), and exact duplicates: distances
    /// at scales where the turned copies' rounding is a large part of them.
    fn multiscale(n: usize, d: usize, seed: u64) -> Array2<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let clusters = 9;
        let centers = Array2::from_shape_fn((clusters, d), |(c, j)| {
            if j < 3 {
                50.0 * ((c >> j) & 1) as f32
            } else {
                0.0
            }
        });
        let spread = [1e-4f32, 1e-3, 1e-2, 1.0];
        let mut x = Array2::from_shape_fn((n, d), |(i, j)| {
            let c = i % clusters;
            let scale = spread[c % spread.len()] / (1 + j) as f32;
            centers[[c, j]] + rng.gen_range(-scale..scale)
        });
        for i in 0..n / 10 {
            let copy = x.row(i).to_owned();
            x.row_mut(n - 1 - i).assign(&copy);
        }
        x
    }

    #[test]
    fn tree_keeps_the_naive_selection_at_every_scale() {
        for (seed, d) in [(1u64, 16usize), (2, 37), (3, 128)] {
            let x = multiscale(1200, d, seed);
            let want = naive(x.view(), 400, seed);
            for shape in [(1, 2), (4, 3), (16, 8)] {
                for lazy in [0, 20, 150] {
                    let fast = tuned(x.view(), 400, seed, lazy, shape);
                    assert_eq!(fast, want, "d {d}, tree {shape:?}, {lazy} lazy");
                }
            }
        }
    }

    #[test]
    fn tree_keeps_the_naive_selection_on_random_and_clustered_data() {
        let mut rng = ChaCha8Rng::seed_from_u64(33);
        let random = Array2::from_shape_fn((2000, 128), |_| rng.gen::<f32>());
        let centers = Array2::from_shape_fn((15, 128), |_| rng.gen_range(-3.0f32..3.0));
        let mut clustered = Array2::from_shape_fn((2000, 128), |(i, j)| {
            centers[[i % 15, j]] + rng.gen_range(-0.1f32..0.1) * (j % 7) as f32
        });
        for i in 0..200 {
            let copy = clustered.row(i).to_owned();
            clustered.row_mut(1500 + i).assign(&copy);
        }
        for (name, x) in [("random", random), ("clustered", clustered)] {
            let want = naive(x.view(), 700, 8);
            for shape in [(2, 2), (8, 4), (ROOTS, FANOUT)] {
                for lazy in [0, 64] {
                    let fast = tuned(x.view(), 700, 8, lazy, shape);
                    assert_eq!(fast, want, "{name}, tree {shape:?}, {lazy} lazy");
                }
            }
        }
    }

    #[test]
    fn distance_below_is_squared_distance_or_rules_it_out() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        for len in [0, 1, 15, 16, 17, 33, 64, 100, 128] {
            for _ in 0..200 {
                let a: Vec<f32> = (0..len).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
                let b: Vec<f32> = (0..len).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
                let full = squared_distance(&a, &b);
                let all = distance_below(&a, &b, f32::INFINITY).expect("no limit");
                assert_eq!(all.to_bits(), full.to_bits(), "the same arithmetic");
                let limit = full * rng.gen_range(0.0f32..2.0);
                match distance_below(&a, &b, limit) {
                    Some(got) => assert_eq!(got.to_bits(), full.to_bits()),
                    None => assert!(full >= limit, "{full} ruled out at {limit}"),
                }
            }
        }
    }

    #[test]
    fn turned_distances_stay_within_the_stated_error() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for d in [3usize, 16, 128] {
            let x = multiscale(3000, d, 5)
                + &Array2::from_shape_fn((3000, d), |(_, j)| 7.0 - j as f32 * rng.gen::<f32>());
            let flat = x.as_slice().unwrap();
            let rot = rotation::Rotation::fit(flat, x.nrows(), d);
            let turned: Vec<Vec<f32>> = x
                .rows()
                .into_iter()
                .map(|r| rot.apply(r.as_slice().unwrap()))
                .collect();
            for _ in 0..2000 {
                let (i, j) = (rng.gen_range(0..x.nrows()), rng.gen_range(0..x.nrows()));
                let exact: f64 = x
                    .row(i)
                    .iter()
                    .zip(x.row(j).iter())
                    .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let got = (squared_distance(&turned[i], &turned[j]) as f64).sqrt();
                let bound = rot.error as f64 + 1e-5 * exact;
                assert!((got - exact).abs() <= bound, "d {d}: {got} vs {exact}");
            }
        }
    }
}
