//! Coverage radius of memory banks: the largest (and mean) Euclidean distance of any training
//! patch to its nearest bank patch, in the full 1024-d feature space. The training images'
//! features are extracted again with the first model's backbone and options; every model
//! given must share them (a sharded and an unsharded training of the same folder, say).
//!   cargo run --release --example coverage_radius -- TRAIN_DIR INDEX [INDEX...]
use std::path::PathBuf;

use anyhow::{bail, Result};
use patchcore::features::images;
use patchcore::model::{bank, single::SingleModel};

fn main() -> Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [input, indices @ ..] = args.as_slice() else {
        bail!("usage: coverage_radius TRAIN_DIR INDEX [INDEX...]");
    };
    if indices.is_empty() {
        bail!("usage: coverage_radius TRAIN_DIR INDEX [INDEX...]");
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    tch::set_num_threads(threads as i32);
    let t = std::time::Instant::now();
    let first = bank::read_info(&indices[0])?;
    let SingleModel { extractor, .. } =
        SingleModel::load(&indices[0], first, None, tch::Device::Cpu, true)?;
    let mut knns = Vec::new();
    for index in indices {
        let info = bank::read_info(index)?;
        let knn = patchcore::model::knn::Knn::new(bank::read_index(index, &info)?, info.index)?;
        knns.push((index, info.bank_size, knn));
    }
    let files = images::find_images(input)?.images;
    // Per model: largest and summed squared distance.
    let mut stats = vec![(0f32, 0f64); knns.len()];
    let mut patches = 0usize;
    extractor.extract(&files, 8, |batch| {
        for e in batch {
            patches += e.features.nrows();
            for ((_, _, knn), (max, sum)) in knns.iter_mut().zip(stats.iter_mut()) {
                for d in knn.patch_scores(e.features.view(), 1)? {
                    *max = max.max(d);
                    *sum += d.max(0.0).sqrt() as f64;
                }
            }
        }
        Ok(())
    })?;
    println!(
        "{} training images, {patches} patches ({:.0} s)",
        files.len(),
        t.elapsed().as_secs_f64()
    );
    println!("model\tbank\tcoverage radius (max L2)\tmean L2 to nearest");
    for ((index, size, _), (max, sum)) in knns.iter().zip(&stats) {
        println!(
            "{}\t{size}\t{:.4}\t{:.4}",
            index.display(),
            max.max(0.0).sqrt(),
            sum / patches as f64
        );
    }
    Ok(())
}
