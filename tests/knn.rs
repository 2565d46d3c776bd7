//! The nearest-neighbour search (`patchcore::model::knn`): the bf16 shortlist with exact float32
//! re-ranking, the pruned search and `auto` return FAISS's exact `IndexFlatL2` results
//! (random data with near-ties and duplicates, k = 1 and 3), an IVF bank searches exactly
//! with nprobe = nlist, and the method is forced by `PATCHCORE_KNN`.

use faiss::index::UpcastIndex;
use faiss::{FlatIndex, Index};
use patchcore::model::bank::{self, IndexKind};
use patchcore::model::knn::{Choice, Knn, Method};

/// A small deterministic generator (no test depends on a crate's random stream).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) as f32
    }
}

/// A bank of `m` non-negative vectors (like ReLU features) with exact duplicates and
/// near-duplicates, and queries that include bank vectors, their near-copies and points
/// half-way between two bank vectors (near-ties).
fn data(m: usize, d: usize, nq: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Lcg(seed);
    let mut bank: Vec<f32> = (0..m * d).map(|_| rng.next() * 2.0).collect();
    for j in (0..m).step_by(17).skip(1) {
        // Exact duplicates of earlier vectors, and copies moved by one float32 step.
        let src: Vec<f32> = bank[(j - 1) * d..j * d].to_vec();
        bank[j * d..(j + 1) * d].copy_from_slice(&src);
        if j + 1 < m {
            let near: Vec<f32> = src.iter().map(|v| v * (1.0 + f32::EPSILON)).collect();
            bank[(j + 1) * d..(j + 2) * d].copy_from_slice(&near);
        }
    }
    let mut queries = Vec::with_capacity(nq * d);
    for i in 0..nq {
        let a = &bank[(i * 7 % m) * d..(i * 7 % m + 1) * d];
        let b = &bank[((i * 13 + 5) % m) * d..((i * 13 + 5) % m + 1) * d];
        match i % 4 {
            0 => queries.extend_from_slice(a),
            1 => queries.extend(a.iter().zip(b).map(|(x, y)| 0.5 * (x + y))),
            2 => queries.extend(a.iter().map(|x| x + 1e-3 * (rng.next() - 0.5))),
            _ => queries.extend((0..d).map(|_| rng.next() * 2.0)),
        }
    }
    (bank, queries)
}

fn flat(bank: &[f32], d: usize) -> faiss::index::IndexImpl {
    let mut index = FlatIndex::new_l2(d as u32).unwrap();
    index.add(bank).unwrap();
    index.upcast()
}

fn forced(method: Method) -> Choice {
    Choice {
        method,
        cpu_flags: vec![],
        forced: true,
    }
}

/// Our float32 distance of query `x` to bank vector `j`, the way FAISS computes it.
fn faiss_distance(x: &[f32], y: &[f32]) -> f32 {
    let dot: f64 = x.iter().zip(y).map(|(a, b)| *a as f64 * *b as f64).sum();
    let n = |v: &[f32]| v.iter().map(|a| *a as f64 * *a as f64).sum::<f64>();
    (n(x) + n(y) - 2.0 * dot).max(0.0) as f32
}

#[test]
fn shortlist_pruned_and_auto_equal_faiss_exact_search() {
    let auto = Choice::parse("auto").unwrap();
    for (m, d, nq, seed) in [(600, 1024, 120, 1), (2000, 64, 1000, 2), (40, 1024, 30, 3)] {
        let (bank, queries) = data(m, d, nq, seed);
        for (k, choice) in [1usize, 3].into_iter().flat_map(|k| {
            [
                forced(Method::Shortlist),
                forced(Method::Pruned),
                auto.clone(),
            ]
            .map(|c| (k, c))
        }) {
            let mut faiss_knn =
                Knn::with_choice(flat(&bank, d), IndexKind::Flat, forced(Method::Faiss)).unwrap();
            let mut short = Knn::with_choice(flat(&bank, d), IndexKind::Flat, choice).unwrap();
            let want = faiss_knn.search(&queries, k).unwrap();
            let got = short.search(&queries, k).unwrap();
            let case = format!("m={m} d={d} k={k} {}", short.describe());
            for i in 0..nq {
                let x = &queries[i * d..(i + 1) * d];
                for r in 0..k {
                    let (w, g) = (want.distances[i * k + r], got.distances[i * k + r]);
                    // 1e-5 relative, plus float32's rounding of the cancellation in
                    // ||x||^2 + ||y||^2 - 2 x.y, which FAISS leaves in (distances of
                    // duplicates come out at ~1e-7 ||x||^2 instead of 0).
                    let tol = 1e-5 * w.max(g) + 1e-6 * faiss_distance(x, &vec![0.0; d]);
                    assert!(
                        (w - g).abs() <= tol,
                        "{case} query {i} rank {r}: faiss {w}, got {g}"
                    );
                    let (wl, gl) = (want.labels[i * k + r], got.labels[i * k + r]);
                    if wl != gl {
                        // Only a tie within float32 rounding may pick another vector.
                        let dw = faiss_distance(x, &bank[wl as usize * d..(wl as usize + 1) * d]);
                        let dg = faiss_distance(x, &bank[gl as usize * d..(gl as usize + 1) * d]);
                        assert!(
                            (dw - dg).abs() <= tol,
                            "{case} query {i} rank {r}: faiss label {wl} ({dw}), got {gl} ({dg})"
                        );
                    }
                }
            }
            eprintln!(
                "{case}: {} of {} queries handed to FAISS (too many candidates)",
                short.fallbacks, short.searched
            );
            // Patch scores and neighbours go through the same search.
            let q = ndarray::ArrayView2::from_shape((nq, d), &queries).unwrap();
            let (a, b) = (
                faiss_knn.patch_scores(q, k).unwrap(),
                short.patch_scores(q, k).unwrap(),
            );
            let top = a.iter().copied().fold(0f32, f32::max);
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-5 * top,
                "{case}: patch scores differ by {worst}"
            );
        }
    }
}

#[test]
fn shortlist_mostly_avoids_the_fallback_on_spread_data() {
    // Uniform random vectors: the bound leaves a short list; a fallback for every query would
    // mean the shortlist never runs.
    let (m, d, nq) = (3000, 256, 100);
    let mut rng = Lcg(9);
    let bank: Vec<f32> = (0..m * d).map(|_| rng.next()).collect();
    let queries: Vec<f32> = (0..nq * d).map(|_| rng.next()).collect();
    let mut short =
        Knn::with_choice(flat(&bank, d), IndexKind::Flat, forced(Method::Shortlist)).unwrap();
    short.search(&queries, 1).unwrap();
    assert!(short.fallbacks < nq / 2, "{} fallbacks", short.fallbacks);
}

#[test]
fn ivf_with_every_list_probed_is_exact() {
    let (m, d, nq) = (2000, 64, 50);
    let (bank, queries) = data(m, d, nq, 4);
    let view = ndarray::ArrayView2::from_shape((m, d), &bank).unwrap();
    let kind = bank::IndexRequest::Ivf {
        nlist: Some(16),
        nprobe: Some(16),
    }
    .resolve(m);
    assert_eq!(
        kind,
        IndexKind::Ivf {
            nlist: 16,
            nprobe: 16
        }
    );
    let mut ivf = Knn::new(bank::build(view, kind).unwrap(), kind).unwrap();
    let mut exact =
        Knn::with_choice(flat(&bank, d), IndexKind::Flat, forced(Method::Faiss)).unwrap();
    for k in [1, 3] {
        let (a, b) = (
            ivf.search(&queries, k).unwrap(),
            exact.search(&queries, k).unwrap(),
        );
        for (x, y) in a.distances.iter().zip(&b.distances) {
            // Same float32 cancellation as above (queries' squared norms are below 4 d).
            assert!(
                (x - y).abs() <= 1e-5 * y + 4e-6 * d as f32,
                "ivf {x} vs exact {y}"
            );
        }
    }
    // Fewer lists probed: approximate, never closer than the exact nearest, and farther for
    // some queries (one list of 16 is searched).
    ivf.set_nprobe(1).unwrap();
    let (a, b) = (
        ivf.search(&queries, 1).unwrap(),
        exact.search(&queries, 1).unwrap(),
    );
    let mut farther = 0;
    for (x, y) in a.distances.iter().zip(&b.distances) {
        assert!(*x >= y - 1e-4 * y.max(1.0), "ivf {x} below exact {y}");
        farther += (*x > y + 1e-3 * y.max(1.0)) as usize;
    }
    assert!(farther > 0, "nprobe 1 searched every list");
    // Reconstruction by label (Eq. 7 needs it) works through the direct map.
    assert_eq!(ivf.vector(faiss::Idx::new(5)).unwrap(), bank[5 * d..6 * d]);
    // A flat bank has no nprobe.
    assert!(exact.set_nprobe(2).is_err());
}

#[test]
fn method_override_values() {
    // The values PATCHCORE_KNN takes (parsed without touching this process's environment:
    // other tests run beside this one; the predict test below passes it to its children).
    let c = Choice::parse("shortlist").unwrap();
    assert_eq!(c.method, Method::Shortlist);
    assert!(c.forced && c.describe().contains("PATCHCORE_KNN"), "{c:?}");
    assert!(Choice::parse("pruned").unwrap().forced);
    let e = Choice::parse("fast").unwrap_err().to_string();
    assert!(e.contains("auto, faiss, shortlist, pruned"), "{e}");
    // auto is measured, not chosen from CPU flags: it starts with the pruned search and
    // times the shortlist only where bf16 runs in hardware.
    for v in ["", "auto"] {
        let c = Choice::parse(v).unwrap();
        assert!(!c.forced && c.method == Method::Pruned, "{c:?}");
        let times_shortlist = c.describe().contains("shortlist");
        assert_eq!(
            times_shortlist,
            !patchcore::model::knn::cpu_bf16_flags().is_empty(),
            "{}",
            c.describe()
        );
    }
}

#[test]
fn auto_measures_then_keeps_the_fastest_and_a_flat_spectrum_stays_exact() {
    // Isotropic vectors: pruning cannot help, so most pruned queries exceed the measured cap
    // and go to FAISS; whatever auto decides, the answers are FAISS's.
    let (m, d, nq) = (4000, 128, 1024);
    let mut rng = Lcg(21);
    let bank: Vec<f32> = (0..m * d).map(|_| rng.next()).collect();
    let queries: Vec<f32> = (0..nq * d).map(|_| rng.next()).collect();
    let mut auto =
        Knn::with_choice(flat(&bank, d), IndexKind::Flat, Choice::parse("").unwrap()).unwrap();
    let mut faiss_knn =
        Knn::with_choice(flat(&bank, d), IndexKind::Flat, forced(Method::Faiss)).unwrap();
    // Too few queries to measure: answered, not timed.
    let few = &queries[..10 * d];
    auto.search(few, 1).unwrap();
    assert!(
        auto.describe().contains("too few queries"),
        "{}",
        auto.describe()
    );
    let got = auto.search(&queries, 1).unwrap();
    let want = faiss_knn.search(&queries, 1).unwrap();
    let described = auto.describe();
    assert!(described.contains("measured per query"), "{described}");
    for (i, (g, w)) in got.distances.iter().zip(&want.distances).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * w + 1e-5,
            "query {i}: {g} vs faiss {w}"
        );
    }
    // A second search answers with the decided method alone (no new measurement).
    auto.search(&queries[..300 * d], 1).unwrap();
    assert_eq!(
        auto.describe().matches("ms").count(),
        described.matches("ms").count()
    );
}

mod common;

#[test]
fn predict_shortlist_ivf_and_bf16_backbone_against_faiss() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    common::write_images(
        &r.join("train"),
        4,
        0,
        (64, 64),
        patchcore::util::synthetic::Defect::None,
    );
    common::write_test_images(r, (64, 64), 2, 1, 1);
    let train = |name: &str, extra: &[&str]| {
        let index = r.join(format!("{name}.faiss"));
        let args = [common::RESNET18_64, &["-s", "0.5", "-k", "3", "-q"], extra].concat();
        common::train_ok(&r.join("train"), &index, &args);
        index
    };
    let predict = |index: &std::path::Path, out: &str, knn: &str, extra: &[&str]| {
        let out = r.join(out);
        let timings = out.join("timings.json");
        let mut args = vec!["predict", "-q", "-i"];
        let (input, o, i, t) = (r.join("test"), out.clone(), index.to_path_buf(), timings);
        args.extend([
            common::s(&input),
            "-o",
            common::s(&o),
            "--index",
            common::s(&i),
        ]);
        args.extend(["--timings", common::s(&t)]);
        args.extend_from_slice(extra);
        let o = common::bin()
            .env(patchcore::model::knn::METHOD_ENV, knn)
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", common::stderr(&o));
        let method = common::json(&out.join("timings.json"))["knn_method"]
            .as_str()
            .unwrap()
            .to_string();
        (out, method)
    };
    // Flat: the shortlist (forced here, whatever the CPU), the pruned search and auto give
    // FAISS's results; the model stores the pruned search's projection.
    let flat = train("flat", &[]);
    let side = common::json(&r.join("flat.faiss.json"));
    assert_eq!(
        side["knn_projection"]["rank"], 64,
        "{}",
        side["knn_projection"]
    );
    let (faiss_out, m) = predict(&flat, "faiss", "faiss", &[]);
    assert!(m.starts_with("faiss (exact"), "{m}");
    let (short_out, m) = predict(&flat, "short", "shortlist", &[]);
    assert!(m.starts_with("shortlist"), "{m}");
    common::assert_same_outputs(&faiss_out, &short_out, 1e-5, "shortlist");
    let (pruned_out, m) = predict(&flat, "pruned", "pruned", &[]);
    assert!(
        m.starts_with("pruned (") && m.contains("from the model"),
        "{m}"
    );
    common::assert_same_outputs(&faiss_out, &pruned_out, 1e-5, "pruned");
    let (auto_out, _) = predict(&flat, "auto", "auto", &[]);
    common::assert_same_outputs(&faiss_out, &auto_out, 1e-5, "auto");
    // A model from before projections were stored loads, fits one and says so; a damaged
    // one is refused, naming the sidecar.
    let old = r.join("old.faiss");
    std::fs::copy(&flat, &old).unwrap();
    let mut side = common::json(&r.join("flat.faiss.json"));
    let stored = side
        .as_object_mut()
        .unwrap()
        .remove("knn_projection")
        .unwrap();
    std::fs::write(r.join("old.faiss.json"), side.to_string()).unwrap();
    let (old_out, m) = predict(&old, "old", "pruned", &[]);
    assert!(m.contains("fitted at load"), "{m}");
    common::assert_same_outputs(&faiss_out, &old_out, 1e-5, "older model");
    let mut text = stored["mean_basis_f32le"].as_str().unwrap().to_string();
    let flipped = if text.starts_with('A') { "B" } else { "A" };
    text.replace_range(0..1, flipped);
    side["knn_projection"] = stored.clone();
    side["knn_projection"]["mean_basis_f32le"] = text.into();
    std::fs::write(r.join("old.faiss.json"), side.to_string()).unwrap();
    let o = common::predict_with(&r.join("test"), &r.join("bad"), &old, &[]);
    let e = common::stderr(&o);
    assert!(!o.status.success(), "a damaged projection was accepted");
    assert!(
        e.contains("old.faiss.json") && e.contains("checksum"),
        "{e}"
    );
    // --nprobe is for IVF models only: a clean failure, nothing written.
    let o = common::predict_with(&r.join("test"), &r.join("x"), &flat, &["--nprobe", "2"]);
    common::assert_fails_naming(&o, &["--bank-index ivf"]);
    assert_nothing_in(&r.join("x"));

    // IVF: recorded in the sidecar; every list probed = exact search.
    let ivf = train(
        "ivf",
        &["--bank-index", "ivf", "--nlist", "4", "--nprobe", "1"],
    );
    let side = common::json(&r.join("ivf.faiss.json"));
    assert_eq!(side["index"]["kind"], "ivf");
    assert_eq!(side["index"]["nlist"], 4);
    assert_eq!(side["index"]["nprobe"], 1);
    let (ivf_out, m) = predict(&ivf, "ivf", "auto", &["--nprobe", "4"]);
    assert!(m.contains("nprobe 4"), "{m}");
    common::assert_same_outputs(&faiss_out, &ivf_out, 1e-5, "ivf nprobe=nlist");
    // The model's nprobe, 1 of 4 lists: approximate, each patch's distance at or above the
    // exact one, so every score and heatmap value too, and some strictly above.
    let (ivf1_out, m) = predict(&ivf, "ivf1", "auto", &[]);
    assert!(m.contains("nprobe 1"), "{m}");
    let (exact, approx) = (
        common::predict_outputs(&faiss_out),
        common::predict_outputs(&ivf1_out),
    );
    assert_eq!(exact.len(), approx.len());
    let mut above = 0;
    for ((name, se, he), (_, sa, ha)) in exact.iter().zip(&approx) {
        assert!(
            *sa >= se * (1.0 - 1e-5),
            "{name}: nprobe 1 score {sa} below exact {se}"
        );
        let top = he.iter().copied().fold(0f32, f32::max);
        for (e, a) in he.iter().zip(ha) {
            assert!(
                *a >= e - 1e-5 * top,
                "{name}: nprobe 1 heat {a} below exact {e}"
            );
            above += (*a > e + 1e-3 * top) as usize;
        }
    }
    assert!(
        above > 0,
        "nprobe 1 of 4 searched every list: exact results"
    );
    for extra in [&["--nlist", "4"][..], &["--nprobe", "2"]] {
        let bad = r.join("refused/m.faiss");
        let o = common::train(&r.join("train"), &bad, extra);
        common::assert_fails_naming(&o, &["--bank-index ivf"]);
        assert_nothing_in(&r.join("refused"));
    }

    // --precision bf16 is the backbone alone: its kNN is the same search (method named as
    // for fp32), and the sidecar records bf16.
    let bf16 = train("bf16", &["--precision", "bf16"]);
    assert_eq!(
        common::json(&r.join("bf16.faiss.json"))["precision"],
        "bf16"
    );
    let (_, m) = predict(&bf16, "bf16", "faiss", &[]);
    assert!(m.starts_with("faiss (exact"), "{m}");
}

/// `dir` is absent or empty: a refused run wrote nothing there.
fn assert_nothing_in(dir: &std::path::Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{}: {left:?}", dir.display());
}
