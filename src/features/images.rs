//! Images in: finding image files, decoding them safely, and the preprocessing that turns an
//! image into the network's input tensor.
//!
//! Resizing reproduces Pillow's bilinear resampling (what torchvision's `Resize` calls on a PIL
//! image in the official implementation) including its 8-bit fixed-point arithmetic, so the
//! network sees the same pixels as in the reference.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::{ImageFormat, ImageReader, Limits, RgbImage};
use serde::{Deserialize, Serialize};

mod whole;

/// File extensions we treat as images (compared case-insensitively).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

/// Images wider or taller than this are refused before decoding.
pub const MAX_SIDE: u32 = 16_384;
/// Largest decoder allocation we allow for one image.
pub const MAX_DECODE_BYTES: u64 = 1 << 30;

/// Longest side a network input may have after resizing; a more extreme aspect ratio is
/// refused rather than run through the backbone at an enormous size.
pub const MAX_INPUT_SIDE: u32 = 4096;

/// ImageNet normalization, as torchvision's pretrained models expect.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// One image file found under an input folder, or given by name.
#[derive(Debug, Clone)]
pub struct ImageFile {
    pub path: PathBuf,
    /// Path relative to the input folder (the file name for a file given by name), used to
    /// mirror the folder layout in outputs.
    pub relative: PathBuf,
}

/// What `find_images` found: the images, and files that were skipped (not images by name).
#[derive(Debug, Default)]
pub struct Found {
    pub images: Vec<ImageFile>,
    pub skipped: Vec<PathBuf>,
}

/// Walks `dir` recursively in sorted order and returns the image files in it. Links are
/// followed, except into a folder that is already on the way down (a link loop); FIFOs,
/// sockets, devices and broken links are skipped like files that are not images by name.
///
/// Errors if `dir` is missing, not a folder, or holds no image at all.
pub fn find_images(dir: &Path) -> Result<Found> {
    if !dir.exists() {
        bail!("input folder {} does not exist", dir.display());
    }
    if !dir.is_dir() {
        bail!("input {} is not a folder", dir.display());
    }
    let mut found = Found::default();
    let walk = walkdir::WalkDir::new(dir)
        .follow_links(true)
        .sort_by_file_name();
    for entry in walk {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) if e.loop_ancestor().is_some() => continue,
            Err(e) => match e.path() {
                // What cannot be looked at: a broken link (skipped), or a folder that cannot
                // be read (an error).
                Some(path) if !path.is_dir() => {
                    found.skipped.push(path.to_path_buf());
                    continue;
                }
                path => {
                    let folder = path.unwrap_or(dir).display().to_string();
                    return Err(anyhow::Error::new(e))
                        .with_context(|| format!("cannot read folder {folder}"));
                }
            },
        };
        let path = entry.path();
        if entry.file_type().is_dir() {
            continue;
        }
        if entry.file_type().is_file() && has_image_extension(path) {
            let relative = path.strip_prefix(dir).unwrap_or(path).to_path_buf();
            found.images.push(ImageFile {
                path: entry.into_path(),
                relative,
            });
        } else {
            // Not an image by name, or not a regular file (FIFOs, sockets, devices): reading
            // those could block or fail.
            found.skipped.push(entry.into_path());
        }
    }
    if found.images.is_empty() {
        bail!(
            "input folder {} contains no images (looked for {})",
            dir.display(),
            IMAGE_EXTENSIONS.join(", ")
        );
    }
    Ok(found)
}

/// The images of several inputs, in the order given: a folder contributes its images as
/// `find_images` finds them (relative to that folder), a file itself under its file name
/// (whatever its extension: it was asked for by name, and decoding checks its content).
pub fn find_inputs(inputs: &[PathBuf]) -> Result<Found> {
    if inputs.is_empty() {
        bail!("no input given");
    }
    let mut all = Found::default();
    for input in inputs {
        if input.is_dir() {
            let found = find_images(input)?;
            all.images.extend(found.images);
            all.skipped.extend(found.skipped);
        } else if input.is_file() {
            let relative = PathBuf::from(
                input
                    .file_name()
                    .with_context(|| format!("input {} has no file name", input.display()))?,
            );
            all.images.push(ImageFile {
                path: input.clone(),
                relative,
            });
        } else if input.exists() {
            bail!(
                "input {} is neither a regular file nor a folder",
                input.display()
            );
        } else {
            bail!("input {} does not exist", input.display());
        }
    }
    Ok(all)
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// The default of `--max-pixels` (serve, predict): 40 megapixels, an 8000x5000 image. Decoding
/// holds up to 11 bytes a pixel at once (16-bit RGBA, then 8-bit RGB), so about 440 MB.
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;

/// An image whose header declares more pixels than `--max-pixels` allows.
#[derive(Debug, thiserror::Error)]
#[error(
    "image {name} is {width}x{height} pixels ({pixels}), over the limit of {limit} pixels \
     (--max-pixels)"
)]
pub struct TooManyPixels {
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub pixels: u64,
    pub limit: u64,
}

/// Refuses an image whose header declares more than `limit` pixels, from the header alone (no
/// pixel is decoded). An unreadable header passes: decoding then says what is wrong.
pub fn check_pixels(bytes: &[u8], name: &str, limit: u64) -> Result<(), TooManyPixels> {
    let reader = ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format();
    reader.map_or(Ok(()), |r| pixels_within(r, name, limit))
}

/// [`check_pixels`] of an image file, reading only its header.
pub fn check_file_pixels(path: &Path, limit: u64) -> Result<(), TooManyPixels> {
    let reader = ImageReader::open(path).and_then(|r| r.with_guessed_format());
    reader.map_or(Ok(()), |r| {
        pixels_within(r, &path.display().to_string(), limit)
    })
}

fn pixels_within<R: std::io::BufRead + std::io::Seek>(
    reader: ImageReader<R>,
    name: &str,
    limit: u64,
) -> Result<(), TooManyPixels> {
    let Ok((width, height)) = reader.into_dimensions() else {
        return Ok(());
    };
    let pixels = u64::from(width) * u64::from(height);
    if pixels <= limit {
        return Ok(());
    }
    Err(TooManyPixels {
        name: name.to_string(),
        width,
        height,
        pixels,
        limit,
    })
}

/// Decodes an image file (format detected from its content, not its name) into 8-bit RGB.
/// Grayscale is replicated to three channels, alpha is dropped, 16-bit is scaled to 8-bit.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("cannot read image {}", path.display()))?;
    decode_rgb(&bytes, &path.display().to_string())
}

/// Decodes image bytes as `load_rgb` does, `name` (a path, an upload's name) naming them in
/// errors. The size is checked from the header first, with explicit decoder limits, so a
/// hostile header cannot exhaust memory; then a cut or damaged file is refused before any
/// pixel is decoded (`whole`).
pub fn decode_rgb(bytes: &[u8], name: &str) -> Result<RgbImage> {
    let cannot = |e: &dyn std::fmt::Display| anyhow::anyhow!("cannot decode image {name}: {e}");
    let damaged = |why: &dyn std::fmt::Display| {
        anyhow::anyhow!("image {name} is damaged or truncated: {why}")
    };
    let failed = |e: image::ImageError| match e {
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            damaged(&"the file ends early")
        }
        e => cannot(&e),
    };
    if bytes.is_empty() {
        bail!("image {name} is empty (0 bytes)");
    }
    let format = image::guess_format(bytes).map_err(|_| cannot(&"unknown image format"))?;
    // The header's size, read without the side limits (a header allocates no pixels) so
    // that an oversized image is refused with its size, not the decoder's bare "limit".
    let mut header = ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    header.limits(limits);
    let (w, h) = header.into_dimensions().map_err(failed)?;
    if w > MAX_SIDE || h > MAX_SIDE {
        bail!("image {name} is {w}x{h} pixels, larger than the limit of {MAX_SIDE} pixels a side");
    }
    whole::check(format, bytes).map_err(|why| damaged(&why))?;
    let img = limited_reader(bytes, format)
        .decode()
        .map_err(|e| match e {
            image::ImageError::Limits(_) => anyhow::anyhow!(
                "image {name} is {w}x{h} pixels, too large to decode within the limit of {} MiB",
                MAX_DECODE_BYTES >> 20
            ),
            e => failed(e),
        })?;
    if img.width() == 0 || img.height() == 0 {
        return Err(cannot(&"image has no pixels"));
    }
    Ok(img.into_rgb8())
}

/// A decoder for `bytes` in `format` that refuses images over our size and memory limits.
fn limited_reader(bytes: &[u8], format: ImageFormat) -> ImageReader<std::io::Cursor<&[u8]>> {
    let mut reader = ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    reader
}

/// How an image becomes the network's input: resize the short side, then optionally
/// center-crop a square. Stored in the model so predict uses exactly what train used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Target length of the image's shorter side (aspect ratio kept), as torchvision's
    /// `Resize(int)`.
    pub resize: u32,
    /// Side of the center crop, or `None` to keep the whole resized image.
    pub crop: Option<u32>,
}

/// Where the network input sits in the original image; used to map heatmaps back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub original: (u32, u32),
    pub resized: (u32, u32),
    /// (left, top, width, height) of the network input inside the resized image.
    pub window: (u32, u32, u32, u32),
}

impl Preprocess {
    /// Output size of the resize step for an image of `(w, h)`, torchvision's rule:
    /// the short side becomes `resize`, the long side `int(resize * long / short)`.
    pub fn resized_size(&self, (w, h): (u32, u32)) -> (u32, u32) {
        let s = self.resize as u64;
        if w <= h {
            (self.resize, ((s * h as u64) / w as u64).max(1) as u32)
        } else {
            (((s * w as u64) / h as u64).max(1) as u32, self.resize)
        }
    }

    pub fn geometry(&self, original: (u32, u32)) -> Result<Geometry> {
        let resized = self.resized_size(original);
        if resized.0 > MAX_INPUT_SIDE || resized.1 > MAX_INPUT_SIDE {
            bail!(
                "a {}x{} image becomes {}x{} when its short side is resized to {}: more than \
                 {MAX_INPUT_SIDE} pixels on a side (aspect ratio too extreme)",
                original.0,
                original.1,
                resized.0,
                resized.1,
                self.resize
            );
        }
        let window = match self.crop {
            None => (0, 0, resized.0, resized.1),
            Some(c) => {
                if c > resized.0 || c > resized.1 {
                    bail!(
                        "crop {c} is larger than the resized image {}x{}",
                        resized.0,
                        resized.1
                    );
                }
                // torchvision's CenterCrop: int(round((size - crop) / 2)), Python rounding.
                let left = round_half_even((resized.0 - c) as f64 / 2.0) as u32;
                let top = round_half_even((resized.1 - c) as f64 / 2.0) as u32;
                (left, top, c, c)
            }
        };
        Ok(Geometry {
            original,
            resized,
            window,
        })
    }

    /// Resizes and crops an RGB image, returning the network input pixels and the geometry.
    pub fn apply(&self, img: &RgbImage) -> Result<(RgbImage, Geometry)> {
        let geometry = self.geometry(img.dimensions())?;
        let resized = resize_bilinear_pil(img, geometry.resized.0, geometry.resized.1);
        let (l, t, w, h) = geometry.window;
        let out = if (l, t, w, h) == (0, 0, resized.width(), resized.height()) {
            resized
        } else {
            image::imageops::crop_imm(&resized, l, t, w, h).to_image()
        };
        Ok((out, geometry))
    }
}

/// Tiles of `tile` x `tile` pixels covering a `w` x `h` image, in raster order, as
/// `(left, top, width, height)`: along each side as few as cover it with neighbours
/// overlapping by at least an eighth of a tile (so a defect on one tile's edge is inside
/// another), spread evenly; a side no longer than `tile` is a single tile of that length.
pub fn tile_rects(w: u32, h: u32, tile: u32) -> Vec<(u32, u32, u32, u32)> {
    fn starts(len: u32, tile: u32) -> Vec<u32> {
        if len <= tile {
            return vec![0];
        }
        let stride = (tile - tile / 8).max(1);
        let n = (len - tile).div_ceil(stride) + 1;
        (0..n)
            .map(|i| ((i as u64 * (len - tile) as u64) as f64 / (n - 1) as f64).round() as u32)
            .collect()
    }
    let (tw, th) = (tile.min(w), tile.min(h));
    let mut rects = Vec::new();
    for y in starts(h, tile) {
        for x in starts(w, tile) {
            rects.push((x, y, tw, th));
        }
    }
    rects
}

fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// Normalizes 8-bit RGB pixels into a CHW float vector: `(v / 255 - mean) / std`, in the same
/// float32 operation order as torchvision's `ToTensor` + `Normalize`.
pub fn normalize_chw(img: &RgbImage) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (p[c] as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        }
    }
    out
}

// ---- Pillow-exact bilinear resampling -------------------------------------------------------

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per-output-pixel input span and fixed-point weights for one axis, as Pillow computes them.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    weights: Vec<Vec<i32>>,
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn precompute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 1.0 * filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // Pillow truncates toward zero here (C cast of a value that may be negative).
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let mut k: Vec<f64> = (xmin..xmax)
            .map(|x| bilinear_filter((x as f64 - center + 0.5) * ss))
            .collect();
        let total: f64 = k.iter().sum();
        if total != 0.0 {
            for w in &mut k {
                *w /= total;
            }
        }
        let fixed = k
            .iter()
            .map(|&w| {
                let v = w * (1u32 << PRECISION_BITS) as f64;
                (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
            })
            .collect();
        bounds.push((xmin, xmax - xmin));
        weights.push(fixed);
    }
    Coeffs { bounds, weights }
}

fn clip8(v: i64) -> u8 {
    let v = v >> PRECISION_BITS;
    v.clamp(0, 255) as u8
}

/// Bilinear resize with Pillow's algorithm (`Image.resize(size, Image.BILINEAR)`): antialiased
/// when shrinking, one pass per axis, each rounded to 8 bits. The horizontal pass comes first,
/// unless the height shrinks by more than twice as many pixels as the width (then the
/// vertical one, as Pillow 13 does: the order changes the rounding).
pub fn resize_bilinear_pil(img: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    if (in_w, in_h) == (out_w, out_h) {
        return img.clone();
    }
    let (w, h, out_w, out_h) = (in_w as usize, in_h as usize, out_w as usize, out_h as usize);
    // Pillow skips a pass whose size does not change.
    let horizontal = |src: Vec<u8>, rows: usize| {
        if out_w != w {
            resample_axis(&src, w, rows, out_w, true)
        } else {
            src
        }
    };
    let vertical = |src: Vec<u8>, cols: usize| {
        if out_h != h {
            resample_axis(&src, cols, h, out_h, false)
        } else {
            src
        }
    };
    let shrink_h = h as i64 - out_h as i64;
    let vertical_first = shrink_h > 0 && shrink_h > (w as i64 - out_w as i64) * 2;
    let out = if vertical_first {
        horizontal(vertical(img.as_raw().clone(), w), out_h)
    } else {
        vertical(horizontal(img.as_raw().clone(), h), out_w)
    };
    RgbImage::from_raw(out_w as u32, out_h as u32, out).expect("resize produced the planned size")
}

fn resample_axis(src: &[u8], w: usize, h: usize, out: usize, horizontal: bool) -> Vec<u8> {
    let in_size = if horizontal { w } else { h };
    let c = precompute_coeffs(in_size, out);
    let (ow, oh) = if horizontal { (out, h) } else { (w, out) };
    let mut dst = vec![0u8; ow * oh * 3];
    let half = 1i64 << (PRECISION_BITS - 1);
    for y in 0..oh {
        for x in 0..ow {
            let o = if horizontal { x } else { y };
            let (start, n) = c.bounds[o];
            let k = &c.weights[o];
            for ch in 0..3 {
                let mut acc = half;
                for (i, &wt) in k.iter().enumerate().take(n) {
                    let (sx, sy) = if horizontal {
                        (start + i, y)
                    } else {
                        (x, start + i)
                    };
                    acc += src[(sy * w + sx) * 3 + ch] as i64 * wt as i64;
                }
                dst[(y * ow + x) * 3 + ch] = clip8(acc);
            }
        }
    }
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn finds_images_sorted_following_links_but_not_loops() {
        use std::os::unix::fs::symlink;
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("in");
        std::fs::create_dir_all(root.join("a")).unwrap();
        for f in ["b.png", "Z.PNG", "a/2.png", "a/10.png", "a/notes.txt"] {
            std::fs::write(root.join(f), b"").unwrap();
        }
        symlink(root.join("a"), root.join("link")).unwrap();
        symlink(&root, root.join("loop")).unwrap();
        symlink(d.path().join("nowhere.png"), root.join("gone.png")).unwrap();
        let fifo = std::ffi::CString::new(root.join("pipe.png").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);

        let found = find_images(&root).unwrap();
        let rel: Vec<_> = found.images.iter().map(|f| f.relative.clone()).collect();
        let want = [
            "Z.PNG",
            "a/10.png",
            "a/2.png",
            "b.png",
            "link/10.png",
            "link/2.png",
        ];
        assert_eq!(rel, want.map(PathBuf::from));
        for f in &found.images {
            assert_eq!(f.path, root.join(&f.relative));
        }
        let skipped = ["a/notes.txt", "gone.png", "link/notes.txt", "pipe.png"];
        assert_eq!(found.skipped, skipped.map(|s| root.join(s)));

        assert!(
            find_images(&root.join("b.png")).is_err(),
            "a file is no folder"
        );
        let e = find_images(&root.join("a/notes.txt").with_file_name("none"));
        assert!(e.unwrap_err().to_string().contains("does not exist"));
    }

    #[test]
    fn torchvision_resize_rule() {
        let p = Preprocess {
            resize: 256,
            crop: Some(224),
        };
        assert_eq!(p.resized_size((1024, 1024)), (256, 256));
        assert_eq!(p.resized_size((640, 480)), (341, 256));
        assert_eq!(p.resized_size((480, 640)), (256, 341));
        let g = p.geometry((640, 480)).unwrap();
        // (341 - 224) / 2 = 58.5 rounds half to even: 58.
        assert_eq!(g.window, (58, 16, 224, 224));
    }

    #[test]
    fn crop_larger_than_image_is_an_error() {
        let p = Preprocess {
            resize: 100,
            crop: Some(224),
        };
        assert!(p.geometry((100, 100)).is_err());
    }

    #[test]
    fn resize_of_constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([10, 200, 77]));
        let out = resize_bilinear_pil(&img, 16, 11);
        assert!(out.pixels().all(|p| p.0 == [10, 200, 77]));
        let up = resize_bilinear_pil(&img, 80, 60);
        assert!(up.pixels().all(|p| p.0 == [10, 200, 77]));
    }

    #[test]
    fn normalize_matches_formula() {
        let img = RgbImage::from_pixel(2, 1, image::Rgb([255, 0, 128]));
        let v = normalize_chw(&img);
        assert!((v[0] - (1.0 - 0.485) / 0.229).abs() < 1e-6);
        assert!((v[2] - (0.0 - 0.456) / 0.224).abs() < 1e-6);
        assert!((v[4] - (128.0 / 255.0 - 0.406) / 0.225).abs() < 1e-6);
    }

    /// A PNG declaring `w`x`h` RGB pixels, with a few bytes of pixel data (all its decoder
    /// reads before the pixels is the header).
    pub(crate) fn png_header(w: u32, h: u32) -> Vec<u8> {
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut chunk = |kind: &[u8], data: &[u8]| {
            let body = [kind, data].concat();
            png.extend_from_slice(&(data.len() as u32).to_be_bytes());
            png.extend_from_slice(&body);
            png.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        };
        let mut ihdr = w.to_be_bytes().to_vec();
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        chunk(b"IHDR", &ihdr);
        chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00]);
        chunk(b"IEND", &[]);
        png
    }

    #[test]
    fn pixel_limit_is_read_from_the_header() {
        let png = png_header(20_000, 20_000);
        let e = check_pixels(&png, "big.png", DEFAULT_MAX_PIXELS).unwrap_err();
        assert_eq!(
            e.to_string(),
            "image big.png is 20000x20000 pixels (400000000), over the limit of 40000000 \
             pixels (--max-pixels)"
        );
        assert!(check_pixels(&png, "big.png", 400_000_000).is_ok());
        assert!(check_pixels(b"not an image", "x", 1).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.png");
        std::fs::write(&path, &png).unwrap();
        let e = check_file_pixels(&path, 1_000).unwrap_err();
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn decoder_refuses_garbage() {
        let e = decode_rgb(b"not an image at all", "x.png").unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot decode image x.png: unknown image format"
        );
    }

    #[test]
    fn decoder_names_an_empty_file_and_an_oversized_image_with_its_size() {
        let e = decode_rgb(b"", "e.png").unwrap_err();
        assert_eq!(e.to_string(), "image e.png is empty (0 bytes)");
        let mut png = Vec::new();
        RgbImage::new(MAX_SIDE + 1, 2)
            .write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let e = decode_rgb(&png, "big.png").unwrap_err();
        assert_eq!(
            e.to_string(),
            "image big.png is 16385x2 pixels, larger than the limit of 16384 pixels a side"
        );
    }

    #[test]
    fn tiles_cover_the_image_with_overlap() {
        assert_eq!(tile_rects(100, 80, 200), vec![(0, 0, 100, 80)]);
        let r = tile_rects(4000, 3000, 1000);
        // 4000: stride at most 875 -> 5 columns; 3000 -> 4 rows.
        assert_eq!(r.len(), 5 * 4);
        assert_eq!(r[0], (0, 0, 1000, 1000));
        assert_eq!(*r.last().unwrap(), (3000, 2000, 1000, 1000));
        let xs: Vec<u32> = r.iter().take(5).map(|t| t.0).collect();
        assert_eq!(xs, vec![0, 750, 1500, 2250, 3000]);
        for w in [1000u32, 1001, 1875, 1876, 2999] {
            let r = tile_rects(w, 10, 1000);
            assert_eq!(r.last().unwrap().0 + 1000, w, "last tile ends at the edge");
            for p in r.windows(2) {
                assert!(p[1].0 - p[0].0 <= 875, "{w}: overlap of at least 1/8");
            }
        }
    }
}
