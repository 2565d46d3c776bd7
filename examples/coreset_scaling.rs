//! Coreset benchmark: times the greedy coreset selection on real 128-d projections, for
//! growing prefixes of the patches and two sampling ratios, with the two-level pruning
//! (`coreset::greedy_select_with_progress`) and, where it finishes in reasonable time, the
//! former one-level pruning (`greedy_select_with_super_centres(.., usize::MAX, ..)`, every
//! selected point tested at every step), checking that both select the same patches.
//!
//!   PATCHCORE_DUMP_PROJECTIONS=/work/tmp-coreset/proj.npy patchcore train ...   # once
//!   cargo run --release --example coreset_scaling -- /work/tmp-coreset/proj.npy \
//!       [--sizes 250000,500000,1000000,all] [--ratios 0.1,0.01] [--old-max-steps 25000] \
//!       [--supers 1024] [--threads N]
//!
//! Prints one JSON line per run and a table at the end.

use std::time::Instant;

use ndarray::{s, Array2};
use patchcore::coreset;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .map(|i| args[i + 1].clone())
    };
    let path = args
        .first()
        .expect("usage: coreset_scaling PROJECTIONS.npy [options]");
    let points: Array2<f32> = ndarray_npy::read_npy(path).expect("a [N, 128] f32 .npy");
    let n = points.nrows();
    let sizes: Vec<usize> = flag("--sizes")
        .unwrap_or_else(|| "250000,500000,1000000,all".into())
        .split(',')
        .map(|s| {
            if s == "all" {
                n
            } else {
                s.parse::<usize>().unwrap().min(n)
            }
        })
        .collect();
    let ratios: Vec<f64> = flag("--ratios")
        .unwrap_or_else(|| "0.1,0.01".into())
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let old_max: usize = flag("--old-max-steps").map_or(25_000, |s| s.parse().unwrap());
    let supers: usize = flag("--supers").map_or(1024, |s| s.parse().unwrap());
    if let Some(t) = flag("--threads") {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t.parse().unwrap())
            .build_global()
            .unwrap();
    }
    eprintln!(
        "{n} patches of {} dims from {path}; {} threads",
        points.ncols(),
        rayon::current_num_threads()
    );
    let mut rows = Vec::new();
    for &ratio in &ratios {
        for &size in &sizes {
            let view = points.slice(s![..size, ..]);
            let count = coreset::coreset_size(size, ratio);
            let t = Instant::now();
            let new = coreset::greedy_select_with_super_centres(view, count, 0, supers, &|| true);
            let new_s = t.elapsed().as_secs_f64();
            let old_s = (count <= old_max).then(|| {
                let t = Instant::now();
                let old =
                    coreset::greedy_select_with_super_centres(view, count, 0, usize::MAX, &|| true);
                let old_s = t.elapsed().as_secs_f64();
                assert_eq!(old, new, "the two prunings select the same patches");
                old_s
            });
            println!(
                "{}",
                serde_json::json!({"patches": size, "ratio": ratio, "selected": count,
                    "supers": supers, "two_level_s": new_s, "one_level_s": old_s})
            );
            rows.push((size, ratio, count, new_s, old_s));
        }
    }
    println!("| patches | ratio | selected | two-level (s) | one-level (s) |");
    println!("|---:|---:|---:|---:|---:|");
    for (size, ratio, count, new_s, old_s) in rows {
        let old = old_s.map_or("not run".into(), |s| format!("{s:.1}"));
        println!("| {size} | {ratio} | {count} | {new_s:.1} | {old} |");
    }
}
