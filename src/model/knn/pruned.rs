//! Exact nearest-neighbour search of a flat bank by projection bounds: most bank vectors are
//! ruled out by a lower bound that costs `r` instead of `D` multiply-adds, and only the few
//! left are measured exactly. Same answers as a brute-force search (the `k` bank vectors of
//! smallest exact distance, ties by label), on any CPU, in float32 arithmetic.
//!
//! ## The bound
//! `P` (`r x D`, rows orthonormal) holds the bank's top-`r` principal directions and `c` its
//! mean ([`Projection`], stored in the model). For a vector `x` let `x' = x - c`, `p(x) = P x'`
//! and `rho(x) = ||x' - P^T P x'|| = sqrt(||x'||^2 - ||p(x)||^2)` (the residual). For a query
//! `q` and a bank vector `b`, Pythagoras and the reverse triangle inequality give
//!
//! ```text
//! ||q - b||^2 = ||P(q' - b')||^2 + ||R(q' - b')||^2 >= ||p(q) - p(b)||^2 + (rho(q) - rho(b))^2
//! ```
//!
//! (`R = I - P^T P`). With a threshold `t` at least the true `k`-th smallest distance, every
//! `b` whose bound exceeds `t` can be skipped; `t` comes from exact distances of the bank
//! vectors with the smallest bounds, and shrinks as better ones are found.
//!
//! ## Rounding (why the pruning never drops a true neighbour)
//! `u = 2^-24`, `gamma_n = n u / (1 - n u)`; `N(q, b) = ||q'|| + ||b'||`, and
//! `N^2 <= 2 (||q'||^2 + ||b'||^2)`. All errors below are bounded by multiples of
//! `||q'||^2 + ||b'||^2`, so one margin `kappa (||q'||^2 + ||b'||^2)` covers them
//! (`Pruned::kappa`), with `kappa` 1.25 times the sum of:
//!
//! - *The stored basis is not exactly orthonormal.* With `F = P P^T - I` (measured at load, in
//!   f64), `P = H P0` with `P0` orthonormal and `||P - P0|| <= ||F||_F =: eps` (polar
//!   decomposition: the singular values `s` of `P` have `|s - 1| <= |s^2 - 1|`). The
//!   identity above holds for `P0`; `P` is what we multiply by.
//! - *Projections in float32.* `x'` is rounded once per element (`|e| <= u |x'_i|`); the
//!   product `P x'` is summed in float32 over blocks of [`BLOCK`] dims (error per component
//!   `<= gamma_BLOCK sum |P_ij x'_j| <= gamma_BLOCK ||x'||`, Cauchy-Schwarz on a unit-ish row),
//!   the blocks in f64, then rounded to float32 (`u` relative). So the computed `p~(x)`
//!   has `||p~(x) - P0 x'|| <= eta1 ||x'||` with
//!   `eta1 = eps + (sqrt(r) gamma_BLOCK + 2u)(1 + eps)`, and
//!   `| ||p~(q) - p~(b)||^2 - ||P0(q' - b')||^2 | <= eta1 (2 + eta1) N^2`: the first term.
//! - *Residuals.* `rho~^2 = ||x'~||^2 - ||p~(x)||^2` in f64 is within
//!   `eta2 ||x'||^2`, `eta2 = 2u + u^2 + eta1 (2 + eta1)`, of `rho(x)^2`; we keep the
//!   interval `[sqrt(rho~^2 - eta2 n), sqrt(rho~^2 + eta2 n)]` (`n` the computed `||x'||^2`
//!   over `(1-u)^2`), rounded outwards to float32, and use the gap between the query's and the
//!   bank vector's intervals, a lower bound of `|rho(q) - rho(b)|`. The gap's float32
//!   subtraction and square: `4u (||q'||^2 + ||b'||^2)` (the gap is at most the larger norm).
//! - *The float32 kernel* computes `||p~q||^2 + (||p~b||^2 - kappa ||b'||^2) - 2 p~q.p~b +
//!   gap^2`: the dot product summed over `r` terms (`2 gamma_r ||p~q|| ||p~b||`, at most
//!   `gamma_r (1 + eta1)^2 (||q'||^2 + ||b'||^2)`), the norms rounded to float32 and the four
//!   terms added (`2u + 5 gamma_4`, each term being at most `2 (||q'||^2 + ||b'||^2)`).
//!
//! So a bank vector is a candidate when its kernel value is at most `t + kappa ||q'||^2`
//! (the bank's share of the margin is folded into its constant, rounded down). The exact
//! distances are `||x - y||^2` summed in f64 and rounded once to float32 ([`super::squared_distance`]),
//! within `u` (relative) of the true distance, so `t` is taken `2u` above the computed `k`-th
//! best. A bank vector never measured then has a computed distance above every reported one:
//! the result is the brute-force answer over the computed distances.
//!
//! A query whose candidates would cost more than a dense search (`cap`, measured: see
//! `Knn`) is handed back for FAISS to search.

use anyhow::{bail, ensure, Context, Result};
use base64::Engine;
use rayon::prelude::*;
use tch::{Kind, Tensor};

use crate::util::records::StoredProjection;

/// Principal directions stored with a model: enough for the search to pick its rank.
pub const RANK: usize = 64;
/// Directions used by default: the measured optimum on screw (experiments/knn/).
pub const DEFAULT_RANK: usize = 16;
/// Dims summed in float32 before the partial sums go to f64 (see the module doc).
pub const BLOCK: usize = 64;
/// Bank vectors per kernel block: one AVX-512 register, two AVX2 ones.
const LANES: usize = 16;
/// At most this many bank rows enter the principal component analysis (evenly spread).
const PCA_ROWS: usize = 32_768;

const U: f64 = 1.0 / 16_777_216.0;

fn gamma(n: usize) -> f64 {
    n as f64 * U / (1.0 - n as f64 * U)
}

/// The bank's mean and top principal directions (rows of `basis`, by decreasing variance).
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    pub d: usize,
    pub rank: usize,
    pub mean: Vec<f32>,
    /// `rank x d`, row-major.
    pub basis: Vec<f32>,
}

impl Projection {
    /// The principal directions of `bank` (`[M, d]` row-major): mean in f64 over every row,
    /// covariance over at most `PCA_ROWS` evenly spread rows (the directions only steer how
    /// well the search prunes, never its answers), eigenvectors by libtorch in f64.
    pub fn fit(bank: &[f32], d: usize) -> Result<Projection> {
        let m = bank.len() / d;
        ensure!(m > 0 && d > 0, "cannot fit a projection to an empty bank");
        let rank = RANK.min(d);
        let mut mean = vec![0f64; d];
        for row in bank.chunks_exact(d) {
            for (s, x) in mean.iter_mut().zip(row) {
                *s += *x as f64;
            }
        }
        let mean: Vec<f32> = mean.iter().map(|s| (s / m as f64) as f32).collect();
        let n = m.min(PCA_ROWS);
        let mut sample = Vec::with_capacity(n * d);
        for i in 0..n {
            let row = &bank[(i * m / n) * d..][..d];
            sample.extend(row.iter().zip(&mean).map(|(x, c)| x - c));
        }
        let _guard = tch::no_grad_guard();
        let x = Tensor::from_slice(&sample).reshape([n as i64, d as i64]);
        let cov = x.tr().matmul(&x).to_kind(Kind::Double);
        let (_, vectors) = cov.linalg_eigh("L");
        // Columns by ascending eigenvalue: the last `rank`, largest first, as rows.
        let top = vectors
            .narrow(1, (d - rank) as i64, rank as i64)
            .flip([1])
            .tr()
            .contiguous()
            .to_kind(Kind::Float);
        let mut basis = vec![0f32; rank * d];
        top.copy_data(&mut basis, rank * d);
        ensure!(
            basis.iter().all(|v| v.is_finite()),
            "the bank's principal directions are not finite"
        );
        Ok(Projection {
            d,
            rank,
            mean,
            basis,
        })
    }

    /// `eps = ||P P^T - I||_F` (f64): how far the stored rows are from orthonormal.
    pub fn defect(&self, r: usize) -> f64 {
        let rows: Vec<&[f32]> = self.basis.chunks_exact(self.d).take(r).collect();
        let mut sum = 0f64;
        for (i, a) in rows.iter().enumerate() {
            for (j, b) in rows.iter().enumerate() {
                let dot: f64 = a.iter().zip(*b).map(|(x, y)| *x as f64 * *y as f64).sum();
                let e = dot - if i == j { 1.0 } else { 0.0 };
                sum += e * e;
            }
        }
        sum.sqrt() * (1.0 + 1e-9) + 1e-15
    }

    /// The record kept in the model's sidecar (little-endian float32, base64, with BLAKE3).
    pub fn to_stored(&self) -> StoredProjection {
        let bytes = self.bytes();
        StoredProjection {
            rank: self.rank,
            blake3: crate::util::fsutil::blake3_bytes(&bytes),
            mean_basis_f32le: base64::engine::general_purpose::STANDARD.encode(&bytes),
        }
    }

    /// The projection a sidecar records, checked against its checksum and the bank's
    /// dimension `d`.
    pub fn from_stored(stored: &StoredProjection, d: usize) -> Result<Projection> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&stored.mean_basis_f32le)
            .context("its kNN projection is not valid base64")?;
        if crate::util::fsutil::blake3_bytes(&bytes) != stored.blake3 {
            bail!("its kNN projection does not match its checksum");
        }
        if stored.rank == 0 || stored.rank > d || bytes.len() != (stored.rank + 1) * d * 4 {
            bail!(
                "its kNN projection holds {} bytes, not {} directions of dimension {d}",
                bytes.len(),
                stored.rank
            );
        }
        let floats: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(Projection {
            d,
            rank: stored.rank,
            mean: floats[..d].to_vec(),
            basis: floats[d..].to_vec(),
        })
    }

    fn bytes(&self) -> Vec<u8> {
        self.mean
            .iter()
            .chain(&self.basis)
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }
}

/// Vectors as the bound sees them: projections, squared centred norms, residual intervals.
struct Projected {
    /// `[n, r]` float32 projections.
    proj: Vec<f32>,
    /// `||p~||^2` rounded to float32.
    pnorm2: Vec<f32>,
    /// Upper bound of `||x'||^2` (the computed one over `(1-u)^2`).
    cnorm2: Vec<f64>,
    rho_lo: Vec<f32>,
    rho_hi: Vec<f32>,
}

/// Rounds `v` to a float32 at most `v` / at least `v`.
fn down(v: f64) -> f32 {
    let f = v as f32;
    if f as f64 > v {
        f.next_down()
    } else {
        f
    }
}
fn up(v: f64) -> f32 {
    let f = v as f32;
    if (f as f64) < v {
        f.next_up()
    } else {
        f
    }
}

/// `rows` (`[n, D]`) as the bound sees them, with the first `r` directions of `p` (see the
/// module doc for the arithmetic); products in chunks of rows that keep the `[blocks, rows, r]`
/// partial sums near 32 MiB.
fn project(p: &Projection, r: usize, eta2: f64, rows: &[f32]) -> Projected {
    let d = p.d;
    let n = rows.len() / d;
    let blocks = d.div_ceil(BLOCK);
    let padded = blocks * BLOCK;
    let _guard = tch::no_grad_guard();
    let mut basis = vec![0f32; r * padded];
    for (i, row) in p.basis.chunks_exact(d).take(r).enumerate() {
        basis[i * padded..i * padded + d].copy_from_slice(row);
    }
    // [blocks, BLOCK, r]
    let basis = Tensor::from_slice(&basis)
        .reshape([r as i64, blocks as i64, BLOCK as i64])
        .permute([1, 2, 0])
        .contiguous();
    let mut out = Projected {
        proj: vec![0f32; n * r],
        pnorm2: vec![0f32; n],
        cnorm2: vec![0f64; n],
        rho_lo: vec![0f32; n],
        rho_hi: vec![0f32; n],
    };
    let chunk = ((32 << 20) / (4 * blocks * r).max(1)).clamp(1, 8192);
    for start in (0..n).step_by(chunk) {
        let end = (start + chunk).min(n);
        let c = end - start;
        let mut centred = vec![0f32; c * padded];
        for (dst, src) in centred
            .chunks_exact_mut(padded)
            .zip(rows[start * d..end * d].chunks_exact(d))
        {
            for ((o, x), m) in dst.iter_mut().zip(src).zip(&p.mean) {
                *o = x - m;
            }
        }
        for (i, row) in centred.chunks_exact(padded).enumerate() {
            let n2: f64 = row.iter().map(|v| (*v as f64) * (*v as f64)).sum();
            out.cnorm2[start + i] = n2 / (1.0 - U).powi(2) * (1.0 + 1e-12);
        }
        // [blocks, c, BLOCK] x [blocks, BLOCK, r] -> [blocks, c, r], summed over blocks in f64.
        let x = Tensor::from_slice(&centred)
            .reshape([c as i64, blocks as i64, BLOCK as i64])
            .permute([1, 0, 2]);
        let sums = x
            .bmm(&basis)
            .to_kind(Kind::Double)
            .sum_dim_intlist([0i64].as_slice(), false, Kind::Double)
            .to_kind(Kind::Float)
            .contiguous();
        sums.copy_data(&mut out.proj[start * r..end * r], c * r);
    }
    for i in 0..n {
        let pv = &out.proj[i * r..(i + 1) * r];
        let p2: f64 = pv.iter().map(|v| (*v as f64) * (*v as f64)).sum();
        out.pnorm2[i] = p2 as f32;
        let n2 = out.cnorm2[i];
        let rho2 = n2 * (1.0 - U).powi(2) - p2;
        let slack = eta2 * n2;
        out.rho_lo[i] = down((rho2 - slack).max(0.0).sqrt() * (1.0 - 1e-12));
        out.rho_hi[i] = up((rho2 + slack).max(0.0).sqrt() * (1.0 + 1e-12));
    }
    out
}

/// One query's `k` nearest: distances and labels, nearest first.
type Nearest = (Vec<f32>, Vec<i64>);

/// What one search found and did.
pub struct Searched {
    pub distances: Vec<f32>,
    pub labels: Vec<i64>,
    /// Queries whose candidates exceeded the cap: left for a dense search.
    pub dense: Vec<usize>,
    /// Exact distances computed, over the queries answered here.
    pub exact: usize,
}

/// The bank prepared for the bound: projections in blocks of `LANES` rows, dimension-major
/// within a block, with each row's constant and residual interval.
pub struct Pruned {
    d: usize,
    m: usize,
    r: usize,
    projection: Projection,
    eta2: f64,
    kappa: f64,
    /// `[blocks, r, LANES]`.
    blocks: Vec<f32>,
    /// Per row (padded to whole blocks): `||p~b||^2 - kappa ||b'||^2` rounded down; padding
    /// rows get +inf so they are never candidates.
    constant: Vec<f32>,
    rho_lo: Vec<f32>,
    rho_hi: Vec<f32>,
    isa: kernel::Isa,
}

impl Pruned {
    /// The search of `bank` (`[M, D]`) with the first `r` directions of `projection`.
    pub fn new(projection: Projection, bank: &[f32], r: usize) -> Result<Pruned> {
        let d = projection.d;
        ensure!(
            bank.len().is_multiple_of(d) && projection.basis.len() == projection.rank * d,
            "projection of dimension {d} does not fit the bank"
        );
        let r = r.clamp(1, projection.rank);
        let m = bank.len() / d;
        let eps = projection.defect(r);
        if eps > 1e-3 {
            bail!("the stored kNN projection is not orthonormal (defect {eps:.1e})");
        }
        let eta1 = eps + ((r as f64).sqrt() * gamma(BLOCK) + 2.0 * U) * (1.0 + eps);
        let eta2 = 2.0 * U + U * U + eta1 * (2.0 + eta1);
        let kappa = 1.25
            * (2.0 * eta1 * (2.0 + eta1)
                + gamma(r) * (1.0 + eta1).powi(2)
                + 4.0 * U
                + 2.0 * U
                + 5.0 * gamma(4));
        let p = project(&projection, r, eta2, bank);
        let nblocks = m.div_ceil(LANES);
        let mut blocks = vec![0f32; nblocks * r * LANES];
        let mut constant = vec![f32::INFINITY; nblocks * LANES];
        let mut rho_lo = vec![0f32; nblocks * LANES];
        let mut rho_hi = vec![0f32; nblocks * LANES];
        for i in 0..m {
            let (b, l) = (i / LANES, i % LANES);
            for j in 0..r {
                blocks[(b * r + j) * LANES + l] = p.proj[i * r + j];
            }
            constant[i] = down(p.pnorm2[i] as f64 - kappa * p.cnorm2[i]);
            rho_lo[i] = p.rho_lo[i];
            rho_hi[i] = p.rho_hi[i];
        }
        Ok(Pruned {
            d,
            m,
            r,
            projection,
            eta2,
            kappa,
            blocks,
            constant,
            rho_lo,
            rho_hi,
            isa: kernel::Isa::best(),
        })
    }

    /// Directions in use.
    pub fn rank(&self) -> usize {
        self.r
    }

    /// The projection this search was built from.
    pub fn projection(&self) -> &Projection {
        &self.projection
    }

    /// The `k` nearest of each query (`[N, D]`) among `bank` (the rows this search was built
    /// from); queries with more than `cap` candidates are listed in `dense` instead.
    pub fn search(&self, bank: &[f32], queries: &[f32], k: usize, cap: usize) -> Searched {
        let (d, r) = (self.d, self.r);
        let nq = queries.len() / d;
        let k = k.min(self.m).max(1);
        let q = project(&self.projection, r, self.eta2, queries);
        let tile = self.isa.tile();
        let mpad = self.constant.len();
        let results: Vec<(usize, Option<Nearest>, usize)> = (0..nq)
            .step_by(tile)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map_init(
                || vec![0f32; tile * mpad],
                |bounds, start| {
                    let end = (start + tile).min(nq);
                    let mut qp_t = vec![0f32; r * tile];
                    let mut qc = vec![0f32; tile];
                    let mut qlo = vec![0f32; tile];
                    let mut qhi = vec![0f32; tile];
                    for t in 0..tile {
                        // Padding queries repeat the last one.
                        let i = (start + t).min(end - 1);
                        for j in 0..r {
                            qp_t[j * tile + t] = q.proj[i * r + j];
                        }
                        qc[t] = q.pnorm2[i];
                        qlo[t] = q.rho_lo[i];
                        qhi[t] = q.rho_hi[i];
                    }
                    let mut mins = vec![0f32; tile];
                    kernel::lower_bounds(
                        self.isa,
                        r,
                        &qp_t,
                        &qc,
                        &qlo,
                        &qhi,
                        &self.blocks,
                        &self.constant,
                        &self.rho_lo,
                        &self.rho_hi,
                        bounds,
                        &mut mins,
                    );
                    (start..end)
                        .map(|i| {
                            let lb = &bounds[(i - start) * mpad..][..self.m];
                            let x = &queries[i * d..(i + 1) * d];
                            let margin = self.kappa * q.cnorm2[i];
                            let least = mins[i - start];
                            let (found, exact) = self.refine(bank, x, lb, least, margin, k, cap);
                            (i, found, exact)
                        })
                        .collect::<Vec<_>>()
                },
            )
            .flatten()
            .collect();
        let mut out = Searched {
            distances: vec![0f32; nq * k],
            labels: vec![-1; nq * k],
            dense: Vec::new(),
            exact: 0,
        };
        for (i, found, exact) in results {
            match found {
                Some((dist, lab)) => {
                    out.distances[i * k..(i + 1) * k].copy_from_slice(&dist);
                    out.labels[i * k..(i + 1) * k].copy_from_slice(&lab);
                    out.exact += exact;
                }
                None => out.dense.push(i),
            }
        }
        out
    }

    /// One query `x` with its bounds `lb` against every bank row (`least` the smallest):
    /// the exact `k` nearest, measuring candidates in order of their bound until the bound
    /// passes the threshold; `None` when more than `cap` rows are candidates. Also the exact
    /// distances computed.
    #[allow(clippy::too_many_arguments)]
    fn refine(
        &self,
        bank: &[f32],
        x: &[f32],
        lb: &[f32],
        least: f32,
        margin: f64,
        k: usize,
        cap: usize,
    ) -> (Option<Nearest>, usize) {
        let d = self.d;
        let exact = |j: usize| super::squared_distance(x, &bank[j * d..(j + 1) * d]);
        // The k rows of smallest bound give a first threshold (k = 1: the row of `least`).
        let seeds: Vec<usize> = if k == 1 {
            match kernel::first_at_most(self.isa, lb, least) {
                Some(j) => vec![j],
                None => return (None, 0),
            }
        } else {
            let mut seeds: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
            for (j, &v) in lb.iter().enumerate() {
                if seeds.len() < k || v < seeds[k - 1].0 {
                    let at = seeds.partition_point(|s| s.0 <= v);
                    seeds.insert(at, (v, j));
                    seeds.truncate(k);
                }
            }
            seeds.into_iter().map(|s| s.1).collect()
        };
        if seeds.len() < k {
            return (None, 0);
        }
        let mut best: Vec<(f32, usize)> = seeds.iter().map(|&j| (exact(j), j)).collect();
        best.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let limit = |best: &[(f32, usize)]| {
            (best[best.len() - 1].0 as f64 * (1.0 + 2.0 * U) + margin + 1e-30) as f32
        };
        let mut threshold = limit(&best);
        let mut rows = Vec::new();
        if !kernel::collect_at_most(self.isa, lb, threshold, cap.saturating_add(k), &mut rows) {
            return (None, k);
        }
        let mut listed: Vec<(f32, usize)> = rows
            .into_iter()
            .filter(|j| !seeds.contains(j))
            .map(|j| (lb[j], j))
            .collect();
        listed.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut measured = k;
        for &(v, j) in &listed {
            if v > threshold {
                break;
            }
            measured += 1;
            let dj = exact(j);
            let worst = best[k - 1];
            if (dj, j) < worst {
                let at = best.partition_point(|b| (b.0, b.1) < (dj, j));
                best.insert(at, (dj, j));
                best.truncate(k);
                threshold = limit(&best);
            }
        }
        (
            Some((
                best.iter().map(|b| b.0).collect(),
                best.iter().map(|b| b.1 as i64).collect(),
            )),
            measured,
        )
    }
}

/// The bound kernel and the scans of its output, written for AVX-512, AVX2 + FMA and any
/// CPU ([`Isa`], the widest this CPU has is chosen at run time; the work is the same, only
/// the vector width differs, and the tests run every variant the CPU can).
mod kernel {
    use super::LANES;

    /// Which variant runs.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Isa {
        Avx512,
        Avx2,
        Generic,
    }

    impl Isa {
        /// The widest variant this CPU runs.
        pub fn best() -> Isa {
            *available()
                .first()
                .expect("the generic variant runs anywhere")
        }

        /// Queries per tile: as many as keep the accumulators in registers.
        pub fn tile(self) -> usize {
            match self {
                Isa::Avx512 => 8,
                Isa::Avx2 | Isa::Generic => 4,
            }
        }
    }

    /// Every variant this CPU runs, widest first.
    pub fn available() -> Vec<Isa> {
        let mut out = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                out.push(Isa::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                out.push(Isa::Avx2);
            }
        }
        out.push(Isa::Generic);
        out
    }

    /// `out[t * mpad + i]`: the kernel value of query `t` of the tile against bank row `i`;
    /// `mins[t]` the smallest over the rows.
    #[allow(clippy::too_many_arguments)]
    pub fn lower_bounds(
        isa: Isa,
        r: usize,
        qp_t: &[f32],
        qc: &[f32],
        qlo: &[f32],
        qhi: &[f32],
        blocks: &[f32],
        constant: &[f32],
        rho_lo: &[f32],
        rho_hi: &[f32],
        out: &mut [f32],
        mins: &mut [f32],
    ) {
        let args = Args {
            r,
            qp_t,
            qc,
            qlo,
            qhi,
            blocks,
            constant,
            rho_lo,
            rho_hi,
        };
        match isa {
            // SAFETY: `Isa::Avx512` comes from `available()`, which checked the CPU.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512(&args, out, mins) },
            // SAFETY: `Isa::Avx2` comes from `available()`, which checked the CPU.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2(&args, out, mins) },
            _ => tiles::<4>(&args, out, mins),
        }
    }

    pub struct Args<'a> {
        r: usize,
        qp_t: &'a [f32],
        qc: &'a [f32],
        qlo: &'a [f32],
        qhi: &'a [f32],
        blocks: &'a [f32],
        constant: &'a [f32],
        rho_lo: &'a [f32],
        rho_hi: &'a [f32],
    }

    /// AVX-512: 8 queries against 16 bank rows per step, one register per query.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(a: &Args, out: &mut [f32], mins: &mut [f32]) {
        use std::arch::x86_64::*;
        const Q: usize = 8;
        let r = a.r;
        let mpad = a.constant.len();
        let zero = _mm512_setzero_ps();
        let two = _mm512_set1_ps(2.0);
        let qc: [__m512; Q] = std::array::from_fn(|t| _mm512_set1_ps(a.qc[t]));
        let qlo: [__m512; Q] = std::array::from_fn(|t| _mm512_set1_ps(a.qlo[t]));
        let qhi: [__m512; Q] = std::array::from_fn(|t| _mm512_set1_ps(a.qhi[t]));
        let qp = a.qp_t.as_ptr();
        let mut least = [_mm512_set1_ps(f32::INFINITY); Q];
        for (b, block) in a.blocks.chunks_exact(r * LANES).enumerate() {
            let mut acc = [zero; Q];
            let rows = block.as_ptr();
            for j in 0..r {
                let row = _mm512_loadu_ps(rows.add(j * LANES));
                let q = qp.add(j * Q);
                for (t, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(t)), row, *acc);
                }
            }
            let at = b * LANES;
            let c = _mm512_loadu_ps(a.constant.as_ptr().add(at));
            let lo = _mm512_loadu_ps(a.rho_lo.as_ptr().add(at));
            let hi = _mm512_loadu_ps(a.rho_hi.as_ptr().add(at));
            for t in 0..Q {
                let g = _mm512_max_ps(
                    _mm512_max_ps(_mm512_sub_ps(qlo[t], hi), _mm512_sub_ps(lo, qhi[t])),
                    zero,
                );
                let v = _mm512_fnmadd_ps(two, acc[t], _mm512_add_ps(qc[t], c));
                let v = _mm512_fmadd_ps(g, g, v);
                least[t] = _mm512_min_ps(least[t], v);
                _mm512_storeu_ps(out.as_mut_ptr().add(t * mpad + at), v);
            }
        }
        for t in 0..Q {
            mins[t] = _mm512_reduce_min_ps(least[t]);
        }
    }

    /// AVX2 + FMA: 4 queries against 16 bank rows (two registers) per step.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(a: &Args, out: &mut [f32], mins: &mut [f32]) {
        use std::arch::x86_64::*;
        const Q: usize = 4;
        let r = a.r;
        let mpad = a.constant.len();
        let zero = _mm256_setzero_ps();
        let two = _mm256_set1_ps(2.0);
        let qp = a.qp_t.as_ptr();
        let mut least = [_mm256_set1_ps(f32::INFINITY); Q];
        for (b, block) in a.blocks.chunks_exact(r * LANES).enumerate() {
            let mut acc = [[zero; 2]; Q];
            let rows = block.as_ptr();
            for j in 0..r {
                let r0 = _mm256_loadu_ps(rows.add(j * LANES));
                let r1 = _mm256_loadu_ps(rows.add(j * LANES + 8));
                let q = qp.add(j * Q);
                for (t, acc) in acc.iter_mut().enumerate() {
                    let x = _mm256_set1_ps(*q.add(t));
                    acc[0] = _mm256_fmadd_ps(x, r0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(x, r1, acc[1]);
                }
            }
            let at = b * LANES;
            for h in 0..2 {
                let c = _mm256_loadu_ps(a.constant.as_ptr().add(at + 8 * h));
                let lo = _mm256_loadu_ps(a.rho_lo.as_ptr().add(at + 8 * h));
                let hi = _mm256_loadu_ps(a.rho_hi.as_ptr().add(at + 8 * h));
                for t in 0..Q {
                    let (ql, qh) = (_mm256_set1_ps(a.qlo[t]), _mm256_set1_ps(a.qhi[t]));
                    let g = _mm256_max_ps(
                        _mm256_max_ps(_mm256_sub_ps(ql, hi), _mm256_sub_ps(lo, qh)),
                        zero,
                    );
                    let base = _mm256_add_ps(_mm256_set1_ps(a.qc[t]), c);
                    let v = _mm256_fnmadd_ps(two, acc[t][h], base);
                    let v = _mm256_fmadd_ps(g, g, v);
                    least[t] = _mm256_min_ps(least[t], v);
                    _mm256_storeu_ps(out.as_mut_ptr().add(t * mpad + at + 8 * h), v);
                }
            }
        }
        for t in 0..Q {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), least[t]);
            mins[t] = lanes.iter().copied().fold(f32::INFINITY, f32::min);
        }
    }

    /// Any CPU (the compiler vectorizes what it can).
    fn tiles<const Q: usize>(a: &Args, out: &mut [f32], mins: &mut [f32]) {
        let r = a.r;
        let mpad = a.constant.len();
        let qp: Vec<[f32; Q]> = (0..r)
            .map(|j| std::array::from_fn(|t| a.qp_t[j * Q + t]))
            .collect();
        let qc: [f32; Q] = std::array::from_fn(|t| a.qc[t]);
        let qlo: [f32; Q] = std::array::from_fn(|t| a.qlo[t]);
        let qhi: [f32; Q] = std::array::from_fn(|t| a.qhi[t]);
        mins[..Q].fill(f32::INFINITY);
        for (b, block) in a.blocks.chunks_exact(r * LANES).enumerate() {
            let mut acc = [[0f32; LANES]; Q];
            for (row, q) in block.chunks_exact(LANES).zip(&qp) {
                let row: &[f32; LANES] = row.try_into().expect("LANES");
                for t in 0..Q {
                    for l in 0..LANES {
                        acc[t][l] += q[t] * row[l];
                    }
                }
            }
            let at = b * LANES;
            let c: &[f32; LANES] = a.constant[at..at + LANES].try_into().expect("LANES");
            let lo: &[f32; LANES] = a.rho_lo[at..at + LANES].try_into().expect("LANES");
            let hi: &[f32; LANES] = a.rho_hi[at..at + LANES].try_into().expect("LANES");
            for t in 0..Q {
                let dst: &mut [f32; LANES] = (&mut out[t * mpad + at..t * mpad + at + LANES])
                    .try_into()
                    .expect("LANES");
                for l in 0..LANES {
                    let g = (qlo[t] - hi[l]).max(lo[l] - qhi[t]).max(0.0);
                    dst[l] = qc[t] + c[l] - 2.0 * acc[t][l] + g * g;
                    mins[t] = mins[t].min(dst[l]);
                }
            }
        }
    }

    /// The first row whose value is at most `v`.
    pub fn first_at_most(isa: Isa, values: &[f32], v: f32) -> Option<usize> {
        let mut rows = Vec::new();
        scan(isa, values, v, 1, &mut rows);
        rows.first().copied()
    }

    /// The rows whose value is at most `v`, into `rows`; false (and stops) past `cap` rows.
    pub fn collect_at_most(
        isa: Isa,
        values: &[f32],
        v: f32,
        cap: usize,
        rows: &mut Vec<usize>,
    ) -> bool {
        scan(isa, values, v, cap.saturating_add(1), rows);
        rows.len() <= cap
    }

    /// Pushes the rows of `values` at most `v` until `stop` are found.
    fn scan(isa: Isa, values: &[f32], v: f32, stop: usize, rows: &mut Vec<usize>) {
        match isa {
            // SAFETY: `Isa::Avx512` comes from `available()`, which checked the CPU.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { scan_avx512(values, v, stop, rows) },
            // SAFETY: `Isa::Avx2` comes from `available()`, which checked the CPU.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { scan_avx2(values, v, stop, rows) },
            _ => scan_from(values, 0, v, stop, rows),
        }
    }

    fn scan_from(values: &[f32], from: usize, v: f32, stop: usize, rows: &mut Vec<usize>) {
        for (j, x) in values.iter().enumerate().skip(from) {
            if *x <= v {
                rows.push(j);
                if rows.len() >= stop {
                    return;
                }
            }
        }
    }

    /// Pushes row `at + i` for every set bit `i` of `mask`; true once `stop` rows are found.
    #[inline(always)]
    fn push_rows(mut mask: u32, at: usize, stop: usize, rows: &mut Vec<usize>) -> bool {
        while mask != 0 {
            rows.push(at + mask.trailing_zeros() as usize);
            if rows.len() >= stop {
                return true;
            }
            mask &= mask - 1;
        }
        false
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn scan_avx512(values: &[f32], v: f32, stop: usize, rows: &mut Vec<usize>) {
        use std::arch::x86_64::*;
        let limit = _mm512_set1_ps(v);
        let n = values.len() / 16 * 16;
        let p = values.as_ptr();
        for at in (0..n).step_by(16) {
            let mask = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(_mm512_loadu_ps(p.add(at)), limit);
            if push_rows(mask as u32, at, stop, rows) {
                return;
            }
        }
        scan_from(values, n, v, stop, rows)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn scan_avx2(values: &[f32], v: f32, stop: usize, rows: &mut Vec<usize>) {
        use std::arch::x86_64::*;
        let limit = _mm256_set1_ps(v);
        let n = values.len() / 8 * 8;
        let p = values.as_ptr();
        for at in (0..n).step_by(8) {
            let le = _mm256_cmp_ps::<_CMP_LE_OQ>(_mm256_loadu_ps(p.add(at)), limit);
            if push_rows(_mm256_movemask_ps(le) as u32, at, stop, rows) {
                return;
            }
        }
        scan_from(values, n, v, stop, rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn exact64(x: &[f32], y: &[f32]) -> f64 {
        x.iter()
            .zip(y)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum()
    }

    /// Bank with a steep spectrum (a few strong directions plus small noise), exact
    /// duplicates, one-ulp neighbours and a common offset; queries near bank rows, midpoints
    /// (ties), bank rows themselves and far-away points.
    fn steep(m: usize, d: usize, nq: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let dirs: Vec<Vec<f32>> = (0..8)
            .map(|_| (0..d).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
            .collect();
        let mut bank = Vec::with_capacity(m * d);
        for i in 0..m {
            if i % 13 == 5 {
                // An exact duplicate of the previous row.
                let prev = bank[(i - 1) * d..i * d].to_vec();
                bank.extend(prev);
                continue;
            }
            if i % 13 == 6 {
                let prev: Vec<f32> = bank[(i - 1) * d..i * d]
                    .iter()
                    .map(|v: &f32| v.next_up())
                    .collect();
                bank.extend(prev);
                continue;
            }
            let w: Vec<f32> = (0..8)
                .map(|k| rng.gen_range(-1.0f32..1.0) * 4.0 / (k + 1) as f32)
                .collect();
            for j in 0..d {
                let v: f32 = w.iter().zip(&dirs).map(|(w, dir)| w * dir[j]).sum::<f32>()
                    + 0.05 * rng.gen_range(-1.0f32..1.0)
                    + 10.0;
                bank.push(v);
            }
        }
        let mut queries = Vec::with_capacity(nq * d);
        for i in 0..nq {
            let a = &bank[(i * 7 % m) * d..][..d];
            let b = &bank[((i * 11 + 3) % m) * d..][..d];
            match i % 5 {
                0 => queries.extend_from_slice(a),
                1 => queries.extend(a.iter().zip(b).map(|(x, y)| 0.5 * (x + y))),
                2 => queries.extend(a.iter().map(|x| x + 0.01 * rng.gen_range(-1.0f32..1.0))),
                3 => queries.extend((0..d).map(|_| rng.gen_range(-50.0f32..50.0))),
                _ => queries.extend(a.iter().map(|x| x.next_down())),
            }
        }
        (bank, queries)
    }

    /// Isotropic random vectors: the flat spectrum where pruning cannot help.
    fn flat(m: usize, d: usize, nq: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let bank = (0..m * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let queries = (0..nq * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        (bank, queries)
    }

    /// Brute force in f64: the `k` smallest (distance, label), ties by label.
    fn brute(bank: &[f32], x: &[f32], d: usize, k: usize) -> Vec<(f64, usize)> {
        let mut all: Vec<(f64, usize)> = bank
            .chunks_exact(d)
            .enumerate()
            .map(|(j, y)| (exact64(x, y), j))
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        all.truncate(k);
        all
    }

    /// The pruned search of every kernel variant this CPU runs against brute force; the
    /// exact distances computed (the same for every variant).
    fn check(bank: &[f32], queries: &[f32], d: usize, r: usize, k: usize, case: &str) -> usize {
        let p = Projection::fit(bank, d).unwrap();
        let mut search = Pruned::new(p, bank, r).unwrap();
        let mut counts = Vec::new();
        for isa in kernel::available() {
            search.isa = isa;
            counts.push(check_one(
                &search,
                bank,
                queries,
                d,
                k,
                &format!("{case} {isa:?}"),
            ));
        }
        assert!(counts.iter().all(|c| *c == counts[0]), "{case}: {counts:?}");
        counts[0]
    }

    fn check_one(
        s: &Pruned,
        bank: &[f32],
        queries: &[f32],
        d: usize,
        k: usize,
        case: &str,
    ) -> usize {
        let s = s.search(bank, queries, k, usize::MAX);
        assert!(s.dense.is_empty());
        let nq = queries.len() / d;
        let k = k.min(bank.len() / d);
        for i in 0..nq {
            let x = &queries[i * d..(i + 1) * d];
            let want = brute(bank, x, d, k);
            for (rank, (wd, wl)) in want.iter().enumerate() {
                let (gd, gl) = (s.distances[i * k + rank], s.labels[i * k + rank] as usize);
                // The distance is the exact one rounded to float32.
                assert_eq!(gd, *wd as f32, "{case} query {i} rank {rank}");
                if gl != *wl {
                    // Another label only at a tie of the rounded distances.
                    assert_eq!(
                        exact64(x, &bank[gl * d..][..d]) as f32,
                        *wd as f32,
                        "{case} query {i} rank {rank}: label {gl} instead of {wl}"
                    );
                }
            }
        }
        s.exact
    }

    #[test]
    fn equals_brute_force_on_adversarial_data() {
        for (m, d, nq, r, k) in [
            (700, 256, 60, 32, 1),
            (700, 256, 60, 32, 3),
            (700, 100, 45, 64, 9),
            (300, 1024, 20, 16, 1),
        ] {
            let (bank, queries) = steep(m, d, nq, m as u64 + d as u64);
            let case = format!("steep m={m} d={d} r={r} k={k}");
            let exact = check(&bank, &queries, d, r, k, &case);
            // The steep spectrum prunes: far fewer exact distances than the bank.
            assert!(exact < nq * m / 4, "{case}: {exact} exact distances");
        }
        for (m, d, k) in [(500, 64, 1), (500, 64, 4)] {
            let (bank, queries) = flat(m, d, 30, 7);
            check(&bank, &queries, d, 32, k, &format!("flat m={m} k={k}"));
        }
        // A bank smaller than the rank, and than k.
        let (bank, queries) = steep(20, 128, 15, 3);
        check(&bank, &queries, 128, 64, 1, "tiny");
        check(&bank, &queries, 128, 64, 30, "k > bank");
    }

    /// The inequality the pruning rests on, pair by pair: the kernel value never exceeds the
    /// true distance plus the query's share of the margin (so a row is skipped only when its
    /// true distance exceeds the threshold).
    #[test]
    fn kernel_value_bounds_the_true_distance() {
        for (bank, queries, d) in [
            {
                let (b, q) = steep(400, 512, 40, 11);
                (b, q, 512)
            },
            {
                let (b, q) = flat(300, 64, 20, 12);
                (b, q, 64)
            },
        ] {
            let p = Projection::fit(&bank, d).unwrap();
            for r in [1, 8, 32, 64.min(d)] {
                let s = Pruned::new(p.clone(), &bank, r).unwrap();
                let q = project(&s.projection, r, s.eta2, &queries);
                let mpad = s.constant.len();
                for (isa, (i, x)) in kernel::available()
                    .into_iter()
                    .flat_map(|isa| queries.chunks_exact(d).enumerate().map(move |q| (isa, q)))
                {
                    let tile = isa.tile();
                    let mut out = vec![0f32; tile * mpad];
                    let mut qp_t = vec![0f32; r * tile];
                    for j in 0..r {
                        for t in 0..tile {
                            qp_t[j * tile + t] = q.proj[i * r + j];
                        }
                    }
                    let c = vec![q.pnorm2[i]; tile];
                    let (lo, hi) = (vec![q.rho_lo[i]; tile], vec![q.rho_hi[i]; tile]);
                    let mut mins = vec![0f32; tile];
                    kernel::lower_bounds(
                        isa,
                        r,
                        &qp_t,
                        &c,
                        &lo,
                        &hi,
                        &s.blocks,
                        &s.constant,
                        &s.rho_lo,
                        &s.rho_hi,
                        &mut out,
                        &mut mins,
                    );
                    let least = out[..bank.len() / d]
                        .iter()
                        .copied()
                        .fold(f32::INFINITY, f32::min);
                    assert_eq!(mins[0], least, "the kernel's minimum");
                    let margin = s.kappa * q.cnorm2[i];
                    for (j, y) in bank.chunks_exact(d).enumerate() {
                        let truth = exact64(x, y);
                        assert!(
                            out[j] as f64 <= truth + margin,
                            "{isa:?} r={r} query {i} row {j}: bound {} over distance {truth} + {margin}",
                            out[j]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn stored_projection_round_trips_and_is_checked() {
        let (bank, _) = steep(100, 64, 1, 5);
        let p = Projection::fit(&bank, 64).unwrap();
        assert!(p.defect(p.rank) < 1e-5, "defect {}", p.defect(p.rank));
        let stored = p.to_stored();
        assert_eq!(Projection::from_stored(&stored, 64).unwrap(), p);
        assert!(Projection::from_stored(&stored, 32).is_err());
        let mut bad = stored.clone();
        bad.mean_basis_f32le.replace_range(10..11, "A");
        if bad.mean_basis_f32le != stored.mean_basis_f32le {
            let e = Projection::from_stored(&bad, 64).unwrap_err().to_string();
            assert!(e.contains("checksum"), "{e}");
        }
        // A basis that is not orthonormal is refused rather than trusted.
        let mut skew = p.clone();
        skew.basis[0] *= 1.5;
        assert!(Pruned::new(skew, &bank, 8).is_err());
    }
}
