//! Counters a connection keeps for `displback status`: flips answered per connector (with
//! a rate over the last few seconds) and refused requests with the last reason. Plain
//! counters updated on the event loop; nothing here changes how requests are handled.

use std::time::{Duration, Instant};

/// Slots of the flip-rate window.
const SLOTS: usize = 10;
/// Width of one slot: the rate covers the last `SLOTS * SLOT` (5 s).
const SLOT: Duration = Duration::from_millis(500);

/// Events per second over a sliding window of [`SLOTS`] x [`SLOT`].
#[derive(Clone, Debug)]
pub struct Rate {
    start: Instant,
    /// Events per slot; slot `n` (since `start`) lives at `n % SLOTS`.
    slots: [u32; SLOTS],
    /// The newest slot counted in `slots`.
    head: u64,
}

impl Rate {
    pub fn new(now: Instant) -> Self {
        Rate {
            start: now,
            slots: [0; SLOTS],
            head: 0,
        }
    }

    fn slot_of(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.start).as_nanos() / SLOT.as_nanos()) as u64
    }

    /// Move the window to `slot`, clearing the slots it leaves behind.
    fn advance(&mut self, slot: u64) {
        if slot <= self.head {
            return;
        }
        let stale = (slot - self.head).min(SLOTS as u64);
        for s in (slot + 1 - stale)..=slot {
            self.slots[(s % SLOTS as u64) as usize] = 0;
        }
        self.head = slot;
    }

    pub fn record(&mut self, now: Instant) {
        let slot = self.slot_of(now);
        self.advance(slot);
        let i = (slot % SLOTS as u64) as usize;
        self.slots[i] = self.slots[i].saturating_add(1);
    }

    /// Events per second over the window ending `now` (shorter while younger than it).
    pub fn per_sec(&self, now: Instant) -> f64 {
        let slot = self.slot_of(now);
        let mut copy = self.clone();
        copy.advance(slot);
        let events: u64 = copy.slots.iter().map(|&n| u64::from(n)).sum();
        let age = now.saturating_duration_since(self.start);
        // The window: the current slot so far plus the SLOTS - 1 before it.
        let in_slot = age.saturating_sub(SLOT * slot as u32);
        let span = (SLOT * (slot.min(SLOTS as u64 - 1) as u32) + in_slot).as_secs_f64();
        if span <= 0.0 {
            return 0.0;
        }
        events as f64 / span
    }
}

/// How a connector's frames reach the output (`displback status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanoutPath {
    /// Guest pages mapped and copied.
    Copy,
    /// Guest pages exported as a dma-buf and scanned out.
    ZeroCopy,
    /// Our gntalloc pages granted to the guest, copied.
    BeAlloc,
    /// A dumb buffer of the output granted to the guest, scanned out.
    BeAllocZeroCopy,
}

impl ScanoutPath {
    pub fn as_str(self) -> &'static str {
        match self {
            ScanoutPath::Copy => "copy",
            ScanoutPath::ZeroCopy => "zero-copy",
            ScanoutPath::BeAlloc => "be-alloc",
            ScanoutPath::BeAllocZeroCopy => "be-alloc-zero-copy",
        }
    }
}

/// A refused request, as the guest got it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The request (its kind and fields, as logged).
    pub request: String,
    /// Positive errno (the guest got its negation).
    pub errno: i32,
    pub reason: String,
    pub at: Instant,
}

/// Counters of one connector.
#[derive(Clone, Debug)]
pub struct ConnectorStats {
    /// PG_FLIPs answered with status 0.
    pub flips: u64,
    pub rate: Rate,
}

/// Counters of one connection.
#[derive(Clone, Debug)]
pub struct ConnStats {
    pub connectors: Vec<ConnectorStats>,
    /// Requests answered with an error, on any ring.
    pub refusals: u64,
    pub last_refusal: Option<Refused>,
}

impl ConnStats {
    pub fn new(connectors: usize) -> Self {
        let now = Instant::now();
        ConnStats {
            connectors: (0..connectors)
                .map(|_| ConnectorStats {
                    flips: 0,
                    rate: Rate::new(now),
                })
                .collect(),
            refusals: 0,
            last_refusal: None,
        }
    }

    /// A flip on connector `idx` was answered with status 0.
    pub fn flip(&mut self, idx: u32) {
        if let Some(c) = self.connectors.get_mut(idx as usize) {
            c.flips += 1;
            c.rate.record(Instant::now());
        }
    }

    /// A request was refused with `errno`.
    pub fn refused(&mut self, request: String, errno: i32, reason: &str) {
        self.refusals += 1;
        self.last_refusal = Some(Refused {
            request,
            errno,
            reason: reason.to_owned(),
            at: Instant::now(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_counts_the_window_and_forgets_the_past() {
        let t0 = Instant::now();
        let mut r = Rate::new(t0);
        assert_eq!(r.per_sec(t0), 0.0);
        // 60 events a second for 3 s.
        for i in 0..180u32 {
            r.record(t0 + Duration::from_micros(16_667) * i);
        }
        let at3 = t0 + Duration::from_secs(3);
        let rate = r.per_sec(at3);
        assert!((rate - 60.0).abs() < 1.0, "{rate}");
        // 10 more seconds of nothing: the window is empty.
        assert_eq!(r.per_sec(t0 + Duration::from_secs(13)), 0.0);
        // 30 a second for 6 s: only the last 5 s count.
        let t1 = t0 + Duration::from_secs(20);
        for i in 0..180u32 {
            r.record(t1 + Duration::from_micros(33_333) * i);
        }
        let rate = r.per_sec(t1 + Duration::from_secs(6));
        assert!((rate - 30.0).abs() < 1.5, "{rate}");
    }

    #[test]
    fn flips_and_refusals_are_counted() {
        let mut s = ConnStats::new(2);
        s.flip(1);
        s.flip(1);
        s.flip(7); // no such connector: ignored
        s.refused(
            "PgFlip { fb_cookie: 1 }".into(),
            libc::ENOENT,
            "no framebuffer 0x1",
        );
        assert_eq!(s.connectors[0].flips, 0);
        assert_eq!(s.connectors[1].flips, 2);
        assert_eq!(s.refusals, 1);
        let last = s.last_refusal.unwrap();
        assert_eq!(last.errno, libc::ENOENT);
        assert_eq!(last.reason, "no framebuffer 0x1");
    }
}
