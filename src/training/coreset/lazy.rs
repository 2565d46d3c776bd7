//! The coreset search's first phase and the switch to the second (see
//! `greedy_select_with_progress`): every point's starting distance, the lazy phase over
//! blocks of consecutive rows, and the filing of every point into the group of its nearest
//! selected point for the group phase.

use rand::{seq::index::sample, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::*;

/// "No nearest selected point yet": the point still has its starting distance.
const UNASSIGNED: u32 = u32::MAX;

/// A run of consecutive rows in the lazy phase.
pub(super) struct Block {
    first: usize,
    /// Squared distance of each row to the selection (its starting value until a selected
    /// point comes closer).
    dist: Vec<f32>,
    /// Position in the selection of each row's nearest selected point, or `UNASSIGNED`.
    nearest: Vec<u32>,
    /// How many selections `dist` takes into account.
    applied: usize,
    /// Best row then (as `Group::max`): exact when `applied` is the selection's length, an
    /// upper bound otherwise, since distances only fall.
    max: (f32, u32),
    /// Chosen to catch up in the current round.
    due: bool,
}

/// The selection so far, as the lazy phase needs it.
pub(super) struct Selection {
    d: usize,
    /// Rows of the selected points, one after another.
    rows: Vec<f32>,
    /// `later[a][j - a - 1]`: squared distance between selected points `a` and `j > a`, so
    /// that a point near `a` reads the distances to the selections it missed in a row.
    later: Vec<Vec<f32>>,
}

impl Selection {
    fn len(&self) -> usize {
        self.later.len()
    }

    fn row(&self, j: usize) -> &[f32] {
        &self.rows[j * self.d..(j + 1) * self.d]
    }

    fn push(&mut self, row: &[f32]) {
        let (d, rows) = (self.d, &self.rows);
        let gap = |(a, later): (usize, &mut Vec<f32>)| {
            later.push(squared_distance(&rows[a * d..(a + 1) * d], row));
        };
        if self.later.len() < 512 {
            self.later.iter_mut().enumerate().for_each(gap);
        } else {
            self.later.par_iter_mut().enumerate().for_each(gap);
        }
        self.later.push(Vec::new());
        self.rows.extend_from_slice(row);
    }
}

impl Block {
    /// Takes the selections `applied..` into account.
    fn catch_up(&mut self, flat: &[f32], sel: &Selection) {
        let (d, k) = (sel.d, sel.len());
        for (o, (dist, nearest)) in self.dist.iter_mut().zip(&mut self.nearest).enumerate() {
            let row = &flat[(self.first + o) * d..(self.first + o + 1) * d];
            for j in self.applied..k {
                // Elkan's test, as `Group::take_closer`'s: d(p, t) >= d(a, t) - d(p, a) >=
                // d(p, a) when d(a, t) >= 2 d(p, a), and `dist` is d(p, a)^2 once assigned.
                if *nearest != UNASSIGNED {
                    let a = *nearest as usize;
                    if sel.later[a][j - a - 1] >= 4.0 * *dist * MARGIN {
                        continue;
                    }
                }
                // Exact: a distance left unfinished would not have been below `dist`.
                if let Some(to) = distance_below(row, sel.row(j), *dist) {
                    if to < *dist {
                        *dist = to;
                        *nearest = j as u32;
                    }
                }
            }
        }
        self.applied = k;
        self.refresh_max();
    }

    fn refresh_max(&mut self) {
        let first = self.first as u32;
        self.max = self
            .dist
            .iter()
            .enumerate()
            .fold(NONE, |b, (o, &m)| better(b, (m, first + o as u32)));
    }
}

/// The next selection of the lazy phase: blocks whose stale maximum beats the best
/// up-to-date one catch up (the highest first, a few in parallel) until none does.
fn lazy_next(blocks: &mut [Block], flat: &[f32], sel: &Selection) -> (f32, u32) {
    let k = sel.len();
    let batch = 2 * rayon::current_num_threads();
    loop {
        let fresh = blocks
            .iter()
            .filter(|b| b.applied == k)
            .map(|b| b.max)
            .fold(NONE, better);
        let mut stale: Vec<(f32, u32, usize)> = blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| b.applied < k && beats(b.max, fresh))
            .map(|(i, b)| (b.max.0, b.max.1, i))
            .collect();
        if stale.is_empty() {
            return fresh;
        }
        if stale.len() > batch {
            stale.select_nth_unstable_by(batch - 1, |a, b| {
                if beats((a.0, a.1), (b.0, b.1)) {
                    std::cmp::Ordering::Less
                } else {
                    std::cmp::Ordering::Greater
                }
            });
            stale.truncate(batch);
        }
        for &(_, _, i) in &stale {
            blocks[i].due = true;
        }
        blocks.par_iter_mut().filter(|b| b.due).for_each(|b| {
            b.catch_up(flat, sel);
            b.due = false;
        });
    }
}

/// Start: each point's mean Euclidean distance to the random starting points, squared.
pub(super) fn start(flat: &[f32], n: usize, d: usize, seed: u64) -> Vec<f32> {
    let row = |i: usize| &flat[i * d..(i + 1) * d];
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(1));
    let starts: Vec<usize> = sample(&mut rng, n, STARTING_POINTS.min(n)).into_vec();
    (0..n)
        .into_par_iter()
        .map(|i| {
            let mean = starts
                .iter()
                .map(|&s| (squared_distance(row(i), row(s)) as f64).sqrt())
                .sum::<f64>()
                / starts.len() as f64;
            (mean * mean) as f32
        })
        .collect()
}

/// How the lazy phase ended: the selection is complete (or `step` stopped it), or the group
/// phase goes on from its blocks and selected rows.
pub(super) enum Lazy {
    Done(Vec<usize>),
    Switch(Vec<usize>, Vec<Block>, Selection),
}

/// Lazy phase: the first `tuning.lazy_steps` selections from the blocks of the starting
/// distances `initial`, each block catching up with the selections only when it could hold
/// the next one.
pub(super) fn lazy_phase(
    initial: Vec<f32>,
    flat: &[f32],
    d: usize,
    count: usize,
    tuning: Tuning,
    step: &(dyn Fn(usize) -> bool + Sync),
) -> Lazy {
    let row = |i: usize| &flat[i * d..(i + 1) * d];
    let mut blocks: Vec<Block> = initial
        .chunks(BLOCK)
        .enumerate()
        .map(|(b, dist)| {
            let mut block = Block {
                first: b * BLOCK,
                dist: dist.to_vec(),
                nearest: vec![UNASSIGNED; dist.len()],
                applied: 0,
                max: NONE,
                due: false,
            };
            block.refresh_max();
            block
        })
        .collect();
    drop(initial);
    let mut sel = Selection {
        d,
        rows: Vec::new(),
        later: Vec::new(),
    };
    let mut selected = Vec::with_capacity(count);
    let mut next = blocks.iter().map(|b| b.max).fold(NONE, better).1;
    let lazy_steps = tuning.lazy_steps.min(count);
    while selected.len() < lazy_steps {
        let s = next as usize;
        selected.push(s);
        if !step(s) {
            return Lazy::Done(selected);
        }
        sel.push(row(s));
        if selected.len() < count {
            next = lazy_next(&mut blocks, flat, &sel).1;
        }
    }
    if selected.len() == count {
        return Lazy::Done(selected);
    }
    Lazy::Switch(selected, blocks, sel)
}

/// Switch: every block catches up, and its points join the group of their nearest selected
/// point (or stay unassigned), as the group phase would have filed them. Returns the tree of
/// the selected points' groups and the unassigned points in chunks.
pub(super) fn switch(
    mut blocks: Vec<Block>,
    sel: Selection,
    flat: &[f32],
    count: usize,
    tuning: Tuning,
) -> (Tree, Vec<Group>) {
    let d = sel.d;
    let row = |i: usize| &flat[i * d..(i + 1) * d];
    blocks.par_iter_mut().for_each(|b| b.catch_up(flat, &sel));
    // Sized exactly first: the rows are a second copy of the matrix, and growing by doubling
    // could make that two.
    let mut sizes = vec![0usize; sel.len() + 1];
    for b in &blocks {
        for &a in &b.nearest {
            sizes[if a == UNASSIGNED {
                sel.len()
            } else {
                a as usize
            }] += 1;
        }
    }
    let mut members: Vec<Moved> = sizes
        .iter()
        .map(|&n| Moved {
            members: Vec::with_capacity(n),
            rows: Vec::with_capacity(n * d),
        })
        .collect();
    let mut unassigned = members.pop().expect("one more than the selection");
    for b in &blocks {
        for (o, (&m, &a)) in b.dist.iter().zip(&b.nearest).enumerate() {
            let i = b.first + o;
            let to = match a {
                UNASSIGNED => &mut unassigned,
                a => &mut members[a as usize],
            };
            to.members.push((i as u32, m));
            to.rows.extend_from_slice(row(i));
        }
    }
    drop(blocks);
    // Unassigned points are always visited; split them so the threads share that work.
    let loose: Vec<Group> = unassigned
        .members
        .chunks(4096)
        .zip(unassigned.rows.chunks(4096 * d))
        .map(|(m, r)| {
            let chunk = Moved {
                members: m.to_vec(),
                rows: r.to_vec(),
            };
            Group::new(chunk)
        })
        .collect();
    drop(unassigned);
    let rotation = Rotation::fit(flat, flat.len() / d, d);
    let mut tree = Tree::new(d, count, tuning, rotation);
    for (j, m) in members.into_iter().enumerate() {
        // The search's distances, from the lazy phase's table.
        let computed: Vec<(u32, f32)> = (0..j)
            .map(|a| (a as u32, sel.later[a][j - a - 1]))
            .collect();
        tree.note(&computed);
        let turned = tree.rotation.apply(sel.row(j));
        tree.push(Group::new(m), &turned, &computed);
    }
    (tree, loose)
}
