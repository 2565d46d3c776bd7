//! Coreset benchmark: times the greedy coreset selection on real 128-d projections, for
//! growing prefixes of the patches and two sampling ratios, with the default tuning (lazy
//! blocks for the first selections, then groups in a tree of selected points) and, where it finishes
//! in reasonable time, a baseline tuning (by default no lazy phase: groups from the first
//! step, the previous code), checking that both select the same patches.
//!
//!   PATCHCORE_DUMP_PROJECTIONS=/work/tmp-coreset/proj.npy patchcore train ...   # once
//!   cargo run --release --example coreset_scaling -- /work/tmp-coreset/proj.npy \
//!       [--sizes 250000,500000,1000000,all] [--ratios 0.1,0.01] [--lazy 1024] \
//!       [--roots 64] [--fanout 8] [--baseline-lazy 0] [--baseline-max-steps 25000] [--threads N]
//!       [--save-selection SEL.npy] [--check-selection SEL.npy]
//!
//! `--save-selection` writes the last run's selected indices (in selection order, u64);
//! `--check-selection` fails unless the last run selected exactly those: how a change to the
//! search is checked for the same selections at a size no test reaches.
//!
//! Prints one JSON line per run (with the process's peak RSS so far) and a table at the end.

use std::time::Instant;

use ndarray::{s, Array2};
use patchcore::training::coreset;

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
    let num = |name: &str, default: usize| flag(name).map_or(default, |s| s.parse().unwrap());
    let defaults = coreset::Tuning::default();
    let tuning = coreset::Tuning {
        lazy_steps: num("--lazy", defaults.lazy_steps),
        roots: num("--roots", defaults.roots),
        fanout: num("--fanout", defaults.fanout),
    };
    let baseline = coreset::Tuning {
        lazy_steps: num("--baseline-lazy", 0),
        ..tuning
    };
    let baseline_max = num("--baseline-max-steps", 25_000);
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
    let mut last = Vec::new();
    for &ratio in &ratios {
        for &size in &sizes {
            let view = points.slice(s![..size, ..]);
            let count = coreset::coreset_size(size, ratio);
            let t = Instant::now();
            let new = coreset::greedy_select_tuned(view, count, 0, tuning, &|_| true);
            let new_s = t.elapsed().as_secs_f64();
            let rss = peak_rss_mib();
            let old_s = (count <= baseline_max).then(|| {
                let t = Instant::now();
                let old = coreset::greedy_select_tuned(view, count, 0, baseline, &|_| true);
                let old_s = t.elapsed().as_secs_f64();
                assert_eq!(old, new, "both tunings select the same patches");
                old_s
            });
            println!(
                "{}",
                serde_json::json!({"patches": size, "ratio": ratio, "selected": count,
                    "lazy_steps": tuning.lazy_steps, "roots": tuning.roots, "fanout": tuning.fanout,
                    "seconds": new_s, "peak_rss_mib": rss,
                    "baseline_lazy_steps": baseline.lazy_steps, "baseline_s": old_s})
            );
            rows.push((size, ratio, count, new_s, old_s));
            last = new;
        }
    }
    let last = ndarray::Array1::from_iter(last.into_iter().map(|i| i as u64));
    if let Some(file) = flag("--save-selection") {
        ndarray_npy::write_npy(&file, &last).expect("write the selection");
        eprintln!("selection of {} written to {file}", last.len());
    }
    if let Some(file) = flag("--check-selection") {
        let want: ndarray::Array1<u64> = ndarray_npy::read_npy(&file).expect("a u64 .npy");
        assert!(want == last, "the selection differs from {file}");
        println!("same selection as {file}: {} indices", last.len());
    }
    println!(
        "| patches | ratio | selected | lazy {} + groups (s) | lazy {} + groups (s) |",
        tuning.lazy_steps, baseline.lazy_steps
    );
    println!("|---:|---:|---:|---:|---:|");
    for (size, ratio, count, new_s, old_s) in rows {
        let old = old_s.map_or("not run".into(), |s| format!("{s:.1}"));
        println!("| {size} | {ratio} | {count} | {new_s:.1} | {old} |");
    }
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}
