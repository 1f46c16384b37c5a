//! Configuration: an optional TOML file (`--config`), overridden by command-line flags.
//! The per-guest part (connectors, resolutions, be-alloc) comes from xl.cfg through
//! XenStore; this file only says how displback itself runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where frames go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// Linux KMS on a DRM card.
    #[default]
    Kms,
    /// No display: frames are kept in memory (and written as PNG by `demo --out`).
    Headless,
    /// A client of the Wayland compositor (`$WAYLAND_DISPLAY`, `--wayland-display`).
    Wayland,
}

/// Zero-copy policy: `auto` uses gntdev dma-buf where the kernel and the KMS driver
/// allow it and copies otherwise; `on` refuses to run without it; `off` always copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum ZeroCopy {
    #[default]
    Auto,
    On,
    Off,
}

/// How frame-sized copies (a guest's whole frame into a scan-out buffer or image)
/// write their destination: `auto` times both ways on the first frame copies and keeps
/// the faster (`output::frame_copy`); `stream` uses non-temporal stores (x86_64; elsewhere it is memcpy);
/// `plain` uses memcpy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum FrameCopy {
    #[default]
    Auto,
    Stream,
    Plain,
}

/// The config file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub output: Option<OutputKind>,
    /// DRM card, e.g. `/dev/dri/card0`; absent = first card with connectors and CRTCs.
    pub card: Option<PathBuf>,
    /// Serve one frontend domain only.
    pub domid: Option<u16>,
    /// Serve `vkbd` input devices too (default true; `false` = `--no-input`).
    pub input: Option<bool>,
    /// `[[inputs]]`: evdev devices of this domain feeding guest vkbd devices.
    pub inputs: Vec<crate::input::source::InputSourceCfg>,
    pub zero_copy: Option<ZeroCopy>,
    /// Frame copies: `auto` (default), `stream` or `plain` (same as `--frame-copy`).
    pub frame_copy: Option<FrameCopy>,
    /// Guest connector `unique-id` → KMS connector name (`HDMI-A-1`, `DP-2`, ...).
    /// Without an entry a `unique-id` must itself be a KMS connector name.
    pub connectors: HashMap<String, String>,
    /// Per-guest budgets (`[limits]`); unset keys keep their defaults.
    pub limits: crate::displif::budget::Limits,
    /// XenStore node reading `ready` while serving, `dead` after a clean stop (same as
    /// `--status-node`; `none`: no node).
    pub status_node: Option<String>,
    /// Control socket of `displback status` (same as `--control-socket`; `none`: none).
    pub control_socket: Option<PathBuf>,
    /// The Wayland output (`[wayland]`, `[wayland.surfaces."<unique-id>"]`).
    pub wayland: crate::output::wayland::WaylandConfig,
}

/// Errors reading the config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("parsing {0}: {1}")]
    Parse(PathBuf, toml::de::Error),
}

impl FileConfig {
    /// Load and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        Self::parse(&text).map_err(|e| ConfigError::Parse(path.into(), e))
    }

    /// Parse config text.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/displback.toml"
        ))
        .unwrap();
        let cfg = FileConfig::parse(&text).unwrap();
        assert_eq!(cfg.output, Some(OutputKind::Kms));
        assert_eq!(
            cfg.connectors.get("guest-hdmi").map(String::as_str),
            Some("HDMI-A-1")
        );
        let wl = &cfg.wayland;
        assert_eq!(wl.surfaces["guest-hdmi"].ivi_id, Some(2000));
        assert_eq!(
            wl.surfaces["1000"].shell,
            Some(crate::output::wayland::ShellChoice::Ivi)
        );
        // The example documents the defaults: they must not drift apart.
        assert_eq!(cfg.limits, crate::displif::budget::Limits::default());
        let partial = FileConfig::parse("[limits]\nmax_buffers = 3").unwrap();
        assert_eq!(partial.limits.max_buffers, 3);
        assert_eq!(partial.limits.max_fbs, 256);
        assert!(FileConfig::parse("[limits]\nmax_bufers = 3").is_err());
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(FileConfig::parse("outptu = \"kms\"").is_err());
        assert!(FileConfig::parse("output = \"vga\"").is_err());
        assert_eq!(FileConfig::parse("").unwrap(), FileConfig::default());
    }
}
