//! The tree search's own copy of the selected points, turned to their principal axes (see
//! `Tree::search`).
//!
//! Why: late in a large selection the search computes thousands of distances to selected
//! points per step, and almost all of them only to find that a subtree is too far away. On
//! real projections the first 16 principal axes carry about 97% of the variance, so in the
//! turned coordinates a partial sum over the first 16 or 32 of them already shows that a
//! point is too far, and the rest of its row is not read (`distance_below`).
//!
//! The search's distances only ever feed bounds (which groups a new selection could take
//! points from), never a point's distance to the selection, so they may differ from the plain
//! ones by rounding, as long as every bound allows for it: `Rotation::error` bounds the
//! difference between a distance in the turned coordinates and the true one.

use rayon::prelude::*;

/// At most this many rows (evenly spaced) estimate the covariance.
const SAMPLE: usize = 65_536;

/// A rigid motion of the points: `x -> axes (x - mean)`.
pub(super) struct Rotation {
    d: usize,
    mean: Vec<f32>,
    /// `d x d`, column `i` the `i`-th principal axis (largest variance first), orthonormal:
    /// the turned copy of `x` is the sum of the rows weighted by `x - mean`, which vectorizes
    /// across the coordinates (a step turns its selection, on one thread).
    axes: Vec<f32>,
    /// Bound on `|d'(a, b) - d(a, b)|` beyond a relative 1e-5, for any two rows `a`, `b` of
    /// the data, `d'` the Euclidean distance of their turned copies computed in f32.
    pub(super) error: f32,
}

impl Rotation {
    /// The principal axes of the rows of `flat` (`n x d`, row-major).
    pub(super) fn fit(flat: &[f32], n: usize, d: usize) -> Self {
        let step = n.div_ceil(SAMPLE).max(1);
        let rows: Vec<&[f32]> = (0..n)
            .step_by(step)
            .map(|i| &flat[i * d..(i + 1) * d])
            .collect();
        let mut mean64 = vec![0f64; d];
        for r in &rows {
            for (m, &v) in mean64.iter_mut().zip(r.iter()) {
                *m += v as f64;
            }
        }
        mean64.iter_mut().for_each(|m| *m /= rows.len() as f64);
        let mut cov = vec![0f64; d * d];
        for r in &rows {
            let c: Vec<f64> = r.iter().zip(&mean64).map(|(&v, m)| v as f64 - m).collect();
            for i in 0..d {
                for j in i..d {
                    cov[i * d + j] += c[i] * c[j];
                }
            }
        }
        for i in 0..d {
            for j in 0..i {
                cov[i * d + j] = cov[j * d + i];
            }
        }
        let axes64 = eigenvectors(cov, d);
        let mean: Vec<f32> = mean64.iter().map(|&m| m as f32).collect();
        let axes: Vec<f32> = (0..d * d)
            .map(|k| axes64[(k % d) * d + k / d] as f32)
            .collect();
        // The largest distance of a row from `mean`: the turned copy of a row `x` is off by at
        // most (d + 1) u |x - mean| per coordinate (u = 2^-24: one rounding for the
        // difference, d for the dot product with an axis of norm 1 + 1e-6), so by at most
        // sqrt(d) (d + 1) u |x - mean| in all; twice that for a distance, doubled again for
        // margin. The axes' own departure from orthonormality (f32 rounding of f64 axes,
        // about 1e-6) and the rounding of the distance itself are relative, under 1e-5.
        let norm = (0..n)
            .into_par_iter()
            .map(|i| {
                let r = &flat[i * d..(i + 1) * d];
                r.iter()
                    .zip(&mean)
                    .map(|(&v, &m)| ((v - m) as f64).powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .reduce(|| 0.0, f64::max);
        let unit = (f32::EPSILON / 2.0) as f64;
        let error = (4.0 * (d as f64).sqrt() * (d as f64 + 1.0) * unit * norm) as f32;
        Rotation {
            d,
            mean,
            axes,
            error,
        }
    }

    /// The turned copy of row `x`.
    pub(super) fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; self.d];
        for ((&v, &m), row) in x.iter().zip(&self.mean).zip(self.axes.chunks_exact(self.d)) {
            let c = v - m;
            for (o, &a) in out.iter_mut().zip(row) {
                *o += a * c;
            }
        }
        out
    }
}

/// Eigenvectors of the symmetric `d x d` matrix `a` (row-major), as the rows of a `d x d`
/// matrix, largest eigenvalue first. Any orthonormal set of axes keeps the selections exact
/// (the bounds allow for the turned copy's rounding, whatever the axes); principal ones only
/// make the partial sums stop sooner.
fn eigenvectors(a: Vec<f64>, d: usize) -> Vec<f64> {
    let eigen = nalgebra::SymmetricEigen::new(nalgebra::DMatrix::from_row_slice(d, d, &a));
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&i, &j| {
        eigen.eigenvalues[j]
            .total_cmp(&eigen.eigenvalues[i])
            .then(i.cmp(&j))
    });
    let mut rows = vec![0f64; d * d];
    for (r, &i) in order.iter().enumerate() {
        for k in 0..d {
            rows[r * d + k] = eigen.eigenvectors[(k, i)];
        }
    }
    rows
}
