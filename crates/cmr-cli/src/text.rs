//! Words for counts in messages: "1 image", "2 images".

/// `n` and `word`, with an `s` unless `n` is 1.
pub fn count(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn singular_and_plural() {
        assert_eq!(super::count(1, "image"), "1 image");
        assert_eq!(super::count(0, "image"), "0 images");
        assert_eq!(super::count(3, "epoch"), "3 epochs");
    }
}
