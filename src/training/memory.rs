//! `--max-memory` as a hard limit (issue 32): what the process holds, measured once the
//! backbone is loaded, and what each stage of `train` and `merge` adds to it, so that a run
//! whose least working set cannot fit is refused before it extracts anything.
//!
//! Nothing here is a flat guess: the runtime (libtorch, FAISS, the backbone's weights, the
//! caches its first forward pass leaves) is the process's resident size after a probe, and a
//! batch's activations are the peak one probe image adds, times the batch size. The rest are
//! the sizes of the arrays each stage holds, from the patch count (estimated from the image
//! count and the probe's patch grid).

use std::path::Path;

use anyhow::{bail, Result};

use crate::features::extractor::Extractor;

/// A line of `/proc/self/status` in bytes (`VmRSS:`, `VmHWM:`); `None` where unreadable.
fn status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The process's resident set now, in bytes (0 where /proc cannot tell).
pub fn resident() -> u64 {
    status_bytes("VmRSS:").unwrap_or(0)
}

/// Gives the heap's free memory back to the system (glibc keeps freed chunks below its mmap
/// threshold, up to 32 MiB each, in its arenas: a batch's activations, a stage's copies).
pub fn trim() {
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What the loaded backbone costs, measured.
#[derive(Clone, Copy, Debug)]
pub struct Footprint {
    /// Resident bytes with the backbone loaded and run once: libtorch, FAISS, the weights and
    /// the caches a forward pass keeps.
    pub runtime: u64,
    /// Peak bytes one image adds while the network runs on it (activations and features).
    pub per_image: u64,
    /// Patches of one network input of the probed size.
    pub patches_per_input: usize,
}

/// Runs the network three times on a blank `side.0 x side.1` input (the first run leaves its
/// caches, the larger peak of the others is kept) and reads the peak it adds from `VmHWM`, reset between
/// (`/proc/self/clear_refs`). Where the peak cannot be reset, the peak is taken as the
/// features' size times 8 (what the aggregation holds at once, measured on resnet18 and
/// WRN-50-2).
pub fn probe(extractor: &Extractor, side: (u32, u32)) -> Result<Footprint> {
    let blank = image::RgbImage::new(side.0, side.1);
    let at = Path::new("(memory probe)");
    let (features, grid) = extractor.features(&[&blank], at)?;
    let feature_bytes = (features.len() * 4) as u64;
    warm_knn(features.view())?;
    drop(features);
    // Measured twice, the larger kept: the peak varies by a few MiB between passes (the
    // threads' scratch buffers).
    let (mut per_image, mut before) = (0, 0);
    for _ in 0..2 {
        trim();
        before = resident();
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        let (features, _) = extractor.features(&[&blank], at)?;
        drop(features);
        let peak = status_bytes("VmHWM:").unwrap_or(0);
        per_image = per_image.max(if reset && peak > before {
            (peak - before).max(feature_bytes)
        } else {
            8 * feature_bytes
        });
    }
    trim();
    Ok(Footprint {
        runtime: resident().max(before),
        per_image,
        patches_per_input: grid.0 * grid.1,
    })
}

/// Runs every kNN method once on a small bank made of `rows` (FAISS's search, the pruned
/// search's PCA through LAPACK, the bf16 shortlist where the CPU has it), so that the code
/// and the per-thread buffers they bring in are part of the measured runtime: they stay
/// resident once the bank is searched, and were most of what the plan missed on WRN-50-2.
fn warm_knn(rows: ndarray::ArrayView2<f32>) -> Result<()> {
    use crate::model::bank::IndexKind;
    let queries = crate::model::knn::PROBE_QUERIES * 2;
    let bank = ndarray::Array2::from_shape_fn((queries, rows.ncols()), |(i, j)| {
        rows[(i % rows.nrows(), j)] + (i as f32 * 0.37 + j as f32 * 0.11).sin()
    });
    let index = crate::model::bank::build(bank.view(), IndexKind::Flat)?;
    let mut knn = crate::model::knn::Knn::new(index, IndexKind::Flat)?;
    knn.patch_scores(bank.view(), 1)?;
    knn.patch_scores(bank.view(), 1)?;
    knn.projection()?;
    Ok(())
}

/// One stage of a run: what it holds besides the runtime, item by item.
pub struct Stage {
    pub name: &'static str,
    pub items: Vec<(String, u64)>,
}

impl Stage {
    pub fn bytes(&self) -> u64 {
        self.items.iter().map(|(_, b)| b).sum()
    }
}

/// A size as `--max-memory` takes it, rounded up: `600M`, `1.4G`.
pub fn flag_size(bytes: u64) -> String {
    let mib = bytes.div_ceil(1 << 20);
    if mib < 1024 {
        format!("{mib}M")
    } else {
        format!("{:.1}G", (mib as f64 / 1024.0 * 10.0).ceil() / 10.0)
    }
}

/// A size for a message: `310 MiB`, `1.2 GiB`.
pub fn human(bytes: u64) -> String {
    if bytes < 1 << 30 {
        format!("{} MiB", bytes.div_ceil(1 << 20))
    } else {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    }
}

/// A count with thousands separators: `2,352,000`.
pub fn count(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Refuses, in one line, when the runtime and the largest of `stages` exceed `budget`:
/// names what does not fit, the least `--max-memory` that holds it and `alternative` (e.g.
/// how many images would fit).
pub fn check(budget: u64, runtime: u64, stages: &[Stage], alternative: &str) -> Result<()> {
    let Some(worst) = stages.iter().max_by_key(|s| s.bytes()) else {
        return Ok(());
    };
    let need = runtime + worst.bytes();
    if need <= budget {
        return Ok(());
    }
    // The first of the largest items (a copy is named after what it copies).
    let (what, most) = worst.items.iter().fold(("", 0u64), |best, (what, b)| {
        if *b > best.1 {
            (what.as_str(), *b)
        } else {
            best
        }
    });
    let largest = format!("{what} ({})", human(most));
    let others = worst.bytes() - most;
    bail!(
        "--max-memory {} cannot hold {largest} during the {}, beside {} of runtime and \
         backbone{}: it needs at least --max-memory {}{alternative}",
        flag_size(budget),
        worst.name,
        human(runtime),
        if others > 0 {
            format!(" and {} more", human(others))
        } else {
            String::new()
        },
        flag_size(need),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_back_as_at_least_the_bytes() {
        for bytes in [
            1u64,
            600 << 20,
            (600 << 20) + 1,
            1 << 30,
            3 << 29,
            5_000_000_000,
        ] {
            let flag = flag_size(bytes);
            assert!(
                crate::training::feature_store::parse_size(&flag).unwrap() >= bytes,
                "{bytes} -> {flag}"
            );
        }
        assert_eq!(count(2_352_000), "2,352,000");
        assert_eq!(count(999), "999");
    }

    #[test]
    fn refuses_naming_the_largest_item_and_what_fits() {
        let stages = [
            Stage {
                name: "feature extraction",
                items: vec![("a batch's activations".into(), 100 << 20)],
            },
            Stage {
                name: "coreset",
                items: vec![
                    ("the projections".into(), 700 << 20),
                    ("their copy".into(), 300 << 20),
                ],
            },
        ];
        assert!(check(2 << 30, 200 << 20, &stages, "").is_ok());
        let e = check(300 << 20, 200 << 20, &stages, ", or at most 3 images fit")
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.contains("the projections (700 MiB) during the coreset"),
            "{e}"
        );
        assert!(
            e.contains("at least --max-memory 1.2G, or at most 3 images"),
            "{e}"
        );
    }
}
