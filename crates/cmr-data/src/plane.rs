//! A 2-D single-channel pixel plane, and centre pad/crop to a square size.

use serde::{Deserialize, Serialize};

/// A row-major `height × width` plane of pixels: an image (`u8` or `f32`
/// intensities) or a label mask (`u8` class ids).
#[derive(Clone, Debug, PartialEq)]
pub struct Plane<T> {
    width: usize,
    height: usize,
    data: Vec<T>,
}

/// An 8-bit grayscale image.
pub type Image = Plane<u8>;
/// A label mask: 0 background, 1 RV, 2 Myo, 3 LV.
pub type Mask = Plane<u8>;

/// Height and width of a plane, in that order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Size {
    pub height: usize,
    pub width: usize,
}

impl<T: Copy + Default> Plane<T> {
    /// A plane filled with `T::default()`.
    pub fn zeros(height: usize, width: usize) -> Self {
        Self {
            width,
            height,
            data: vec![T::default(); width * height],
        }
    }
}

impl<T: Copy> Plane<T> {
    /// Wrap row-major `data`; `None` when its length is not `height * width`.
    pub fn from_vec(height: usize, width: usize, data: Vec<T>) -> Option<Self> {
        (data.len() == height * width).then_some(Self { width, height, data })
    }

    /// Build a plane from a function of `(y, x)`.
    pub fn from_fn(height: usize, width: usize, f: impl Fn(usize, usize) -> T) -> Self {
        let mut data = Vec::with_capacity(height * width);
        for y in 0..height {
            for x in 0..width {
                data.push(f(y, x));
            }
        }
        Self { width, height, data }
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn size(&self) -> Size {
        Size {
            height: self.height,
            width: self.width,
        }
    }

    /// The pixels, row-major.
    pub fn data(&self) -> &[T] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [T] {
        &mut self.data
    }

    pub fn into_vec(self) -> Vec<T> {
        self.data
    }

    /// The pixel at row `y`, column `x`. Panics when out of bounds.
    pub fn get(&self, y: usize, x: usize) -> T {
        self.data[y * self.width + x]
    }

    pub fn set(&mut self, y: usize, x: usize, v: T) {
        self.data[y * self.width + x] = v;
    }

    /// Apply `f` to every pixel.
    pub fn map<U: Copy>(&self, f: impl Fn(T) -> U) -> Plane<U> {
        Plane {
            width: self.width,
            height: self.height,
            data: self.data.iter().map(|&v| f(v)).collect(),
        }
    }
}

impl<T: Copy + Default> Plane<T> {
    /// Centre pad (with `T::default()`) or crop each axis to `size`.
    ///
    /// Along an axis of length `n` fitted to `m`: when `n < m` the plane lands at
    /// offset `(m - n) / 2`; when `n > m` the window starting at `(n - m) / 2` is
    /// kept. [`Plane::unfit`] is the inverse where pixels were kept.
    pub fn fit(&self, size: Size) -> Self {
        let (oy, ox) = (offset(self.height, size.height), offset(self.width, size.width));
        Self::from_fn(size.height, size.width, |y, x| {
            let sy = y as isize + oy;
            let sx = x as isize + ox;
            if sy >= 0 && sx >= 0 && (sy as usize) < self.height && (sx as usize) < self.width {
                self.get(sy as usize, sx as usize)
            } else {
                T::default()
            }
        })
    }

    /// Map a plane produced at `self.size()` from an original of size `original`
    /// back to that original size: the inverse of [`Plane::fit`]. Pixels that the
    /// fit cropped away come back as `T::default()` (background for masks).
    pub fn unfit(&self, original: Size) -> Self {
        let (oy, ox) = (offset(original.height, self.height), offset(original.width, self.width));
        Self::from_fn(original.height, original.width, |y, x| {
            let sy = y as isize - oy;
            let sx = x as isize - ox;
            if sy >= 0 && sx >= 0 && (sy as usize) < self.height && (sx as usize) < self.width {
                self.get(sy as usize, sx as usize)
            } else {
                T::default()
            }
        })
    }
}

/// Source offset of the fitted window: the fitted pixel `i` reads the original
/// pixel `i + offset`.
fn offset(original: usize, target: usize) -> isize {
    if original >= target {
        ((original - target) / 2) as isize
    } else {
        -(((target - original) / 2) as isize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(h: usize, w: usize) -> Plane<u8> {
        Plane::from_fn(h, w, |y, x| (1 + y * w + x) as u8)
    }

    #[test]
    fn fit_pads_in_the_centre() {
        let p = ramp(2, 2).fit(Size { height: 4, width: 4 });
        #[rustfmt::skip]
        let expected = vec![
            0, 0, 0, 0,
            0, 1, 2, 0,
            0, 3, 4, 0,
            0, 0, 0, 0,
        ];
        assert_eq!(p.data(), &expected[..]);
    }

    #[test]
    fn fit_crops_the_centre() {
        let p = ramp(4, 5).fit(Size { height: 2, width: 3 });
        // rows 1..3, columns 1..4 of the 4×5 ramp
        assert_eq!(p.data(), &[7, 8, 9, 12, 13, 14]);
    }

    #[test]
    fn unfit_restores_what_was_kept() {
        for (h, w) in [(96, 96), (90, 101), (120, 80), (7, 3), (1, 200)] {
            let original = ramp(h, w);
            let size = Size { height: 96, width: 96 };
            let back = original.fit(size).unfit(original.size());
            assert_eq!(back.size(), original.size());
            let (oy, ox) = (offset(h, 96), offset(w, 96));
            for y in 0..h {
                for x in 0..w {
                    let kept = (y as isize - oy) >= 0
                        && (y as isize - oy) < 96
                        && (x as isize - ox) >= 0
                        && (x as isize - ox) < 96;
                    let want = if kept { original.get(y, x) } else { 0 };
                    assert_eq!(back.get(y, x), want, "{h}x{w} at ({y},{x})");
                }
            }
        }
    }

    #[test]
    fn same_size_is_identity() {
        let p = ramp(5, 5);
        assert_eq!(p.fit(p.size()), p);
        assert_eq!(p.unfit(p.size()), p);
    }
}
