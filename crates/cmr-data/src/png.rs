//! PNG decoding (images and masks, validated) and encoding (masks, overlays).

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageFormat, ImageReader};

use crate::atomic::write_atomic;
use crate::error::{DataError, Result};
use crate::plane::{Image, Mask, Plane};

/// Number of classes in a mask: background, RV, Myo, LV.
pub const NUM_CLASSES: usize = 4;

fn decode(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    ImageReader::with_format(Cursor::new(bytes), ImageFormat::Png)
        .decode()
        .map_err(|source| DataError::Decode {
            path: path.to_path_buf(),
            source,
        })
}

/// Read an image as 8-bit grayscale.
///
/// 8-bit grayscale is taken as it is. Anything else is converted with a warning:
/// 16-bit grayscale is scaled to 8 bits (`v / 257`, rounded), colour goes to luma
/// (Rec. 601 weights, as `image` does), an alpha channel is dropped.
pub fn read_image(path: &Path) -> Result<Image> {
    let decoded = decode(path)?;
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
    let decoded = decode(path)?;
    let DynamicImage::ImageLuma8(img) = decoded else {
        return Err(DataError::MaskFormat {
            path: path.to_path_buf(),
            found: format!("{:?}", decoded.color()),
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

/// Tint of each foreground class in overlays: RV red, Myo green, LV blue.
pub const CLASS_COLOURS: [[u8; 3]; NUM_CLASSES] = [[0, 0, 0], [230, 60, 60], [60, 200, 80], [70, 120, 240]];

/// Blend the class colours into a grayscale image (`alpha` of the colour where a
/// class is present), giving RGB pixels, row-major.
pub fn overlay(image: &Image, mask: &Mask, alpha: f32) -> Vec<[u8; 3]> {
    image
        .data()
        .iter()
        .zip(mask.data())
        .map(|(&g, &c)| {
            let c = usize::from(c);
            if c == 0 || c >= NUM_CLASSES {
                [g, g, g]
            } else {
                let tint = CLASS_COLOURS[c];
                let g = f32::from(g);
                tint.map(|t| (g * (1.0 - alpha) + f32::from(t) * alpha).round() as u8)
            }
        })
        .collect()
}

/// Write a colour overlay PNG (image with RV, Myo and LV tinted), atomically.
/// `image` and `mask` must have the same size.
pub fn write_overlay(path: &Path, image: &Image, mask: &Mask) -> Result<()> {
    if image.size() != mask.size() {
        return Err(DataError::SizeMismatch {
            image: path.to_path_buf(),
            mask: path.to_path_buf(),
            image_size: (image.width(), image.height()),
            mask_size: (mask.width(), mask.height()),
        });
    }
    let rgb: Vec<u8> = overlay(image, mask, 0.45).into_iter().flatten().collect();
    let mut bytes = Vec::new();
    image::RgbImage::from_raw(image.width() as u32, image.height() as u32, rgb)
        .expect("overlay holds width × height pixels")
        .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
        .map_err(|source| DataError::Encode {
            path: path.to_path_buf(),
            source,
        })?;
    write_atomic(path, &bytes)
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

    #[test]
    fn overlay_tints_only_foreground() {
        let img = Plane::from_vec(1, 2, vec![100u8, 100]).unwrap();
        let mask = Plane::from_vec(1, 2, vec![0u8, 1]).unwrap();
        let rgb = overlay(&img, &mask, 0.5);
        assert_eq!(rgb[0], [100, 100, 100]);
        assert_eq!(rgb[1], [165, 80, 80]);
    }
}
