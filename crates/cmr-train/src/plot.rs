//! `curves.png`: training and validation loss, and validation Dice, per epoch.
//!
//! Drawn with `plotters` into a buffer, encoded as PNG and written atomically.
//! Text needs a TrueType font, which the binary registers once
//! ([`register_font`], from the paths it chooses); without one the curves
//! are drawn without labels.

use std::io::Cursor;
use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::error::{Result, TrainError};
use crate::log::EpochRecord;

/// Whether [`register_font`] found a font (set once per process: the
/// plotting library's fonts are process-wide).
static FONT: OnceLock<bool> = OnceLock::new();

/// Register the first readable TrueType font of `candidates` as the curves'
/// sans-serif font (the first call decides; later ones return its answer).
/// Returns whether one was found.
pub fn register_font(candidates: &[std::path::PathBuf]) -> bool {
    *FONT.get_or_init(|| {
        for path in candidates {
            if let Ok(bytes) = std::fs::read(path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        tracing::debug!("no TrueType font found: curves are drawn without labels");
        false
    })
}

fn font_available() -> bool {
    FONT.get().copied().unwrap_or(false)
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(format!("cannot draw curves: {e}")),
    }
}

type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// Pixels right of each panel's plot for its legend (outside the data).
const LEGEND_WIDTH: u32 = 120;

/// One panel: `series` over the epochs, a dashed vertical line at `marker`
/// (the best epoch) when given, the legend right of the plot.
fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    epochs: f64,
    y: std::ops::Range<f64>,
    series: &[Series],
    marker: Option<f64>,
    text: bool,
) -> std::result::Result<(), String> {
    let (width, _) = area.dim_in_pixel();
    let mut builder = ChartBuilder::on(area);
    builder.margin(10).margin_right(if text { LEGEND_WIDTH } else { 10 });
    if text {
        builder
            .caption(title, ("sans-serif", 18))
            .x_label_area_size(34)
            .y_label_area_size(56);
    }
    let mut chart = builder
        .build_cartesian_2d(1f64..epochs.max(2.0), y.clone())
        .map_err(|e| e.to_string())?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("epoch")
            .x_labels(8)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_labels(6)
            .label_style(("sans-serif", 13))
            .light_line_style(RGBColor(235, 235, 235));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| e.to_string())?;
    // the legend's entries, drawn right of the plot
    let mut entries: Vec<(String, ShapeStyle)> = Vec::new();
    if let Some(best) = marker {
        let dashes = (0..20).map(|i| {
            let t = |k: f64| y.start + (y.end - y.start) * k / 20.0;
            PathElement::new(vec![(best, t(i as f64)), (best, t(i as f64 + 0.5))], BLACK.mix(0.6))
        });
        chart.draw_series(dashes).map_err(|e| e.to_string())?;
        entries.push((format!("best: epoch {best}"), BLACK.mix(0.6).into()));
    }
    for (name, colour, points) in series {
        if points.is_empty() {
            continue;
        }
        let colour = *colour;
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
            .map_err(|e| e.to_string())?;
        entries.push((name.to_string(), colour.stroke_width(3)));
        if let Some(best) = marker
            && let Some(&(bx, by)) = points.iter().find(|p| p.0 == best)
        {
            chart
                .draw_series(std::iter::once(Circle::new((bx, by), 4, colour.filled())))
                .map_err(|e| e.to_string())?;
        }
    }
    if text {
        let x0 = width as i32 - LEGEND_WIDTH as i32 + 8;
        for (i, (name, style)) in entries.iter().enumerate() {
            let y = 44 + 20 * i as i32;
            area.draw(&PathElement::new(vec![(x0, y), (x0 + 18, y)], *style))
                .map_err(|e| e.to_string())?;
            area.draw(&Text::new(
                name.clone(),
                (x0 + 24, y - 7),
                ("sans-serif", 13).into_font().color(&BLACK),
            ))
            .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// The panels' size.
const PANEL: (u32, u32) = (560, 340);

/// Draw the training curves of `records` into `path` (PNG, atomic), four
/// panels: loss (training and validation), validation Dice per class and
/// mean, the learning rate, and the seconds per epoch; the best epoch (the
/// highest mean validation Dice) marked in the first two.
pub fn draw_curves(path: &Path, records: &[EpochRecord]) -> Result<()> {
    let (w, h) = (2 * PANEL.0, 2 * PANEL.1);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let text = font_available();
    let epochs = records.last().map_or(1.0, |r| r.epoch as f64);
    let pts = |f: &dyn Fn(&EpochRecord) -> Option<f64>| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter_map(|r| f(r).map(|v| (r.epoch as f64, v)))
            .collect()
    };
    let train = pts(&|r| Some(r.train_loss));
    let val = pts(&|r| r.val_loss);
    let max_loss = train.iter().chain(&val).map(|p| p.1).fold(0.0f64, f64::max).max(1e-3) * 1.05;
    let best = records
        .iter()
        .filter_map(|r| r.val_mean_dice.map(|d| (r.epoch as f64, d)))
        .fold(None, |b: Option<(f64, f64)>, (e, d)| match b {
            Some((_, bd)) if bd >= d => b,
            _ => Some((e, d)),
        })
        .map(|(e, _)| e);
    // the overlays' colour-blind-safe palette for the classes
    let class = |c: usize| {
        let [r, g, b] = cmr_data::CLASS_COLOURS[c];
        RGBColor(r, g, b)
    };
    let loss_series = [
        ("training", RGBColor(0, 114, 178), train),
        ("validation", RGBColor(213, 94, 0), val),
    ];
    let dice_series = [
        ("mean", BLACK, pts(&|r| r.val_mean_dice)),
        ("RV", class(1), pts(&|r| r.val_dice.map(|d| d[0]))),
        ("Myo", class(2), pts(&|r| r.val_dice.map(|d| d[1]))),
        ("LV", class(3), pts(&|r| r.val_dice.map(|d| d[2]))),
    ];
    let lr = pts(&|r| Some(r.lr));
    let max_lr = lr.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let seconds = pts(&|r| Some(r.seconds));
    let max_s = seconds.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-3) * 1.1;
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let areas = root.split_evenly((2, 2));
        let err = |e| plot_err(path, e);
        panel(&areas[0], "loss", epochs, 0.0..max_loss, &loss_series, best, text).map_err(err)?;
        panel(&areas[1], "validation Dice", epochs, 0.0..1.0, &dice_series, best, text).map_err(err)?;
        let lr_series = [("learning rate", RGBColor(0, 114, 178), lr)];
        panel(&areas[2], "learning rate", epochs, 0.0..max_lr, &lr_series, None, text).map_err(err)?;
        let s_series = [("seconds", RGBColor(204, 121, 167), seconds)];
        panel(
            &areas[3],
            "seconds per epoch",
            epochs,
            0.0..max_s,
            &s_series,
            None,
            text,
        )
        .map_err(err)?;
        root.present().map_err(|e| plot_err(path, e))?;
    }
    let mut png = Vec::new();
    image::RgbImage::from_raw(w, h, buf)
        .expect("buffer holds w × h RGB pixels")
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| plot_err(path, e))?;
    cmr_data::write_atomic(path, &png)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png() {
        let records: Vec<EpochRecord> = (1..=5)
            .map(|e| EpochRecord {
                epoch: e,
                lr: 1e-3,
                train_loss: 1.0 / e as f64,
                val_loss: Some(1.2 / e as f64),
                val_dice: Some([0.5, 0.6, 0.7]),
                val_mean_dice: Some(0.6),
                seconds: 1.0,
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.png");
        draw_curves(&p, &records).unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (2 * PANEL.0, 2 * PANEL.1));
        // something other than white was drawn
        assert!(img.pixels().filter(|px| px.0 != [255, 255, 255]).count() > 1000);
    }
}
