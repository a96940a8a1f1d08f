//! The `tern` binary's library half: what outside tools (the fuzz targets)
//! need of it without running it.

pub mod config;
