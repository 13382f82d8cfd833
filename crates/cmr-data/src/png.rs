//! PNG decoding (images and masks, validated) and encoding (masks, overlays).

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageFormat};

use crate::atomic::write_atomic;
use crate::error::{DataError, Result};
use crate::plane::{Image, Mask, Plane};

/// Number of classes in a mask: background, RV, Myo, LV.
pub const NUM_CLASSES: usize = 4;

/// The widest and tallest image read (the slices are 96 × 96; a scan's
/// slice is rarely over 512): larger is an error before any pixel is
/// decoded, so that a small file claiming 20000 × 20000 costs nothing.
pub const MAX_SIDE: u32 = 4096;
/// The largest PNG file read.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// A decoded PNG, and whether it was stored with a palette.
struct Decoded {
    image: DynamicImage,
    palette: bool,
}

/// Decode the PNG at `path`, checking what `image` does not: the zlib
/// checksum of its pixel data (a flipped byte is an error, as in zlib and
/// PIL), the file size and the image's sides, before pixels are decoded.
fn decode(path: &Path) -> Result<Decoded> {
    use png::{BitDepth::Eight, BitDepth::Sixteen, ColorType};
    let bad = |message: String| DataError::Decode {
        path: path.to_path_buf(),
        message,
    };
    let size = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?.len();
    if size > MAX_FILE_BYTES {
        return Err(bad(format!(
            "the file has {size} bytes, more than the {MAX_FILE_BYTES} read"
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let mut options = png::DecodeOptions::default();
    options.set_ignore_adler32(false);
    let mut decoder = png::Decoder::new_with_options(Cursor::new(&bytes), options);
    // palettes and low bit depths to 8 bits, transparency to alpha
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().map_err(|e| bad(e.to_string()))?;
    let (width, height) = reader.info().size();
    if width > MAX_SIDE || height > MAX_SIDE {
        return Err(bad(format!(
            "{width}x{height} pixels: images are limited to {MAX_SIDE} pixels a side"
        )));
    }
    let palette = reader.info().color_type == ColorType::Indexed;
    let len = reader
        .output_buffer_size()
        .ok_or_else(|| bad(format!("{width}x{height} pixels do not fit in memory")))?;
    let mut buf = vec![0u8; len];
    let frame = reader.next_frame(&mut buf).map_err(|e| bad(e.to_string()))?;
    buf.truncate(frame.buffer_size());
    let wide = |b: &[u8]| -> Vec<u16> { b.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect() };
    let (w, h) = (frame.width, frame.height);
    let short = || bad("the decoder returned fewer pixels than the image has".to_string());
    let image = match (frame.color_type, frame.bit_depth) {
        (ColorType::Grayscale, Eight) => {
            DynamicImage::ImageLuma8(image::GrayImage::from_raw(w, h, buf).ok_or_else(short)?)
        }
        (ColorType::Grayscale, Sixteen) => {
            DynamicImage::ImageLuma16(image::ImageBuffer::from_raw(w, h, wide(&buf)).ok_or_else(short)?)
        }
        (ColorType::GrayscaleAlpha, Eight) => {
            DynamicImage::ImageLumaA8(image::ImageBuffer::from_raw(w, h, buf).ok_or_else(short)?)
        }
        (ColorType::GrayscaleAlpha, Sixteen) => {
            DynamicImage::ImageLumaA16(image::ImageBuffer::from_raw(w, h, wide(&buf)).ok_or_else(short)?)
        }
        (ColorType::Rgb, Eight) => DynamicImage::ImageRgb8(image::ImageBuffer::from_raw(w, h, buf).ok_or_else(short)?),
        (ColorType::Rgb, Sixteen) => {
            DynamicImage::ImageRgb16(image::ImageBuffer::from_raw(w, h, wide(&buf)).ok_or_else(short)?)
        }
        (ColorType::Rgba, Eight) => {
            DynamicImage::ImageRgba8(image::ImageBuffer::from_raw(w, h, buf).ok_or_else(short)?)
        }
        (ColorType::Rgba, Sixteen) => {
            DynamicImage::ImageRgba16(image::ImageBuffer::from_raw(w, h, wide(&buf)).ok_or_else(short)?)
        }
        (c, d) => return Err(bad(format!("unsupported colour type {c:?} at bit depth {d:?}"))),
    };
    Ok(Decoded { image, palette })
}

/// Read an image as 8-bit grayscale.
///
/// 8-bit grayscale is taken as it is. Anything else is converted with a warning:
/// 16-bit grayscale is scaled to 8 bits (`v / 257`, rounded), colour goes to luma
/// (Rec. 601 weights, as `image` does), an alpha channel is dropped.
pub fn read_image(path: &Path) -> Result<Image> {
    let decoded = decode(path)?.image;
    let (w, h) = (decoded.width() as usize, decoded.height() as usize);
    let data = match decoded {
        DynamicImage::ImageLuma8(img) => img.into_raw(),
        DynamicImage::ImageLuma16(img) => {
            tracing::warn!("{}: 16-bit grayscale image scaled to 8 bits", path.display());
            img.into_raw()
                .into_iter()
                .map(|v| ((u32::from(v) + 128) / 257) as u8)
                .collect()
        }
        other => {
            tracing::warn!(
                "{}: {:?} image converted to 8-bit grayscale",
                path.display(),
                other.color()
            );
            other.to_luma8().into_raw()
        }
    };
    Ok(Plane::from_vec(h, w, data).expect("decoder returns width × height pixels"))
}

/// Read a label mask: an 8-bit single-channel PNG with every value in 0..=3.
pub fn read_mask(path: &Path) -> Result<Mask> {
    let Decoded { image, palette } = decode(path)?;
    let DynamicImage::ImageLuma8(img) = image else {
        let found = if palette {
            "a palette (indexed-colour) PNG".to_string()
        } else {
            describe_colour(image.color())
        };
        return Err(DataError::MaskFormat {
            path: path.to_path_buf(),
            found,
        });
    };
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data = img.into_raw();
    if let Some(i) = data.iter().position(|&v| usize::from(v) >= NUM_CLASSES) {
        return Err(DataError::MaskValue {
            path: path.to_path_buf(),
            value: data[i],
            x: i % w,
            y: i / w,
        });
    }
    Ok(Plane::from_vec(h, w, data).expect("decoder returns width × height pixels"))
}

/// A colour type as people say it.
fn describe_colour(c: image::ColorType) -> String {
    use image::ColorType as C;
    match c {
        C::L8 => "8-bit grayscale",
        C::L16 => "16-bit grayscale",
        C::La8 => "8-bit grayscale with alpha",
        C::La16 => "16-bit grayscale with alpha",
        C::Rgb8 => "8-bit RGB colour",
        C::Rgb16 => "16-bit RGB colour",
        C::Rgba8 => "8-bit RGBA colour",
        C::Rgba16 => "16-bit RGBA colour",
        _ => return format!("{c:?}"),
    }
    .to_string()
}

fn encode_gray(path: &Path, plane: &Plane<u8>) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    image::GrayImage::from_raw(plane.width() as u32, plane.height() as u32, plane.data().to_vec())
        .expect("plane holds width × height pixels")
        .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
        .map_err(|source| DataError::Encode {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(bytes)
}

/// Write an 8-bit grayscale image as PNG, atomically.
pub fn write_image(path: &Path, image: &Image) -> Result<()> {
    let bytes = encode_gray(path, image)?;
    write_atomic(path, &bytes)
}

/// Write a mask as an 8-bit PNG with values 0..=3 (the competition's format),
/// atomically. Values above 3 are an error.
pub fn write_mask(path: &Path, mask: &Mask) -> Result<()> {
    if let Some(i) = mask.data().iter().position(|&v| usize::from(v) >= NUM_CLASSES) {
        return Err(DataError::MaskValue {
            path: path.to_path_buf(),
            value: mask.data()[i],
            x: i % mask.width(),
            y: i / mask.width(),
        });
    }
    write_image(path, mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.png");
        let mask = Plane::from_fn(5, 7, |y, x| ((y + x) % 4) as u8);
        write_mask(&path, &mask).unwrap();
        assert_eq!(read_mask(&path).unwrap(), mask);
    }

    #[test]
    fn writing_a_bad_mask_fails_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.png");
        let mask = Plane::from_fn(3, 3, |y, _| if y == 2 { 9 } else { 0 });
        let err = write_mask(&path, &mask).unwrap_err();
        assert!(matches!(err, DataError::MaskValue { value: 9, y: 2, .. }), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn sixteen_bit_and_rgb_images_become_gray() {
        let dir = tempfile::tempdir().unwrap();
        let p16 = dir.path().join("a.png");
        image::ImageBuffer::<image::Luma<u16>, _>::from_raw(2, 1, vec![0u16, 65535])
            .unwrap()
            .save(&p16)
            .unwrap();
        assert_eq!(read_image(&p16).unwrap().data(), &[0, 255]);
        let prgb = dir.path().join("b.png");
        image::RgbImage::from_raw(2, 1, vec![200, 200, 200, 255, 0, 0])
            .unwrap()
            .save(&prgb)
            .unwrap();
        let g = read_image(&prgb).unwrap();
        assert_eq!(g.get(0, 0), 200);
        // pure red has luma ≈ 0.2126·255 (sRGB weights used by `image`) or 0.299·255
        assert!((50..=80).contains(&g.get(0, 1)), "{}", g.get(0, 1));
    }

    /// CRC-32 of PNG chunks (ISO 3309), bit by bit.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in bytes {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 == 1 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }

    /// `png` with the data of its first chunk of type `kind` changed by
    /// `edit`, and that chunk's CRC fixed (so only deeper checks can tell).
    fn edit_chunk(png: &[u8], kind: &[u8; 4], edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
        let mut out = png.to_vec();
        let mut at = 8;
        while at + 12 <= out.len() {
            let len = u32::from_be_bytes(out[at..at + 4].try_into().unwrap()) as usize;
            if &out[at + 4..at + 8] == kind {
                edit(&mut out[at + 8..at + 8 + len]);
                let crc = crc32(&out[at + 4..at + 8 + len]);
                out[at + 8 + len..at + 12 + len].copy_from_slice(&crc.to_be_bytes());
                return out;
            }
            at += 12 + len;
        }
        panic!("no {kind:?} chunk")
    }

    #[test]
    fn a_corrupt_zlib_checksum_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.png");
        let mask = Plane::from_fn(16, 16, |y, x| ((y * 3 + x) % 4) as u8);
        write_mask(&good, &mask).unwrap();
        assert_eq!(read_mask(&good).unwrap(), mask);
        // the last byte of the image data is the zlib stream's Adler-32
        let bytes = edit_chunk(&std::fs::read(&good).unwrap(), b"IDAT", |d| {
            let last = d.len() - 1;
            d[last] ^= 0x40;
        });
        let bad = dir.path().join("bad.png");
        std::fs::write(&bad, bytes).unwrap();
        let err = read_mask(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.png") && err.contains("cannot decode PNG"), "{err}");
        assert!(read_image(&bad).is_err());
    }

    #[test]
    fn a_huge_image_is_refused_before_decoding() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("s.png");
        write_mask(&small, &Plane::from_fn(2, 2, |_, _| 0)).unwrap();
        let huge = edit_chunk(&std::fs::read(&small).unwrap(), b"IHDR", |d| {
            d[0..4].copy_from_slice(&20_000u32.to_be_bytes());
            d[4..8].copy_from_slice(&20_000u32.to_be_bytes());
        });
        let path = dir.path().join("huge.png");
        std::fs::write(&path, huge).unwrap();
        let err = read_image(&path).unwrap_err().to_string();
        assert!(
            err.contains("huge.png") && err.contains("20000x20000") && err.contains("4096"),
            "{err}"
        );
    }

    #[test]
    fn a_palette_mask_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        let file = std::fs::File::create(&path).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), 2, 2);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(vec![0, 0, 0, 255, 0, 0]);
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[0, 1, 1, 0]).unwrap();
        w.finish().unwrap();
        let err = read_mask(&path).unwrap_err().to_string();
        assert!(err.contains("palette") && !err.contains("Rgb8"), "{err}");
        // as an image it is colour, converted to gray
        assert_eq!(read_image(&path).unwrap().get(0, 0), 0);
        let rgb = dir.path().join("c.png");
        image::RgbImage::from_raw(1, 1, vec![1, 2, 3])
            .unwrap()
            .save(&rgb)
            .unwrap();
        let err = read_mask(&rgb).unwrap_err().to_string();
        assert!(err.contains("found 8-bit RGB colour"), "{err}");
    }
}
