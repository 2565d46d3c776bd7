//! Plots as standalone SVG documents, drawn with plotters, for the commands that show them:
//! the image scores of a run against the threshold and the held-out calibration scores
//! (predict's report), the calibration alone (train, `INDEX.calibration.svg`), ROC and PRO
//! curves and bar charts of metrics (mvtec).
//!
//! Sizes are bounded whatever the data: scores are counted into at most [`MAX_BINS`] bins
//! (plus two for the alignment on the threshold), curves arrive thinned by
//! `metrics::CurveBuilder`.

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use plotters::coord::ranged1d::{Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::commands::mvtec::metrics::Curve;
use crate::util::fsutil::AtomicFile;
use crate::util::records::Calibration;

/// Colours shared with the report's badges.
pub const GOOD: RGBColor = RGBColor(0x2e, 0x7d, 0x32);
pub const ANOMALOUS: RGBColor = RGBColor(0xc6, 0x28, 0x28);
pub const NO_VERDICT: RGBColor = RGBColor(0x75, 0x75, 0x75);
pub const HELD_OUT: RGBColor = RGBColor(0x15, 0x65, 0xc0);

/// Most bins of a score histogram (plus one for the alignment on the threshold).
pub const MAX_BINS: usize = 60;
/// Fewest bins, so that a handful of scores still spreads out.
const MIN_BINS: usize = 12;
/// Bin counts above this switch the count axis to a log scale, so that a bin of one image
/// stays visible next to a bin of thousands.
const LOG_SCALE_ABOVE: u64 = 100;
const FONT: &str = "sans-serif";

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("cannot draw the plot: {e:?}")
}

/// Writes an SVG document atomically.
pub fn write_svg(path: &Path, svg: &str) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(svg.as_bytes())
        .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    f.commit()
}

/// The SVG for embedding in an HTML page: the namespace declaration is implied there.
pub fn inline_svg(svg: &str) -> String {
    svg.replacen(" xmlns=\"http://www.w3.org/2000/svg\"", "", 1)
}

// ---------------------------------------------------------------------------------------------
// Score histograms.

/// Scores of one kind in a histogram panel (stacked in the order given).
pub struct Group<'a> {
    pub label: String,
    pub color: RGBColor,
    pub scores: &'a [f32],
}

/// One histogram panel: a title and its stacked groups. Every panel of a figure shares the
/// bins and the score axis.
pub struct Panel<'a> {
    pub title: String,
    pub groups: Vec<Group<'a>>,
}

/// Equal-width bins over the scores, one edge exactly on the threshold when there is one, so
/// that every bin lies on one side of it. Bin `k` (an integer, `first..=last`) holds the
/// scores in `(anchor + (k - 1) * width, anchor + k * width]`, matching the verdict rule
/// (anomalous when strictly above the threshold).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bins {
    anchor: f64,
    width: f64,
    first: i64,
    last: i64,
}

impl Bins {
    fn new(values: impl Iterator<Item = f32>, threshold: Option<f32>) -> Bins {
        let (mut lo, mut hi, mut n) = (f64::INFINITY, f64::NEG_INFINITY, 0usize);
        for v in values.filter(|v| v.is_finite()) {
            lo = lo.min(v as f64);
            hi = hi.max(v as f64);
            n += 1;
        }
        let threshold = threshold.filter(|t| t.is_finite()).map(f64::from);
        if let Some(t) = threshold {
            (lo, hi) = (lo.min(t), hi.max(t));
        }
        if lo > hi {
            (lo, hi) = (0.0, 1.0);
        }
        if hi - lo <= 1e-6 * lo.abs().max(1e-3) {
            let pad = (0.05 * lo.abs()).max(1e-3);
            (lo, hi) = (lo - pad, hi + pad);
        }
        // About 2 sqrt(n) bins: a few per score for small sets, MAX_BINS for large ones.
        let count = ((2.0 * (n as f64).sqrt()).ceil() as usize).clamp(MIN_BINS, MAX_BINS);
        let width = (hi - lo) / count as f64;
        // Without a threshold, bins centred so that the extremes are not alone on an edge.
        let anchor = threshold.unwrap_or(lo - 0.5 * width);
        let bin = |v: f64| ((v - anchor) / width).ceil() as i64;
        Bins {
            anchor,
            width,
            first: bin(lo),
            last: bin(hi).max(bin(lo)),
        }
    }

    fn len(&self) -> usize {
        (self.last - self.first + 1) as usize
    }

    /// The bin index (0-based) of a finite score, clamped into the bins.
    fn index(&self, v: f32) -> Option<usize> {
        if !v.is_finite() {
            return None;
        }
        let k = ((v as f64 - self.anchor) / self.width).ceil() as i64;
        Some((k.clamp(self.first, self.last) - self.first) as usize)
    }

    /// Lower and upper edges of bin `i` (0-based).
    fn edges(&self, i: usize) -> (f64, f64) {
        let k = self.first + i as i64;
        (
            self.anchor + (k - 1) as f64 * self.width,
            self.anchor + k as f64 * self.width,
        )
    }

    /// The score axis: the bins and an empty bin's width on each side, so that a threshold
    /// or a score at an end is not drawn on the frame.
    fn range(&self) -> Range<f64> {
        self.edges(0).0 - self.width..self.edges(self.len() - 1).1 + self.width
    }

    fn count(&self, scores: &[f32]) -> Vec<u64> {
        let mut c = vec![0u64; self.len()];
        for i in scores.iter().filter_map(|&s| self.index(s)) {
            c[i] += 1;
        }
        c
    }
}

/// A figure of score histograms: `panels` stacked vertically on a shared score axis, the
/// threshold drawn across them, `note` lines under them.
pub fn histogram_svg(
    caption: &str,
    panels: &[Panel],
    threshold: Option<f32>,
    x_desc: &str,
    note: &[String],
) -> Result<String> {
    let all = panels
        .iter()
        .flat_map(|p| p.groups.iter().flat_map(|g| g.scores.iter().copied()));
    let bins = Bins::new(all, threshold);
    let width = 900u32;
    let panel_height = |i: usize| if i == 0 { 250u32 } else { 190 };
    let note_height = 18 * note.len() as u32 + 8;
    let caption_height = 34u32;
    let height =
        caption_height + (0..panels.len()).map(panel_height).sum::<u32>() + note_height + 8;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (top, mut rest) = root.split_vertically(caption_height);
        top.draw(&Text::new(
            caption.to_string(),
            (12, 8),
            (FONT, 20).into_font().color(&BLACK),
        ))
        .map_err(plot_err)?;
        for (i, panel) in panels.iter().enumerate() {
            let (area, below) = rest.split_vertically(panel_height(i));
            let last = i + 1 == panels.len();
            draw_panel(&area, panel, &bins, threshold, last.then_some(x_desc))?;
            rest = below;
        }
        for (i, line) in note.iter().enumerate() {
            rest.draw(&Text::new(
                line.clone(),
                (14, 4 + 18 * i as i32),
                (FONT, 13).into_font().color(&RGBColor(0x44, 0x44, 0x44)),
            ))
            .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

fn draw_panel(
    area: &DrawingArea<SVGBackend, Shift>,
    panel: &Panel,
    bins: &Bins,
    threshold: Option<f32>,
    x_desc: Option<&str>,
) -> Result<()> {
    let counts: Vec<Vec<u64>> = panel.groups.iter().map(|g| bins.count(g.scores)).collect();
    let totals: Vec<u64> = (0..bins.len())
        .map(|i| counts.iter().map(|c| c[i]).sum())
        .collect();
    let max = totals.iter().copied().max().unwrap_or(0).max(1);
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(&panel.title, (FONT, 15))
        .margin_left(12)
        .margin_right(24)
        .margin_top(4)
        .x_label_area_size(if x_desc.is_some() { 40 } else { 22 })
        .y_label_area_size(56);
    let x = bins.range();
    // Head room above the tallest bar for the legend (the upper corner away from the threshold).
    if max > LOG_SCALE_ABOVE {
        let chart = builder
            .build_cartesian_2d(x, (0.5..max as f64 * 30.0).log_scale())
            .map_err(plot_err)?;
        fill_panel(
            chart,
            panel,
            bins,
            &counts,
            0.5,
            threshold,
            x_desc,
            "images (log)",
        )
    } else {
        let chart = builder
            .build_cartesian_2d(x, 0.0..max as f64 * 1.6)
            .map_err(plot_err)?;
        fill_panel(
            chart, panel, bins, &counts, 0.0, threshold, x_desc, "images",
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn fill_panel<'a, Y>(
    mut chart: ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    panel: &Panel,
    bins: &Bins,
    counts: &[Vec<u64>],
    floor: f64,
    threshold: Option<f32>,
    x_desc: Option<&str>,
    y_desc: &str,
) -> Result<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let int_label = |v: &f64| {
        if (v - v.round()).abs() < 1e-9 && *v >= 1.0 {
            format!("{v:.0}")
        } else if *v == 0.0 {
            "0".to_string()
        } else {
            String::new()
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh()
        .light_line_style(WHITE.mix(0.0))
        .y_label_formatter(&int_label)
        .y_desc(y_desc)
        .x_labels(10);
    if let Some(d) = x_desc {
        mesh.x_desc(d);
    }
    mesh.draw().map_err(plot_err)?;
    let y_top = chart.y_range().end;
    let mut base = vec![0u64; bins.len()];
    for (g, c) in panel.groups.iter().zip(counts) {
        let color = g.color;
        let bars: Vec<Rectangle<(f64, f64)>> = (0..bins.len())
            .filter(|&i| c[i] > 0)
            .map(|i| {
                let (x0, x1) = bins.edges(i);
                let gap = 0.04 * (x1 - x0);
                let y0 = if base[i] == 0 { floor } else { base[i] as f64 };
                Rectangle::new(
                    [(x0 + gap, y0), (x1 - gap, (base[i] + c[i]) as f64)],
                    color.filled(),
                )
            })
            .collect();
        let n = g.scores.len();
        chart
            .draw_series(bars)
            .map_err(plot_err)?
            .label(format!("{} ({n})", g.label))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        for i in 0..bins.len() {
            base[i] += c[i];
        }
    }
    if let Some(t) = threshold.filter(|t| t.is_finite()) {
        let t = t as f64;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(t, floor), (t, y_top)],
                BLACK.stroke_width(2),
            )))
            .map_err(plot_err)?
            .label(format!("threshold {}", fmt_value(t)))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], BLACK.stroke_width(2)));
    }
    let x = bins.range();
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(0xbb, 0xbb, 0xbb))
        .label_font((FONT, 13))
        .position(legend_position(x.start, x.end, threshold))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

/// Where the legend goes: the upper corner away from the threshold line, so it never covers
/// it (upper right unless the threshold is in the right half of the axis `lo..hi`).
fn legend_position(lo: f64, hi: f64, threshold: Option<f32>) -> SeriesLabelPosition {
    match threshold.filter(|t| t.is_finite()) {
        Some(t) if hi > lo && (t as f64 - lo) / (hi - lo) > 0.5 => SeriesLabelPosition::UpperLeft,
        _ => SeriesLabelPosition::UpperRight,
    }
}

/// A score for labels: 4 significant digits.
fn fmt_value(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let digits = (3 - v.abs().log10().floor() as i32).max(0) as usize;
    format!("{v:.digits$}")
}

/// The histogram at the top of predict's report: this run's image scores by verdict, and
/// below them the model's held-out good images (`held_out`, its calibration; empty when it
/// has none), with the threshold in force across both.
pub fn run_scores_svg(
    good: &[f32],
    anomalous: &[f32],
    no_verdict: &[f32],
    held_out: &[f32],
    calibration_folder: Option<&str>,
    threshold: Option<f32>,
) -> Result<String> {
    let n = good.len() + anomalous.len() + no_verdict.len();
    let mut groups = Vec::new();
    for (label, color, scores) in [
        ("good", GOOD, good),
        ("anomalous", ANOMALOUS, anomalous),
        ("no verdict", NO_VERDICT, no_verdict),
    ] {
        if !scores.is_empty() || (threshold.is_some() && color != NO_VERDICT) {
            groups.push(Group {
                label: label.to_string(),
                color,
                scores,
            });
        }
    }
    let mut panels = vec![Panel {
        title: format!(
            "This run: {n} image{}, by verdict",
            if n == 1 { "" } else { "s" }
        ),
        groups,
    }];
    let mut note = vec![match threshold {
        Some(t) => format!(
            "An image is anomalous when its score is above the threshold ({}).",
            fmt_value(t as f64)
        ),
        None => "No threshold: scores only.".to_string(),
    }];
    if held_out.is_empty() {
        note.push("The model has no held-out calibration scores to compare with.".to_string());
    } else {
        let (title, label) = match calibration_folder {
            Some(f) => (
                format!(
                    "The model's {} calibration good images (from {f}, patchcore calibrate)",
                    held_out.len()
                ),
                "calibration good",
            ),
            None => (
                format!(
                    "The model's {} held-out good images (calibration, not in the memory bank)",
                    held_out.len()
                ),
                "held-out good",
            ),
        };
        panels.push(Panel {
            title,
            groups: vec![Group {
                label: label.to_string(),
                color: HELD_OUT,
                scores: held_out,
            }],
        });
        note.push(
            "Good images like the held-out ones should score like them: a run whose good \
             images sit far right of them has drifted."
                .to_string(),
        );
    }
    histogram_svg(
        "Image scores",
        &panels,
        threshold,
        "image score (largest patch distance)",
        &note,
    )
}

/// The calibration figure `train` writes beside the model: the held-out good images' scores,
/// the image threshold derived from them and the false-alarm bound.
pub fn calibration_svg(c: &Calibration) -> Result<String> {
    let t = c.image_threshold;
    let at_or_above = c.image_scores.iter().filter(|&&s| s >= t).count();
    // Images given to `calibrate` may be anywhere (even in the bank): not "held-out".
    let (title, label) = match &c.folder {
        Some(folder) => (
            format!(
                "{} good images from {folder} (patchcore calibrate), scored against the memory bank",
                c.images
            ),
            "calibration good",
        ),
        None => (
            format!(
                "{} held-out good images, scored against the finished memory bank",
                c.images
            ),
            "held-out good",
        ),
    };
    let panels = [Panel {
        title,
        groups: vec![Group {
            label: label.to_string(),
            color: HELD_OUT,
            scores: &c.image_scores,
        }],
    }];
    let mut note = vec![
        format!(
            "Image threshold {} = {}.",
            fmt_value(t as f64),
            c.rule.trim_end_matches('.')
        ),
        format!(
            "A good image like these exceeds it at most {:.1}% of the time: (c + 1) / (n + 1) with \
             c = {at_or_above} of n = {} scores at or above it.",
            100.0 * c.false_alarm_bound,
            c.images
        ),
    ];
    note.extend(highest_first_lines(&c.scored_images));
    histogram_svg(
        "Calibration of the image threshold",
        &panels,
        Some(t),
        "image score (largest patch distance)",
        &note,
    )
}

/// Most calibration images the figure names (the sidecar has them all).
const NAMED_IMAGES: usize = 12;

/// The calibration images by name, highest score first, a few to a line.
fn highest_first_lines(images: &[crate::util::records::ScoredFile]) -> Vec<String> {
    if images.is_empty() {
        return Vec::new();
    }
    let named: Vec<String> = images
        .iter()
        .take(NAMED_IMAGES)
        .map(|s| format!("{} {}", s.file, fmt_value(s.score as f64)))
        .collect();
    let mut lines: Vec<String> = named.chunks(4).map(|c| c.join(", ")).collect();
    lines[0] = format!("Highest first: {}", lines[0]);
    if images.len() > NAMED_IMAGES {
        let last = lines.len() - 1;
        lines[last] += &format!(
            " ... and {} more (all in the sidecar)",
            images.len() - NAMED_IMAGES
        );
    }
    lines
}

/// Where `train` puts the calibration figure of the model `index`: `INDEX.calibration.svg`.
pub fn calibration_svg_path(index: &Path) -> PathBuf {
    let mut s = index.as_os_str().to_owned();
    s.push(".calibration.svg");
    PathBuf::from(s)
}

/// Writes the calibration figure beside the model `index`, or, for a model without
/// calibration, removes a figure left there by an earlier model. Returns the path written.
pub fn write_calibration_svg(index: &Path, c: Option<&Calibration>) -> Result<Option<PathBuf>> {
    let path = calibration_svg_path(index);
    match c {
        Some(c) => {
            write_svg(&path, &calibration_svg(c)?)?;
            Ok(Some(path))
        }
        None => {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(anyhow!(
                        "cannot remove the outdated {}: {e}",
                        path.display()
                    ))
                }
                _ => {}
            }
            Ok(None)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ROC and PRO curves.

/// Which curve: how it is titled, its axes and the metric its area gives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CurveKind {
    ImageRoc,
    PixelRoc,
    /// Per-region overlap up to FPR `max_fpr`.
    Pro {
        max_fpr: f64,
    },
}

impl CurveKind {
    /// File stem of the curve's SVG.
    pub fn stem(self) -> &'static str {
        match self {
            CurveKind::ImageRoc => "image_roc",
            CurveKind::PixelRoc => "pixel_roc",
            CurveKind::Pro { .. } => "pro",
        }
    }

    pub fn title(self) -> String {
        match self {
            CurveKind::ImageRoc => "image ROC".to_string(),
            CurveKind::PixelRoc => "pixel ROC".to_string(),
            CurveKind::Pro { max_fpr } => format!("PRO up to FPR {max_fpr}"),
        }
    }

    fn x_max(self) -> f64 {
        match self {
            CurveKind::Pro { max_fpr } => max_fpr,
            _ => 1.0,
        }
    }

    /// The metric's name and value: the curve's area, normalized to the axes' box.
    pub fn metric(self, c: &Curve) -> (&'static str, f64) {
        match self {
            CurveKind::Pro { max_fpr } => ("AUPRO", c.area_share(max_fpr)),
            _ => ("AUROC", c.area_share(1.0)),
        }
    }
}

/// One curve in a figure: its legend label and its colour (index into plotters' Palette99,
/// as the bar charts use per backbone).
pub struct CurveSeries<'a> {
    pub label: String,
    pub color: usize,
    pub curve: &'a Curve,
}

/// A figure of curves of one kind, their metrics in the legend, the chance diagonal dashed.
pub fn curves_svg(title: &str, kind: CurveKind, series: &[CurveSeries]) -> Result<String> {
    let x_max = kind.x_max();
    let (x_desc, y_desc) = match kind {
        CurveKind::ImageRoc => ("false positive rate (good images)", "true positive rate"),
        CurveKind::PixelRoc => ("false positive rate (normal pixels)", "true positive rate"),
        CurveKind::Pro { .. } => (
            "false positive rate (normal pixels)",
            "per-region overlap (mean over defects)",
        ),
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (600, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 18))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..x_max, 0.0..1.0)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .light_line_style(RGBColor(0xf0, 0xf0, 0xf0))
            .x_desc(x_desc)
            .y_desc(y_desc)
            .draw()
            .map_err(plot_err)?;
        let grey = RGBColor(0x99, 0x99, 0x99);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, 0.0), (x_max, x_max)],
                6,
                4,
                grey.stroke_width(1),
            ))
            .map_err(plot_err)?
            .label("chance")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], grey));
        for s in series {
            let color = Palette99::pick(s.color).to_rgba();
            let (name, value) = kind.metric(s.curve);
            chart
                .draw_series(LineSeries::new(
                    s.curve.points.iter().map(|p| (p[0], p[1])),
                    color.stroke_width(2),
                ))
                .map_err(plot_err)?
                .label(format!("{}: {name} {:.2}%", s.label, 100.0 * value))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(0xbb, 0xbb, 0xbb))
            .label_font((FONT, 13))
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

// ---------------------------------------------------------------------------------------------
// Bar charts.

/// A grouped bar chart of metrics in `[0, 1]`, shown in %: `groups` along x, one bar per
/// series (label, one value per group; `None` leaves a gap), coloured by Palette99 in order.
pub fn bar_chart(
    title: &str,
    groups: &[String],
    series: &[(String, Vec<Option<f64>>)],
) -> Result<String> {
    let width = (160 + 90 * groups.len() as u32 * series.len().max(1) as u32).max(640);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{title}, %"), (FONT, 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..groups.len() as f64, 0f64..100f64)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .max_light_lines(0)
            .x_labels(groups.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 1e-6 && i < groups.len() {
                    groups[i].clone()
                } else {
                    String::new()
                }
            })
            .y_desc("%")
            .draw()
            .map_err(plot_err)?;
        let bar = 0.8 / series.len().max(1) as f64;
        for (k, (label, values)) in series.iter().enumerate() {
            let color = Palette99::pick(k).to_rgba();
            let bars = values.iter().enumerate().filter_map(|(i, v)| {
                let v = (*v)? * 100.0;
                let x0 = i as f64 + 0.1 + k as f64 * bar;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + bar * 0.92, v)],
                    color.filled(),
                ))
            });
            chart
                .draw_series(bars)
                .map_err(plot_err)?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
            let labels = values.iter().enumerate().filter_map(|(i, v)| {
                let v = (*v)? * 100.0;
                let x = i as f64 + 0.1 + (k as f64 + 0.5) * bar;
                Some(Text::new(
                    format!("{v:.1}"),
                    (x, (v + 1.5).min(97.0)),
                    (FONT, 12)
                        .into_font()
                        .color(&BLACK)
                        .pos(Pos::new(HPos::Center, VPos::Bottom)),
                ))
            });
            chart.draw_series(labels).map_err(plot_err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_put_the_threshold_on_an_edge() {
        let scores = [0.5f32, 1.0, 1.7, 2.0, 2.0001, 3.9];
        let b = Bins::new(scores.iter().copied(), Some(2.0));
        assert!(b.len() <= MAX_BINS + 2, "{b:?}");
        for &s in &scores {
            let (lo, hi) = b.edges(b.index(s).unwrap());
            assert!(s as f64 > lo && s as f64 <= hi, "{s} in ({lo}, {hi}]");
            // Every bin lies on one side of the threshold.
            assert!(hi <= 2.0 || lo >= 2.0, "bin ({lo}, {hi}) straddles 2.0");
        }
        assert_eq!(b.count(&scores).iter().sum::<u64>(), 6);
        let r = b.range();
        assert!(r.start < 0.5 && r.end >= 3.9);
    }

    #[test]
    fn bins_handle_one_value_none_and_odd_values() {
        let b = Bins::new([7.0f32].into_iter(), None);
        let (lo, hi) = b.edges(b.index(7.0).unwrap());
        assert!(lo < 7.0 && hi >= 7.0);
        assert!(b.range().end > b.range().start);
        let b = Bins::new(std::iter::empty(), None);
        assert!(b.len() >= 1);
        let b = Bins::new([1.0, f32::NAN, f32::INFINITY, 2.0].into_iter(), Some(1.5));
        assert_eq!(b.index(f32::NAN), None);
        assert_eq!(b.count(&[1.0, f32::NAN, 2.0]).iter().sum::<u64>(), 2);
        // Far outside (e.g. another panel's bins): clamped into the end bins.
        assert_eq!(b.index(-1e30), Some(0));
        assert_eq!(b.index(1e30), Some(b.len() - 1));
    }

    #[test]
    fn calibration_figure_is_written_and_an_outdated_one_removed() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("m.faiss");
        let c = Calibration::from_scores(
            crate::training::calibration::Scores {
                image_scores: (1..=20).map(|v| v as f32).collect(),
                heatmap_maxima: vec![1.0; 20],
                sizes: vec![(64, 64); 20],
                names: (1..=20).map(|v| format!("f{v:02}.png")).collect(),
            },
            crate::util::records::Rule::Quantile,
        );
        let path = write_calibration_svg(&index, Some(&c)).unwrap().unwrap();
        assert_eq!(path, dir.path().join("m.faiss.calibration.svg"));
        let svg = std::fs::read_to_string(&path).unwrap();
        // The threshold is above all 20 scores: c = 0, bound 1/21.
        assert!(
            svg.contains("held-out good (20)") && svg.contains("c = 0 of n = 20"),
            "{svg}"
        );
        assert!(svg.contains("at most 4.8% of the time"));
        // The images by name, highest first, a dozen of them.
        assert!(
            svg.contains("Highest first: f20.png 20.00, f19.png 19.00"),
            "{svg}"
        );
        assert!(svg.contains("f09.png 9.000 ... and 8 more (all in the sidecar)"));
        // Calibrated on a folder (`patchcore calibrate`): not called held-out.
        let mut by_folder = c.clone();
        by_folder.folder = Some("new_good".to_string());
        let svg = calibration_svg(&by_folder).unwrap();
        assert!(svg.contains("calibration good (20)") && svg.contains("from new_good"));
        assert!(!svg.contains("held-out"), "{svg}");
        assert!(svg.contains(&format!(
            "threshold {}",
            fmt_value(c.image_threshold as f64)
        )));
        // Retrained without calibration: the figure of the old model goes.
        assert_eq!(write_calibration_svg(&index, None).unwrap(), None);
        assert!(!path.exists());
        assert_eq!(write_calibration_svg(&index, None).unwrap(), None);
    }

    /// The x of the threshold line (the polyline from the floor to the top in black, width
    /// 2) and of the legend's "threshold" label, in the SVG.
    fn line_and_label_x(svg: &str) -> (f64, f64) {
        let lines: Vec<&str> = svg.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.trim_start().starts_with("threshold "))
            .expect("a threshold label");
        let label = lines[at - 1];
        let x = |s: &str, key: &str| -> f64 {
            let i = s.find(key).unwrap() + key.len();
            s[i..].split(['"', ',']).next().unwrap().parse().unwrap()
        };
        let line = svg
            .lines()
            .find(|l| l.contains("<polyline") && l.contains("stroke-width=\"2\""))
            .expect("the threshold line");
        (x(line, "points=\""), x(label, "x=\""))
    }

    #[test]
    fn the_legend_stays_clear_of_the_threshold_line() {
        let scores: Vec<f32> = (0..40).map(|i| 1.0 + i as f32 / 10.0).collect();
        // A threshold far right (as the calibration figure's usually is): legend upper left.
        let svg = run_scores_svg(&scores, &[], &[], &[], None, Some(4.8)).unwrap();
        let (line, label) = line_and_label_x(&svg);
        assert!(label < line - 150.0, "label at {label}, line at {line}");
        // Far left: legend upper right.
        let svg = run_scores_svg(&scores, &[], &[], &[], None, Some(1.1)).unwrap();
        let (line, label) = line_and_label_x(&svg);
        assert!(label > line + 150.0, "label at {label}, line at {line}");
        assert!(matches!(
            legend_position(0.0, 10.0, None),
            SeriesLabelPosition::UpperRight
        ));
    }

    #[test]
    fn large_histograms_stay_small() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let good: Vec<f32> = (0..100_000).map(|_| rng.gen_range(1.0..2.0)).collect();
        let bad: Vec<f32> = (0..7).map(|i| 2.5 + i as f32).collect();
        let held: Vec<f32> = (0..1000).map(|_| rng.gen_range(1.0..2.0)).collect();
        let svg = run_scores_svg(&good, &bad, &[], &held, None, Some(2.1)).unwrap();
        assert!(svg.len() < 64 * 1024, "{} bytes", svg.len());
        assert!(svg.contains("good (100000)") && svg.contains("anomalous (7)"));
        assert!(svg.contains("held-out good (1000)") && svg.contains("threshold 2.100"));
        assert!(
            svg.contains("images (log)"),
            "one bin of 7 next to bins of thousands"
        );
        let one = run_scores_svg(&[1.5], &[], &[], &[], None, Some(2.0)).unwrap();
        assert!(one.contains("This run: 1 image,") && one.contains("good (1)"));
        assert!(!one.contains("(log)"));
    }
}
