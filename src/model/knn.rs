//! Nearest-neighbour search over the memory bank. A flat bank is searched exactly, by one of
//! three methods with the same answers (the bank vectors of smallest squared L2 distance):
//!
//! - `pruned` ([`pruned`]): lower bounds from the bank's principal directions rule out most
//!   of the bank at `r / D` of the cost, and the few candidates left are measured exactly
//!   (`||x - y||^2` in f64, rounded to float32). Proven against float32 rounding.
//! - `faiss`: FAISS's own exact search (one float32 GEMM against the whole bank; its
//!   `||x||^2 + ||y||^2 - 2 x.y` differs from the exact distance by its own rounding, ~1e-5
//!   of an image score on real features).
//! - `shortlist`: a bfloat16 product of (centred) queries and bank, through libtorch/oneDNN,
//!   shortlists the bank vectors that can still be among the `k` nearest given a proven bound
//!   on the bf16 error (`Bounds`); only those are re-ranked exactly. It pays only where
//!   bf16 runs in hardware (AMX).
//!
//! `auto` (the default) decides by measured cost, not by CPU flags: the first searches of a
//! model time each method on a few hundred real queries (every method answers them: nothing
//! is computed twice), then the fastest answers the rest. Where pruning cannot help (a bank
//! with a flat spectrum), pruned queries with too many candidates go to FAISS anyway, so the
//! worst case stays near FAISS's cost. `PATCHCORE_KNN=faiss|shortlist|pruned` forces one
//! (tests, benchmarks). Whatever runs, the distances reported outside a forced `faiss` are
//! the exact ones of the labels found.
//!
//! A model trained with `--bank-index ivf` is searched by FAISS's IVF index (approximate, `nprobe`
//! lists visited).

pub mod pruned;
mod shortlist;

use std::time::Instant;

use anyhow::{bail, Result};
use faiss::index::IndexImpl;
use faiss::Index;
use ndarray::ArrayView2;
use rayon::prelude::*;
use tch::{Kind, Tensor};

use crate::model::bank::IndexKind;
use pruned::{Projection, Pruned};
use shortlist::Shortlist;
pub use shortlist::MAX_SHORTLIST;

/// Environment variable that forces a method: `faiss`, `shortlist`, `pruned` (or `auto`).
pub const METHOD_ENV: &str = "PATCHCORE_KNN";
/// Environment variable that sets how many principal directions the pruned search uses
/// (1 to [`pruned::RANK`]; default [`pruned::DEFAULT_RANK`]).
pub const RANK_ENV: &str = "PATCHCORE_KNN_RANK";

/// CPU features under which bf16 products run in hardware (names as in /proc/cpuinfo): the
/// shortlist is timed by `auto` only on such CPUs.
pub const BF16_FLAGS: [&str; 2] = ["amx_bf16", "avx512_bf16"];

/// Queries each method answers while `auto` measures them; searches of fewer queries (single
/// rows for Eq. 7) are not timed.
pub const PROBE_QUERIES: usize = 256;

/// How a flat bank is searched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Faiss,
    Shortlist,
    Pruned,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Faiss => "faiss",
            Method::Shortlist => "shortlist",
            Method::Pruned => "pruned",
        }
    }
}

/// The method asked for: `forced` (by `PATCHCORE_KNN` or a caller), or `auto`, which starts
/// with `method` and measures.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Choice {
    pub method: Method,
    /// Which of [`BF16_FLAGS`] the CPU has.
    pub cpu_flags: Vec<String>,
    /// Set when the method is not to be measured against the others.
    pub forced: bool,
}

impl Choice {
    /// From `PATCHCORE_KNN` if set (other than `auto`), else `auto`.
    pub fn from_env() -> Result<Choice> {
        Choice::parse(&std::env::var(METHOD_ENV).unwrap_or_default())
    }

    /// From a value of `PATCHCORE_KNN` (empty: `auto`).
    pub fn parse(value: &str) -> Result<Choice> {
        let cpu_flags = cpu_bf16_flags();
        let (method, forced) = match value {
            "" | "auto" => (Method::Pruned, false),
            "faiss" => (Method::Faiss, true),
            "shortlist" => (Method::Shortlist, true),
            "pruned" => (Method::Pruned, true),
            other => {
                bail!("{METHOD_ENV}={other} is not one of auto, faiss, shortlist, pruned")
            }
        };
        Ok(Choice {
            method,
            cpu_flags,
            forced,
        })
    }

    /// The methods `auto` measures on this CPU, in the order it tries them.
    fn candidates(&self) -> Vec<Method> {
        let mut m = vec![Method::Pruned, Method::Faiss];
        if !self.cpu_flags.is_empty() {
            m.push(Method::Shortlist);
        }
        m
    }

    /// E.g. "auto (measured per model among pruned, faiss, shortlist; CPU avx512_bf16)".
    pub fn describe(&self) -> String {
        if self.forced {
            let what = match self.method {
                Method::Faiss => "exact float32",
                Method::Shortlist => "bf16 + exact float32 re-ranking",
                Method::Pruned => "exact: projection bounds",
            };
            return format!("{} ({what}; {METHOD_ENV})", self.method.name());
        }
        let flags = if self.cpu_flags.is_empty() {
            "no bf16 flags".to_string()
        } else {
            self.cpu_flags.join(" ")
        };
        let names: Vec<&str> = self.candidates().iter().map(|m| m.name()).collect();
        format!(
            "auto (measured per model among {}; CPU {flags})",
            names.join(", ")
        )
    }
}

/// The [`BF16_FLAGS`] of this CPU, read once from /proc/cpuinfo (none if unreadable).
pub fn cpu_bf16_flags() -> Vec<String> {
    static FLAGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    FLAGS
        .get_or_init(|| {
            let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            let flags: Vec<&str> = text
                .lines()
                .find(|l| l.starts_with("flags"))
                .map(|l| l.split_whitespace().collect())
                .unwrap_or_default();
            BF16_FLAGS
                .iter()
                .filter(|f| flags.contains(f))
                .map(|f| f.to_string())
                .collect()
        })
        .clone()
}

/// What `patchcore --version` and predict say about the search: "auto (...)".
pub fn describe_default() -> String {
    Choice::from_env().map_or_else(|e| e.to_string(), |c| c.describe())
}

/// Results of a search: per query, `k` squared L2 distances and bank labels, nearest first.
pub struct Found {
    pub distances: Vec<f32>,
    pub labels: Vec<i64>,
}

impl Found {
    fn empty(nq: usize, k: usize) -> Found {
        Found {
            distances: vec![0f32; nq * k],
            labels: vec![-1; nq * k],
        }
    }

    /// Copies `other`'s results (for `rows.len()` queries, in order) into rows `rows`.
    fn fill(&mut self, rows: &[usize], other: &Found, k: usize) {
        for (n, &i) in rows.iter().enumerate() {
            self.distances[i * k..(i + 1) * k]
                .copy_from_slice(&other.distances[n * k..(n + 1) * k]);
            self.labels[i * k..(i + 1) * k].copy_from_slice(&other.labels[n * k..(n + 1) * k]);
        }
    }
}

/// Where the pruned search's projection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProjectionSource {
    Model,
    /// Fitted to the bank here (models from before projections were stored, new banks).
    Fitted,
}

/// What `auto` measured: seconds per query of each method, on this model and machine.
#[derive(Debug, Default, Clone)]
struct Measured {
    seconds: Vec<(Method, f64)>,
    decided: Option<Method>,
    /// Set when the pruned search, once chosen, handed most of a search to FAISS.
    switched: bool,
}

/// Nearest-neighbour search over the bank.
pub struct Knn {
    index: IndexImpl,
    kind: IndexKind,
    choice: Choice,
    /// The pruned search's projection before the search is built (from the model).
    projection: Option<Projection>,
    projection_source: ProjectionSource,
    pruned: Option<Pruned>,
    shortlist: Option<Shortlist>,
    measured: Measured,
    /// Candidates per query past which a pruned query goes to FAISS (measured once FAISS
    /// and the exact distance have been timed; an eighth of the bank before).
    cap: usize,
    /// Seconds per exact distance of the pruned search (timed when it is built).
    exact_s: f64,
    /// Queries the shortlist or the pruned search handed to FAISS, and all searched.
    pub fallbacks: usize,
    pub searched: usize,
    /// Queries the pruned search answered and the exact distances it computed for them.
    pub pruned_queries: usize,
    pub exact_distances: usize,
}

extern "C" {
    // FAISS's C API for the flat index's own storage (the faiss crate wraps it only for
    // its own FlatIndex type; the index here comes from a file). Opaque pointers.
    fn faiss_IndexFlat_cast(index: *mut std::ffi::c_void) -> *mut std::ffi::c_void;
    fn faiss_IndexFlat_xb(index: *mut std::ffi::c_void, p: *mut *mut f32, size: *mut usize);
}

impl Knn {
    /// The search of `index`, a bank of kind `kind` (an IVF index gets its `nprobe` and a
    /// direct map for [`Knn::vector`]); a flat bank's method comes from [`Choice::from_env`].
    pub fn new(index: IndexImpl, kind: IndexKind) -> Result<Self> {
        Self::with_choice(index, kind, Choice::from_env()?)
    }

    /// The search of `index` with the method of `choice` (for a flat bank).
    pub fn with_choice(mut index: IndexImpl, kind: IndexKind, choice: Choice) -> Result<Self> {
        if let IndexKind::Ivf { nprobe, .. } = kind {
            crate::model::bank::prepare_ivf(&mut index, nprobe)?;
        }
        let m = index.ntotal() as usize;
        Ok(Knn {
            index,
            kind,
            choice,
            projection: None,
            projection_source: ProjectionSource::Fitted,
            pruned: None,
            shortlist: None,
            measured: Measured::default(),
            cap: (m / 8).max(16),
            exact_s: 0.0,
            fallbacks: 0,
            searched: 0,
            pruned_queries: 0,
            exact_distances: 0,
        })
    }

    /// The search using the projection a model stored (`None`: fitted when first needed).
    pub fn with_projection(mut self, projection: Option<Projection>) -> Self {
        if let Some(p) = projection {
            self.projection = Some(p);
            self.projection_source = ProjectionSource::Model;
        }
        self
    }

    /// Leaves the bf16 shortlist (half the bank again) out of `auto`'s candidates, where
    /// `--max-memory` has no room for it; a forced method stays.
    pub fn without_shortlist(&mut self) {
        if !self.choice.forced {
            self.choice.cpu_flags.clear();
        }
    }

    /// Visits `nprobe` lists per query from now on (IVF banks only).
    pub fn set_nprobe(&mut self, nprobe: u32) -> Result<()> {
        let IndexKind::Ivf { nlist, .. } = self.kind else {
            bail!("--nprobe applies to models trained with --bank-index ivf; this one is flat");
        };
        crate::model::bank::prepare_ivf(&mut self.index, nprobe)?;
        self.kind = IndexKind::Ivf { nlist, nprobe };
        Ok(())
    }

    /// The FAISS index searched (or whose vectors the other methods read).
    pub fn index(&self) -> &IndexImpl {
        &self.index
    }

    /// The bank's kind, with the `nprobe` in force.
    pub fn kind(&self) -> IndexKind {
        self.kind
    }

    /// A flat bank's vectors, `[M, D]` row-major, as FAISS holds them (mapped from the model
    /// file, not copied).
    fn bank(&self) -> &[f32] {
        // SAFETY: the cast returns null for an index that is not flat; `xb` points into the
        // live index, which `self` owns and does not modify while the slice is borrowed.
        unsafe {
            let flat = faiss_IndexFlat_cast(self.index.inner_ptr().cast());
            assert!(!flat.is_null(), "the bank of a flat model is an IndexFlat");
            let (mut p, mut len) = (std::ptr::null_mut(), 0usize);
            faiss_IndexFlat_xb(flat, &mut p, &mut len);
            let n = self.index.ntotal() as usize * self.index.d() as usize;
            assert!(len >= n && !p.is_null());
            std::slice::from_raw_parts(p, n)
        }
    }

    /// The projection to store with a flat model (fitted to the bank now if the search has
    /// none yet); `None` for IVF banks.
    pub fn projection(&mut self) -> Result<Option<&Projection>> {
        if self.kind != IndexKind::Flat {
            return Ok(None);
        }
        if self.pruned.is_none() && self.projection.is_none() {
            let d = self.index.d() as usize;
            self.projection = Some(Projection::fit(self.bank(), d)?);
        }
        Ok(Some(match &self.pruned {
            Some(p) => p.projection(),
            None => self.projection.as_ref().expect("fitted above"),
        }))
    }

    /// The search used, e.g. "pruned (exact: 32 principal directions, 4.1 exact distances
    /// per query; measured: pruned 0.02 ms, faiss 0.31 ms per query)", "ivf (nlist 632,
    /// nprobe 32)".
    pub fn describe(&self) -> String {
        if let IndexKind::Ivf { nlist, nprobe } = self.kind {
            return format!("faiss ivf (approximate: nlist {nlist}, nprobe {nprobe})");
        }
        if self.choice.forced && self.choice.method != Method::Pruned {
            return self.choice.describe();
        }
        let method = self.current();
        let mut parts = Vec::new();
        if let Some(p) = self.pruned.as_ref().filter(|_| self.pruned_queries > 0) {
            let source = match self.projection_source {
                ProjectionSource::Model => "from the model",
                ProjectionSource::Fitted => "fitted at load",
            };
            parts.push(format!(
                "{} principal directions {source}, {:.1} exact distances per query{}",
                p.rank(),
                self.exact_distances as f64 / self.pruned_queries as f64,
                if self.fallbacks > 0 {
                    format!(", {} queries to faiss", self.fallbacks)
                } else {
                    String::new()
                }
            ));
        }
        if self.choice.forced {
            parts.push(METHOD_ENV.to_string());
        } else if self.measured.decided.is_some() {
            let times: Vec<String> = self
                .measured
                .seconds
                .iter()
                .map(|(m, s)| format!("{} {:.3} ms", m.name(), s * 1e3))
                .collect();
            parts.push(format!("measured per query: {}", times.join(", ")));
            if self.measured.switched {
                parts.push("then switched: most pruned queries needed faiss".to_string());
            }
        } else {
            parts.push("auto: too few queries to measure".to_string());
        }
        format!("{} ({})", method.name(), parts.join("; "))
    }

    /// The method that answers the next large search.
    fn current(&self) -> Method {
        if self.choice.forced {
            self.choice.method
        } else {
            self.measured.decided.unwrap_or(self.choice.method)
        }
    }

    /// The `k` nearest bank vectors of each query (`[N, D]` row-major).
    pub fn search(&mut self, queries: &[f32], k: usize) -> Result<Found> {
        let k = k.min(self.index.ntotal() as usize);
        let d = self.index.d() as usize;
        let nq = queries.len() / d;
        self.searched += nq;
        if self.kind != IndexKind::Flat || k == 0 {
            return self.faiss(queries, k, false);
        }
        if self.choice.forced || self.measured.decided.is_some() || nq < PROBE_QUERIES {
            return self.run(self.current(), queries, k);
        }
        // auto, still measuring: each method not yet timed answers the next queries.
        let mut found = Found::empty(nq, k);
        let mut start = 0;
        for method in self.choice.candidates() {
            if start == nq {
                break;
            }
            if self.measured.seconds.iter().any(|(m, _)| *m == method) {
                continue;
            }
            let end = (start + PROBE_QUERIES).min(nq);
            if end - start < PROBE_QUERIES {
                break;
            }
            self.prepare(method)?;
            let t = Instant::now();
            let part = self.run(method, &queries[start * d..end * d], k)?;
            let s = t.elapsed().as_secs_f64() / (end - start) as f64;
            self.measured.seconds.push((method, s));
            found.fill(&(start..end).collect::<Vec<_>>(), &part, k);
            start = end;
        }
        if self.measured.seconds.len() == self.choice.candidates().len() {
            self.decide();
        }
        if start < nq {
            let part = self.run(self.current(), &queries[start * d..], k)?;
            found.fill(&(start..nq).collect::<Vec<_>>(), &part, k);
        }
        Ok(found)
    }

    /// `auto`'s decision once every method is timed, and the pruned search's cap: a query
    /// with more candidates than FAISS's time per query buys in exact distances goes to FAISS.
    fn decide(&mut self) {
        let best = self
            .measured
            .seconds
            .iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(m, _)| *m);
        self.measured.decided = best;
        if best != Some(Method::Shortlist) {
            // Its bf16 copy of the bank is the one large structure a method keeps.
            self.shortlist = None;
        }
        let faiss = self
            .measured
            .seconds
            .iter()
            .find(|(m, _)| *m == Method::Faiss)
            .map(|(_, s)| *s);
        if let (Some(f), true) = (faiss, self.exact_s > 0.0) {
            let m = self.index.ntotal() as usize;
            self.cap = ((f / self.exact_s) as usize).clamp(16, m.max(16));
        }
    }

    /// Builds what `method` needs before it is timed (the pruned search's bank projections,
    /// the shortlist's bf16 bank).
    fn prepare(&mut self, method: Method) -> Result<()> {
        match method {
            Method::Faiss => {}
            Method::Shortlist if self.shortlist.is_none() => {
                self.shortlist = Some(Shortlist::new(self.bank(), self.index.d() as usize)?);
            }
            Method::Shortlist => {}
            Method::Pruned if self.pruned.is_none() => {
                let d = self.index.d() as usize;
                let projection = match self.projection.take() {
                    Some(p) => p,
                    None => Projection::fit(self.bank(), d)?,
                };
                let rank = match std::env::var(RANK_ENV) {
                    Ok(v) => match v.parse::<usize>() {
                        Ok(r) if (1..=pruned::RANK).contains(&r) => r,
                        _ => bail!("{RANK_ENV}={v} is not a number from 1 to {}", pruned::RANK),
                    },
                    Err(_) => pruned::DEFAULT_RANK,
                };
                let search = Pruned::new(projection, self.bank(), rank)?;
                self.exact_s = time_exact_distance(self.bank(), d);
                self.pruned = Some(search);
            }
            Method::Pruned => {}
        }
        Ok(())
    }

    /// `queries` searched by `method` (built first if needed); pruned and shortlist queries
    /// they cannot answer cheaply go to FAISS.
    fn run(&mut self, method: Method, queries: &[f32], k: usize) -> Result<Found> {
        self.prepare(method)?;
        let d = self.index.d() as usize;
        let (mut found, dense) = match method {
            Method::Faiss => return self.faiss(queries, k, !self.choice.forced),
            Method::Shortlist => {
                let s = self.shortlist.as_ref().expect("prepared");
                s.search(self.bank(), queries, k)?
            }
            Method::Pruned => {
                let p = self.pruned.as_ref().expect("prepared");
                let s = p.search(self.bank(), queries, k, self.cap);
                self.pruned_queries += queries.len() / d - s.dense.len();
                self.exact_distances += s.exact;
                (
                    Found {
                        distances: s.distances,
                        labels: s.labels,
                    },
                    s.dense,
                )
            }
        };
        let nq = queries.len() / d;
        if self.measured.decided == Some(Method::Pruned)
            && nq >= PROBE_QUERIES
            && dense.len() * 2 > nq
        {
            // Pruning does not pay on this bank after all (most queries had more candidates
            // than an exact search is worth): from now on FAISS.
            self.measured.decided = Some(Method::Faiss);
            self.measured.switched = true;
        }
        if !dense.is_empty() {
            self.fallbacks += dense.len();
            let q: Vec<f32> = dense
                .iter()
                .flat_map(|&i| queries[i * d..(i + 1) * d].iter().copied())
                .collect();
            let exact = self.faiss(&q, k, true)?;
            found.fill(&dense, &exact, k);
        }
        Ok(found)
    }

    /// FAISS's search; with `exact`, the distances of its labels recomputed exactly (as the
    /// other methods report them) and re-sorted.
    fn faiss(&mut self, queries: &[f32], k: usize, exact: bool) -> Result<Found> {
        let found = self.index.search(queries, k)?;
        let mut out = Found {
            distances: found.distances,
            labels: found
                .labels
                .iter()
                .map(|l| l.get().map_or(-1, |v| v as i64))
                .collect(),
        };
        if exact && self.kind == IndexKind::Flat && k > 0 {
            let d = self.index.d() as usize;
            let bank = self.bank();
            out.distances
                .par_chunks_mut(k)
                .zip(out.labels.par_chunks_mut(k))
                .zip(queries.par_chunks_exact(d))
                .for_each(|((dist, lab), x)| {
                    let mut pairs: Vec<(f32, i64)> = lab
                        .iter()
                        .map(|&l| {
                            let y = &bank[l.max(0) as usize * d..][..d];
                            (squared_distance(x, y), l)
                        })
                        .collect();
                    pairs.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                    for (n, (dv, l)) in pairs.into_iter().enumerate() {
                        dist[n] = dv;
                        lab[n] = l;
                    }
                });
        }
        Ok(out)
    }

    /// Labels of the `k` bank vectors nearest to `query`, nearest first.
    pub fn neighbours(&mut self, query: &[f32], k: usize) -> Result<Vec<faiss::Idx>> {
        Ok(self
            .search(query, k)?
            .labels
            .into_iter()
            .map(|l| faiss::Idx::new(l as u64))
            .collect())
    }

    /// The bank vector stored under `label`.
    pub fn vector(&self, label: faiss::Idx) -> Result<Vec<f32>> {
        let d = self.index.d() as usize;
        if let (IndexKind::Flat, Some(l)) = (self.kind, label.get()) {
            return Ok(self.bank()[l as usize * d..(l as usize + 1) * d].to_vec());
        }
        let mut v = vec![0f32; d];
        self.index.reconstruct_n(label, 1, &mut v)?;
        Ok(v)
    }

    /// Patch scores for `queries` (`[N, D]`): the mean of the squared L2 distances to the
    /// `k` nearest bank vectors.
    pub fn patch_scores(&mut self, queries: ArrayView2<f32>, k: usize) -> Result<Vec<f32>> {
        let queries = queries.as_standard_layout();
        let found = self.search(queries.as_slice().expect("standard layout"), k)?;
        let k = found.distances.len() / queries.nrows().max(1);
        Ok(found
            .distances
            .chunks_exact(k.max(1))
            .map(|d| d.iter().sum::<f32>() / k as f32)
            .collect())
    }
}

/// Seconds per exact distance on this machine (bank rows against each other, spread over the
/// bank so they come from memory as candidates do).
fn time_exact_distance(bank: &[f32], d: usize) -> f64 {
    let m = bank.len() / d;
    let n = 2048.min(m * m);
    let t = Instant::now();
    let mut sink = 0f32;
    for i in 0..n {
        let a = (i * 7919) % m;
        let b = (i * 104_729 + 1) % m;
        sink += squared_distance(&bank[a * d..][..d], &bank[b * d..][..d]);
    }
    std::hint::black_box(sink);
    t.elapsed().as_secs_f64() / n as f64
}

/// `||x - y||^2` summed in f64 (eight partial sums, so it vectorizes), rounded once to
/// float32: within float32's unit roundoff of the true distance; the distance every method
/// but a forced `faiss` reports.
pub fn squared_distance(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f64; 8];
    let (cx, cy) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail: f64 = cx
        .remainder()
        .iter()
        .zip(cy.remainder())
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    for (a, b) in cx.zip(cy) {
        for i in 0..8 {
            let d = a[i] as f64 - b[i] as f64;
            acc[i] += d * d;
        }
    }
    (acc.iter().sum::<f64>() + tail) as f32
}
