//! cmr-train: placeholder, filled by its issue.
