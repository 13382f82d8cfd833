//! Clean-up of predicted label maps, per class: keep every component, the
//! largest one, or (for the RV) the components that touch the myocardium.
//!
//! Which rule helps each class is decided on cross-validation and stored
//! with the model ([`PostProcess`] is serde); "keep the largest" for every
//! class is the old `--clean`.

use serde::{Deserialize, Serialize};

use crate::components::{keep_largest_components, label_components};

/// The myocardium's label.
const MYO: u8 = 2;

/// What to keep of one class's connected components (8-connectivity).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Clean {
    /// Every component.
    #[default]
    Keep,
    /// The largest component only.
    Largest,
    /// The components that touch the myocardium (8-adjacent); the largest
    /// one when none does. A blob away from the heart goes, a right
    /// ventricle in two pieces beside the septum stays.
    TouchingMyo,
}

impl Clean {
    /// The rules worth trying for `class` (1 RV, 2 Myo, 3 LV).
    pub fn candidates(class: u8) -> &'static [Self] {
        if class == MYO {
            &[Self::Keep, Self::Largest]
        } else {
            &[Self::Keep, Self::Largest, Self::TouchingMyo]
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Keep => "keep all",
            Self::Largest => "largest",
            Self::TouchingMyo => "touching Myo",
        }
    }

    /// Apply the rule to `class` in the row-major `height × width` map;
    /// removed pixels become background.
    pub fn apply(self, labels: &mut [u8], height: usize, width: usize, class: u8) {
        match self {
            Self::Keep => {}
            Self::Largest => keep_largest_components(labels, height, width, &[class]),
            Self::TouchingMyo => {
                let (comp, sizes) = label_components(labels, height, width, class);
                if sizes.len() <= 1 {
                    return;
                }
                let mut touches = vec![false; sizes.len()];
                for (i, &c) in comp.iter().enumerate() {
                    if c == 0 || touches[c as usize - 1] {
                        continue;
                    }
                    let (y, x) = (i / width, i % width);
                    let near_myo = (y.saturating_sub(1)..=(y + 1).min(height - 1)).any(|ny| {
                        (x.saturating_sub(1)..=(x + 1).min(width - 1)).any(|nx| labels[ny * width + nx] == MYO)
                    });
                    touches[c as usize - 1] = near_myo;
                }
                if !touches.iter().any(|&t| t) {
                    keep_largest_components(labels, height, width, &[class]);
                    return;
                }
                for (l, &c) in labels.iter_mut().zip(&comp) {
                    if c != 0 && !touches[c as usize - 1] {
                        *l = 0;
                    }
                }
            }
        }
    }
}

/// A clean-up rule per foreground class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostProcess {
    pub rv: Clean,
    pub myo: Clean,
    pub lv: Clean,
}

impl PostProcess {
    /// Nothing removed.
    pub const NONE: Self = Self {
        rv: Clean::Keep,
        myo: Clean::Keep,
        lv: Clean::Keep,
    };
    /// The largest component of every class (the old `--clean`).
    pub const LARGEST: Self = Self {
        rv: Clean::Largest,
        myo: Clean::Largest,
        lv: Clean::Largest,
    };

    /// The rule of class 1, 2 or 3.
    pub fn rule(&self, class: u8) -> Clean {
        match class {
            1 => self.rv,
            MYO => self.myo,
            _ => self.lv,
        }
    }

    pub fn set(&mut self, class: u8, rule: Clean) {
        match class {
            1 => self.rv = rule,
            MYO => self.myo = rule,
            _ => self.lv = rule,
        }
    }

    pub fn is_none(&self) -> bool {
        *self == Self::NONE
    }

    /// Clean a label map in place. The myocardium goes first, so that the
    /// RV's rule sees the myocardium that stays.
    pub fn apply(&self, labels: &mut [u8], height: usize, width: usize) {
        for class in [MYO, 1, 3] {
            self.rule(class).apply(labels, height, width, class);
        }
    }
}

impl std::fmt::Display for PostProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RV {}, Myo {}, LV {}",
            self.rv.name(),
            self.myo.name(),
            self.lv.name()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[rustfmt::skip]
    const MAP: [u8; 30] = [
        1, 0, 0, 0, 0, 1,
        0, 0, 0, 0, 0, 1,
        1, 2, 2, 3, 0, 0,
        1, 2, 3, 3, 0, 0,
        0, 2, 2, 0, 0, 3,
    ];

    #[test]
    fn each_rule_by_hand() {
        let mut m = MAP;
        Clean::Keep.apply(&mut m, 5, 6, 1);
        assert_eq!(m, MAP);
        // RV: components {0}, {5, 11} (size 2), {12, 18} (size 2, beside Myo)
        let mut m = MAP;
        Clean::Largest.apply(&mut m, 5, 6, 1);
        assert_eq!(
            (m[0], m[5], m[11], m[12], m[18]),
            (0, 1, 1, 0, 0),
            "the first of equal sizes stays"
        );
        let mut m = MAP;
        Clean::TouchingMyo.apply(&mut m, 5, 6, 1);
        assert_eq!((m[0], m[5], m[11], m[12], m[18]), (0, 0, 0, 1, 1));
        // LV: {15, 20, 21} and {29}
        let mut m = MAP;
        Clean::Largest.apply(&mut m, 5, 6, 3);
        assert_eq!((m[15], m[29]), (3, 0));
    }

    #[test]
    fn touching_nothing_falls_back_to_the_largest() {
        #[rustfmt::skip]
        let map = [
            1, 1, 0, 1,
            0, 0, 0, 0,
        ];
        let mut m = map;
        Clean::TouchingMyo.apply(&mut m, 2, 4, 1);
        assert_eq!(m, [1, 1, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn a_post_process_applies_per_class() {
        let mut m = MAP;
        PostProcess {
            rv: Clean::TouchingMyo,
            myo: Clean::Keep,
            lv: Clean::Largest,
        }
        .apply(&mut m, 5, 6);
        assert_eq!((m[0], m[5], m[12], m[29], m[15]), (0, 0, 1, 0, 3));
        let mut m = MAP;
        PostProcess::NONE.apply(&mut m, 5, 6);
        assert_eq!(m, MAP);
        let json = serde_json::to_string(&PostProcess::LARGEST).unwrap();
        assert_eq!(
            serde_json::from_str::<PostProcess>(&json).unwrap(),
            PostProcess::LARGEST
        );
    }
}
