//! Developer tasks behind `cargo xtask`: dataset download, the end-to-end
//! reproduction of the report, the test suite crate by crate, benchmarks.
//! Only this crate touches the network.

pub mod bench;
pub mod download;
pub mod fuzz;
pub mod manifest;
pub mod reproduce;
pub mod testall;
pub mod tidy;

// The fuzz test bounds each case's allocations: count them.
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: fuzz::Counting = fuzz::Counting;
