//! The pruned search's worst case: a bank with a flat spectrum (isotropic Gaussian vectors),
//! where no projection bound can rule anything out. Times FAISS, the pruned search forced, and
//! `auto` (which measures and should land within 10% of FAISS) on the same queries, and checks
//! that they agree. Prints a line per method and JSON.
//!
//!   cargo run --release --example knn_flat -- [--bank 25088] [--dim 1024] [--queries 18816]
//!       [--threads 2]
//!
//! The projection is fitted before timing, as a model stores it.

use std::time::Instant;

use faiss::index::UpcastIndex;
use faiss::{FlatIndex, Index};
use patchcore::model::bank::IndexKind;
use patchcore::model::knn::{pruned::Projection, Choice, Knn, Method};
use rand::SeedableRng;
use rand_distr_free::normal;
use serde_json::json;

/// Standard normal samples by Box-Muller (no extra crate for one distribution).
mod rand_distr_free {
    use rand::Rng;
    pub fn normal(rng: &mut impl Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u, v): (f64, f64) = (rng.gen_range(1e-12..1.0), rng.gen());
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .map_or(default, |i| args[i + 1].parse().unwrap())
    };
    let (m, d, nq) = (
        opt("--bank", 25_088),
        opt("--dim", 1024),
        opt("--queries", 18_816),
    );
    let threads = opt("--threads", 2);
    tch::set_num_threads(threads as i32);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let bank = normal(&mut rng, m * d);
    let queries = normal(&mut rng, nq * d);
    let projection = Projection::fit(&bank, d).unwrap();
    let index = || {
        let mut i = FlatIndex::new_l2(d as u32).unwrap();
        i.add(&bank).unwrap();
        i.upcast()
    };
    let forced = |method| Choice {
        method,
        cpu_flags: patchcore::model::knn::cpu_bf16_flags(),
        forced: true,
    };
    let mut rows = Vec::new();
    let mut reference: Option<Vec<f32>> = None;
    for (name, choice) in [
        ("faiss", forced(Method::Faiss)),
        ("pruned", forced(Method::Pruned)),
        ("auto", Choice::parse("auto").unwrap()),
        // As on a CPU without bf16 hardware (AVX2 only): auto between pruned and FAISS.
        (
            "auto-nobf16",
            Choice {
                method: Method::Pruned,
                cpu_flags: vec![],
                forced: false,
            },
        ),
    ] {
        let mut knn = Knn::with_choice(index(), IndexKind::Flat, choice)
            .unwrap()
            .with_projection(Some(projection.clone()));
        let t = Instant::now();
        // In batches of 8 images of 784 patches, as predict searches.
        let mut distances = Vec::with_capacity(nq);
        for chunk in queries.chunks(8 * 784 * d) {
            distances.extend(knn.search(chunk, 1).unwrap().distances);
        }
        let s = t.elapsed().as_secs_f64();
        let err = reference.as_ref().map_or(0.0, |r| {
            r.iter()
                .zip(&distances)
                .map(|(a, b)| ((a - b).abs() / a.abs().max(1e-12)) as f64)
                .fold(0.0, f64::max)
        });
        reference.get_or_insert(distances);
        let described = knn.describe();
        println!("{name:11} {s:8.3} s  max rel err vs faiss {err:.1e}  {described}");
        rows.push(
            json!({"method": name, "seconds": s, "max_rel_err_vs_faiss": err,
                         "described": described}),
        );
    }
    let faiss_s = rows[0]["seconds"].as_f64().unwrap();
    for r in &mut rows {
        let s = r["seconds"].as_f64().unwrap();
        r["vs_faiss"] = json!(s / faiss_s);
    }
    println!(
        "{}",
        json!({"bank": m, "dim": d, "queries": nq, "threads": threads, "methods": rows})
    );
}
