//! `displback serve` (pending the real device interfaces).
use std::collections::HashMap;
use std::path::Path;

use crate::config::OutputKind;

/// Run the backend on real Xen.
pub fn run(
    _output: OutputKind,
    _card: Option<&Path>,
    _mapping: HashMap<String, String>,
    _domid: Option<u16>,
) -> anyhow::Result<()> {
    anyhow::bail!("serve not wired yet")
}
