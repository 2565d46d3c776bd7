//! Deterministic synthetic inspection images: a woven metal-like texture, optionally with a
//! defect (a dark scratch or a bright spot). They make the bundled sample in `data/sample` and
//! the images the tests train and predict on, so no third-party image is needed.

use std::path::Path;

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defect {
    None,
    Scratch,
    Spot,
}

/// Bounding box `(x0, y0, x1, y1)`, inclusive-exclusive, of a drawn defect.
pub type BBox = (u32, u32, u32, u32);

/// Renders a `width x height` image for `seed`. Returns the image and the defect's box.
pub fn render(seed: u64, width: u32, height: u32, defect: Defect) -> (RgbImage, Option<BBox>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let period = 9.0f32;
    let (px, py): (f32, f32) = (rng.gen_range(0.0..period), rng.gen_range(0.0..period));
    let tau = std::f32::consts::TAU;
    let mut gray: Vec<f32> = (0..height)
        .flat_map(|y| (0..width).map(move |x| (x, y)))
        .map(|(x, y)| {
            let (x, y) = (x as f32 + px, y as f32 + py);
            let weave = (tau * x / period).sin() * (tau * y / period).sin();
            let shade = 0.15 * (y / height as f32 - 0.5);
            0.5 + 0.18 * weave + shade
        })
        .collect();
    for v in gray.iter_mut() {
        *v += rng.gen_range(-0.03..0.03);
    }

    let margin = (width.min(height) / 5).max(4);
    let cx = rng.gen_range(margin..width - margin) as f32;
    let cy = rng.gen_range(margin..height - margin) as f32;
    let scale = width.min(height) as f32 / 256.0;
    let bbox = match defect {
        Defect::None => None,
        Defect::Scratch => {
            let angle = rng.gen_range(0.0..std::f32::consts::PI);
            let half = 28.0 * scale;
            let (dx, dy) = (angle.cos() * half, angle.sin() * half);
            let thickness = (2.5 * scale).max(1.5);
            paint(
                &mut gray,
                width,
                height,
                |x, y| dist_to_segment(x, y, cx - dx, cy - dy, cx + dx, cy + dy) <= thickness,
                0.08,
            );
            Some(bounds(
                cx,
                cy,
                dx.abs() + thickness,
                dy.abs() + thickness,
                width,
                height,
            ))
        }
        Defect::Spot => {
            let r = 9.0 * scale;
            paint(
                &mut gray,
                width,
                height,
                |x, y| (x - cx).powi(2) + (y - cy).powi(2) <= r * r,
                0.95,
            );
            Some(bounds(cx, cy, r, r, width, height))
        }
    };
    let img = RgbImage::from_fn(width, height, |x, y| {
        let v = gray[(y * width + x) as usize].clamp(0.0, 1.0);
        // A cool metallic tint.
        Rgb([
            (v * 225.0).round() as u8,
            (v * 235.0).round() as u8,
            (v * 250.0).round() as u8,
        ])
    });
    (img, bbox)
}

fn paint(gray: &mut [f32], w: u32, h: u32, inside: impl Fn(f32, f32) -> bool, value: f32) {
    for y in 0..h {
        for x in 0..w {
            if inside(x as f32, y as f32) {
                gray[(y * w + x) as usize] = value;
            }
        }
    }
}

fn dist_to_segment(x: f32, y: f32, x0: f32, y0: f32, x1: f32, y1: f32) -> f32 {
    let (vx, vy) = (x1 - x0, y1 - y0);
    let t = (((x - x0) * vx + (y - y0) * vy) / (vx * vx + vy * vy)).clamp(0.0, 1.0);
    ((x - x0 - t * vx).powi(2) + (y - y0 - t * vy).powi(2)).sqrt()
}

fn bounds(cx: f32, cy: f32, rx: f32, ry: f32, w: u32, h: u32) -> BBox {
    let clamp = |v: f32, max: u32| v.max(0.0).min(max as f32) as u32;
    (
        clamp(cx - rx, w),
        clamp(cy - ry, h),
        clamp(cx + rx + 1.0, w),
        clamp(cy + ry + 1.0, h),
    )
}

/// Writes the bundled sample: `train/good` and `test/{good,scratch,spot}` as grayscale PNGs.
pub fn write_sample(dir: &Path, size: u32, n_train: usize, n_test: usize) -> Result<()> {
    let sets: [(&str, Defect, u64, usize); 4] = [
        ("train/good", Defect::None, 0, n_train),
        ("test/good", Defect::None, 1_000, n_test),
        ("test/scratch", Defect::Scratch, 2_000, n_test),
        ("test/spot", Defect::Spot, 3_000, n_test),
    ];
    for (sub, defect, base, n) in sets {
        let folder = dir.join(sub);
        std::fs::create_dir_all(&folder)
            .with_context(|| format!("cannot create {}", folder.display()))?;
        for i in 0..n {
            let (img, _) = render(base + i as u64, size, size, defect);
            let path = folder.join(format!("{i:03}.png"));
            // Saved as grayscale, like many inspection cameras (and 3x smaller).
            image::DynamicImage::ImageRgb8(img)
                .to_luma8()
                .save(&path)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_defects_change_pixels_inside_their_box() {
        let (a, _) = render(5, 64, 48, Defect::None);
        let (b, _) = render(5, 64, 48, Defect::None);
        assert_eq!(a, b);
        let (c, bbox) = render(5, 64, 48, Defect::Scratch);
        let (x0, y0, x1, y1) = bbox.unwrap();
        let mut changed_outside = 0;
        let mut changed_inside = 0;
        for (x, y, p) in c.enumerate_pixels() {
            if p != a.get_pixel(x, y) {
                if x >= x0 && x < x1 && y >= y0 && y < y1 {
                    changed_inside += 1;
                } else {
                    changed_outside += 1;
                }
            }
        }
        assert!(changed_inside > 10);
        assert_eq!(changed_outside, 0);
    }
}
