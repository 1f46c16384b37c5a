//! How whole-frame copies write their destination: glibc's memcpy, or non-temporal
//! stores ([`MappedRegion::read_stream`](crate::xen::mem::MappedRegion::read_stream),
//! x86_64), which skip reading the destination's cache lines first.
//!
//! Which one is faster depends on the machine, and the difference is large both ways:
//! on this project's x86_64 hosts the streaming copy is ~1.5x faster than memcpy for a
//! 1280x720 frame (`benches/copy.rs`), while in a Dom0 under QEMU's TCG writing into an
//! emulated card's framebuffer it made a real-Xen guest's flips slower (the
//! `xen-noisy-neighbour` scenario). A measurement on a scratch buffer at start does not
//! settle it either (under TCG it favoured streaming, the real destination did not). So
//! with `auto` the backend measures its own first frame copies: it alternates the two
//! ways for [`SAMPLES`] copies each, keeps the best bytes-per-second of each, and from
//! then on uses streaming only if it was at least 10% faster. `--frame-copy
//! stream|plain` (config `frame_copy`) skips the measurement.
//!
//! The state is process-wide: every output of one backend writes the same kind of memory.

use std::sync::Mutex;
use std::time::Instant;

use crate::config::FrameCopy;

/// Copies of at least this many bytes are frame copies (smaller ones use memcpy).
pub const STREAM_MIN: usize = 256 * 1024;

/// Timed copies of each way before `auto` settles.
pub const SAMPLES: u32 = 8;

/// One way to copy a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// memcpy.
    Plain,
    /// Non-temporal stores (a memcpy where there are none).
    Stream,
}

/// Where the choice stands.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FrameCopyState {
    /// The setting (`auto`, `stream`, `plain`).
    pub setting: FrameCopy,
    /// The way frame copies use from now on; `None` while `auto` still measures.
    pub settled: Option<Way>,
    /// Best measured rate of each way so far, bytes per second (plain, stream).
    pub best_bytes_per_sec: [f64; 2],
    /// Timed copies of each way so far (plain, stream).
    pub samples: [u32; 2],
}

impl std::fmt::Display for FrameCopyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let way = match self.settled {
            Some(Way::Stream) => "stream",
            Some(Way::Plain) => "plain",
            None => "measuring",
        };
        write!(f, "frame_copy={way} setting={:?}", self.setting)?;
        if self.samples != [0, 0] {
            let [p, s] = self.best_bytes_per_sec;
            write!(
                f,
                " plain_mb_s={:.0} stream_mb_s={:.0} samples={}+{}",
                p / 1e6,
                s / 1e6,
                self.samples[0],
                self.samples[1]
            )?;
        }
        Ok(())
    }
}

impl FrameCopyState {
    const fn new(setting: FrameCopy) -> Self {
        let settled = match setting {
            FrameCopy::Plain => Some(Way::Plain),
            FrameCopy::Stream => Some(Way::Stream),
            // Without non-temporal stores both ways are the same memcpy.
            FrameCopy::Auto if !cfg!(target_arch = "x86_64") => Some(Way::Plain),
            FrameCopy::Auto => None,
        };
        Self {
            setting,
            settled,
            best_bytes_per_sec: [0.0; 2],
            samples: [0; 2],
        }
    }

    fn next(&self) -> Way {
        self.settled
            .unwrap_or(if self.samples[1] <= self.samples[0] {
                Way::Stream
            } else {
                Way::Plain
            })
    }

    /// Count one timed copy; true when this one settled the choice.
    fn record(&mut self, way: Way, bytes_per_sec: f64) -> bool {
        if self.settled.is_some() {
            return false;
        }
        let i = way as usize;
        self.samples[i] += 1;
        self.best_bytes_per_sec[i] = self.best_bytes_per_sec[i].max(bytes_per_sec);
        if self.samples.iter().all(|&n| n >= SAMPLES) {
            let [plain, stream] = self.best_bytes_per_sec;
            self.settled = Some(if stream > plain * 1.1 {
                Way::Stream
            } else {
                Way::Plain
            });
            return true;
        }
        false
    }
}

static STATE: Mutex<FrameCopyState> = Mutex::new(FrameCopyState::new(FrameCopy::Auto));

fn state() -> std::sync::MutexGuard<'static, FrameCopyState> {
    // The state is plain data, valid after any panic: ignore poisoning.
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Set how frame copies write (`auto` measures again from the next copy).
pub fn set_frame_copy(setting: FrameCopy) {
    *state() = FrameCopyState::new(setting);
}

/// Where the choice stands now.
pub fn frame_copy_state() -> FrameCopyState {
    *state()
}

/// The way a copy of `bytes` bytes uses.
pub fn way_for(bytes: usize) -> Way {
    if bytes < STREAM_MIN {
        Way::Plain
    } else {
        state().next()
    }
}

/// Times one frame copy while `auto` measures ([`Timer::finish`] records it; a copy
/// that failed half-way is dropped unrecorded).
pub struct Timer {
    run: Option<(Way, usize, Instant)>,
}

impl Timer {
    /// Start timing a copy of `bytes` bytes the way [`way_for`] said.
    pub fn start(way: Way, bytes: usize) -> Self {
        let measuring = bytes >= STREAM_MIN && state().settled.is_none();
        Timer {
            run: measuring.then(|| (way, bytes, Instant::now())),
        }
    }

    /// The copy is done: record its rate.
    pub fn finish(self) {
        let Some((way, bytes, t0)) = self.run else {
            return;
        };
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        let mut s = state();
        if s.record(way, bytes as f64 / secs) {
            tracing::info!("frame copies settled: {}", *s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_alternates_then_keeps_the_clearly_faster_way() {
        if !cfg!(target_arch = "x86_64") {
            return assert_eq!(
                FrameCopyState::new(FrameCopy::Auto).settled,
                Some(Way::Plain)
            );
        }
        let mut s = FrameCopyState::new(FrameCopy::Auto);
        let mut seen = Vec::new();
        for _ in 0..2 * SAMPLES {
            let way = s.next();
            seen.push(way);
            let rate = if way == Way::Stream { 1.5e9 } else { 1.0e9 };
            s.record(way, rate);
        }
        assert_eq!(
            seen.iter().filter(|&&w| w == Way::Stream).count(),
            SAMPLES as usize
        );
        assert_eq!(s.settled, Some(Way::Stream));
        assert_eq!(s.next(), Way::Stream);
        assert!(!s.record(Way::Plain, 9e9), "settled stays settled");

        // Streaming only 5% faster: not worth it.
        let mut s = FrameCopyState::new(FrameCopy::Auto);
        for _ in 0..2 * SAMPLES {
            let way = s.next();
            s.record(way, if way == Way::Stream { 1.05e9 } else { 1.0e9 });
        }
        assert_eq!(s.settled, Some(Way::Plain));
        // The best sample counts, not the last.
        let mut s = FrameCopyState::new(FrameCopy::Auto);
        for i in 0..2 * SAMPLES {
            let way = s.next();
            let fast = i < 2;
            s.record(
                way,
                match (way, fast) {
                    (Way::Plain, true) => 3e9,
                    (Way::Plain, false) => 0.5e9,
                    (Way::Stream, _) => 2e9,
                },
            );
        }
        assert_eq!(s.settled, Some(Way::Plain));
    }

    #[test]
    fn fixed_settings_do_not_measure() {
        assert_eq!(FrameCopyState::new(FrameCopy::Stream).next(), Way::Stream);
        assert_eq!(FrameCopyState::new(FrameCopy::Plain).next(), Way::Plain);
        let mut s = FrameCopyState::new(FrameCopy::Plain);
        assert!(!s.record(Way::Stream, 1e12));
        assert_eq!(s.samples, [0, 0]);
    }
}
