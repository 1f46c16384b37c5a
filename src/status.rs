//! What `displback status` shows: a snapshot of every guest, device and connector the
//! server handles, as JSON (`status json`) or text. Read-only: built by the event loop
//! from its own state ([`crate::backend::readiness::snapshot`]).

use std::fmt::Write as _;

use serde::Serialize;

/// The whole backend.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub pid: u32,
    /// The domain displback runs in.
    pub backend_domid: u16,
    pub uptime_secs: f64,
    pub counts: Counts,
    pub guests: Vec<GuestStatus>,
}

/// What the `STATUS=` line of sd_notify says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub guests: usize,
    pub devices: usize,
    /// Devices with a live connection.
    pub connected: usize,
    /// Connectors of live connections.
    pub connectors: usize,
}

impl Counts {
    /// `serving 2 guests: 3 devices (2 connected), 4 connectors`.
    pub fn line(&self) -> String {
        format!(
            "serving {}: {} ({} connected), {}",
            plural(self.guests, "guest"),
            plural(self.devices, "device"),
            self.connected,
            plural(self.connectors, "connector"),
        )
    }
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// One frontend domain.
#[derive(Clone, Debug, Serialize)]
pub struct GuestStatus {
    pub domid: u16,
    pub budget: BudgetStatus,
    pub devices: Vec<DeviceStatus>,
}

/// A domain's budget use (all its devices together) against its limits.
#[derive(Clone, Debug, Serialize)]
pub struct BudgetStatus {
    /// Display buffer bytes mapped or allocated (retained be-alloc pages included).
    pub bytes: u64,
    pub bytes_limit: u64,
    pub buffers: usize,
    pub buffers_limit: usize,
    pub framebuffers: usize,
    pub framebuffers_limit: usize,
    pub grant_mappings: usize,
    pub grant_mappings_limit: usize,
    /// Pages of destroyed be-alloc buffers the guest may still map.
    pub retained_pages: usize,
}

/// One vdispl device.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceStatus {
    pub dev: u32,
    /// The XenBus state we last wrote (`Connected`, `InitWait`, ...).
    pub state: String,
    pub connected: bool,
    pub connected_secs: Option<f64>,
    /// Closed for misbehaviour: seconds until it may connect again.
    pub held_secs: Option<f64>,
    /// Removed by the toolstack, waiting for its directory to go.
    pub removed: bool,
    pub display_buffers: usize,
    pub framebuffers: usize,
    /// Requests refused on this connection.
    pub refusals: u64,
    pub last_refusal: Option<RefusalStatus>,
    /// Empty until connected.
    pub connectors: Vec<ConnectorStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RefusalStatus {
    pub request: String,
    /// Positive errno; the guest got its negation.
    pub errno: i32,
    pub reason: String,
    pub secs_ago: f64,
}

/// One guest connector of a live connection.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectorStatus {
    pub index: u32,
    pub unique_id: String,
    pub width: u32,
    pub height: u32,
    /// Where it is shown: a KMS connector name, or `headless`.
    pub target: Option<String>,
    /// `copy`, `zero-copy`, `be-alloc`, `be-alloc-zero-copy`; `None` while disabled.
    pub path: Option<&'static str>,
    /// Page flips answered (status 0) on this connection.
    pub flips: u64,
    /// Over the last 5 seconds.
    pub flips_per_sec: f64,
}

impl Status {
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("plain data serialises");
        s.push('\n');
        s
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "displback {} (pid {}), backend domain {}, up {}",
            self.version,
            self.pid,
            self.backend_domid,
            duration(self.uptime_secs)
        );
        let _ = writeln!(s, "{}", self.counts.line());
        for g in &self.guests {
            let b = &g.budget;
            let _ = writeln!(
                s,
                "\ndom{}: {} of {} mapped, {}/{} buffers, {}/{} framebuffers, {}/{} grant mappings{}",
                g.domid,
                bytes(b.bytes),
                bytes(b.bytes_limit),
                b.buffers,
                b.buffers_limit,
                b.framebuffers,
                b.framebuffers_limit,
                b.grant_mappings,
                b.grant_mappings_limit,
                if b.retained_pages > 0 {
                    format!(", {} retained be-alloc pages", b.retained_pages)
                } else {
                    String::new()
                }
            );
            for d in &g.devices {
                let mut line = format!("  vdispl {}: {}", d.dev, d.state);
                if let Some(t) = d.connected_secs {
                    let _ = write!(line, " for {}", duration(t));
                }
                if let Some(t) = d.held_secs {
                    let _ = write!(line, ", held closed for {} more", duration(t));
                }
                if d.removed {
                    line.push_str(", removed by the toolstack");
                }
                if d.connected {
                    let _ = write!(
                        line,
                        ", {} buffers, {} framebuffers",
                        d.display_buffers, d.framebuffers
                    );
                }
                let _ = write!(line, ", {} refused", d.refusals);
                let _ = writeln!(s, "{line}");
                for c in &d.connectors {
                    let _ = writeln!(
                        s,
                        "    connector {} {} {}x{} -> {}, {}, {} flips, {:.1} flips/s",
                        c.index,
                        c.unique_id,
                        c.width,
                        c.height,
                        c.target.as_deref().unwrap_or("?"),
                        c.path.unwrap_or("disabled"),
                        c.flips,
                        c.flips_per_sec
                    );
                }
                if let Some(r) = &d.last_refusal {
                    let _ = writeln!(
                        s,
                        "    last refusal {} ago: {} -> -{} ({}): {}",
                        duration(r.secs_ago),
                        r.request,
                        r.errno,
                        std::io::Error::from_raw_os_error(r.errno)
                            .to_string()
                            .split(" (os error")
                            .next()
                            .unwrap_or(""),
                        r.reason
                    );
                }
            }
        }
        s
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{secs:.1}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_line_and_units() {
        let c = Counts {
            guests: 1,
            devices: 2,
            connected: 1,
            connectors: 1,
        };
        assert_eq!(
            c.line(),
            "serving 1 guest: 2 devices (1 connected), 1 connector"
        );
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(24576), "24.0 KiB");
        assert_eq!(bytes(512 << 20), "512.0 MiB");
        assert_eq!(duration(3.25), "3.2s");
        assert_eq!(duration(125.0), "2m05s");
        assert_eq!(duration(7322.0), "2h02m");
    }
}
