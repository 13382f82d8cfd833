//! When to validate, when a model is the new best, when to stop early: small
//! pure functions, kept apart from the loop that acts on them.

/// Whether epoch `epoch` (1-based) of `epochs` is validated: every
/// `val_every` epochs, and always the last.
pub fn validates_at(epoch: usize, val_every: usize, epochs: usize) -> bool {
    epoch == epochs || epoch.is_multiple_of(val_every.max(1))
}

/// Whether `score` beats the best so far by more than `min_delta` (the first
/// score always does).
pub fn is_improvement(best: Option<f64>, score: f64, min_delta: f64) -> bool {
    match best {
        None => score.is_finite(),
        Some(b) => score > b + min_delta,
    }
}

/// Whether to stop after `since_best` validations without improvement.
pub fn should_stop_early(since_best: usize, patience: usize) -> bool {
    since_best >= patience.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_schedule() {
        assert!(validates_at(1, 1, 10));
        assert!(!validates_at(1, 3, 10));
        assert!(validates_at(3, 3, 10));
        assert!(validates_at(10, 3, 10));
    }

    #[test]
    fn improvement_and_patience() {
        assert!(is_improvement(None, 0.1, 0.0));
        assert!(!is_improvement(None, f64::NAN, 0.0));
        assert!(is_improvement(Some(0.5), 0.51, 0.0));
        assert!(!is_improvement(Some(0.5), 0.5, 0.0));
        assert!(!is_improvement(Some(0.5), 0.505, 0.01));
        assert!(!should_stop_early(2, 3));
        assert!(should_stop_early(3, 3));
    }
}
