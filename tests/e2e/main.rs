//! End-to-end tests of the `cmr` binary on real slices from the shared set.

#![allow(clippy::unwrap_used)]

mod crash;
mod cv;
mod errors;
mod models;
mod pipeline;
mod volumes;
