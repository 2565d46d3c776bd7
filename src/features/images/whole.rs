//! Whether an encoded image is whole: checked on the container before decoding, because the
//! decoders stop reading once they have the pixels they need (a PNG's final chunk, a JPEG's
//! end marker are never looked at) and image's JPEG decoder (zune-jpeg, not in strict mode)
//! fills missing scan data with grey, so a cut file would otherwise be scored. Only the
//! structure is read (markers, chunks, header fields), never the pixels.
//!
//! JPEG markers and PNG chunks are walked by hand, as ITU T.81 B.1 and PNG 5.3 define them:
//! no crate exposes that walk on its own (the CRCs are crc32fast's). TIFF tags are read with
//! the tiff crate; BMP's few header fields by hand. What is not checked: damage inside a
//! JPEG's compressed data that keeps its structure (JPEG has no checksum).

use image::ImageFormat;

/// What is wrong with an image file, in words that follow "is damaged or truncated: ".
pub type Damage = String;

/// Checks that `bytes`, an image in `format`, is complete and, where the format has
/// checksums (PNG), undamaged.
pub fn check(format: ImageFormat, bytes: &[u8]) -> Result<(), Damage> {
    match format {
        ImageFormat::Jpeg => jpeg(bytes),
        ImageFormat::Png => png(bytes),
        ImageFormat::Bmp => bmp(bytes),
        ImageFormat::Tiff => tiff(bytes),
        _ => Ok(()),
    }
}

// ---- JPEG (ITU T.81 B.1) ---------------------------------------------------------------------

/// JPEG marker codes (the byte after 0xFF) that matter to the walk.
mod marker {
    pub const TEM: u8 = 0x01;
    pub const RST0: u8 = 0xD0;
    pub const RST7: u8 = 0xD7;
    pub const SOI: u8 = 0xD8;
    pub const EOI: u8 = 0xD9;
}

/// A JPEG must reach its end-of-image marker. Segments with a length are skipped whole (so
/// an EXIF thumbnail's own end marker is never taken for the image's); between them, as in
/// libjpeg's `next_marker`, anything that is not a marker is passed over: the compressed
/// data, its stuffed `FF 00` pairs, restart markers and fill bytes.
fn jpeg(b: &[u8]) -> Result<(), Damage> {
    let ends_early = || "the JPEG data ends before its end-of-image marker".to_string();
    if !b.starts_with(&[0xFF, marker::SOI]) {
        return Err("no JPEG start-of-image marker".into());
    }
    let mut pos = 2;
    loop {
        let ff = b[pos..]
            .iter()
            .position(|&x| x == 0xFF)
            .ok_or_else(ends_early)?;
        pos += ff + 1;
        while b.get(pos) == Some(&0xFF) {
            pos += 1;
        }
        let code = *b.get(pos).ok_or_else(ends_early)?;
        pos += 1;
        match code {
            0x00 | marker::TEM | marker::RST0..=marker::RST7 | marker::SOI => continue,
            marker::EOI => return Ok(()),
            _ => {}
        }
        let len = b.get(pos..pos + 2).ok_or_else(ends_early)?;
        let len = u16::from_be_bytes([len[0], len[1]]) as usize;
        if len < 2 {
            return Err(format!("JPEG segment 0xFF{code:02X} has length {len}"));
        }
        pos += len;
        if pos > b.len() {
            return Err(ends_early());
        }
    }
}

// ---- PNG (PNG specification 5.3) -------------------------------------------------------------

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1A, b'\n'];

/// A PNG must be a chain of chunks with correct CRCs up to and including IEND (anything
/// after IEND is ignored, as decoders do).
fn png(b: &[u8]) -> Result<(), Damage> {
    if !b.starts_with(&PNG_SIGNATURE) {
        return Err("no PNG signature".into());
    }
    let mut pos = PNG_SIGNATURE.len();
    loop {
        let Some(head) = b.get(pos..pos + 8) else {
            return Err("the PNG data ends before its IEND chunk".into());
        };
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let kind = String::from_utf8_lossy(&head[4..8]).into_owned();
        if len > i32::MAX as usize {
            return Err(format!("PNG chunk {kind} has length {len}"));
        }
        let Some(crc) = b.get(pos + 8 + len..pos + 12 + len) else {
            return Err(format!("the PNG data ends inside its {kind} chunk"));
        };
        let stored = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32fast::hash(&b[pos + 4..pos + 8 + len]) != stored {
            return Err(format!("PNG chunk {kind} fails its CRC check"));
        }
        if kind == "IEND" {
            return Ok(());
        }
        pos += 12 + len;
    }
}

// ---- BMP -------------------------------------------------------------------------------------

/// An uncompressed BMP must hold the pixel rows its header declares (run-length encoded ones
/// end with their own end code, which the decoder requires).
fn bmp(b: &[u8]) -> Result<(), Damage> {
    let u16_at = |i: usize| {
        b.get(i..i + 2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]) as u64)
    };
    let u32_at = |i: usize| {
        b.get(i..i + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let short = || "the BMP file ends inside its header".to_string();
    let offset = u32_at(10).ok_or_else(short)? as u64;
    let header = u32_at(14).ok_or_else(short)?;
    // (width, height, bits per pixel, compression); the 12-byte OS/2 1.x header has 16-bit
    // sizes and no compression field.
    let (w, h, bpp, compression) = if header == 12 {
        let w = u16_at(18).ok_or_else(short)?;
        let h = u16_at(20).ok_or_else(short)?;
        (w, h, u16_at(24).ok_or_else(short)?, 0)
    } else {
        let w = u32_at(18).ok_or_else(short)? as i32;
        let h = u32_at(22).ok_or_else(short)? as i32;
        let bpp = u16_at(28).ok_or_else(short)?;
        let compression = if header >= 20 {
            u32_at(30).ok_or_else(short)?
        } else {
            0
        };
        (
            w.unsigned_abs() as u64,
            h.unsigned_abs() as u64,
            bpp,
            compression,
        )
    };
    // BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS: rows of whole 32-bit words.
    if !matches!(compression, 0 | 3 | 6) {
        return Ok(());
    }
    let row = (w * bpp).div_ceil(32) * 4;
    let needed = offset.saturating_add(row.saturating_mul(h));
    if (b.len() as u64) < needed {
        return Err(format!(
            "the BMP file has {} bytes, its header needs {needed} for {w}x{h} pixels",
            b.len()
        ));
    }
    Ok(())
}

// ---- TIFF ------------------------------------------------------------------------------------

/// Every strip (or tile) of a TIFF's first image, the one decoded, must lie inside the file.
fn tiff(b: &[u8]) -> Result<(), Damage> {
    use tiff::tags::Tag;
    let mut decoder = tiff::decoder::Decoder::new(std::io::Cursor::new(b))
        .map_err(|e| format!("the TIFF header cannot be read ({e})"))?;
    let mut read = |tag: Tag| {
        decoder
            .find_tag_unsigned_vec::<u64>(tag)
            .map_err(|e| format!("the TIFF tag {tag:?} cannot be read ({e})"))
    };
    let (what, offsets, counts) = match (read(Tag::StripOffsets)?, read(Tag::StripByteCounts)?) {
        (Some(o), Some(c)) => ("strip", o, c),
        _ => match (read(Tag::TileOffsets)?, read(Tag::TileByteCounts)?) {
            (Some(o), Some(c)) => ("tile", o, c),
            // No byte counts recorded: the decoder finds out for itself.
            _ => return Ok(()),
        },
    };
    for (i, (offset, count)) in offsets.iter().zip(&counts).enumerate() {
        let end = offset.saturating_add(*count);
        if end > b.len() as u64 {
            return Err(format!(
                "TIFF {what} {i} ends at byte {end}, the file has {}",
                b.len()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(format: ImageFormat) -> Vec<u8> {
        let img =
            image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 6, y as u8 * 8, 9]));
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, format).unwrap();
        buf.into_inner()
    }

    #[test]
    fn a_thumbnails_end_marker_does_not_end_the_jpeg() {
        let jpg = encoded(ImageFormat::Jpeg);
        // An APP1 segment holding a whole small JPEG (an EXIF thumbnail), then the image.
        let thumb = encoded(ImageFormat::Jpeg);
        let mut with_thumb = vec![0xFF, 0xD8, 0xFF, 0xE1];
        with_thumb.extend(((thumb.len() + 2) as u16).to_be_bytes());
        with_thumb.extend(&thumb);
        with_thumb.extend(&jpg[2..]);
        assert_eq!(check(ImageFormat::Jpeg, &with_thumb), Ok(()));
        let cut = &with_thumb[..with_thumb.len() - 40];
        assert!(check(ImageFormat::Jpeg, cut).is_err());
        // Bytes after the end marker (some cameras append data) are not damage.
        let mut trailing = jpg.clone();
        trailing.extend(b"trailer");
        assert_eq!(check(ImageFormat::Jpeg, &trailing), Ok(()));
    }

    #[test]
    fn every_cut_is_found() {
        for format in [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::Bmp] {
            let full = encoded(format);
            assert_eq!(check(format, &full), Ok(()), "{format:?}");
            for cut in 0..full.len() {
                assert!(
                    check(format, &full[..cut]).is_err(),
                    "{format:?} cut at {cut}"
                );
            }
        }
        let mut png = encoded(ImageFormat::Png);
        png.extend(b"after IEND");
        assert_eq!(check(ImageFormat::Png, &png), Ok(()));
    }

    #[test]
    fn garbage_after_a_signature_is_refused_without_panic() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for (format, magic) in [
            (ImageFormat::Jpeg, &b"\xFF\xD8\xFF"[..]),
            (ImageFormat::Png, &PNG_SIGNATURE[..]),
            (ImageFormat::Bmp, &b"BM"[..]),
            (ImageFormat::Tiff, &b"II*\0"[..]),
        ] {
            for n in 0..300 {
                let mut b = magic.to_vec();
                b.extend((0..n).map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 24) as u8
                }));
                let _ = check(format, &b);
            }
        }
    }
}
