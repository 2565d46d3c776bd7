//! Outputs: `.npy` heatmaps, JPEG overlays, masks, contours and the results files, each
//! written atomically.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use image::{codecs::jpeg::JpegEncoder, RgbImage};
use ndarray::{Array2, ArrayView2};
use ndarray_npy::WriteNpyExt;

// For `mvtec::summary`, which still names it here; it lives in `fsutil`.
use crate::util::fsutil::AtomicFile;

/// Writes a float32 `(height, width)` array as `.npy`.
pub fn write_npy(path: &Path, heat: &Array2<f32>) -> Result<()> {
    let mut f = AtomicFile::create_fast(path)?;
    heat.write_npy(&mut f)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.commit()
}

/// A blue-to-red colour scale (the "jet" look inspection tools use) for `t` in [0, 1].
pub fn colormap(t: f32) -> [u8; 3] {
    let t = t.clamp(0.0, 1.0);
    let ch = |c: f32| ((1.5 - (4.0 * t - c).abs()).clamp(0.0, 1.0) * 255.0).round() as u8;
    [ch(3.0), ch(2.0), ch(1.0)]
}

/// Blends the heatmap (scaled so `lo`..`hi` spans the colour range) over the image.
pub fn overlay(original: &RgbImage, heat: &Array2<f32>, lo: f32, hi: f32) -> RgbImage {
    const LEVELS: usize = 256;
    let lut: Vec<[u8; 3]> = (0..LEVELS)
        .map(|i| colormap(i as f32 / (LEVELS - 1) as f32))
        .collect();
    let scale = (LEVELS - 1) as f32 / (hi - lo).max(f32::EPSILON);
    let mut out = original.clone();
    for (p, &h) in out.pixels_mut().zip(heat.iter()) {
        let level = ((h - lo) * scale).round().clamp(0.0, (LEVELS - 1) as f32) as usize;
        let c = lut[level];
        for i in 0..3 {
            p[i] = (p[i] as u16 + c[i] as u16).div_ceil(2) as u8;
        }
    }
    out
}

pub fn write_jpeg(path: &Path, img: &RgbImage) -> Result<()> {
    let mut f = AtomicFile::create_fast(path)?;
    f.write_all(&jpeg_bytes(img)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.commit()
}

/// An overlay as JPEG (quality 90), the bytes of `NAME.jpg`.
pub fn jpeg_bytes(img: &RgbImage) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    img.write_with_encoder(JpegEncoder::new_with_quality(&mut bytes, 90))
        .context("cannot encode JPEG")?;
    Ok(bytes)
}

/// The suffixes of an image's outputs: `NAME.npy`, `NAME.jpg`, `NAME_mask.png`, `NAME.json`.
pub const IMAGE_OUTPUT_SUFFIXES: [&str; 4] = [".npy", ".jpg", "_mask.png", ".json"];

/// An image's output `REL` (relative to the output folder) with its extension replaced by
/// `suffix`: `good/000.png` gives `good/000.npy`.
pub fn output_relative(relative: &Path, suffix: &str) -> Result<PathBuf> {
    let mut name = relative
        .file_stem()
        .ok_or_else(|| anyhow!("{} has no file name", relative.display()))?
        .to_os_string();
    name.push(suffix);
    Ok(relative.with_file_name(name))
}

/// `OUTDIR/REL` with the extension replaced, creating the folders on the way.
pub fn output_path(out_dir: &Path, relative: &Path, suffix: &str) -> Result<PathBuf> {
    let path = out_dir.join(output_relative(relative, suffix)?);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create output folder {}", dir.display()))?;
    }
    Ok(path)
}

/// A binary mask as an 8-bit grayscale PNG: 255 where `mask` is set, 0 elsewhere.
pub fn write_mask_png(path: &Path, mask: ArrayView2<bool>) -> Result<()> {
    let (h, w) = mask.dim();
    let pixels: Vec<u8> = mask.iter().map(|&m| if m { 255 } else { 0 }).collect();
    let img = image::GrayImage::from_raw(w as u32, h as u32, pixels).expect("size matches");
    let mut f = AtomicFile::create_fast(path)?;
    img.write_with_encoder(image::codecs::png::PngEncoder::new_with_quality(
        &mut f,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Adaptive,
    ))
    .with_context(|| format!("cannot write {}", path.display()))?;
    f.commit()
}

/// The image with the outlines of `mask`'s regions drawn in red, about 1/300 of the image's
/// shorter side thick (at least 1 pixel), so they show on thumbnails of large images too.
pub fn contour(original: &RgbImage, mask: ArrayView2<bool>) -> RgbImage {
    let (h, w) = mask.dim();
    let radius = (w.min(h) / 300) as isize;
    let inside = |y: isize, x: isize| {
        y >= 0 && x >= 0 && (y as usize) < h && (x as usize) < w && mask[[y as usize, x as usize]]
    };
    let mut out = original.clone();
    for y in 0..h as isize {
        for x in 0..w as isize {
            if !inside(y, x) {
                continue;
            }
            let edge =
                !(inside(y - 1, x) && inside(y + 1, x) && inside(y, x - 1) && inside(y, x + 1));
            if !edge {
                continue;
            }
            for dy in -radius..=radius {
                for dx in -radius..=radius {
                    let (yy, xx) = (y + dy, x + dx);
                    if yy >= 0 && xx >= 0 && (yy as usize) < h && (xx as usize) < w {
                        out.put_pixel(xx as u32, yy as u32, image::Rgb([255, 0, 0]));
                    }
                }
            }
        }
    }
    out
}

/// One image's results, as written to `NAME.json` and the run's results file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageResult {
    /// Path relative to the input folder (lossy for non-UTF-8 names); the outputs are named
    /// after it, relative to the output folder.
    pub path: String,
    /// The image file as given on the command line: the file itself, or the folder given
    /// joined with `path` (lossy for non-UTF-8 names).
    pub source: String,
    pub width: u32,
    pub height: u32,
    /// Largest patch score (squared L2 distance to the memory bank).
    pub score: f32,
    /// `score / image threshold`: above 1.0 is anomalous. Absent without a threshold.
    pub normalized_score: Option<f32>,
    /// "good" or "anomalous"; absent without a threshold.
    pub verdict: Option<&'static str>,
    /// Connected areas of the heatmap above the pixel threshold, in original pixels.
    pub regions: Vec<crate::outputs::regions::Region>,
    /// Output files, relative to the output folder.
    pub heatmap: String,
    pub overlay: String,
    pub mask: Option<String>,
    /// Why the image could not be scored (`predict --on-error skip`; verdict "error", no
    /// score or output files); absent for scored images.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ImageResult {
    /// The row of an image that could not be scored (`--on-error skip`).
    pub fn error(file: &crate::features::images::ImageFile, reason: String) -> ImageResult {
        ImageResult {
            path: file.relative.to_string_lossy().into_owned(),
            source: file.path.to_string_lossy().into_owned(),
            width: 0,
            height: 0,
            score: f32::NAN,
            normalized_score: None,
            verdict: Some(crate::model::verdict::ERROR),
            regions: Vec::new(),
            heatmap: String::new(),
            overlay: String::new(),
            mask: None,
            error: Some(reason),
        }
    }
}

/// The thresholds a run used, recorded in its results.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Thresholds {
    pub image: f32,
    pub pixel: f32,
    /// "calibration" (stored in the model) or "command line".
    pub source: &'static str,
}

/// `results.json`: the whole run.
#[derive(Debug, serde::Serialize)]
pub struct RunResults<'a> {
    pub model: String,
    pub thresholds: Option<Thresholds>,
    pub images: usize,
    /// How many images are anomalous; absent without a threshold.
    pub anomalous: Option<usize>,
    /// How many images could not be scored (`--on-error skip`, verdict "error"); included
    /// in `images`.
    pub errors: usize,
    pub results: &'a [ImageResult],
}

/// Writes `NAME.json`-style JSON (pretty, newline-terminated) atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T, durable: bool) -> Result<()> {
    let mut f = if durable {
        AtomicFile::create(path)?
    } else {
        AtomicFile::create_fast(path)?
    };
    serde_json::to_writer_pretty(&mut f, value)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f)?;
    f.commit()
}

/// Writes `results.csv`: a row per image with path, score, normalized score, verdict, the
/// number of regions and the mask file (empty fields where there is no threshold), the
/// source file as given and, for an image that could not be scored (verdict "error", no
/// score), the reason (the last two columns come last, so that columns read by position
/// keep their place). Fields
/// are quoted only where needed (RFC 4180); numbers are written as Rust prints them, the
/// shortest text that reads back to the same float.
pub fn write_results_csv(path: &Path, rows: &[ImageResult]) -> Result<()> {
    let cannot = || format!("cannot write {}", path.display());
    let mut w = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(AtomicFile::create(path)?);
    w.write_record([
        "path",
        "score",
        "normalized_score",
        "verdict",
        "regions",
        "largest_region_area",
        "mask",
        "source",
        "error",
    ])
    .with_context(cannot)?;
    let text = |v: Option<String>| v.unwrap_or_default();
    for r in rows {
        let largest = r.regions.iter().map(|g| g.area).max();
        let score = match r.error {
            Some(_) => String::new(),
            None => r.score.to_string(),
        };
        w.write_record([
            r.path.as_str(),
            &score,
            &text(r.normalized_score.map(|v| v.to_string())),
            r.verdict.unwrap_or(""),
            &r.regions.len().to_string(),
            &text(largest.map(|v| v.to_string())),
            r.mask.as_deref().unwrap_or(""),
            r.source.as_str(),
            r.error.as_deref().unwrap_or(""),
        ])
        .with_context(cannot)?;
    }
    w.into_inner()
        .map_err(|e| anyhow!("cannot write {}: {}", path.display(), e.error()))?
        .commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(path: &str, verdict: Option<&'static str>) -> ImageResult {
        ImageResult {
            path: path.into(),
            source: format!("in/{path}"),
            width: 4,
            height: 3,
            score: 1.25,
            normalized_score: verdict.map(|_| 0.5),
            verdict,
            regions: vec![],
            heatmap: String::new(),
            overlay: String::new(),
            mask: verdict.map(|_| format!("{path}.mask.png")),
            error: None,
        }
    }

    #[test]
    fn results_csv_quotes_fields_only_when_needed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("results.csv");
        let bad = crate::features::images::ImageFile {
            path: "in/bad.png".into(),
            relative: "bad.png".into(),
        };
        let rows = [
            result("good/000.png", Some("good")),
            result("a,\"b\".png", None),
            ImageResult::error(&bad, "cannot decode image in/bad.png: empty".into()),
        ];
        write_results_csv(&p, &rows).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "path,score,normalized_score,verdict,regions,largest_region_area,mask,source,error\n\
             good/000.png,1.25,0.5,good,0,,good/000.png.mask.png,in/good/000.png,\n\
             \"a,\"\"b\"\".png\",1.25,,,0,,,\"in/a,\"\"b\"\".png\",\n\
             bad.png,,,error,0,,,in/bad.png,cannot decode image in/bad.png: empty\n"
        );
    }

    #[test]
    fn contour_marks_only_region_edges() {
        let img = RgbImage::new(9, 9);
        let mut mask = Array2::from_elem((9, 9), false);
        for y in 2..7 {
            for x in 2..7 {
                mask[[y, x]] = true;
            }
        }
        let out = contour(&img, mask.view());
        assert_eq!(out.get_pixel(2, 2).0, [255, 0, 0]);
        assert_eq!(out.get_pixel(6, 4).0, [255, 0, 0]);
        assert_eq!(out.get_pixel(4, 4).0, [0, 0, 0], "inside stays");
        assert_eq!(out.get_pixel(0, 0).0, [0, 0, 0], "outside stays");
    }

    #[test]
    fn output_paths_mirror_input_tree() {
        let dir = tempfile::tempdir().unwrap();
        let a = output_path(dir.path(), Path::new("good/000.png"), ".npy").unwrap();
        let b = output_path(dir.path(), Path::new("scratch/000.png"), ".npy").unwrap();
        assert_ne!(a, b);
        assert!(a.ends_with("good/000.npy"));
        assert!(dir.path().join("scratch").is_dir());
    }
}
