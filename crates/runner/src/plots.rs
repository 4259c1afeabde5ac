//! PNG plots with plotters: NLL curves (optionally with a min-max band) and sample grids. The
//! font is embedded (DejaVu Sans, see crates/runner/assets/), so plots render on machines with
//! no fonts.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::store::atomic_write_with;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is a compile-time constant checked by the plot tests; a failure here would
        // only lose text, never the run.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

/// One line of a curve plot: points (x, y) and an optional band (x, lo, hi).
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub band: Vec<(f64, f64, f64)>,
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plot: {e:?}")
}

/// Line plot with axis labels and a legend, written atomically to `path`.
pub fn curves(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<()> {
    register_font();
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied().chain(s.band.iter().flat_map(|&(x, lo, hi)| [(x, lo), (x, hi)])))
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    if all.is_empty() {
        return Err(anyhow!("plot {}: nothing to draw", path.display()));
    }
    let (x0, x1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    // Clip the y range to the lower part: early epochs are far above where runs settle.
    let mut ys: Vec<f64> = all.iter().map(|p| p.1).collect();
    ys.sort_by(|a, b| a.total_cmp(b));
    let y0 = ys[0];
    let y1 = ys[((ys.len() - 1) as f64 * 0.9) as usize].max(y0 + 1e-9);
    let pad = (y1 - y0) * 0.08 + 1e-6;
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    atomic_write_with(path, |tmp| {
        let tmp_png = tmp.with_extension("png");
        {
            let root = BitMapBackend::new(&tmp_png, (900, 560)).into_drawing_area();
            root.fill(&WHITE).map_err(err)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(title, (FAMILY, 22))
                .margin(14)
                .x_label_area_size(44)
                .y_label_area_size(64)
                .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .label_style((FAMILY, 14))
                .axis_desc_style((FAMILY, 16))
                .draw()
                .map_err(err)?;
            for (i, s) in series.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                if !s.band.is_empty() {
                    // Early epochs far above the shown range would be drawn pinned to its top edge.
                    let top = y1 + pad;
                    let band: Vec<_> = s.band.iter().filter(|b| b.2 <= top).collect();
                    let mut poly: Vec<(f64, f64)> = band.iter().map(|&&(x, _, hi)| (x, hi)).collect();
                    poly.extend(band.iter().rev().map(|&&(x, lo, _)| (x, lo)));
                    chart.draw_series(std::iter::once(Polygon::new(poly, color.mix(0.18).filled()))).map_err(err)?;
                }
                chart
                    .draw_series(LineSeries::new(
                        s.points.iter().copied().skip_while(|p| p.1 > y1 + pad),
                        color.stroke_width(2),
                    ))
                    .map_err(err)?
                    .label(s.label.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .label_font((FAMILY, 14))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(err)?;
            root.present().map_err(err)?;
        }
        std::fs::rename(&tmp_png, tmp)?;
        Ok(())
    })
}

/// A grid of grey-level images (levels 0..levels, 0 = black), each `h` x `w`, with a title.
pub fn sample_grid(path: &Path, title: &str, images: &[Vec<u8>], shape: (usize, usize), levels: usize) -> Result<()> {
    panels(path, title, &[("", grey(images, levels))], shape)
}

/// Real images beside samples (the chapter's Fig. 2.4 a and b): two labelled grids.
pub fn real_and_samples(
    path: &Path,
    title: &str,
    real: &[Vec<u8>],
    samples: &[Vec<u8>],
    shape: (usize, usize),
    levels: usize,
) -> Result<()> {
    panels(path, title, &[("test images", grey(real, levels)), ("samples", grey(samples, levels))], shape)
}

/// Pixel orderings as heat maps of each pixel's rank (viridis: dark first, yellow last), one
/// labelled panel each.
pub fn ordering_maps(path: &Path, title: &str, orderings: &[(String, Vec<usize>)], shape: (usize, usize)) -> Result<()> {
    use plotters::style::colors::colormaps::{ColorMap, ViridisRGB};
    let last = (shape.0 * shape.1).saturating_sub(1).max(1) as f64;
    let maps: Vec<(&str, Vec<Vec<RGBColor>>)> = orderings
        .iter()
        .map(|(name, rank)| (name.as_str(), vec![rank.iter().map(|&r| ViridisRGB.get_color(r as f64 / last)).collect()]))
        .collect();
    panels(path, title, &maps, shape)
}

fn grey(images: &[Vec<u8>], levels: usize) -> Vec<Vec<RGBColor>> {
    let scale = 255.0 / (levels.max(2) - 1) as f64;
    let g = |v: u8| {
        let g = (v as f64 * scale).round().clamp(0.0, 255.0) as u8;
        RGBColor(g, g, g)
    };
    images.iter().map(|img| img.iter().map(|&v| g(v)).collect()).collect()
}

/// Grids of images (a colour per pixel) side by side, each under its label (no label row when
/// every label is empty).
fn panels(path: &Path, title: &str, grids: &[(&str, Vec<Vec<RGBColor>>)], (h, w): (usize, usize)) -> Result<()> {
    register_font();
    if grids.is_empty() || grids.iter().any(|(_, g)| g.is_empty()) {
        return Err(anyhow!("plot {}: no images", path.display()));
    }
    let n = grids.iter().map(|(_, g)| g.len()).max().unwrap_or(1);
    let cols = (n as f64).sqrt().ceil() as usize;
    let rows = n.div_ceil(cols);
    let cell = (256 / h.max(w)).clamp(4, 16) as u32; // screen pixels per image pixel
    let gap = 2u32;
    let title_h = 34u32;
    let label_h = if grids.iter().any(|(l, _)| !l.is_empty()) { 22u32 } else { 0 };
    let panel_w = (cols as u32 * (w as u32 * cell + gap) + gap).max(if label_h > 0 { 90 } else { 0 });
    let panel_gap = 12u32;
    let width = grids.len() as u32 * (panel_w + panel_gap) - panel_gap;
    let height = rows as u32 * (h as u32 * cell + gap) + gap + title_h + label_h;
    atomic_write_with(path, |tmp| {
        let tmp_png = tmp.with_extension("png");
        {
            let root = BitMapBackend::new(&tmp_png, (width.max(240), height)).into_drawing_area();
            root.fill(&RGBColor(200, 200, 200)).map_err(err)?;
            root.draw(&Text::new(title.to_string(), (gap as i32 + 4, 8), (FAMILY, 18).into_font())).map_err(err)?;
            for (k, (label, images)) in grids.iter().enumerate() {
                let px0 = k as u32 * (panel_w + panel_gap);
                if !label.is_empty() {
                    let at = ((px0 + gap + 4) as i32, (title_h + 2) as i32);
                    root.draw(&Text::new(label.to_string(), at, (FAMILY, 15).into_font())).map_err(err)?;
                }
                for (n, img) in images.iter().enumerate() {
                    let (r, c) = (n / cols, n % cols);
                    let ox = (px0 + gap + c as u32 * (w as u32 * cell + gap)) as i32;
                    let oy = (title_h + label_h + gap + r as u32 * (h as u32 * cell + gap)) as i32;
                    for (i, &colour) in img.iter().enumerate() {
                        let (py, px) = ((i / w) as i32, (i % w) as i32);
                        let (x, y) = (ox + px * cell as i32, oy + py * cell as i32);
                        root.draw(&Rectangle::new([(x, y), (x + cell as i32, y + cell as i32)], colour.filled()))
                            .map_err(err)?;
                    }
                }
            }
            root.present().map_err(err)?;
        }
        std::fs::rename(&tmp_png, tmp)?;
        Ok(())
    })
}
