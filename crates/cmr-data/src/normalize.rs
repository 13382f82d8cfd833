//! Intensity normalisation: the one choice every model is trained and run with.
//!
//! Pixels are first scaled from `u8` to `[0, 1]` (`v / 255`); augmentation works
//! in that range. Then [`Normalization`] maps them to the network's input. The
//! choice is part of the data config that is saved next to every model, so
//! inference repeats it.

use serde::{Deserialize, Serialize};

use crate::plane::{Image, Plane};

/// How `[0, 1]` intensities become network inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    /// Keep `v / 255` in `[0, 1]` (the default). Brightness and contrast
    /// augmentation keep their effect.
    #[default]
    UnitRange,
    /// Per image: subtract the mean and divide by the standard deviation
    /// (at least 1e-6). Removes global brightness and contrast.
    ZScore,
}

/// `u8` pixels to `[0, 1]`.
pub fn to_unit(image: &Image) -> Plane<f32> {
    image.map(|v| f32::from(v) / 255.0)
}

impl Normalization {
    /// Normalise `[0, 1]` intensities in place.
    pub fn apply(self, plane: &mut Plane<f32>) {
        match self {
            Self::UnitRange => {}
            Self::ZScore => {
                let data = plane.data_mut();
                let n = data.len().max(1) as f64;
                let mean = data.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
                let var = data.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n;
                let std = var.sqrt().max(1e-6);
                for v in data {
                    *v = ((f64::from(*v) - mean) / std) as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zscore_has_zero_mean_unit_std() {
        let img = Plane::from_vec(1, 4, vec![0u8, 51, 102, 255]).unwrap();
        let mut p = to_unit(&img);
        assert!((p.get(0, 1) - 0.2).abs() < 1e-6);
        Normalization::ZScore.apply(&mut p);
        let mean: f32 = p.data().iter().sum::<f32>() / 4.0;
        let var: f32 = p.data().iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6);
        assert!((var - 1.0).abs() < 1e-5);
    }

    #[test]
    fn zscore_of_a_flat_image_is_finite() {
        let mut p = Plane::from_vec(1, 3, vec![0.5f32; 3]).unwrap();
        Normalization::ZScore.apply(&mut p);
        assert!(p.data().iter().all(|v| *v == 0.0));
    }
}
