//! The legacy path's modesets, off the event loop. `SET_CRTC` has no non-blocking form
//! (it returns once the new mode is on screen: a refresh or more), so on drivers
//! without atomic modesetting a worker thread makes those calls, in submission order.
//! A modeset is followed by a `PAGE_FLIP` with an event to the framebuffer it shows, so
//! the loop learns that it took effect from the card fd, as on the atomic path.
//! Restores are ordered with modesets by the same queue, and the buffers the CRTC may
//! still show travel with the restore and are freed after it.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use drm::control::{connector, crtc, framebuffer, Device as ControlDevice, Mode, PageFlipFlags};

use super::scanout::ScanBuf;
use super::{Card, SavedCrtc};
use crate::output::ConnectorId;

/// Work for the worker.
pub(super) enum Job {
    /// `SET_CRTC` showing `fb` from `pos` in `mode`, then a flip with an event.
    Modeset {
        conn: ConnectorId,
        crtc: crtc::Handle,
        fb: framebuffer::Handle,
        pos: (u32, u32),
        phys: connector::Handle,
        mode: Mode,
    },
    /// Free buffers the CRTC showed before the modesets queued ahead.
    Free(Vec<ScanBuf>),
    /// Give `crtc` back its saved state, then free `keep`.
    Restore {
        crtc: crtc::Handle,
        saved: SavedCrtc,
        keep: Vec<ScanBuf>,
    },
}

/// A modeset the worker could not make (or whose event it could not ask for).
#[derive(Debug)]
pub(super) struct Failure {
    pub conn: ConnectorId,
    pub crtc: crtc::Handle,
    pub error: io::Error,
}

/// The worker thread, started on first use.
pub(super) struct Worker {
    card: Arc<Card>,
    jobs: Option<mpsc::Sender<Job>>,
    failures: Option<mpsc::Receiver<Failure>>,
    /// Jobs submitted and not yet done.
    pending: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

/// How often, and how long apart, the worker asks again for the flip that signals a
/// modeset when the driver says EBUSY (a flip of an older configuration still pending).
const FLIP_RETRIES: u32 = 50;
const FLIP_RETRY_GAP: Duration = Duration::from_millis(2);

impl Worker {
    pub(super) fn new(card: Arc<Card>) -> Worker {
        Worker {
            card,
            jobs: None,
            failures: None,
            pending: Arc::new(AtomicUsize::new(0)),
            thread: None,
        }
    }

    /// Queue `job`. If the thread cannot be started, the job runs here (blocking), so a
    /// connector is never left half-configured.
    pub(super) fn submit(&mut self, job: Job) {
        if self.jobs.is_none() {
            let (tx, rx) = mpsc::channel::<Job>();
            let (ftx, frx) = mpsc::channel();
            let card = Arc::clone(&self.card);
            let pending = Arc::clone(&self.pending);
            let spawned = std::thread::Builder::new()
                .name("kms-legacy".into())
                .spawn(move || {
                    for job in rx {
                        if let Some(f) = run(&card, job) {
                            let _ = ftx.send(f);
                        }
                        pending.fetch_sub(1, Ordering::AcqRel);
                    }
                });
            match spawned {
                Ok(t) => {
                    self.thread = Some(t);
                    self.jobs = Some(tx);
                    self.failures = Some(frx);
                }
                Err(e) => {
                    tracing::warn!(
                        "cannot start the legacy modeset thread ({e}): modesetting on the loop"
                    );
                    if let Some(f) = run(&self.card, job) {
                        tracing::warn!(conn = ?f.conn, "legacy modeset failed: {}", f.error);
                    }
                    return;
                }
            }
        }
        self.pending.fetch_add(1, Ordering::AcqRel);
        let Some(tx) = self.jobs.as_ref() else {
            return;
        };
        // The thread is gone (it panicked): do it here.
        if let Err(mpsc::SendError(job)) = tx.send(job) {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            let _ = run(&self.card, job);
        }
    }

    /// Jobs still queued or running.
    pub(super) fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Failures reported since the last call.
    pub(super) fn failures(&self) -> Vec<Failure> {
        self.failures
            .as_ref()
            .map(|rx| rx.try_iter().collect())
            .unwrap_or_default()
    }

    /// Finish every queued job and stop the thread (shutdown).
    pub(super) fn finish(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!("the legacy modeset thread panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.finish();
    }
}

fn run(card: &Card, job: Job) -> Option<Failure> {
    match job {
        Job::Modeset {
            conn,
            crtc,
            fb,
            pos,
            phys,
            mode,
        } => {
            let fail = |error| Some(Failure { conn, crtc, error });
            if let Err(e) = card.set_crtc(crtc, Some(fb), pos, &[phys], Some(mode)) {
                return fail(e);
            }
            for _ in 0..FLIP_RETRIES {
                match card.page_flip(crtc, fb, PageFlipFlags::EVENT, None) {
                    Ok(()) => return None,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(FLIP_RETRY_GAP);
                    }
                    Err(e) => return fail(e),
                }
            }
            fail(io::Error::from_raw_os_error(libc::EBUSY))
        }
        Job::Free(bufs) => {
            drop(bufs);
            None
        }
        Job::Restore { crtc, saved, keep } => {
            let how = if restore_crtc(card, crtc, &saved) {
                "set_crtc"
            } else {
                "disabled"
            };
            tracing::debug!(?crtc, restored = how, "legacy restore done");
            drop(keep);
            None
        }
    }
}

/// Legacy restore (blocking); false if the CRTC had to be disabled instead.
pub(super) fn restore_crtc(card: &Card, c: crtc::Handle, saved: &SavedCrtc) -> bool {
    let restored = match (saved.fb, saved.mode) {
        (Some(fb), Some(mode)) if !saved.conns.is_empty() => {
            card.set_crtc(c, Some(fb), saved.pos, &saved.conns, Some(mode))
        }
        _ => Err(io::ErrorKind::NotFound.into()),
    };
    if let Err(e) = restored {
        if saved.fb.is_some() {
            tracing::debug!(
                ?c,
                "cannot restore the previous CRTC state ({e}); disabling"
            );
        }
        if let Err(e) = card.set_crtc(c, None, (0, 0), &[], None) {
            tracing::warn!(?c, "cannot disable CRTC: {e}");
        }
        return false;
    }
    true
}
