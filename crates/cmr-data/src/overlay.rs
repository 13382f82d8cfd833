//! Overlays people look at: the image upscaled (nearest neighbour, so that
//! every pixel of the mask stays a visible block), RV, Myo and LV tinted or
//! outlined in the colour-blind-safe Okabe–Ito palette, a legend under it, and
//! the ground truth beside the prediction when it is known.

use std::io::Cursor;
use std::path::Path;

use image::ImageFormat;

use crate::atomic::write_atomic;
use crate::error::{DataError, Result};
use crate::plane::{Image, Mask};

/// RV, Myo and LV in Okabe and Ito's palette for colour-blind readers
/// (vermillion, bluish green, sky blue); index 0, the background, is unused.
pub const CLASS_COLOURS: [[u8; 3]; 4] = [[0, 0, 0], [213, 94, 0], [0, 158, 115], [86, 180, 233]];

/// The class names the legend writes.
const NAMES: [&str; 3] = ["RV", "Myo", "LV"];

/// How the classes are drawn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OverlayMode {
    /// The class colour blended into the image over the whole region.
    #[default]
    Fill,
    /// Only each region's boundary, one output pixel wide, in full colour.
    Outline,
}

/// How an overlay is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverlayStyle {
    pub mode: OverlayMode,
    /// Output pixels per image pixel (nearest neighbour), at least 1.
    pub scale: usize,
    /// A legend strip (class colours and names) under the image.
    pub legend: bool,
}

impl Default for OverlayStyle {
    fn default() -> Self {
        Self {
            mode: OverlayMode::Fill,
            scale: 4,
            legend: true,
        }
    }
}

/// An RGB picture, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<[u8; 3]>,
}

impl Rgb {
    fn filled(width: usize, height: usize, colour: [u8; 3]) -> Self {
        Self {
            width,
            height,
            pixels: vec![colour; width * height],
        }
    }

    fn put(&mut self, x: usize, y: usize, colour: [u8; 3]) {
        if x < self.width && y < self.height {
            self.pixels[y * self.width + x] = colour;
        }
    }

    /// `other` copied in with its top-left corner at `(x0, y0)`.
    fn paste(&mut self, other: &Rgb, x0: usize, y0: usize) {
        for y in 0..other.height {
            for x in 0..other.width {
                self.put(x0 + x, y0 + y, other.pixels[y * other.width + x]);
            }
        }
    }
}

/// Alpha of the class colour where a region is filled.
const FILL_ALPHA: f32 = 0.45;

/// The image upscaled with the mask drawn over it as `style` says (no
/// legend). `image` and `mask` have the same size.
pub fn draw(image: &Image, mask: &Mask, style: OverlayStyle) -> Rgb {
    let s = style.scale.max(1);
    let (w, h) = (image.width() * s, image.height() * s);
    let label = |x: usize, y: usize| mask.data()[(y / s) * mask.width() + x / s];
    let mut out = Rgb::filled(w, h, [0, 0, 0]);
    for y in 0..h {
        for x in 0..w {
            let g = image.data()[(y / s) * image.width() + x / s];
            let c = usize::from(label(x, y));
            let grey = [g, g, g];
            let colour = if c == 0 || c >= CLASS_COLOURS.len() {
                grey
            } else {
                let tint = CLASS_COLOURS[c];
                match style.mode {
                    OverlayMode::Fill => {
                        tint.map(|t| (f32::from(g) * (1.0 - FILL_ALPHA) + f32::from(t) * FILL_ALPHA).round() as u8)
                    }
                    OverlayMode::Outline => {
                        // a boundary pixel: a 4-neighbour of another class, or the edge
                        let edge = x == 0 || y == 0 || x + 1 == w || y + 1 == h;
                        let differs = edge
                            || usize::from(label(x - 1, y)) != c
                            || usize::from(label(x + 1, y)) != c
                            || usize::from(label(x, y - 1)) != c
                            || usize::from(label(x, y + 1)) != c;
                        if differs { tint } else { grey }
                    }
                }
            };
            out.pixels[y * w + x] = colour;
        }
    }
    out
}

/// Pixel glyphs (5 wide, 7 high, one row per byte, high bit first) of the
/// letters the legend needs.
fn glyph(c: char) -> [u8; 7] {
    match c {
        'R' => [0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001],
        'V' => [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100],
        'M' => [0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001],
        'y' => [0b00000, 0b00000, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110],
        'o' => [0b00000, 0b00000, 0b01110, 0b10001, 0b10001, 0b10001, 0b01110],
        'L' => [0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111],
        _ => [0; 7],
    }
}

/// `text` at `(x0, y0)`, each glyph pixel `k × k` output pixels.
fn write_text(out: &mut Rgb, text: &str, x0: usize, y0: usize, k: usize, colour: [u8; 3]) -> usize {
    let mut x = x0;
    for c in text.chars() {
        let rows = glyph(c);
        for (gy, row) in rows.iter().enumerate() {
            for gx in 0..5 {
                if row & (0b10000 >> gx) != 0 {
                    for dy in 0..k {
                        for dx in 0..k {
                            out.put(x + gx * k + dx, y0 + gy * k + dy, colour);
                        }
                    }
                }
            }
        }
        x += 6 * k;
    }
    x
}

/// A legend strip `width` wide: for each class a swatch of its colour and
/// its name, white on black.
fn legend(width: usize, k: usize) -> Rgb {
    let height = 11 * k;
    let mut out = Rgb::filled(width, height, [0, 0, 0]);
    let mut x = 2 * k;
    for (i, name) in NAMES.iter().enumerate() {
        for y in 2 * k..9 * k {
            for dx in 0..7 * k {
                out.put(x + dx, y, CLASS_COLOURS[i + 1]);
            }
        }
        x = write_text(&mut out, name, x + 9 * k, 2 * k, k, [255, 255, 255]) + 4 * k;
    }
    out
}

/// The overlay of `prediction` on `image` and, when `truth` is given, the
/// truth's overlay to its left (truth | prediction, a 2-pixel gap), with the
/// legend under both when the style asks for it.
pub fn compose(image: &Image, prediction: &Mask, truth: Option<&Mask>, style: OverlayStyle) -> Rgb {
    let pred = draw(image, prediction, style);
    let panels: Vec<Rgb> = match truth {
        Some(t) => vec![draw(image, t, style), pred],
        None => vec![pred],
    };
    let gap = 2;
    let width = panels.iter().map(|p| p.width).sum::<usize>() + gap * (panels.len() - 1);
    // the legend's letters grow with the upscaling, within the width
    let k = (style.scale / 2).clamp(1, 3).min((width / 60).max(1));
    let strip = style.legend.then(|| legend(width, k));
    let height = panels[0].height + strip.as_ref().map_or(0, |l| l.height);
    let mut out = Rgb::filled(width, height, [255, 255, 255]);
    let mut x = 0;
    for p in &panels {
        out.paste(p, x, 0);
        x += p.width + gap;
    }
    if let Some(l) = &strip {
        out.paste(l, 0, panels[0].height);
    }
    out
}

/// Write `image` with `prediction` (and `truth`) drawn as `style` says, as
/// an RGB PNG, atomically.
pub fn write_overlay_styled(
    path: &Path,
    image: &Image,
    prediction: &Mask,
    truth: Option<&Mask>,
    style: OverlayStyle,
) -> Result<()> {
    for m in std::iter::once(prediction).chain(truth) {
        if image.size() != m.size() {
            return Err(DataError::SizeMismatch {
                image: path.to_path_buf(),
                mask: path.to_path_buf(),
                image_size: (image.width(), image.height()),
                mask_size: (m.width(), m.height()),
            });
        }
    }
    let png = encode_png(&compose(image, prediction, truth, style)).map_err(|source| DataError::Encode {
        path: path.to_path_buf(),
        source,
    })?;
    write_atomic(path, &png)
}

/// `rgb` as PNG bytes.
pub fn encode_png(rgb: &Rgb) -> std::result::Result<Vec<u8>, image::ImageError> {
    let bytes: Vec<u8> = rgb.pixels.iter().flatten().copied().collect();
    let mut png = Vec::new();
    image::RgbImage::from_raw(rgb.width as u32, rgb.height as u32, bytes)
        .expect("an Rgb holds width × height pixels")
        .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)?;
    Ok(png)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plane::Plane;

    fn pair() -> (Image, Mask) {
        let image = Plane::from_fn(6, 8, |y, x| (10 * (y + x)) as u8);
        // an LV square inside a Myo ring, RV beside
        let mask = Plane::from_fn(6, 8, |y, x| match (y, x) {
            (2..=3, 2..=3) => 3,
            (1..=4, 1..=4) => 2,
            (1..=4, 6) => 1,
            _ => 0,
        });
        (image, mask)
    }

    /// Upscaled by nearest neighbour: each mask pixel a `scale × scale` block
    /// of one colour; background pixels stay grey.
    #[test]
    fn fill_upscales_by_blocks() {
        let (image, mask) = pair();
        let style = OverlayStyle {
            legend: false,
            ..OverlayStyle::default()
        };
        let out = draw(&image, &mask, style);
        assert_eq!((out.width, out.height), (32, 24));
        for y in 0..24 {
            for x in 0..32 {
                let px = out.pixels[y * 32 + x];
                assert_eq!(px, out.pixels[(y / 4 * 4) * 32 + x / 4 * 4], "block at {x},{y}");
                if mask.data()[(y / 4) * 8 + x / 4] == 0 {
                    let g = image.data()[(y / 4) * 8 + x / 4];
                    assert_eq!(px, [g, g, g]);
                }
            }
        }
        // the LV block is tinted towards sky blue
        let lv = out.pixels[(2 * 4) * 32 + 2 * 4];
        assert!(lv[2] > lv[0], "{lv:?}");
    }

    /// Outline: a region's inner pixels are the image's grey, its boundary
    /// the class colour exactly.
    #[test]
    fn outline_draws_boundaries_only() {
        let (image, mask) = pair();
        let style = OverlayStyle {
            mode: OverlayMode::Outline,
            scale: 4,
            legend: false,
        };
        let out = draw(&image, &mask, style);
        let at = |x: usize, y: usize| out.pixels[y * 32 + x];
        // LV square covers output 8..16: its edge is blue, its middle grey
        assert_eq!(at(8, 10), CLASS_COLOURS[3]);
        let g = image.data()[2 * 8 + 2];
        assert_eq!(at(10, 10), [g, g, g]);
    }

    /// The composed picture: truth | gap | prediction, then a legend whose
    /// swatches carry the three class colours.
    #[test]
    fn composed_with_truth_and_legend() {
        let (image, mask) = pair();
        let out = compose(&image, &mask, Some(&mask), OverlayStyle::default());
        assert_eq!(out.width, 32 + 2 + 32);
        assert!(out.height > 24);
        let legend = &out.pixels[24 * out.width..];
        for c in &CLASS_COLOURS[1..] {
            assert!(legend.contains(c), "the legend shows {c:?}");
        }
        // the two panels are the same drawing
        for y in 0..24 {
            assert_eq!(
                out.pixels[y * out.width..y * out.width + 32],
                out.pixels[y * out.width + 34..y * out.width + 66]
            );
        }
        // and the gap is white
        assert_eq!(out.pixels[5 * out.width + 32], [255, 255, 255]);
    }
}
