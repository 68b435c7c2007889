//! Test PKIs.
