//! `report.html`: what an evaluation found, as one self-contained page (every
//! picture inlined as a data URI, no script or style from the network, opens
//! from disk): the summary per class with the metrics' definitions, a box
//! plot of each class's Dice over the images, the pixel confusion matrix, and
//! a gallery of every slice (image | truth | prediction | errors) with its
//! Dice, worst first. A few lines of script at the end count the pictures
//! that failed to load and the gallery's entries into `data-` attributes of
//! the page, which the browser test reads.

use std::fmt::Write as _;
use std::path::Path;

use cmr_data::{CLASS_COLOURS, Image, Mask, OverlayMode, OverlayStyle, Rgb, compose, encode_png};
use cmr_loss::{ImageMetrics, MetricsReport};

use crate::error::{Result, TrainError};

/// One evaluated slice: its image, truth and prediction at the image's size.
#[derive(Clone, Debug)]
pub struct Slice {
    pub id: String,
    pub image: Image,
    pub truth: Mask,
    pub prediction: Mask,
}

/// Errors: a foreground predicted on background, background predicted on a
/// foreground, one foreground class for another (Okabe–Ito reddish purple,
/// yellow, orange).
const FALSE_POSITIVE: [u8; 3] = [204, 121, 167];
const FALSE_NEGATIVE: [u8; 3] = [240, 228, 66];
const WRONG_CLASS: [u8; 3] = [230, 159, 0];

const CLASSES: [&str; 4] = ["background", "RV", "Myo", "LV"];

/// The error map of one slice, upscaled as the overlays are.
fn error_map(s: &Slice, scale: usize) -> Rgb {
    let (w, h) = (s.image.width() * scale, s.image.height() * scale);
    let mut pixels = Vec::with_capacity(w * h);
    for y in 0..h {
        for x in 0..w {
            let i = (y / scale) * s.image.width() + x / scale;
            let (t, p) = (s.truth.data()[i], s.prediction.data()[i]);
            let g = s.image.data()[i] / 2; // dimmed, so the errors stand out
            pixels.push(match (t, p) {
                _ if t == p => [g, g, g],
                (0, _) => FALSE_POSITIVE,
                (_, 0) => FALSE_NEGATIVE,
                _ => WRONG_CLASS,
            });
        }
    }
    Rgb {
        width: w,
        height: h,
        pixels,
    }
}

/// The four panels of a slice side by side, 2 white pixels apart.
fn gallery_picture(s: &Slice) -> Rgb {
    let style = OverlayStyle {
        mode: OverlayMode::Fill,
        scale: 2,
        legend: false,
    };
    // the image alone: the drawing of an all-background mask
    let empty = s.prediction.map(|_| 0);
    let panels = [
        compose(&s.image, &empty, None, style),
        compose(&s.image, &s.truth, None, style),
        compose(&s.image, &s.prediction, None, style),
        error_map(s, 2),
    ];
    let gap = 2;
    let width = panels.iter().map(|p| p.width).sum::<usize>() + gap * (panels.len() - 1);
    let height = panels[0].height;
    let mut pixels = vec![[255u8; 3]; width * height];
    let mut x0 = 0;
    for p in &panels {
        for y in 0..p.height {
            for x in 0..p.width {
                pixels[y * width + x0 + x] = p.pixels[y * p.width + x];
            }
        }
        x0 += p.width + gap;
    }
    Rgb { width, height, pixels }
}

/// `rgb` as a PNG data URI.
fn data_uri(rgb: &Rgb, page: &Path) -> Result<String> {
    let png = encode_png(rgb).map_err(|e| TrainError::Run {
        path: page.to_path_buf(),
        message: format!("cannot encode a picture: {e}"),
    })?;
    Ok(format!("data:image/png;base64,{}", base64(&png)))
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(TABLE[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// HTML-escaped text.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Quartiles (min, q1, median, q3, max) of `v` (not empty), linear
/// interpolation between order statistics.
fn quartiles(v: &[f64]) -> [f64; 5] {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let q = |p: f64| {
        let pos = p * (s.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
    };
    [s[0], q(0.25), q(0.5), q(0.75), s[s.len() - 1]]
}

/// The box plots of each class's Dice, as inline SVG (x from 0 to 1).
fn box_plots(images: &[ImageMetrics]) -> String {
    let (w, row, left) = (640.0, 46.0, 60.0);
    let scale = |v: f64| left + v * (w - left - 20.0);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{}" role="img" aria-label="Dice per class">"#,
        3.0 * row + 30.0
    );
    for c in 0..3 {
        let values: Vec<f64> = images.iter().map(|m| m.dice[c]).collect();
        if values.is_empty() {
            continue;
        }
        let [mn, q1, md, q3, mx] = quartiles(&values);
        let y = c as f64 * row + 10.0;
        let [r, g, b] = CLASS_COLOURS[c + 1];
        let _ = write!(
            svg,
            r##"<text x="4" y="{ty}" font-size="13">{name}</text><line x1="{a}" y1="{m}" x2="{e}" y2="{m}" stroke="#444"/><rect x="{bx}" y="{y}" width="{bw}" height="26" fill="rgb({r},{g},{b})" fill-opacity="0.6" stroke="#222"/><line x1="{md}" y1="{y}" x2="{md}" y2="{y2}" stroke="#000" stroke-width="2"/>"##,
            ty = y + 17.0,
            name = CLASSES[c + 1],
            a = scale(mn),
            e = scale(mx),
            m = y + 13.0,
            bx = scale(q1),
            bw = (scale(q3) - scale(q1)).max(1.0),
            md = scale(md),
            y2 = y + 26.0,
        );
    }
    let axis = 3.0 * row + 14.0;
    for t in 0..=5 {
        let v = f64::from(t) / 5.0;
        let _ = write!(
            svg,
            r##"<line x1="{x}" y1="{a}" x2="{x}" y2="{b}" stroke="#888"/><text x="{tx}" y="{ty}" font-size="11">{v:.1}</text>"##,
            x = scale(v),
            a = axis - 4.0,
            b = axis,
            tx = scale(v) - 8.0,
            ty = axis + 13.0,
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The pixel confusion matrix: rows the truth, columns the prediction.
fn confusion(slices: &[Slice]) -> [[u64; 4]; 4] {
    let mut m = [[0u64; 4]; 4];
    for s in slices {
        for (&t, &p) in s.truth.data().iter().zip(s.prediction.data()) {
            if let (Some(row), true) = (m.get_mut(usize::from(t)), usize::from(p) < 4) {
                row[usize::from(p)] += 1;
            }
        }
    }
    m
}

/// What the page says about the evaluation (the command's settings).
#[derive(Clone, Debug)]
pub struct Header<'a> {
    pub model: &'a str,
    pub data: &'a str,
    pub settings: String,
}

/// Write `report.html` into `dir` (created if needed), atomically; its path.
/// `images[i]` are the metrics of `slices[i]`.
pub fn write(
    dir: &Path,
    header: &Header,
    report: &MetricsReport,
    images: &[ImageMetrics],
    slices: &[Slice],
) -> Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let path = dir.join("report.html");
    let mut html = String::new();
    let _ = write!(
        html,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cmr evaluation: {model}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #bbb; padding: 4px 10px; text-align: right; }}
th {{ background: #eee; }}
.gallery figure {{ margin: 0 0 1.2em 0; }}
figcaption {{ font-size: 0.9em; }}
.key span {{ display: inline-block; width: 1em; height: 1em; vertical-align: middle; margin: 0 4px 0 12px; }}
pre {{ background: #f6f6f6; padding: 0.8em; }}
</style></head>
<body data-broken="unknown" data-gallery="unknown">
<h1>Evaluation of {model}</h1>
<p>Data: {data}. {n} images. {settings}</p>
"#,
        model = esc(header.model),
        data = esc(header.data),
        n = report.images,
        settings = esc(&header.settings),
    );
    // summary
    html.push_str(
        "<h2>Summary</h2><table><tr><th>class</th><th>Dice</th><th>IoU</th><th>HD95 (px)</th><th>noise</th></tr>",
    );
    for c in &report.classes {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{:.4}</td><td>{:.4}</td><td>{:.2}</td><td>{:.2}</td></tr>",
            esc(&c.class),
            c.dice,
            c.iou,
            c.hd95,
            c.noise
        );
    }
    let _ = write!(
        html,
        "<tr><th>mean</th><th>{:.4}</th><th>{:.4}</th><th>{:.2}</th><th>{:.2} (sum)</th></tr></table><pre>{}</pre>",
        report.mean_dice,
        report.mean_iou,
        report.mean_hd95,
        report.noise_number,
        esc(cmr_loss::DEFINITIONS)
    );
    // box plots
    let _ = write!(html, "<h2>Dice per class over the images</h2>{}", box_plots(images));
    html.push_str("<p>Box: quartiles; line: median; whiskers: minimum and maximum.</p>");
    // confusion matrix
    let m = confusion(slices);
    html.push_str("<h2>Pixel confusion matrix</h2><p>Rows: the truth; columns: the prediction; each cell the share of the row's pixels (and the count).</p><table><tr><th>truth \\ prediction</th>");
    for name in CLASSES {
        let _ = write!(html, "<th>{name}</th>");
    }
    html.push_str("</tr>");
    for (t, row) in m.iter().enumerate() {
        let total = row.iter().sum::<u64>().max(1);
        let _ = write!(html, "<tr><th>{}</th>", CLASSES[t]);
        for &v in row {
            let share = v as f64 / total as f64;
            let shade = 255 - (share * 150.0) as u8;
            let _ = write!(
                html,
                r#"<td style="background: rgb({shade},{shade},255)">{:.1} % ({v})</td>"#,
                100.0 * share
            );
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>");
    // gallery, worst first
    let mut order: Vec<usize> = (0..slices.len()).collect();
    let mean = |i: usize| images.get(i).map_or(0.0, |m| m.dice.iter().sum::<f64>() / 3.0);
    order.sort_by(|&a, &b| mean(a).total_cmp(&mean(b)).then(a.cmp(&b)));
    html.push_str(r#"<h2>Every slice, worst first</h2><p class="key">image | truth | prediction | errors:"#);
    for (name, c) in [
        ("predicted on background", FALSE_POSITIVE),
        ("missed", FALSE_NEGATIVE),
        ("wrong class", WRONG_CLASS),
    ] {
        let _ = write!(
            html,
            r#"<span style="background: rgb({},{},{})"></span>{name}"#,
            c[0], c[1], c[2]
        );
    }
    for (i, name) in ["RV", "Myo", "LV"].iter().enumerate() {
        let [r, g, b] = CLASS_COLOURS[i + 1];
        let _ = write!(html, r#"<span style="background: rgb({r},{g},{b})"></span>{name}"#);
    }
    html.push_str("</p><div class=\"gallery\">");
    for i in order {
        let s = &slices[i];
        let dice = images.get(i).map(|m| m.dice).unwrap_or_default();
        let _ = write!(
            html,
            r#"<figure class="entry"><img src="{}" alt="{id}"><figcaption>{id}: mean Dice {:.3} (RV {:.3}, Myo {:.3}, LV {:.3})</figcaption></figure>"#,
            data_uri(&gallery_picture(s), &path)?,
            mean(i),
            dice[0],
            dice[1],
            dice[2],
            id = esc(&s.id),
        );
    }
    html.push_str(
        r#"</div>
<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; }).length;
  document.body.setAttribute("data-broken", String(broken));
  document.body.setAttribute("data-gallery", String(document.querySelectorAll(".gallery .entry").length));
});
</script>
</body></html>
"#,
    );
    cmr_data::write_atomic(&path, html.as_bytes())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_by_hand() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn quartiles_by_hand() {
        assert_eq!(quartiles(&[3.0, 1.0, 2.0, 4.0, 5.0]), [1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(quartiles(&[0.5]), [0.5; 5]);
    }
}
