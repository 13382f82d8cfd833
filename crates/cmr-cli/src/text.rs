//! What `cmr` writes for people: counts in words ("1 image", "2 images"),
//! error chains said once, standard output that a closed pipe ends quietly.

/// `writeln!` to standard output, returning the `io::Result` instead of
/// panicking as `println!` does when the reader has gone (`cmr info | head`);
/// `main` ends quietly on that error.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}
pub(crate) use outln;

/// An error and its causes on one line, each said once: a cause whose text
/// the line already holds (our errors' messages include their source's) is
/// not repeated.
pub fn describe(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Whether `err` is a write to a reader that has gone (a closed pipe).
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

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
    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "x.png: cannot read: {}", self.0)
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory (os error 2)");
        let err = anyhow::Error::new(Outer(io)).context("loading data");
        // anyhow's own form repeats the source our message already holds
        assert_eq!(
            format!("{err:#}"),
            "loading data: x.png: cannot read: No such file or directory (os error 2): No such file or directory (os error 2)"
        );
        assert_eq!(
            super::describe(&err),
            "loading data: x.png: cannot read: No such file or directory (os error 2)"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::describe(&plain), "outer: inner");
        assert!(!super::is_broken_pipe(&plain));
        let pipe = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe)).context("printing");
        assert!(super::is_broken_pipe(&pipe));
    }

    #[test]
    fn singular_and_plural() {
        assert_eq!(super::count(1, "image"), "1 image");
        assert_eq!(super::count(0, "image"), "0 images");
        assert_eq!(super::count(3, "epoch"), "3 epochs");
    }
}
