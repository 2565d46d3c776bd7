//! The shortlist method of the bank's search: bf16 products against the centred bank pick
//! each query's candidates, within a proven bound on the bf16 error (`Bounds`); only those
//! are re-ranked exactly in float32 (see the module doc of `knn`).

use super::*;

/// Longest shortlist re-ranked per query; past it, the query goes to FAISS.
pub const MAX_SHORTLIST: usize = 512;

/// Unit roundoff of bfloat16 (8 significant bits) and of float32.
pub(super) const U_BF16: f64 = 1.0 / 256.0;
pub(super) const U_F32: f64 = 1.0 / 16_777_216.0;

/// The bank for the shortlist method: float32 vectors and FAISS-style norms for the exact
/// re-ranking, and the bank centred on its mean in bf16 for the approximate product.
/// Centring changes no distance but shrinks the norms the bf16 error is proportional to.
pub(super) struct Shortlist {
    /// `[M, D]` bf16 of the centred bank (multiplied as its transposed view: libtorch's
    /// CPU bf16 GEMM is several times faster that way than from a `[D, M]` copy).
    centred: Tensor,
    exact: Rerank,
}

/// What the re-ranking of one query needs (shared by the threads).
pub(super) struct Rerank {
    d: usize,
    /// `||y||^2` in float32, as FAISS computes it.
    norms: Vec<f32>,
    center: Vec<f32>,
    /// Per bank vector: `||y'||` and `||y'||^2` of the centred float32 vector (in f64, then
    /// rounded up), and the float32 part of its bound ([`Bounds`]).
    cnorm: Vec<f32>,
    cnorm2: Vec<f32>,
    fixed: Vec<f32>,
    bounds: Bounds,
}

/// The proven bound on `|d_E(x, y) - d~(x, y)|`, where `d_E` is either the exact distance or
/// the float32 one computed as FAISS does, `||x||^2 + ||y||^2 - 2 x.y` from float32 norms and
/// dot product (a larger error, bounded below), and `d~`
/// the approximate one, `||x'||^2 + ||y'||^2 - 2 bf16(bf16(x').bf16(y'))`, with `x' = x - c`
/// and `y' = y - c` the centred vectors in float32. Bounded by
/// `c1 ||x'|| ||y'|| + c2 |a~| + r(x) + r(y)` (`a~` the bf16 product):
///
/// - bf16 rounding of each factor (relative `u = 2^-8` each) and float32 accumulation of the
///   `D` products (`gamma_D`, any summation order; products of bf16 are exact in float32):
///   `|x'.y' - bf16(x').bf16(y')| <= (2u + u^2 + gamma_D (1+u)^2) ||x'|| ||y'||` (Cauchy-
///   Schwarz), twice in the distance: `c1`;
/// - the product rounded to bf16 on output (libtorch's CPU bf16 matmul returns bf16): `u |a~|`,
///   twice: `c2`;
/// - FAISS's float32 arithmetic of `d_E`: `gamma_{D+2} (||x||^2 + ||y||^2 + 2 ||x|| ||y||)
///   <= 2 gamma_{D+2} (||x||^2 + ||y||^2)`; the centring in float32 moves the distance by at
///   most `3 u32 (||x'|| + ||y'||)^2 <= 6 u32 (||x'||^2 + ||y'||^2)`; the float32 evaluation
///   of `d~` and of the bound itself, a few `u32` of each term: all in `r`, with 1% and an
///   absolute floor on top (denormals flushed by bf16 hardware).
#[derive(Debug, Clone, Copy)]
pub(super) struct Bounds {
    c1: f32,
    c2: f32,
    /// `r = f_norm ||x||^2 + f_centred ||x'||^2 + floor`.
    f_norm: f64,
    f_centred: f64,
    floor: f64,
}

impl Bounds {
    pub(super) fn new(d: usize) -> Bounds {
        let gamma = |n: usize| n as f64 * U_F32 / (1.0 - n as f64 * U_F32);
        let u = U_BF16;
        let margin = 1.01;
        Bounds {
            c1: (margin * 2.0 * (2.0 * u + u * u + gamma(d) * (1.0 + u).powi(2))) as f32,
            c2: (margin * 2.0 * u + 16.0 * U_F32) as f32,
            f_norm: margin * 2.0 * gamma(d + 2) + 8.0 * U_F32,
            f_centred: margin * 6.0 * U_F32 + 8.0 * U_F32,
            floor: 1e-30,
        }
    }

    /// `r(v)` from `||v||^2` and `||v'||^2`.
    fn fixed(&self, norm2: f64, cnorm2: f64) -> f32 {
        (self.f_norm * norm2 + self.f_centred * cnorm2 + self.floor) as f32
    }
}

/// Float32 squared norms as FAISS's `fvec_norms_L2sqr` computes them (up to summation
/// order, covered by the bound).
pub(super) fn norm2_f32(v: &[f32]) -> f32 {
    dot_f32(v, v)
}

/// A float32 dot product (eight partial sums, as SIMD code accumulates).
pub(super) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Norm and squared norm of `v - c` in f64 (rounded up to float32).
pub(super) fn centred_norms(v: &[f32], c: &[f32]) -> (f64, f64) {
    let n2: f64 = v
        .iter()
        .zip(c)
        .map(|(x, m)| {
            let y = (x - m) as f64;
            y * y
        })
        .sum();
    (n2.sqrt() * (1.0 + 1e-12), n2 * (1.0 + 1e-12))
}

impl Shortlist {
    pub(super) fn new(bank: &[f32], d: usize) -> Result<Shortlist> {
        let m = bank.len() / d;
        let mut center = vec![0f64; d];
        for row in bank.chunks_exact(d) {
            for (c, x) in center.iter_mut().zip(row) {
                *c += *x as f64;
            }
        }
        let center: Vec<f32> = center
            .iter()
            .map(|c| (c / m.max(1) as f64) as f32)
            .collect();
        let bounds = Bounds::new(d);
        let norms: Vec<f32> = bank.par_chunks_exact(d).map(norm2_f32).collect();
        let cn: Vec<(f64, f64)> = bank
            .par_chunks_exact(d)
            .map(|row| centred_norms(row, &center))
            .collect();
        let fixed = cn
            .iter()
            .zip(&norms)
            .map(|((_, c2), n2)| bounds.fixed(*n2 as f64, *c2))
            .collect();
        // The centred bank in bf16, filled a block of rows at a time: no float32 copy of the
        // whole bank (963 MB at 235,200 x 1024) ever exists beside it.
        let centred = Tensor::empty([m as i64, d as i64], (Kind::BFloat16, tch::Device::Cpu));
        let mean = Tensor::from_slice(&center);
        let rows = 8192;
        for start in (0..m).step_by(rows) {
            let n = rows.min(m - start);
            let block = Tensor::from_slice(&bank[start * d..(start + n) * d])
                .reshape([n as i64, d as i64])
                - &mean;
            centred
                .narrow(0, start as i64, n as i64)
                .copy_(&block.to_kind(Kind::BFloat16));
        }
        Ok(Shortlist {
            centred,
            exact: Rerank {
                d,
                norms,
                center,
                cnorm: cn.iter().map(|(n, _)| *n as f32).collect(),
                cnorm2: cn.iter().map(|(_, n2)| *n2 as f32).collect(),
                fixed,
                bounds,
            },
        })
    }

    /// The exact `k` nearest of each query from its shortlist; the indices of the queries
    /// whose shortlist was longer than [`MAX_SHORTLIST`] are returned for FAISS to search.
    pub(super) fn search(
        &self,
        bank: &[f32],
        queries: &[f32],
        k: usize,
    ) -> Result<(Found, Vec<usize>)> {
        let exact = &self.exact;
        let (d, m) = (exact.d, exact.norms.len());
        let nq = queries.len() / d;
        let mut found = Found {
            distances: vec![0f32; nq * k],
            labels: vec![-1; nq * k],
        };
        let mut fallback = Vec::new();
        // Rows per product: the approximate distances of a chunk stay near 64 MiB.
        let rows = (16 << 20) / m.max(1);
        let rows = rows.clamp(1, 1024);
        for start in (0..nq).step_by(rows) {
            let end = (start + rows).min(nq);
            let q = &queries[start * d..end * d];
            let centred: Vec<f32> = q
                .chunks_exact(d)
                .flat_map(|row| row.iter().zip(&exact.center).map(|(x, c)| x - c))
                .collect();
            let products = Tensor::from_slice(&centred)
                .reshape([(end - start) as i64, d as i64])
                .to_kind(Kind::BFloat16)
                .matmul(&self.centred.tr())
                .to_kind(Kind::Float);
            let n = (end - start) * m;
            let mut approx = vec![0f32; n];
            products.copy_data(&mut approx, n);
            let rows_found: Vec<Option<(Vec<f32>, Vec<i64>)>> = approx
                .par_chunks_exact(m)
                .zip(q.par_chunks_exact(d))
                .map(|(a, x)| exact.rerank(bank, x, a, k))
                .collect();
            for (i, r) in rows_found.into_iter().enumerate() {
                let qi = start + i;
                match r {
                    Some((dist, lab)) => {
                        found.distances[qi * k..(qi + 1) * k].copy_from_slice(&dist);
                        found.labels[qi * k..(qi + 1) * k].copy_from_slice(&lab);
                    }
                    None => fallback.push(qi),
                }
            }
        }
        Ok((found, fallback))
    }
}

impl Rerank {
    /// One query `x` with its bf16 products `a` against the bank: the shortlist (every bank
    /// vector whose lower bound is at most the k-th smallest upper bound, so it holds the
    /// true `k` nearest), re-ranked exactly; `None` when longer than [`MAX_SHORTLIST`].
    fn rerank(&self, bank: &[f32], x: &[f32], a: &[f32], k: usize) -> Option<(Vec<f32>, Vec<i64>)> {
        let b = &self.bounds;
        let (cn, cn2) = centred_norms(x, &self.center);
        let xn2 = norm2_f32(x);
        let (xa, xa2) = (cn as f32, cn2 as f32);
        let rx = b.fixed(xn2 as f64, cn2);
        let approx = |j: usize| {
            let dj = xa2 + self.cnorm2[j] - 2.0 * a[j];
            let bound = b.c1 * xa * self.cnorm[j] + b.c2 * a[j].abs() + rx + self.fixed[j];
            (dj - bound, dj + bound)
        };
        // The k smallest upper bounds (k is small: insertion into a sorted array).
        let mut uppers: Vec<f32> = Vec::with_capacity(k + 1);
        for j in 0..a.len() {
            let (_, upper) = approx(j);
            if uppers.len() < k || upper < uppers[k - 1] {
                let at = uppers.partition_point(|u| *u <= upper);
                uppers.insert(at, upper);
                uppers.truncate(k);
            }
        }
        let threshold = *uppers.last()?;
        let mut listed = Vec::new();
        for j in 0..a.len() {
            if approx(j).0 <= threshold {
                if listed.len() == MAX_SHORTLIST {
                    return None;
                }
                listed.push(j);
            }
        }
        let mut exact: Vec<(f32, usize)> = listed
            .into_iter()
            .map(|j| {
                let y = &bank[j * self.d..(j + 1) * self.d];
                (squared_distance(x, y), j)
            })
            .collect();
        exact.sort_by(|p, q| p.0.total_cmp(&q.0).then(p.1.cmp(&q.1)));
        exact.truncate(k);
        Some((
            exact.iter().map(|p| p.0).collect(),
            exact.iter().map(|p| p.1 as i64).collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// The bound holds against f64 arithmetic on adversarial-ish data (large common offset,
    /// mixed signs), with libtorch's bf16 product of this machine.
    #[test]
    fn bound_covers_bf16_error() {
        let (m, d, nq) = (300, 1024, 20);
        let mut rng = 12345u64;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((rng >> 11) as f64 / (1u64 << 53) as f64) as f32
        };
        let bank: Vec<f32> = (0..m * d)
            .map(|i| 3.0 + next() * (1 + i % 7) as f32)
            .collect();
        let queries: Vec<f32> = (0..nq * d).map(|_| 3.0 + next() * 4.0 - 1.0).collect();
        let s = Shortlist::new(&bank, d).unwrap();
        for x in queries.chunks_exact(d) {
            let c: Vec<f32> = x.iter().zip(&s.exact.center).map(|(a, b)| a - b).collect();
            let p = Tensor::from_slice(&c)
                .reshape([1, d as i64])
                .to_kind(Kind::BFloat16)
                .matmul(&s.centred.tr())
                .to_kind(Kind::Float);
            let mut a = vec![0f32; m];
            p.copy_data(&mut a, m);
            let (cn, cn2) = centred_norms(x, &s.exact.center);
            let xn2 = norm2_f32(x);
            let rx = s.exact.bounds.fixed(xn2 as f64, cn2);
            for (j, &aj) in a.iter().enumerate() {
                let y = &bank[j * d..(j + 1) * d];
                let faiss_like = (xn2 + s.exact.norms[j] - 2.0 * dot_f32(x, y)).max(0.0) as f64;
                let approx = (cn2 as f32 + s.exact.cnorm2[j] - 2.0 * aj) as f64;
                let bound = (s.exact.bounds.c1 * cn as f32 * s.exact.cnorm[j]
                    + s.exact.bounds.c2 * aj.abs()
                    + rx
                    + s.exact.fixed[j]) as f64;
                let exact = squared_distance(x, y) as f64;
                for (what, d) in [("faiss-like", faiss_like), ("exact", exact)] {
                    assert!(
                        (d - approx).abs() <= bound,
                        "{what}: error {} over bound {bound}",
                        (d - approx).abs()
                    );
                }
            }
        }
    }
}
