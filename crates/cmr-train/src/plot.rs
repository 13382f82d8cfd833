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

fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    epochs: f64,
    y: std::ops::Range<f64>,
    series: &[Series],
    text: bool,
) -> std::result::Result<(), String> {
    let mut builder = ChartBuilder::on(area);
    builder.margin(12);
    if text {
        builder
            .caption(title, ("sans-serif", 18))
            .x_label_area_size(32)
            .y_label_area_size(48);
    }
    let mut chart = builder
        .build_cartesian_2d(1f64..epochs.max(2.0), y)
        .map_err(|e| e.to_string())?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("epoch");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| e.to_string())?;
    for (name, colour, points) in series {
        if points.is_empty() {
            continue;
        }
        let colour = *colour;
        let s = chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
            .map_err(|e| e.to_string())?;
        if text {
            s.label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Draw the loss and Dice curves of `records` into `path` (PNG, atomic).
pub fn draw_curves(path: &Path, records: &[EpochRecord]) -> Result<()> {
    let (w, h) = (1000u32, 420u32);
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
    let loss_series = [("train loss", BLUE, train), ("val loss", RED, val)];
    let dice_series = [
        ("mean", BLACK, pts(&|r| r.val_mean_dice)),
        ("RV", RGBColor(230, 60, 60), pts(&|r| r.val_dice.map(|d| d[0]))),
        ("Myo", RGBColor(40, 160, 70), pts(&|r| r.val_dice.map(|d| d[1]))),
        ("LV", RGBColor(70, 120, 240), pts(&|r| r.val_dice.map(|d| d[2]))),
    ];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let (left, right) = root.split_horizontally(w / 2);
        panel(&left, "loss", epochs, 0.0..max_loss, &loss_series, text).map_err(|e| plot_err(path, e))?;
        panel(&right, "validation Dice", epochs, 0.0..1.0, &dice_series, text).map_err(|e| plot_err(path, e))?;
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
        assert_eq!(img.dimensions(), (1000, 420));
        // something other than white was drawn
        assert!(img.pixels().filter(|px| px.0 != [255, 255, 255]).count() > 1000);
    }
}
