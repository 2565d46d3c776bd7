//! kNN benchmark: the seconds per image of the nearest-neighbour search of a trained flat
//! model by each method -- FAISS's exact float32 search, the bf16 shortlist with exact float32
//! re-ranking, the pruned search at several ranks (with its exact distances per query),
//! `auto` as predict runs it, FAISS IVF-Flat at several nprobe -- on the test images of an
//! MVTec category,
//! with the bare feature extraction (forward) of the same run to normalise by, and each
//! method's error against FAISS: image scores, patch scores, nearest patch, image and pixel
//! AUROC. Prints a table and JSON.
//!
//!   cargo run --release --example knn_bench -- MODEL.faiss CATEGORY_DIR [--limit N] \
//!       [--threads 2] [--nlist N] [--nprobe 1,8,32] [--no-shortlist] [--no-ivf]
//!       [--ranks 16,32,64] [--dump DIR]
//!
//! `--dump DIR` also writes the bank and the queries of the first 8 images as .npy (for
//! timing the same search elsewhere: experiments/knn_amx.py). FAISS's threads follow OMP_NUM_THREADS.

use std::path::PathBuf;
use std::time::Instant;

use faiss::Index;
use ndarray::{Array2, Axis};
use patchcore::commands::mvtec;
use patchcore::commands::mvtec::metrics::{auroc, PixelMetrics};
use patchcore::model::bank::{self, IndexKind};
use patchcore::model::knn::{Choice, Knn, Method};
use patchcore::model::{scoring, single::SingleModel};
use serde_json::json;

struct Image {
    features: Array2<f32>,
    grid: (usize, usize),
    geometry: patchcore::features::images::Geometry,
    mask: Option<Array2<bool>>,
    label: bool,
}

/// One method's patch scores for every image (batches of 8, as predict searches), seconds.
fn run(knn: &mut Knn, images: &[Image], k: usize) -> (Vec<Vec<f32>>, Vec<Vec<i64>>, f64) {
    let t = Instant::now();
    let mut scores = Vec::new();
    let mut labels = Vec::new();
    for batch in images.chunks(8) {
        let views: Vec<_> = batch.iter().map(|i| i.features.view()).collect();
        let q = ndarray::concatenate(Axis(0), &views).unwrap();
        let found = knn.search(q.as_slice().unwrap(), k).unwrap();
        let per = batch[0].features.nrows();
        for (i, _) in batch.iter().enumerate() {
            let d = &found.distances[i * per * k..(i + 1) * per * k];
            scores.push(
                d.chunks(k)
                    .map(|c| c.iter().sum::<f32>() / k as f32)
                    .collect(),
            );
            labels.push(
                found.labels[i * per * k..(i + 1) * per * k]
                    .iter()
                    .step_by(k)
                    .copied()
                    .collect(),
            );
        }
    }
    (scores, labels, t.elapsed().as_secs_f64())
}

/// Image AUROC and pixel AUROC (heatmaps at the crop, as `mvtec runall` evaluates).
fn aurocs(images: &[Image], scores: &[Vec<f32>]) -> (Option<f64>, Option<f64>) {
    let image_scores: Vec<f32> = scores.iter().map(|s| scoring::image_score(s)).collect();
    let labels: Vec<bool> = images.iter().map(|i| i.label).collect();
    let mut pixels = PixelMetrics::new();
    for (img, s) in images.iter().zip(scores) {
        let heat = scoring::window_heatmap(s, img.grid, &img.geometry).unwrap();
        let mask = img
            .mask
            .clone()
            .unwrap_or_else(|| Array2::from_elem(heat.dim(), false));
        pixels.add(heat.view(), mask.view()).unwrap();
    }
    (auroc(&image_scores, &labels), pixels.auroc())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .map(|i| args[i + 1].clone())
    };
    let index = PathBuf::from(&args[1]);
    let category = PathBuf::from(&args[2]);
    let limit: usize = opt("--limit").map_or(usize::MAX, |v| v.parse().unwrap());
    let threads: usize = opt("--threads").map_or(2, |v| v.parse().unwrap());
    let nprobes: Vec<u32> = opt("--nprobe").map_or(vec![1, 4, 16, 64], |v| {
        v.split(',').map(|p| p.parse().unwrap()).collect()
    });
    tch::set_num_threads(threads as i32);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();

    let info = bank::read_info(&index).unwrap();
    let k = info.n_neighbors;
    let model = SingleModel::load(&index, info.clone(), None, tch::Device::Cpu, true).unwrap();
    let mut files = patchcore::features::images::find_images(&category.join("test"))
        .unwrap()
        .images;
    files.truncate(limit);
    // Features of every test image; the time outside the sink is the bare extraction.
    let mut images = Vec::new();
    let mut sink_s = 0.0;
    let t = Instant::now();
    model
        .extractor
        .extract(&files, 8, |batch| {
            let t = Instant::now();
            for e in batch {
                let mask = mvtec::evaluate::mask_path(&category, &e.file.relative).map(|p| {
                    mvtec::evaluate::load_mask(&p, &info.preprocess, e.original.dimensions())
                        .unwrap()
                });
                images.push(Image {
                    label: mask.is_some(),
                    mask,
                    features: e.features,
                    grid: e.grid,
                    geometry: e.geometry,
                });
            }
            sink_s += t.elapsed().as_secs_f64();
            Ok(())
        })
        .unwrap();
    let n = images.len() as f64;
    let forward = (t.elapsed().as_secs_f64() - sink_s) / n;
    let exact_choice = |method| Choice {
        method,
        cpu_flags: patchcore::model::knn::cpu_bf16_flags(),
        forced: true,
    };
    let flat = || bank::read_index(&index, &info).unwrap();

    // The bank vectors, for IVF and --dump.
    let m = info.bank_size;
    let d = info.feature_dim as usize;
    let mut vectors = vec![0f32; m * d];
    bank::read_index(&index, &info)
        .unwrap()
        .reconstruct_n(faiss::Idx::new(0), m, &mut vectors)
        .unwrap();
    let vectors = Array2::from_shape_vec((m, d), vectors).unwrap();
    if let Some(dir) = opt("--dump") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        ndarray_npy::write_npy(dir.join("bank.npy"), &vectors).unwrap();
        let views: Vec<_> = images.iter().take(8).map(|i| i.features.view()).collect();
        let q = ndarray::concatenate(Axis(0), &views).unwrap();
        ndarray_npy::write_npy(dir.join("queries.npy"), &q).unwrap();
    }

    let mut faiss = Knn::with_choice(flat(), IndexKind::Flat, exact_choice(Method::Faiss)).unwrap();
    let (want, want_labels, faiss_s) = run(&mut faiss, &images, k);
    let (want_img, want_pix) = aurocs(&images, &want);
    let mut rows = vec![json!({
        "method": "faiss", "knn_s_per_image": faiss_s / n,
        "knn_over_forward": faiss_s / n / forward,
        "image_auroc": want_img, "pixel_auroc": want_pix,
    })];
    let compare =
        |name: String, extra: serde_json::Value, got: &[Vec<f32>], labels: &[Vec<i64>], s: f64| {
            let (mut img_err, mut patch_err, mut same, mut total) = (0f64, 0f64, 0usize, 0usize);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let (gi, wi) = (scoring::image_score(g), scoring::image_score(w));
                img_err = img_err.max(((gi - wi).abs() / wi) as f64);
                for (a, b) in g.iter().zip(w) {
                    patch_err = patch_err.max(((a - b).abs() / wi) as f64);
                }
                same += labels[i]
                    .iter()
                    .zip(&want_labels[i])
                    .filter(|(a, b)| a == b)
                    .count();
                total += labels[i].len();
            }
            let (ia, pa) = aurocs(&images, got);
            let mut row = json!({
                "method": name, "knn_s_per_image": s / n, "knn_over_forward": s / n / forward,
                "vs_faiss": s / faiss_s,
                "max_rel_image_score_err": img_err, "max_rel_patch_score_err": patch_err,
                "same_nearest_patch": same as f64 / total as f64,
                "image_auroc": ia, "pixel_auroc": pa,
            });
            row.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            row
        };

    let ranks: Vec<usize> = opt("--ranks").map_or(vec![16, 32, 64], |v| {
        v.split(',').map(|p| p.parse().unwrap()).collect()
    });
    for r in ranks {
        // The bench is single-threaded here; the search reads the rank when it is built.
        std::env::set_var(patchcore::model::knn::RANK_ENV, r.to_string());
        let mut pruned = Knn::with_choice(flat(), IndexKind::Flat, exact_choice(Method::Pruned))
            .unwrap()
            .with_projection(model_projection(&info, d));
        let (got, labels, s) = run(&mut pruned, &images, k);
        let extra = json!({
            "rank": r,
            "exact_distances_per_query":
                pruned.exact_distances as f64 / pruned.pruned_queries.max(1) as f64,
            "fallback_queries": pruned.fallbacks, "queries": pruned.searched,
        });
        rows.push(compare(format!("pruned r={r}"), extra, &got, &labels, s));
    }
    std::env::remove_var(patchcore::model::knn::RANK_ENV);
    let mut auto = Knn::with_choice(flat(), IndexKind::Flat, Choice::parse("auto").unwrap())
        .unwrap()
        .with_projection(model_projection(&info, d));
    let (got, labels, s) = run(&mut auto, &images, k);
    let extra = json!({"described": auto.describe()});
    rows.push(compare("auto".into(), extra, &got, &labels, s));

    if !args.iter().any(|a| a == "--no-shortlist") {
        let mut short =
            Knn::with_choice(flat(), IndexKind::Flat, exact_choice(Method::Shortlist)).unwrap();
        let (got, labels, s) = run(&mut short, &images, k);
        let fallbacks = json!({"fallback_queries": short.fallbacks, "queries": short.searched});
        rows.push(compare("shortlist".into(), fallbacks, &got, &labels, s));
    }

    let no_ivf = args.iter().any(|a| a == "--no-ivf");
    let nlist = opt("--nlist").map(|v| v.parse().unwrap());
    let kind = bank::IndexRequest::Ivf {
        nlist,
        nprobe: Some(1),
    }
    .resolve(m);
    let IndexKind::Ivf { nlist, .. } = kind else {
        unreachable!()
    };
    let t = Instant::now();
    let kind = if no_ivf { IndexKind::Flat } else { kind };
    let mut ivf = Knn::new(bank::build(vectors.view(), kind).unwrap(), kind).unwrap();
    let build_s = t.elapsed().as_secs_f64();
    for &p in nprobes.iter().filter(|&&p| p <= nlist && !no_ivf) {
        ivf.set_nprobe(p).unwrap();
        let (got, labels, s) = run(&mut ivf, &images, k);
        let extra = json!({"nlist": nlist, "nprobe": p, "build_s": build_s});
        rows.push(compare(format!("ivf nprobe {p}"), extra, &got, &labels, s));
    }

    println!(
        "{} images, bank {m} x {d}, k {k}, {threads} threads, CPU bf16 flags {:?}; \
         bare forward {forward:.4} s/image",
        images.len(),
        patchcore::model::knn::cpu_bf16_flags()
    );
    println!(
        "{:18} {:>10} {:>9} {:>8} {:>8} {:>11} {:>11} {:>9} {:>8} {:>8}",
        "method",
        "kNN s/img",
        "/forward",
        "/faiss",
        "exact/q",
        "img err",
        "patch err",
        "same NN",
        "img AUC",
        "pix AUC"
    );
    for r in &rows {
        let f = |key: &str| r[key].as_f64().map_or("-".into(), |v| format!("{v:.4}"));
        let e = |key: &str| r[key].as_f64().map_or("-".into(), |v| format!("{v:.1e}"));
        println!(
            "{:18} {:>10} {:>9} {:>8} {:>8} {:>11} {:>11} {:>9} {:>8} {:>8}",
            r["method"].as_str().unwrap(),
            f("knn_s_per_image"),
            f("knn_over_forward"),
            f("vs_faiss"),
            r["exact_distances_per_query"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.1}")),
            e("max_rel_image_score_err"),
            e("max_rel_patch_score_err"),
            f("same_nearest_patch"),
            f("image_auroc"),
            f("pixel_auroc")
        );
    }
    println!(
        "{}",
        json!({"images": images.len(), "bank": m, "k": k, "threads": threads,
               "cpu_bf16_flags": patchcore::model::knn::cpu_bf16_flags(),
               "forward_s_per_image": forward, "methods": rows})
    );
}

/// The projection the model stores (or none: fitted from the bank).
fn model_projection(
    info: &bank::ModelInfo,
    d: usize,
) -> Option<patchcore::model::knn::pruned::Projection> {
    info.knn_projection
        .as_ref()
        .map(|p| patchcore::model::knn::pruned::Projection::from_stored(p, d).unwrap())
}
