//! The HTML report of a `patchcore predict` run (`OUTDIR/index.html`): one self-contained page
//! (thumbnails embedded as data URIs, inline CSS and JS, nothing fetched) with every image's
//! thumbnail, overlay, score and verdict, worst first, filterable by verdict. It opens with a
//! histogram of the run's image scores by verdict against the threshold, beside the model's
//! held-out calibration scores (an inline SVG from `plots`, bounded in size).
//!
//! Memory stays bounded however many images there are: `Report::add` (callable from many
//! threads) encodes the two thumbnails at once and appends them to a spool file in the output
//! folder, which is unlinked as soon as it is opened (so nothing is left behind, even after a
//! crash); only the small per-image entries stay in memory. `Report::finish` sorts the entries
//! and streams the page, reading the thumbnails back one at a time, into an `AtomicFile`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{anyhow, Context, Result};
use base64::Engine;
use image::{codecs::jpeg::JpegEncoder, imageops, RgbImage};

use crate::outputs::plots;
use crate::util::fsutil::AtomicFile;

/// Longest side of the thumbnails, in pixels.
pub const THUMBNAIL_SIZE: u32 = 256;
const THUMBNAIL_QUALITY: u8 = 80;

/// One scored image.
#[derive(Debug, Clone)]
pub struct ReportEntry {
    /// The image's path relative to the input folder, as shown (lossy for non-UTF-8 names).
    pub name: String,
    pub score: f32,
    /// `score / threshold`, when there is a threshold.
    pub normalized: Option<f32>,
    /// The verdict; `None` when there is no threshold.
    pub anomalous: Option<bool>,
    /// Connected anomalous regions found in the heatmap.
    pub regions: usize,
    /// The full-size overlay (`NAME.jpg`) relative to the report's folder, which the
    /// thumbnails link to; `None`: no link.
    pub overlay_file: Option<String>,
}

/// What the page's header says about the run.
#[derive(Debug, Clone, Default)]
pub struct ReportMeta {
    pub title: String,
    /// The model (index file) that scored the images.
    pub model: String,
    /// The folder of images scored.
    pub input: String,
    pub threshold: Option<f32>,
    /// Image scores of the model's held-out good images (its calibration), drawn under the
    /// run's for comparison; empty when the model has none.
    pub calibration_scores: Vec<f32>,
    /// The calibration images by name with their scores, highest first (empty for models
    /// whose sidecar does not name them).
    pub calibration_images: Vec<(String, f32)>,
    /// The folder given to `patchcore calibrate`, when the calibration images come from one
    /// rather than held out of training.
    pub calibration_folder: Option<String>,
    /// More `(label, value)` lines for the header (backbone, device, run time...).
    pub extra: Vec<(String, String)>,
}

/// A report being assembled: see the module's documentation.
pub struct Report {
    spool: Mutex<Spool>,
}

struct Spool {
    file: File,
    /// Set only if the spool could not be unlinked when created: removed on drop instead.
    path: Option<PathBuf>,
    len: u64,
    rows: Vec<Row>,
    /// Images that could not be scored: name and reason (`predict --on-error skip`).
    errors: Vec<(String, String)>,
}

struct Row {
    entry: ReportEntry,
    offset: u64,
    original: Thumb,
    overlay: Thumb,
}

#[derive(Clone, Copy)]
struct Thumb {
    bytes: u32,
    width: u32,
    height: u32,
}

impl Drop for Spool {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Report {
    /// Starts a report whose thumbnails are spooled in `out_dir` (which must exist).
    pub fn new(out_dir: &Path) -> Result<Report> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = out_dir.join(format!(
            ".patchcore-report-{}-{}.spool",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("cannot write in output folder {}", out_dir.display()))?;
        let path = std::fs::remove_file(&path).err().map(|_| path);
        Ok(Report {
            spool: Mutex::new(Spool {
                file,
                path,
                len: 0,
                rows: Vec::new(),
                errors: Vec::new(),
            }),
        })
    }

    /// Adds an image: makes JPEG thumbnails (longest side at most `THUMBNAIL_SIZE`) of the
    /// original and of its overlay and spools them. Thread-safe; the encoding runs outside the
    /// lock.
    pub fn add(&self, entry: ReportEntry, original: &RgbImage, overlay: &RgbImage) -> Result<()> {
        let (a, a_thumb) = thumbnail_jpeg(original)
            .with_context(|| format!("report thumbnail of {}", entry.name))?;
        let (b, b_thumb) = thumbnail_jpeg(overlay)
            .with_context(|| format!("report thumbnail of {}'s overlay", entry.name))?;
        let mut spool = self
            .spool
            .lock()
            .map_err(|_| anyhow!("the report was abandoned by a failed thread"))?;
        let offset = spool.len;
        let write = |at: u64, data: &[u8]| spool.file.write_all_at(data, at);
        write(offset, &a)
            .and_then(|_| write(offset + a.len() as u64, &b))
            .context("cannot write the report's spool file (disk full?)")?;
        spool.len += (a.len() + b.len()) as u64;
        spool.rows.push(Row {
            entry,
            offset,
            original: a_thumb,
            overlay: b_thumb,
        });
        Ok(())
    }

    /// Adds an image that could not be scored, listed first with its one-line reason
    /// (`predict --on-error skip`).
    pub fn add_error(&self, name: String, reason: String) -> Result<()> {
        self.spool
            .lock()
            .map_err(|_| anyhow!("the report was abandoned by a failed thread"))?
            .errors
            .push((name, reason));
        Ok(())
    }

    /// Number of images added so far.
    pub fn len(&self) -> usize {
        self.spool.lock().map_or(0, |s| s.rows.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the page to `path` (atomically: a reader never sees half a page) and removes the
    /// spool.
    pub fn finish(self, meta: &ReportMeta, path: &Path) -> Result<()> {
        let mut spool = self
            .spool
            .into_inner()
            .map_err(|_| anyhow!("the report was abandoned by a failed thread"))?;
        let mut rows = std::mem::take(&mut spool.rows);
        rows.sort_by(|x, y| {
            sort_key(&y.entry)
                .total_cmp(&sort_key(&x.entry))
                .then_with(|| x.entry.name.cmp(&y.entry.name))
        });
        let plot = score_plot(meta, &rows)?;
        let mut out = AtomicFile::create(path)?;
        let io = |e: std::io::Error| anyhow!("cannot write {}: {e}", path.display());
        write_head(&mut out, meta, &rows, plot.as_deref()).map_err(io)?;
        spool.errors.sort();
        for (name, reason) in &spool.errors {
            write_error_row(&mut out, name, reason).map_err(io)?;
        }
        let mut jpeg = Vec::new();
        let mut b64 = String::new();
        for (rank, row) in rows.iter().enumerate() {
            let n = (row.original.bytes + row.overlay.bytes) as usize;
            jpeg.resize(n, 0);
            spool
                .file
                .read_exact_at(&mut jpeg, row.offset)
                .context("cannot read the report's spool file back")?;
            let (a, b) = jpeg.split_at(row.original.bytes as usize);
            write_row(&mut out, rank + 1, row, [a, b], &mut b64).map_err(io)?;
        }
        write_tail(&mut out, rows.len()).map_err(io)?;
        out.commit()
    }
}

/// The score histogram of the page (`None` without images), ready to inline.
fn score_plot(meta: &ReportMeta, rows: &[Row]) -> Result<Option<String>> {
    if rows.is_empty() {
        return Ok(None);
    }
    let (mut good, mut bad, mut none) = (Vec::new(), Vec::new(), Vec::new());
    for r in rows {
        match r.entry.anomalous {
            Some(false) => good.push(r.entry.score),
            Some(true) => bad.push(r.entry.score),
            None => none.push(r.entry.score),
        }
    }
    let svg = plots::run_scores_svg(
        &good,
        &bad,
        &none,
        &meta.calibration_scores,
        meta.calibration_folder.as_deref(),
        meta.threshold,
    )?;
    Ok(Some(plots::inline_svg(&svg)))
}

/// Worst first: by normalized score when there is a threshold, else by score.
fn sort_key(e: &ReportEntry) -> f32 {
    e.normalized.unwrap_or(e.score)
}

fn thumbnail_jpeg(img: &RgbImage) -> Result<(Vec<u8>, Thumb)> {
    let (w, h) = img.dimensions();
    let longest = w.max(h);
    let small;
    let img = if longest > THUMBNAIL_SIZE {
        let scale = |v: u32| {
            ((v as u64 * THUMBNAIL_SIZE as u64 + longest as u64 / 2) / longest as u64).max(1) as u32
        };
        small = imageops::thumbnail(img, scale(w), scale(h));
        &small
    } else {
        img
    };
    let mut buf = Vec::new();
    JpegEncoder::new_with_quality(&mut buf, THUMBNAIL_QUALITY).encode_image(img)?;
    let bytes = u32::try_from(buf.len()).map_err(|_| anyhow!("thumbnail too large"))?;
    Ok((
        buf,
        Thumb {
            bytes,
            width: img.width(),
            height: img.height(),
        },
    ))
}

/// Escapes text for HTML content and (quoted) attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn verdict(e: &ReportEntry) -> &'static str {
    match e.anomalous {
        Some(true) => "anomalous",
        Some(false) => "good",
        None => "none",
    }
}

/// A relative file path as a link target: each byte outside the URL's unreserved set and
/// `/` percent-encoded (spaces, `#`, `?`, `%`, quotes, non-ASCII), `\\` as `/`.
fn href(path: &str) -> String {
    let mut s = String::with_capacity(path.len());
    for b in path.replace('\\', "/").bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// A score for display: 4 decimals, or the special value's name (NaN, inf).
fn fmt_score(v: f32) -> String {
    if v.is_finite() {
        format!("{v:.4}")
    } else {
        format!("{v}")
    }
}

const STYLE: &str = r#"
:root { color-scheme: light; --bad: #c62828; --ok: #2e7d32; --muted: #666; --line: #ddd; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; background: #fafafa; }
header { padding: 16px 24px 8px; background: #fff; border-bottom: 1px solid var(--line); }
h1 { margin: 0 0 8px; font-size: 20px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0 0 8px; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; overflow-wrap: anywhere; }
.counts { display: flex; gap: 12px; flex-wrap: wrap; margin: 8px 0; }
.count { padding: 4px 10px; border-radius: 4px; background: #eee; }
.count b { font-size: 16px; }
.count.anomalous { background: #fdecea; color: var(--bad); }
.count.good { background: #e8f5e9; color: var(--ok); }
nav#filter { margin: 8px 0 4px; }
nav#filter a { display: inline-block; padding: 4px 12px; margin-right: 4px; border: 1px solid var(--line); border-radius: 16px; color: #222; text-decoration: none; background: #fff; }
nav#filter a[aria-current="true"] { background: #222; color: #fff; border-color: #222; }
nav#filter .shown { color: var(--muted); margin-left: 8px; }
.grid { padding: 0 24px 24px; }
.row { display: grid; grid-template-columns: 3.5em 200px 200px minmax(12em, 1fr) 7em 7em 7.5em 5em; gap: 12px; align-items: center; padding: 8px 0; border-bottom: 1px solid var(--line); }
.rows > .row { content-visibility: auto; contain-intrinsic-size: auto 216px; }
.row.head { position: sticky; top: 0; z-index: 1; background: #fafafa; color: var(--muted); font-weight: 600; padding: 6px 0; }
.row img { display: block; max-width: 200px; max-height: 200px; width: auto; height: auto; background: #eee; }
.row a.full { display: block; }
.rank, .num { text-align: right; font-variant-numeric: tabular-nums; }
.name { overflow-wrap: anywhere; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; }
.badge { display: inline-block; padding: 2px 8px; border-radius: 10px; font-weight: 600; background: #eee; color: var(--muted); }
.badge.anomalous { background: var(--bad); color: #fff; }
.badge.good { background: var(--ok); color: #fff; }
.badge.error { background: #6a1b9a; color: #fff; }
.reason { color: var(--bad); font-family: system-ui, sans-serif; }
.row[hidden] { display: none !important; }
.empty { padding: 24px; color: var(--muted); }
figure.plot { margin: 8px 0; max-width: 900px; }
figure.plot svg { display: block; width: 100%; height: auto; border: 1px solid var(--line); background: #fff; }
figure.plot figcaption { color: var(--muted); font-size: 12px; margin-top: 2px; }
footer { padding: 8px 24px 24px; color: var(--muted); font-size: 12px; }
"#;

/// Applies the verdict filter named by the URL's hash (#all, #anomalous, #good) by hiding
/// rows; without JS nothing is hidden and the filter links stay hidden.
const SCRIPT: &str = r#"
(function () {
  var nav = document.getElementById('filter');
  if (!nav) return;
  var rows = document.querySelectorAll('.rows > .row');
  var links = nav.querySelectorAll('a');
  var shown = document.getElementById('shown');
  function apply() {
    var f = location.hash.slice(1);
    if (f !== 'anomalous' && f !== 'good') f = 'all';
    var n = 0;
    for (var i = 0; i < rows.length; i++) {
      var hide = f !== 'all' && rows[i].getAttribute('data-verdict') !== f;
      rows[i].hidden = hide;
      if (!hide) n++;
    }
    for (var j = 0; j < links.length; j++) {
      links[j].setAttribute('aria-current', links[j].getAttribute('href') === '#' + f ? 'true' : 'false');
    }
    document.body.setAttribute('data-filter', f);
    shown.textContent = n + ' of ' + rows.length + ' shown';
  }
  nav.hidden = false;
  window.addEventListener('hashchange', apply);
  apply();
})();
"#;

fn write_head(
    out: &mut impl Write,
    meta: &ReportMeta,
    rows: &[Row],
    plot: Option<&str>,
) -> std::io::Result<()> {
    let total = rows.len();
    let count = |v: Option<bool>| rows.iter().filter(|r| r.entry.anomalous == v).count();
    let (bad, good) = (count(Some(true)), count(Some(false)));
    let title = if meta.title.is_empty() {
        "PatchCore report"
    } else {
        &meta.title
    };
    write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"generator\" content=\"patchcore {}\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<header>\n<h1>{}</h1>\n\
         <dl class=\"meta\">\n",
        escape(crate::util::version::PROGRAM),
        escape(title),
        escape(title)
    )?;
    let mut item = |k: &str, v: &str| writeln!(out, "<dt>{}</dt><dd>{}</dd>", escape(k), escape(v));
    item("Model", &meta.model)?;
    if !meta.input.is_empty() {
        item("Input", &meta.input)?;
    }
    match meta.threshold {
        Some(t) => item(
            "Threshold",
            &format!("{t} (normalized score = score / threshold)"),
        )?,
        None => item("Threshold", "none: no verdicts, sorted by score")?,
    }
    for (k, v) in &meta.extra {
        item(k, v)?;
    }
    item("Generated", &utc_now())?;
    writeln!(out, "</dl>\n<div class=\"counts\">")?;
    writeln!(
        out,
        "<span class=\"count total\" data-count=\"total\"><b>{total}</b> images</span>"
    )?;
    if meta.threshold.is_some() || bad + good > 0 {
        writeln!(
            out,
            "<span class=\"count anomalous\" data-count=\"anomalous\"><b>{bad}</b> anomalous</span>\n\
             <span class=\"count good\" data-count=\"good\"><b>{good}</b> good</span>"
        )?;
    }
    if let Some(top) = rows.first() {
        writeln!(
            out,
            "<span class=\"count\">highest score <b>{}</b></span>",
            fmt_score(top.entry.score)
        )?;
    }
    writeln!(out, "</div>")?;
    if let Some(svg) = plot {
        write_plot(out, meta, svg)?;
    }
    if bad + good > 0 {
        writeln!(
            out,
            "<nav id=\"filter\" hidden>Show: <a href=\"#all\">All ({total})</a>\
             <a href=\"#anomalous\">Anomalous ({bad})</a><a href=\"#good\">Good ({good})</a>\
             <span class=\"shown\" id=\"shown\"></span></nav>"
        )?;
    }
    writeln!(
        out,
        "</header>\n<main class=\"grid\">\n<div class=\"row head\"><span class=\"rank\">#</span>\
         <span>Image</span><span>Overlay</span><span>Name</span><span class=\"num\">Score</span>\
         <span class=\"num\">Normalized</span><span>Verdict</span><span class=\"num\">Regions</span></div>\n\
         <div class=\"rows\">"
    )
}

/// The score plot of the run, its caption, and the calibration images' list.
fn write_plot(out: &mut impl Write, meta: &ReportMeta, svg: &str) -> std::io::Result<()> {
    let run = if meta.threshold.is_some() {
        "Image scores of this run (green good, red anomalous) against the threshold (black line)"
    } else {
        "Image scores of this run (grey: no threshold, no verdicts)"
    };
    let held_out = match (&meta.calibration_folder, meta.calibration_scores.is_empty()) {
        (_, true) => String::new(),
        (Some(f), false) => format!(
            "; below, the good images from {} the model was calibrated on (blue)",
            escape(f)
        ),
        (None, false) => {
            "; below, the model's held-out good images it was calibrated on (blue)".to_string()
        }
    };
    writeln!(
        out,
        "<figure class=\"plot\" id=\"score-plot\">{svg}<figcaption>{run}{held_out}.</figcaption></figure>"
    )?;
    if !meta.calibration_images.is_empty() {
        writeln!(
            out,
            "<details class=\"calibration\" id=\"calibration-images\"><summary>The {} \
             calibration images, highest score first</summary><ol>",
            meta.calibration_images.len()
        )?;
        for (name, score) in &meta.calibration_images {
            writeln!(
                out,
                "<li>{} <b>{}</b></li>",
                escape(name),
                fmt_score(*score)
            )?;
        }
        writeln!(out, "</ol></details>")?;
    }
    Ok(())
}

fn write_row(
    out: &mut impl Write,
    rank: usize,
    row: &Row,
    jpegs: [&[u8]; 2],
    b64: &mut String,
) -> std::io::Result<()> {
    let e = &row.entry;
    let v = verdict(e);
    let name = escape(&e.name);
    write!(
        out,
        "<div class=\"row\" data-rank=\"{rank}\" data-verdict=\"{v}\" data-score=\"{}\"",
        e.score
    )?;
    if let Some(n) = e.normalized {
        write!(out, " data-normalized=\"{n}\"")?;
    }
    write!(
        out,
        " data-name=\"{name}\"><span class=\"rank\">{rank}</span>"
    )?;
    let href = e.overlay_file.as_deref().map(href);
    for (jpeg, (thumb, alt)) in jpegs
        .iter()
        .zip([(row.original, "image"), (row.overlay, "overlay")])
    {
        b64.clear();
        base64::engine::general_purpose::STANDARD.encode_string(jpeg, b64);
        if let Some(h) = &href {
            write!(
                out,
                "<a class=\"full\" href=\"{h}\" title=\"full-size overlay\">"
            )?;
        }
        write!(
            out,
            "<img class=\"{alt}\" width=\"{}\" height=\"{}\" loading=\"lazy\" decoding=\"async\" \
             alt=\"{alt} of {name}\" src=\"data:image/jpeg;base64,{b64}\">",
            thumb.width, thumb.height
        )?;
        if href.is_some() {
            write!(out, "</a>")?;
        }
    }
    writeln!(
        out,
        "<span class=\"name\">{name}</span><span class=\"num score\">{}</span>\
         <span class=\"num normalized\">{}</span><span><span class=\"badge {v}\">{}</span></span>\
         <span class=\"num regions\">{}</span></div>",
        fmt_score(e.score),
        e.normalized.map_or_else(|| "–".to_string(), fmt_score),
        if v == "none" { "–" } else { v },
        e.regions
    )
}

/// The row of an image that could not be scored: no thumbnails or score, its reason.
fn write_error_row(out: &mut impl Write, name: &str, reason: &str) -> std::io::Result<()> {
    let name = escape(name);
    writeln!(
        out,
        "<div class=\"row error\" data-verdict=\"error\" data-name=\"{name}\">\
         <span class=\"rank\">–</span><span></span><span></span>\
         <span class=\"name\">{name}<br><span class=\"reason\">{}</span></span>\
         <span class=\"num score\">–</span><span class=\"num normalized\">–</span>\
         <span><span class=\"badge error\">error</span></span>\
         <span class=\"num regions\">–</span></div>",
        escape(reason)
    )
}

fn write_tail(out: &mut impl Write, total: usize) -> std::io::Result<()> {
    writeln!(out, "</div>")?;
    if total == 0 {
        writeln!(out, "<p class=\"empty\">No images were scored.</p>")?;
    }
    writeln!(
        out,
        "</main>\n<footer>patchcore {}</footer>\n<script>{SCRIPT}</script>\n</body>\n</html>",
        escape(crate::util::version::long_version())
    )
}

/// The current time as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc_now() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_percent_encode_file_names() {
        assert_eq!(href("good/000.jpg"), "good/000.jpg");
        assert_eq!(href("a b/#1 \"x\"%.jpg"), "a%20b/%231%20%22x%22%25.jpg");
        assert_eq!(href("é.jpg"), "%C3%A9.jpg");
    }

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(escape(r#"a<b>&"c'.png"#), "a&lt;b&gt;&amp;&quot;c&#39;.png");
    }

    #[test]
    fn thumbnails_keep_aspect_and_fit() {
        let img = RgbImage::new(1000, 300);
        let (_, t) = thumbnail_jpeg(&img).unwrap();
        assert_eq!((t.width, t.height), (256, 77));
        let img = RgbImage::new(40, 30);
        let (_, t) = thumbnail_jpeg(&img).unwrap();
        assert_eq!((t.width, t.height), (40, 30));
        let img = RgbImage::new(3000, 1);
        let (_, t) = thumbnail_jpeg(&img).unwrap();
        assert_eq!((t.width, t.height), (256, 1));
    }

    #[test]
    fn spool_is_not_left_in_the_output_folder() {
        let dir = tempfile::tempdir().unwrap();
        let r = Report::new(dir.path()).unwrap();
        let img = RgbImage::new(8, 8);
        let entry = ReportEntry {
            name: "a.png".into(),
            score: 1.0,
            normalized: None,
            anomalous: None,
            regions: 0,
            overlay_file: None,
        };
        r.add(entry, &img, &img).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        drop(r);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
