//! The `cmr` binary.
fn main() {}
