//! End-to-end tests of the cmr binary.
