//! Input sources: the backend domain's evdev devices, chosen per guest device in the
//! config file, read on a thread of their own and handed to the server's vkbd devices.
//! Devices that appear later (a touchscreen plugged in) are picked up through inotify on
//! `/dev/input`; a device that vanishes releases everything it held down in the guest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use serde::Deserialize;
use tracing::{debug, info, warn};

use crate::backend::server::{InputHandle, InputTarget};

use super::evdev::{DirWatch, Evdev};
use super::translate::{
    Caps, Translator, ABS_MT_POSITION_X, ABS_MT_POSITION_Y, ABS_MT_SLOT, ABS_X, ABS_Y,
};

/// One `[[inputs]]` entry of the config file: which evdev device feeds which guest
/// device (by the `unique-id` of its xl.cfg `vkb` entry).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct InputSourceCfg {
    /// The guest device's `unique-id`.
    pub unique_id: String,
    /// A device path: `/dev/input/eventN`, `/dev/input/by-id/...`, `/dev/input/by-path/...`.
    pub device: Option<PathBuf>,
    /// Or a device whose name (`EVIOCGNAME`) contains this.
    pub name: Option<String>,
    /// Take the device exclusively (`EVIOCGRAB`): the backend domain stops seeing it.
    #[serde(default)]
    pub grab: bool,
}

struct Open {
    dev: Evdev,
    path: PathBuf,
    target: String,
    translator: Translator,
    /// Malformed events already reported.
    reported: u64,
}

/// Runs the sources until `stop` is set.
pub struct Sources {
    dir: PathBuf,
    cfgs: Vec<InputSourceCfg>,
    handle: InputHandle,
    open: HashMap<Token, Open>,
    next_token: usize,
}

const TOK_DIR: Token = Token(0);

impl Sources {
    /// Sources from `dir` (normally `/dev/input`) for the configured entries.
    pub fn new(dir: &Path, cfgs: Vec<InputSourceCfg>, handle: InputHandle) -> Self {
        Sources {
            dir: dir.to_path_buf(),
            cfgs,
            handle,
            open: HashMap::new(),
            next_token: 1,
        }
    }

    /// Start on a thread of its own; the flag stops it (checked every 500 ms).
    pub fn spawn(self, stop: Arc<AtomicBool>) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("input".into())
            .spawn(move || {
                let mut s = self;
                if let Err(e) = s.run(&stop) {
                    warn!("input sources stopped: {e}");
                }
            })
    }

    fn run(&mut self, stop: &AtomicBool) -> std::io::Result<()> {
        let mut poll = Poll::new()?;
        let watch = match DirWatch::new(&self.dir) {
            Ok(w) => {
                poll.registry().register(
                    &mut SourceFd(&w.as_raw_fd()),
                    TOK_DIR,
                    Interest::READABLE,
                )?;
                Some(w)
            }
            Err(e) => {
                warn!(
                    "no hot-plug of input devices ({}: {e}); rescanning every second",
                    self.dir.display()
                );
                None
            }
        };
        self.scan(&poll);
        let mut events = Events::with_capacity(32);
        let mut raw = Vec::new();
        let mut input = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let timeout = if watch.is_some() {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(1)
            };
            match poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let mut rescan = watch.is_none() && events.is_empty();
            for ev in events.iter() {
                if ev.token() == TOK_DIR {
                    if let Some(w) = &watch {
                        rescan |= w.drain();
                    }
                    continue;
                }
                let token = ev.token();
                let Some(o) = self.open.get_mut(&token) else {
                    continue;
                };
                raw.clear();
                input.clear();
                let mut partial = 0u64;
                let alive = match o.dev.read_events(&mut raw, &mut partial) {
                    Ok(alive) => alive,
                    Err(e) => {
                        warn!("reading {}: {e}", o.path.display());
                        false
                    }
                };
                o.translator.malformed += partial;
                for r in &raw {
                    o.translator.feed(r, &mut input);
                }
                if o.translator.malformed > o.reported {
                    crate::warn_limited!(
                        device = %o.path.display(),
                        malformed = o.translator.malformed,
                        "malformed input events skipped"
                    );
                    o.reported = o.translator.malformed;
                }
                if !alive {
                    o.translator.vanished(&mut input);
                }
                if !input.is_empty() {
                    self.handle.send(
                        InputTarget::UniqueId(o.target.clone()),
                        std::mem::take(&mut input),
                    );
                }
                if !alive {
                    info!("input device {} gone", o.path.display());
                    let _ = poll
                        .registry()
                        .deregister(&mut SourceFd(&o.dev.as_raw_fd()));
                    self.open.remove(&token);
                }
            }
            if rescan {
                self.scan(&poll);
            }
        }
        Ok(())
    }

    /// Open every `eventN` node that a config entry names and is not open yet.
    fn scan(&mut self, poll: &Poll) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut nodes: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("event"))
            })
            .collect();
        nodes.sort();
        for node in nodes {
            if self.open.values().any(|o| o.path == node) {
                continue;
            }
            let Ok(dev) = Evdev::open(&node) else {
                continue;
            };
            let name = dev.name().unwrap_or_default();
            let Some(cfg) = self.cfgs.iter().find(|c| matches(c, &node, &name)).cloned() else {
                continue;
            };
            if cfg.grab {
                if let Err(e) = dev.grab(true) {
                    warn!("grabbing {}: {e}", node.display());
                }
            }
            let caps = caps_of(&dev);
            let token = Token(self.next_token);
            self.next_token += 1;
            if let Err(e) =
                poll.registry()
                    .register(&mut SourceFd(&dev.as_raw_fd()), token, Interest::READABLE)
            {
                warn!("watching {}: {e}", node.display());
                continue;
            }
            info!(
                "input device {} ({name:?}, {} contacts) feeds unique-id {}",
                node.display(),
                caps.mt_slots,
                cfg.unique_id
            );
            self.open.insert(
                token,
                Open {
                    dev,
                    path: node,
                    target: cfg.unique_id,
                    translator: Translator::new(caps),
                    reported: 0,
                },
            );
        }
    }
}

/// Whether config entry `c` names the event node `node` (called `name`).
pub fn matches(c: &InputSourceCfg, node: &Path, name: &str) -> bool {
    if let Some(dev) = &c.device {
        // by-id / by-path names are symlinks to the node.
        return std::fs::canonicalize(dev).is_ok_and(|p| p == node)
            || std::fs::canonicalize(node)
                .is_ok_and(|n| Some(n) == std::fs::canonicalize(dev).ok());
    }
    c.name
        .as_deref()
        .is_some_and(|want| !want.is_empty() && name.contains(want))
}

fn caps_of(dev: &Evdev) -> Caps {
    let get = |axis| dev.has_abs(axis).then(|| dev.abs_info(axis).ok()).flatten();
    let slots = get(ABS_MT_SLOT).map_or(0, |i| {
        usize::try_from(i.maximum.saturating_add(1)).unwrap_or(0)
    });
    let caps = Caps {
        abs_x: get(ABS_X),
        abs_y: get(ABS_Y),
        mt_x: get(ABS_MT_POSITION_X),
        mt_y: get(ABS_MT_POSITION_Y),
        mt_slots: if get(ABS_MT_POSITION_X).is_some() {
            slots.max(1)
        } else {
            0
        },
    };
    debug!("caps {caps:?}");
    caps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_match_by_path_symlink_and_name() {
        let dir = std::env::temp_dir().join(format!("displback-input-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("by-id")).unwrap();
        let node = dir.join("event3");
        std::fs::write(&node, b"").unwrap();
        std::os::unix::fs::symlink("../event3", dir.join("by-id/usb-touch-event")).unwrap();
        let node = std::fs::canonicalize(&node).unwrap();
        let by_id = InputSourceCfg {
            unique_id: "T:1".into(),
            device: Some(dir.join("by-id/usb-touch-event")),
            ..Default::default()
        };
        assert!(matches(&by_id, &node, "whatever"));
        assert!(!matches(&by_id, &dir.join("event4"), "whatever"));
        let by_name = InputSourceCfg {
            unique_id: "T:1".into(),
            name: Some("ILITEK".into()),
            ..Default::default()
        };
        assert!(matches(&by_name, &node, "ILITEK Multi-Touch"));
        assert!(!matches(&by_name, &node, "AT keyboard"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
