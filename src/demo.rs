//! `displback demo` (pending the simulated frontend).
use std::collections::HashMap;
use std::path::PathBuf;

use crate::config::OutputKind;
use crate::displif::format::PixelFormat;

/// What `displback demo` runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub connectors: u32,
    pub width: u32,
    pub height: u32,
    pub format: PixelFormat,
    pub frames: u32,
    pub out_dir: Option<PathBuf>,
    pub hold_secs: u64,
    pub output: OutputKind,
    pub card: Option<PathBuf>,
    pub mapping: HashMap<String, String>,
}

/// Run the demo.
pub fn run(_opts: DemoOptions) -> anyhow::Result<()> {
    anyhow::bail!("demo not wired yet")
}
