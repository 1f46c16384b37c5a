//! The KMS output (copy path): each guest connector drives one physical connector of a
//! DRM card through three XRGB8888 dumb buffers. Guest frames are copied (converted
//! when needed) into a back buffer and shown by the CRTC's primary plane.
//! Flip-complete events arrive on the card fd; a guest flip is reported done when the
//! kernel reports the flip done.
//!
//! Split by concern: `mode` (mode choice and placement: planning, no ioctls),
//! `flip_queue` (which buffer is shown, in flight, queued), `scanout` (our buffers,
//! RAII owners), `import` (PRIME imports and be-alloc dumb buffers), [`atomic`] (the
//! atomic commits), `legacy` (legacy modesets off the loop); this file applies plans.
//!
//! Paths: atomic modesetting where the driver accepts `DRM_CLIENT_CAP_ATOMIC` (modesets
//! with `MODE_ID`/`ACTIVE`/`CRTC_ID` and the primary plane's `FB_ID`/`SRC_*`/`CRTC_*`,
//! flips as `FB_ID` commits with `PAGE_FLIP_EVENT | NONBLOCK`; see [`atomic`]), legacy
//! `SET_CRTC` / `PAGE_FLIP` otherwise. A connector whose atomic commit fails falls back
//! to legacy for good; the path in use is logged once per connector.
//! `DISPLBACK_KMS_ATOMIC=0` in the environment forces legacy.
//!
//! Nothing here blocks the event loop. On the atomic path every commit is `NONBLOCK`
//! with an event, and at most one event of ours is due per CRTC: a modeset asked for
//! while one is due (a flip in flight) is planned and `TEST_ONLY`-checked at once
//! (`Active::unsent`) and submitted by `Kms::advance` when the event came; so is
//! the restore of a disabled connector's CRTC. Events that complete nothing of ours (a
//! replaced configuration's flip) are counted per CRTC (`Kms::stray`). Legacy
//! `SET_CRTC` has no non-blocking form: a worker thread makes those calls in order
//! (`legacy`), followed by a `PAGE_FLIP` whose event tells the loop the mode shows.
//!
//! Mode choice ([`choose_mode`]): the guest's exact size if the connector offers it,
//! else the preferred mode (or the smallest one the image fits in). In the latter
//! case, on the atomic path, the primary plane is asked (`TEST_ONLY`) to show the guest
//! image scaled to fit the mode (aspect kept, centred: [`atomic::fit_rect`]), the
//! buffers then being of the guest's size; if it refuses, the image is centred on
//! black (or its centre shown when larger) by the copy into mode-sized buffers. The
//! choice is logged.
//!
//! Versus displ_be (reference §3.5, §3.11.4): the guest size need not match a mode
//! exactly (see above), connection state is re-read at every SET_CONFIG, flips queued
//! while one is pending are merged (latest wins) instead of failing with EBUSY, and
//! every CRTC we take is restored on disable and on drop (atomically when we took it
//! atomically, else with `SET_CRTC`).
//!
//! Zero-copy: a guest buffer exported as a dma-buf is imported with
//! `PRIME_FD_TO_HANDLE`, each of its framebuffers is made with AddFB2 (the guest's
//! pitch, `offsets[0] = data_ofs`), and flips to it go to the CRTC directly through the
//! same flip queue (targets from [`NBUF`] on). It needs a mode of exactly the guest
//! image's size, or a plane that scales it (no letterboxing without a copy). be-alloc
//! buffers are dumb buffers of this card ([`Output::create_dumb`]). A guest framebuffer
//! taken off screen while a flip may still show it is removed once none can
//! (`Kms::rmfb_later`). [`Kms::frame_counts`] tells copies from direct scanouts.

pub mod atomic;
mod flip_queue;
mod import;
mod legacy;
mod mode;
mod scanout;

pub use flip_queue::{FlipQueue, NBUF};
pub use mode::{choose_mode, connector_name, Fit, Layout, ModeInfo, Placement};
pub use scanout::Card;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use drm::buffer::{Buffer as _, DrmFourcc};
use drm::control::{
    connector, crtc, framebuffer, plane, Device as ControlDevice, Event, FbCmd2Flags, Mode,
    PageFlipFlags,
};
use drm::{ClientCapability, Device as _, DriverCapability};

use self::atomic::{AtomicState, PlaneGeom};
use self::import::{KmsDumb, KmsImport, Planar};
use self::scanout::ScanBuf;
use super::convert::Copier;
use super::{
    ConnectorId, FbLayout, FlipDone, FrameSource, ImportId, ImportedFb, ImportedFrame, Output,
    OutputError,
};
use crate::zcopy::DmaBufFd;

/// A CRTC's state before we took it.
#[derive(Debug)]
pub(super) struct SavedCrtc {
    fb: Option<framebuffer::Handle>,
    pos: (u32, u32),
    mode: Option<Mode>,
    conns: Vec<connector::Handle>,
}

/// An imported framebuffer flipped to, and where in it the shown image starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DirectFb {
    fb: framebuffer::Handle,
    pos: (u32, u32),
}

struct Active {
    crtc: crtc::Handle,
    mode: Mode,
    /// Size of our buffers and of the shown image: the mode's, or with `plane_fit`
    /// the guest image's.
    size: (u32, u32),
    /// The plane scales (and centres) the image to the mode: buffers of the guest
    /// image's size, atomic only.
    plane_fit: bool,
    /// The guest image size the layout was chosen for.
    guest: (u32, u32),
    bufs: Vec<ScanBuf>,
    /// Imported framebuffers flipped to: flip target `NBUF + i` is `direct[i]`
    /// (`None` once removed).
    direct: Vec<Option<DirectFb>>,
    flips: FlipQueue,
    saved: SavedCrtc,
    /// The atomic path's objects, properties and saved state; `None`: legacy.
    atomic: Option<AtomicState>,
    /// When the last flip was submitted: flips are paced to the mode's refresh even on
    /// drivers that complete them sooner (virtio-gpu has no vblank).
    last_submit: Option<Instant>,
    /// A caller was told "busy" because of that pacing: [`Output::next_deadline`] wakes
    /// the loop when the pause ends.
    paced: std::cell::Cell<bool>,
    /// The modeset that shows this configuration, planned (and `TEST_ONLY`-checked) but
    /// not yet submitted: the CRTC still had an event to come. [`Kms::advance`] submits
    /// it, non-blocking, once the CRTC is idle; `flips` is busy until its event.
    unsent: Option<Unsent>,
    /// The previous configuration's buffers, still what the CRTC shows until `unsent`
    /// goes out (the kernel holds its own references from then on).
    waiting_old: Vec<ScanBuf>,
}

/// A planned modeset (see [`Active::unsent`]).
#[derive(Clone, Copy, Debug)]
struct Unsent {
    fb: framebuffer::Handle,
    geom: PlaneGeom,
}

/// A disabled connector's CRTC, to be given back its saved state once no event of ours
/// is due on it (a flip was in flight): by [`Kms::advance`], non-blocking.
struct Restore {
    conn: ConnectorId,
    crtc: crtc::Handle,
    saved: SavedCrtc,
    atomic: Option<AtomicState>,
    /// Our buffers the CRTC may still show until the restore goes out.
    keep: Vec<ScanBuf>,
}

impl Active {
    /// The shortest time between two flips: the mode's refresh period (60 Hz if the
    /// mode does not say) less 2 ms (a flip submitted after a vblank event still makes
    /// the next vblank).
    fn min_interval(&self) -> Duration {
        let hz = match self.mode.vrefresh() {
            r @ 20..=1000 => u64::from(r),
            _ => 60,
        };
        Duration::from_micros(1_000_000 / hz).saturating_sub(Duration::from_millis(2))
    }

    /// When the pacing lets the next flip go, if later than now.
    fn paced_until(&self, now: Instant) -> Option<Instant> {
        let at = self.last_submit? + self.min_interval();
        (at > now).then_some(at)
    }

    /// The framebuffer of flip target `b` and where its image starts.
    fn target(&self, b: usize) -> Option<(framebuffer::Handle, (u32, u32))> {
        match b.checked_sub(NBUF) {
            None => self.bufs.get(b).map(|s| (s.fb, (0, 0))),
            Some(i) => self.direct.get(i).copied().flatten().map(|d| (d.fb, d.pos)),
        }
    }

    /// The flip target of an imported framebuffer shown from `pos` (registered on
    /// first use).
    fn direct_target(&mut self, fb: framebuffer::Handle, pos: (u32, u32)) -> usize {
        let d = DirectFb { fb, pos };
        let i = match self.direct.iter().position(|x| *x == Some(d)) {
            Some(i) => i,
            None => {
                self.direct.push(Some(d));
                self.direct.len() - 1
            }
        };
        NBUF + i
    }

    /// Submit the flip to target `b` with a flip-complete event. A failed atomic
    /// commit is retried with legacy `PAGE_FLIP` (unless the plane scales, which legacy
    /// cannot); if that works the connector stays legacy and this returns `Ok(true)`.
    ///
    /// With `may_fall_back` false (an imported framebuffer not yet shown: the failure
    /// may be the import's, not atomic's) a failed commit is only reported.
    fn submit_flip(&mut self, card: &Card, b: usize, may_fall_back: bool) -> std::io::Result<bool> {
        let (fb, pos) = self.target(b).ok_or(std::io::ErrorKind::NotFound)?;
        let Some(st) = self.atomic.as_mut() else {
            card.page_flip(self.crtc, fb, PageFlipFlags::EVENT, None)?;
            return Ok(false);
        };
        let Err(e) = atomic::commit_flip(card, st, fb, pos, true) else {
            return Ok(false);
        };
        if !may_fall_back {
            return Err(e);
        }
        crate::warn_limited!(crtc = ?self.crtc, "atomic page flip failed: {e}");
        if self.plane_fit {
            return Err(e);
        }
        card.page_flip(self.crtc, fb, PageFlipFlags::EVENT, None)
            .map_err(|_| e)?;
        self.atomic = None;
        Ok(true)
    }
}

/// Frames shown by copying versus by scanning out the guest's buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameCounts {
    pub copied: u64,
    pub zero_copy: u64,
}

impl FrameCounts {
    fn count(&mut self, frame: &FrameSource<'_>) {
        match frame {
            FrameSource::Mapped(_) => self.copied += 1,
            FrameSource::Imported(_) => self.zero_copy += 1,
        }
    }
}

struct KmsConn {
    unique_id: String,
    phys: connector::Handle,
    name: String,
    active: Option<Active>,
    /// An atomic commit failed (or atomic cannot drive it): legacy from now on.
    legacy_only: bool,
    /// The path last logged for it (`true`: atomic).
    path_logged: Option<bool>,
}

impl KmsConn {
    /// Log the path in use the first time it is known and whenever it changes.
    fn note_path(&mut self, conn: ConnectorId, atomic: bool) {
        if self.path_logged == Some(atomic) {
            return;
        }
        self.path_logged = Some(atomic);
        if atomic {
            tracing::info!(?conn, connector = %self.name, path = "atomic",
                "KMS path: atomic modesetting (flips: FB_ID commits with PAGE_FLIP_EVENT|NONBLOCK)");
        } else {
            tracing::info!(?conn, connector = %self.name, path = "legacy",
                "KMS path: legacy modesetting (SET_CRTC, PAGE_FLIP with events)");
        }
    }

    /// The atomic path failed for it: legacy from now on.
    fn fell_back(&mut self, conn: ConnectorId) {
        self.legacy_only = true;
        self.note_path(conn, false);
    }
}

/// A configuration [`Kms::show_in_new_buffers`] put on the CRTC (or planned to).
struct Shown {
    bufs: Vec<ScanBuf>,
    /// Planned, not yet submitted (see [`Active::unsent`]).
    unsent: Option<Unsent>,
    /// A flip-complete event will tell when it shows (atomic); else it already shows.
    event: bool,
}

/// Why showing a frame in new buffers failed.
enum ShowError {
    /// A `TEST_ONLY` commit refused the configuration.
    Refused(std::io::Error),
    /// The atomic commit itself failed.
    Commit(std::io::Error),
    /// Anything else (allocation, copy, legacy modeset, the frame itself).
    Other(OutputError),
}

/// The KMS [`Output`].
pub struct Kms {
    card: Arc<Card>,
    path: PathBuf,
    mapping: HashMap<String, String>,
    conns: BTreeMap<ConnectorId, KmsConn>,
    copier: Copier,
    /// Flips to report at the next dispatch (superseded or disabled).
    immediate: Vec<FlipDone>,
    master: bool,
    imports: HashMap<ImportId, KmsImport>,
    /// Imported framebuffers: (their import, the KMS handle).
    imported_fbs: HashMap<ImportedFb, (ImportId, framebuffer::Handle)>,
    /// Imported framebuffers a real commit has shown: no `TEST_ONLY` first, and a
    /// failure with them is atomic's (or the legacy flip's), not the import's.
    proven: HashSet<framebuffer::Handle>,
    /// Imported framebuffers the display refused ([`OutputError::ImportRefused`]).
    imports_refused: u64,
    next_id: u64,
    counts: FrameCounts,
    /// The driver accepted `DRM_CLIENT_CAP_ATOMIC`.
    atomic: bool,
    /// Events still to come on a CRTC that complete nothing of ours (the flip in flight
    /// of a configuration since replaced, a restore), and since when: the CRTC is busy
    /// until they arrive (or [`STRAY_EVENT_TIMEOUT`] passes).
    stray: HashMap<crtc::Handle, (u32, Instant)>,
    /// CRTCs of disabled connectors waiting to be restored.
    restores: Vec<Restore>,
    /// A non-blocking commit met EBUSY: [`Kms::advance`] tries again then.
    retry_at: Option<Instant>,
    /// Modesets planned while an event was due (submitted later), and restores that
    /// waited for a flip in flight: logged at exit (the harness checks them).
    planned_modesets: u64,
    deferred_restores: u64,
    /// Legacy `SET_CRTC`s, off the loop.
    legacy: legacy::Worker,
    /// Guest framebuffers taken off screen whose removal waits until no flip in flight
    /// may still show them.
    rmfb_later: Vec<LateRmfb>,
}

/// See [`Kms::rmfb_later`].
struct LateRmfb {
    fb: framebuffer::Handle,
    /// (connector, its CRTC, the flip target that named the framebuffer).
    waits: Vec<(ConnectorId, crtc::Handle, usize)>,
    since: Instant,
}

/// How long an expected flip-complete event may be late before the CRTC is taken as
/// idle anyway (a driver that lost it must not keep a connector dark for good).
const STRAY_EVENT_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the loop looks for failed legacy modesets while the worker has some.
const LEGACY_POLL: Duration = Duration::from_millis(20);
/// The retry interval after EBUSY from a non-blocking commit.
const EBUSY_RETRY: Duration = Duration::from_millis(2);

fn open_card(path: &Path) -> anyhow::Result<Card> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let card = Card(file);
    let dumb = card
        .get_driver_capability(DriverCapability::DumbBuffer)
        .with_context(|| format!("{}: querying DRM_CAP_DUMB_BUFFER", path.display()))?;
    if dumb == 0 {
        bail!("{}: no dumb buffer support", path.display());
    }
    let res = card
        .resource_handles()
        .with_context(|| format!("{}: not a KMS device", path.display()))?;
    if res.connectors().is_empty() || res.crtcs().is_empty() {
        bail!("{}: no connectors or CRTCs", path.display());
    }
    Ok(card)
}

/// `/dev/dri/card*` nodes, by number.
fn card_nodes() -> Vec<PathBuf> {
    let mut cards: Vec<(u32, PathBuf)> = std::fs::read_dir("/dev/dri")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = name.strip_prefix("card")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    cards.sort();
    cards.into_iter().map(|(_, p)| p).collect()
}

impl Kms {
    /// Open `card` (or the first `/dev/dri/card*` with connectors, CRTCs and dumb
    /// buffers) and become DRM master. `mapping` maps guest connector unique-ids to
    /// KMS connector names; unmapped unique-ids are taken as connector names.
    pub fn open(card: Option<&Path>, mapping: HashMap<String, String>) -> anyhow::Result<Kms> {
        let (card, path) = match card {
            Some(p) => (open_card(p)?, p.to_path_buf()),
            None => {
                let mut found = None;
                for p in card_nodes() {
                    match open_card(&p) {
                        Ok(c) => {
                            found = Some((c, p));
                            break;
                        }
                        Err(e) => tracing::debug!("skipping {}: {e:#}", p.display()),
                    }
                }
                found.context("no usable /dev/dri/card* (KMS with dumb buffers) found")?
            }
        };
        card.acquire_master_lock().with_context(|| {
            format!(
                "{}: cannot become DRM master (is a compositor running?)",
                path.display()
            )
        })?;
        // Universal planes for the primary plane lookup; atomic implies it anyway.
        let _ = card.set_client_capability(ClientCapability::UniversalPlanes, true);
        let atomic = if std::env::var_os("DISPLBACK_KMS_ATOMIC").is_some_and(|v| v == "0") {
            tracing::info!("DISPLBACK_KMS_ATOMIC=0: legacy modesetting only");
            false
        } else {
            match card.set_client_capability(ClientCapability::Atomic, true) {
                Ok(()) => true,
                Err(e) => {
                    tracing::info!("the driver refuses atomic modesetting ({e}): legacy only");
                    false
                }
            }
        };
        let card = Arc::new(card);
        let kms = Kms {
            legacy: legacy::Worker::new(Arc::clone(&card)),
            card,
            path,
            mapping,
            conns: BTreeMap::new(),
            copier: Copier::new(),
            immediate: Vec::new(),
            master: true,
            imports: HashMap::new(),
            imported_fbs: HashMap::new(),
            proven: HashSet::new(),
            imports_refused: 0,
            next_id: 1,
            counts: FrameCounts::default(),
            atomic,
            stray: HashMap::new(),
            restores: Vec::new(),
            retry_at: None,
            planned_modesets: 0,
            deferred_restores: 0,
            rmfb_later: Vec::new(),
        };
        tracing::info!(
            card = %kms.path.display(),
            connectors = ?kms.connector_names(),
            modesetting = if atomic { "atomic (legacy fallback)" } else { "legacy" },
            "KMS output ready (copy path, PRIME import for zero-copy)"
        );
        Ok(kms)
    }

    /// Frames shown so far by copying and by direct scanout (zero-copy).
    pub fn frame_counts(&self) -> FrameCounts {
        self.counts
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Make sure no CRTC scans out, flips to or has queued the imported framebuffer
    /// `fb`: such a connector shows black from one of our buffers instead (or is
    /// disabled if even that fails). Then `fb` can be removed without a CRTC going dark.
    fn take_off_screen(&mut self, fb: framebuffer::Handle) -> bool {
        // Every (connector, CRTC, flip target) that names `fb`.
        let named: Vec<(ConnectorId, crtc::Handle, usize)> = self
            .conns
            .iter()
            .filter_map(|(id, c)| c.active.as_ref().map(|a| (*id, a)))
            .flat_map(|(id, a)| {
                a.direct
                    .iter()
                    .enumerate()
                    .filter(move |(_, d)| d.is_some_and(|d| d.fb == fb))
                    .map(move |(i, _)| (id, a.crtc, NBUF + i))
            })
            .collect();
        let mut users: Vec<ConnectorId> = named
            .iter()
            .filter(|(id, _, t)| {
                self.conns
                    .get(id)
                    .and_then(|c| c.active.as_ref())
                    .is_some_and(|a| a.flips.uses(*t))
            })
            .map(|(id, _, _)| *id)
            .collect();
        users.dedup();
        let mut remove_now = true;
        for conn in users {
            let Some(kc) = self.conns.get_mut(&conn) else {
                continue;
            };
            let Some(a) = kc.active.as_mut() else {
                continue;
            };
            let b = a.flips.back();
            let buf = &mut a.bufs[b];
            buf.clear();
            let black = buf.fb;
            // The planned modeset has not gone out: it shows black instead.
            if let Some(u) = a.unsent.as_mut() {
                u.fb = black;
                u.geom.src.x = 0;
                u.geom.src.y = 0;
                let dropped = a.flips.retarget(b);
                self.immediate.extend(
                    dropped
                        .into_iter()
                        .map(|fb_cookie| FlipDone { conn, fb_cookie }),
                );
                continue;
            }
            // Black goes up with the next flip: now (non-blocking) if nothing is in
            // flight, else when the flip in flight completes (latest wins). Once
            // submitted, the kernel's own reference keeps the guest's framebuffer alive
            // until it is off screen, and the DBUF_DESTROY release wait (off the loop)
            // covers that. While a flip in flight may still show it, removing it would
            // make the kernel disable the plane (blocking): that waits in
            // [`Kms::rmfb_later`].
            match self.queue_flip(conn, b, None, false) {
                Ok(true) => {}
                Ok(false) => remove_now = false,
                Err(e) => {
                    crate::warn_limited!(?conn, "taking a guest buffer off screen: {e}; disabling");
                    self.deactivate(conn, true);
                }
            }
        }
        // A replaced configuration's flip in flight may name it too.
        if named.iter().any(|(_, c, _)| self.stray_due(*c)) {
            remove_now = false;
        }
        if !remove_now {
            self.rmfb_later.push(LateRmfb {
                fb,
                waits: named,
                since: Instant::now(),
            });
        }
        for kc in self.conns.values_mut() {
            if let Some(a) = kc.active.as_mut() {
                for d in &mut a.direct {
                    if d.is_some_and(|d| d.fb == fb) {
                        *d = None;
                    }
                }
            }
        }
        remove_now
    }

    /// The card's connectors as (KMS name, connected?).
    pub fn connector_names(&self) -> Vec<(String, bool)> {
        let Ok(res) = self.card.resource_handles() else {
            return Vec::new();
        };
        res.connectors()
            .iter()
            .filter_map(|&h| self.card.get_connector(h, false).ok())
            .map(|i| {
                (
                    connector_name(i.interface(), i.interface_id()),
                    i.state() != connector::State::Disconnected,
                )
            })
            .collect()
    }

    fn find_connector(&self, name: &str) -> Option<connector::Handle> {
        let res = self.card.resource_handles().ok()?;
        res.connectors().iter().copied().find(|&h| {
            self.card
                .get_connector(h, false)
                .is_ok_and(|i| connector_name(i.interface(), i.interface_id()) == name)
        })
    }

    /// CRTCs our other connectors drive.
    fn used_crtcs(&self, except: ConnectorId) -> HashSet<crtc::Handle> {
        self.conns
            .iter()
            .filter(|(id, _)| **id != except)
            .filter_map(|(_, c)| c.active.as_ref().map(|a| a.crtc))
            .collect()
    }

    /// The CRTC for `info`: its encoder's current one if free, else a compatible CRTC,
    /// idle ones first.
    fn pick_crtc(&self, info: &connector::Info, except: ConnectorId) -> Option<crtc::Handle> {
        let used = self.used_crtcs(except);
        if let Some(c) = info
            .current_encoder()
            .and_then(|e| self.card.get_encoder(e).ok())
            .and_then(|e| e.crtc())
        {
            if !used.contains(&c) {
                return Some(c);
            }
        }
        let res = self.card.resource_handles().ok()?;
        let mut candidates: Vec<crtc::Handle> = Vec::new();
        for &enc in info.encoders() {
            let Ok(e) = self.card.get_encoder(enc) else {
                continue;
            };
            for c in res.filter_crtcs(e.possible_crtcs()) {
                if !used.contains(&c) && !candidates.contains(&c) {
                    candidates.push(c);
                }
            }
        }
        candidates.sort_by_key(|&c| {
            self.card
                .get_crtc(c)
                .map_or(true, |i| i.mode().is_some() || i.framebuffer().is_some())
        });
        candidates.first().copied()
    }

    fn save_crtc(&self, c: crtc::Handle) -> SavedCrtc {
        let info = self.card.get_crtc(c).ok();
        let mut conns = Vec::new();
        if let Ok(res) = self.card.resource_handles() {
            for &h in res.connectors() {
                let on_c = self
                    .card
                    .get_connector(h, false)
                    .ok()
                    .and_then(|i| i.current_encoder())
                    .and_then(|e| self.card.get_encoder(e).ok())
                    .and_then(|e| e.crtc())
                    == Some(c);
                if on_c {
                    conns.push(h);
                }
            }
        }
        SavedCrtc {
            fb: info.as_ref().and_then(|i| i.framebuffer()),
            pos: info.as_ref().map_or((0, 0), |i| i.position()),
            mode: info.as_ref().and_then(|i| i.mode()),
            conns,
        }
    }

    /// Give `c` back its saved state: atomically if we took it atomically (falling
    /// back to `SET_CRTC`), else with `SET_CRTC`. Returns how: `atomic`, `set_crtc`,
    /// or `disabled` (the saved state could not be put back).
    fn restore_active(
        card: &Card,
        c: crtc::Handle,
        saved: &SavedCrtc,
        atomic: Option<&AtomicState>,
    ) -> &'static str {
        if let Some(st) = atomic {
            match atomic::commit_restore(card, st, saved.mode.as_ref(), false) {
                Ok(()) => return "atomic",
                Err(e) => tracing::debug!(?c, "atomic restore failed ({e}); trying SET_CRTC"),
            }
        }
        if legacy::restore_crtc(card, c, saved) {
            "set_crtc"
        } else {
            "disabled"
        }
    }

    /// Stop showing `conn`: its flips are reported done (with `report`), and its CRTC
    /// is given back its saved state by a non-blocking commit, now or (a flip still in
    /// flight) once that flip's event came ([`Kms::advance`]).
    fn deactivate(&mut self, conn: ConnectorId, report: bool) {
        let Some(kc) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(mut a) = kc.active.take() else {
            return;
        };
        let event_due = a.flips.busy() && a.unsent.is_none();
        let cookies = a.flips.drain();
        if report {
            self.immediate.extend(
                cookies
                    .into_iter()
                    .map(|fb_cookie| FlipDone { conn, fb_cookie }),
            );
        }
        if event_due {
            self.expect_stray(a.crtc);
        }
        // What the CRTC may still show: the planned modeset never went out, so the
        // buffers before it; else ours.
        let keep = if a.unsent.is_some() {
            drop(a.bufs);
            a.waiting_old
        } else {
            a.bufs
        };
        self.restores.push(Restore {
            conn,
            crtc: a.crtc,
            saved: a.saved,
            atomic: a.atomic,
            keep,
        });
        self.advance();
        if self.restores.iter().any(|r| r.conn == conn) {
            self.deferred_restores += 1;
        }
    }

    /// Give every CRTC we took back its previous state, free our buffers and drop DRM
    /// master, so the console comes back. Idempotent; also done on drop. Blocking
    /// (waits for flips in flight): for shutdown, not for serving.
    pub fn restore(&mut self) {
        let ids: Vec<ConnectorId> = self.conns.keys().copied().collect();
        for id in ids {
            self.deactivate(id, true);
        }
        self.legacy.finish();
        for r in std::mem::take(&mut self.restores) {
            let how = Self::restore_active(&self.card, r.crtc, &r.saved, r.atomic.as_ref());
            tracing::info!(conn = ?r.conn, restored = how, "display disabled");
        }
        if self.master && self.counts != FrameCounts::default() {
            tracing::info!(
                copied = self.counts.copied,
                zero_copy = self.counts.zero_copy,
                planned_modesets = self.planned_modesets,
                deferred_restores = self.deferred_restores,
                imports_refused = self.imports_refused,
                "KMS frames shown: copied vs scanned out directly"
            );
        }
        if self.master {
            self.master = false;
            if let Err(e) = self.card.release_master_lock() {
                tracing::debug!("dropping DRM master: {e}");
            }
        }
    }

    /// One more event is due on `crtc` that completes nothing of ours.
    fn expect_stray(&mut self, crtc: crtc::Handle) {
        let e = self.stray.entry(crtc).or_insert((0, Instant::now()));
        e.0 += 1;
    }

    /// True while an event that completes nothing of ours is still due on `crtc`.
    fn stray_due(&self, crtc: crtc::Handle) -> bool {
        self.stray.get(&crtc).is_some_and(|(n, _)| *n > 0)
    }

    /// True while an event of ours is due on `crtc`: nothing new may be committed to it
    /// yet (a non-blocking commit would meet EBUSY, a blocking one would wait).
    fn crtc_busy(&self, crtc: crtc::Handle) -> bool {
        self.stray_due(crtc)
            || self
                .conns
                .values()
                .filter_map(|c| c.active.as_ref())
                .any(|a| a.crtc == crtc && a.unsent.is_none() && a.flips.busy())
    }

    /// Submit, non-blocking, what waits for an idle CRTC: restores of disabled
    /// connectors, then planned modesets. Never waits; EBUSY is retried at
    /// [`Kms::retry_at`].
    fn advance(&mut self) {
        let now = Instant::now();
        self.retry_at = None;
        self.stray.retain(|crtc, (n, since)| {
            if *n > 0 && now.duration_since(*since) > STRAY_EVENT_TIMEOUT {
                crate::warn_limited!(
                    ?crtc,
                    missing = *n,
                    "a flip-complete event never came; taking the CRTC as idle"
                );
                return false;
            }
            *n > 0
        });
        for r in std::mem::take(&mut self.restores) {
            if self.crtc_busy(r.crtc) {
                self.restores.push(r);
                continue;
            }
            let how = match r.atomic.as_ref() {
                Some(st) => {
                    match atomic::commit_restore(&*self.card, st, r.saved.mode.as_ref(), true) {
                        Ok(()) => {
                            self.expect_stray(r.crtc);
                            "atomic"
                        }
                        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                            self.retry_at = Some(now + EBUSY_RETRY);
                            self.restores.push(r);
                            continue;
                        }
                        Err(e) => {
                            tracing::debug!(crtc = ?r.crtc, "atomic restore failed ({e}); trying SET_CRTC");
                            if legacy::restore_crtc(&self.card, r.crtc, &r.saved) {
                                "set_crtc"
                            } else {
                                "disabled"
                            }
                        }
                    }
                }
                // Legacy drivers have no non-blocking modeset: the worker restores it
                // and frees what the CRTC showed after.
                None => {
                    tracing::info!(conn = ?r.conn, restored = "set_crtc (worker)", "display disabled");
                    self.legacy.submit(legacy::Job::Restore {
                        crtc: r.crtc,
                        saved: r.saved,
                        keep: r.keep,
                    });
                    continue;
                }
            };
            tracing::info!(conn = ?r.conn, restored = how, "display disabled");
            // The kernel holds its own references to what is still on screen.
            drop(r.keep);
        }
        for late in std::mem::take(&mut self.rmfb_later) {
            let in_use = late.waits.iter().any(|&(conn, crtc, t)| {
                self.stray_due(crtc)
                    || self.restores.iter().any(|r| r.conn == conn)
                    || self
                        .conns
                        .get(&conn)
                        .and_then(|c| c.active.as_ref())
                        .is_some_and(|a| a.flips.uses(t))
            });
            if in_use && now.duration_since(late.since) < STRAY_EVENT_TIMEOUT {
                self.rmfb_later.push(late);
                continue;
            }
            if let Err(e) = self.card.destroy_framebuffer(late.fb) {
                tracing::warn!("removing an imported framebuffer: {e}");
            }
        }
        let planned: Vec<(ConnectorId, crtc::Handle)> = self
            .conns
            .iter()
            .filter_map(|(id, c)| {
                let a = c.active.as_ref()?;
                a.unsent.map(|_| (*id, a.crtc))
            })
            .collect();
        for (conn, crtc) in planned {
            if self.crtc_busy(crtc) {
                continue;
            }
            let Some(a) = self.conns.get_mut(&conn).and_then(|c| c.active.as_mut()) else {
                continue;
            };
            let (Some(u), Some(st)) = (a.unsent, a.atomic.as_mut()) else {
                continue;
            };
            match atomic::commit_modeset(&*self.card, st, &a.mode, u.fb, &u.geom, false, true) {
                Ok(()) => {
                    a.unsent = None;
                    a.last_submit = Some(now);
                    drop(std::mem::take(&mut a.waiting_old));
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    self.retry_at = Some(now + EBUSY_RETRY);
                }
                Err(e) => {
                    crate::warn_limited!(
                        ?conn,
                        "the planned modeset failed: {e}; display disabled"
                    );
                    self.deactivate(conn, true);
                }
            }
        }
    }

    /// The KMS framebuffer of an imported frame, checked to cover `size` exactly (the
    /// plane scans out a `size` window of it at the source offset).
    fn imported_fb(
        &self,
        f: &ImportedFrame,
        size: (u32, u32),
    ) -> Result<framebuffer::Handle, OutputError> {
        let &(_, fb) = self
            .imported_fbs
            .get(&f.fb)
            .ok_or(OutputError::NotConfigured)?;
        if (f.width, f.height) != size {
            crate::warn_limited!(
                guest = %format_args!("{}x{}", f.width, f.height),
                mode = %format_args!("{}x{}", size.0, size.1),
                "a zero-copy buffer needs a mode of exactly its size or a scaling plane"
            );
            return Err(OutputError::Format(f.format));
        }
        Ok(fb)
    }

    /// Allocate `size` buffers, put `frame` in the first (or take its import) and show
    /// it in `mode` on `crtc`. Atomic (`st` with `geom`): a `TEST_ONLY` commit first
    /// when `test` or `busy`; then a non-blocking commit with an event, or, while an
    /// event of ours is still due on the CRTC (`busy`, or EBUSY), the modeset is only
    /// planned ([`Shown::unsent`], submitted by [`Kms::advance`]). Legacy: `SET_CRTC`
    /// (`geom` a [`PlaneGeom::full`]), which the kernel only has in a blocking form.
    #[allow(clippy::too_many_arguments)]
    fn show_in_new_buffers(
        &mut self,
        conn: ConnectorId,
        crtc: crtc::Handle,
        phys: connector::Handle,
        mode: &Mode,
        size: (u32, u32),
        frame: &FrameSource<'_>,
        st: Option<&mut AtomicState>,
        geom: &PlaneGeom,
        test: bool,
        busy: bool,
    ) -> Result<Shown, ShowError> {
        let direct_fb = match frame {
            FrameSource::Imported(f) => Some(self.imported_fb(f, size).map_err(ShowError::Other)?),
            FrameSource::Mapped(_) => None,
        };
        let mut bufs = ScanBuf::set(&self.card, size).map_err(|e| ShowError::Other(e.into()))?;
        let fb = match (frame, direct_fb) {
            (FrameSource::Imported(_), Some(fb)) => fb,
            (FrameSource::Mapped(f), _) => {
                bufs[0]
                    .draw(&mut self.copier, size, f)
                    .map_err(ShowError::Other)?;
                bufs[0].fb
            }
            (FrameSource::Imported(_), None) => {
                return Err(ShowError::Other(OutputError::NotConfigured))
            }
        };
        let planned = Unsent { fb, geom: *geom };
        let Some(st) = st else {
            // Its flip-complete event tells the loop the mode is on screen.
            self.legacy.submit(legacy::Job::Modeset {
                conn,
                crtc,
                fb,
                pos: (geom.src.x, geom.src.y),
                phys,
                mode: *mode,
            });
            return Ok(Shown {
                bufs,
                unsent: None,
                event: true,
            });
        };
        if test || busy {
            atomic::commit_modeset(&*self.card, st, mode, fb, geom, true, false)
                .map_err(ShowError::Refused)?;
        }
        if !busy {
            match atomic::commit_modeset(&*self.card, st, mode, fb, geom, false, true) {
                Ok(()) => {
                    return Ok(Shown {
                        bufs,
                        unsent: None,
                        event: true,
                    })
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    self.retry_at = Some(Instant::now() + EBUSY_RETRY);
                }
                Err(e) => return Err(ShowError::Commit(e)),
            }
        }
        // `st.geom` follows when the modeset goes out; the plane geometry is planned.
        st.geom = *geom;
        Ok(Shown {
            bufs,
            unsent: Some(planned),
            event: true,
        })
    }

    /// The connector (if any) gave up on atomic: remember, and log the path.
    fn fell_back(&mut self, conn: ConnectorId) {
        if let Some(kc) = self.conns.get_mut(&conn) {
            kc.fell_back(conn);
        }
    }

    /// Put `frame` where connector `conn`'s next flip shows it: drawn into the back
    /// buffer, or its imported framebuffer registered as a flip target (checked to fit
    /// the layout). Returns the flip target and its framebuffer.
    fn stage(
        &mut self,
        conn: ConnectorId,
        frame: &FrameSource<'_>,
    ) -> Result<(usize, framebuffer::Handle), OutputError> {
        let size = match self.conns.get(&conn).and_then(|c| c.active.as_ref()) {
            Some(a) => a.size,
            None => return Err(OutputError::NotConfigured),
        };
        let direct_fb = match frame {
            FrameSource::Imported(f) => Some(self.imported_fb(f, size)?),
            FrameSource::Mapped(_) => None,
        };
        let Some(a) = self.conns.get_mut(&conn).and_then(|c| c.active.as_mut()) else {
            return Err(OutputError::NotConfigured);
        };
        match (frame, direct_fb) {
            (FrameSource::Imported(f), Some(fb)) => Ok((a.direct_target(fb, (f.x, f.y)), fb)),
            (FrameSource::Mapped(f), _) => {
                let b = a.flips.back();
                a.bufs[b].draw(&mut self.copier, a.size, f)?;
                Ok((b, a.bufs[b].fb))
            }
            (FrameSource::Imported(_), None) => Err(OutputError::NotConfigured),
        }
    }

    /// An imported frame whose framebuffer `fb` no commit has shown yet.
    fn unproven(&self, frame: &FrameSource<'_>, fb: framebuffer::Handle) -> bool {
        matches!(frame, FrameSource::Imported(_)) && !self.proven.contains(&fb)
    }

    /// Before the first flip to imported framebuffer `fb` on the atomic path: a
    /// `TEST_ONLY` commit of it, refused as [`OutputError::ImportRefused`]. The legacy
    /// path has no test: its first `PAGE_FLIP` is the test (refused synchronously,
    /// nothing shown), see [`Kms::queue_flip`].
    fn test_import(
        &mut self,
        conn: ConnectorId,
        fb: framebuffer::Handle,
        frame: &FrameSource<'_>,
    ) -> Result<(), OutputError> {
        let FrameSource::Imported(f) = frame else {
            return Ok(());
        };
        let Some(a) = self.conns.get(&conn).and_then(|c| c.active.as_ref()) else {
            return Ok(());
        };
        // A planned modeset not yet sent: the CRTC's state is not the one to test.
        let (Some(st), None) = (a.atomic.as_ref(), a.unsent.as_ref()) else {
            return Ok(());
        };
        match atomic::test_flip(&*self.card, st, fb, (f.x, f.y)) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            Err(e) => {
                self.imports_refused += 1;
                tracing::debug!(?conn, "TEST_ONLY refused an imported framebuffer: {e}");
                Err(OutputError::ImportRefused(e))
            }
        }
    }

    /// Queue flip target `b` on `conn` (a guest flip with its `cookie`, or a same-mode
    /// SET_CONFIG or a black frame with none; latest wins) and submit it now,
    /// non-blocking with an event, if nothing is in flight. Returns whether it was
    /// submitted now (`false`: it waits behind the flip in flight).
    ///
    /// `unproven`: `b` is an imported framebuffer no commit has shown yet. If it is
    /// submitted now and the driver refuses it, that is the import's failure
    /// ([`OutputError::ImportRefused`], atomic stays); once a commit took it, it is proven.
    fn queue_flip(
        &mut self,
        conn: ConnectorId,
        b: usize,
        cookie: Option<u64>,
        unproven: bool,
    ) -> Result<bool, OutputError> {
        let Some(kc) = self.conns.get_mut(&conn) else {
            return Err(OutputError::NotConfigured);
        };
        let Some(a) = kc.active.as_mut() else {
            return Err(OutputError::NotConfigured);
        };
        let now = match cookie {
            Some(c) => a.flips.push_to(b, c),
            None => a.flips.push_show(b),
        };
        let Some(b) = now else {
            return Ok(false);
        };
        a.last_submit = Some(Instant::now());
        a.paced.set(false);
        let fb = a.target(b).map(|(fb, _)| fb);
        match a.submit_flip(&self.card, b, !unproven) {
            Ok(fell_back) => {
                if fell_back {
                    kc.fell_back(conn);
                }
                if let (true, Some(fb)) = (unproven, fb) {
                    self.proven.insert(fb);
                }
                Ok(true)
            }
            Err(e) if unproven => {
                a.flips.submit_failed();
                self.imports_refused += 1;
                tracing::debug!(?conn, connector = %kc.name, "an imported framebuffer's flip was refused: {e}");
                Err(OutputError::ImportRefused(e))
            }
            Err(e) => {
                crate::warn_limited!(?conn, connector = %kc.name, "page flip failed: {e}");
                a.flips.submit_failed();
                Err(e.into())
            }
        }
    }

    fn enable(&mut self, conn: ConnectorId, frame: &FrameSource<'_>) -> Result<(), OutputError> {
        let (fw, fh) = frame.size();
        let kc = self.conns.get(&conn).ok_or(OutputError::NotConfigured)?;
        let (phys, name, legacy_only) = (kc.phys, kc.name.clone(), kc.legacy_only);
        let info = self.card.get_connector(phys, false)?;
        if info.state() == connector::State::Disconnected || info.modes().is_empty() {
            crate::warn_limited!(?conn, connector = %name, "SET_CONFIG on a disconnected connector");
            return Err(OutputError::Disconnected(name));
        }
        let infos: Vec<ModeInfo> = info.modes().iter().map(ModeInfo::from).collect();
        let (idx, fit) =
            choose_mode(&infos, fw, fh).ok_or_else(|| OutputError::Disconnected(name.clone()))?;
        let mode = info.modes()[idx];
        let mode_size = (infos[idx].width, infos[idx].height);
        let pos = match frame {
            FrameSource::Imported(f) => (f.x, f.y),
            FrameSource::Mapped(_) => (0, 0),
        };

        // Same mode and layout as now: draw into the back buffer and swap it in. A
        // plane-fitted layout holds for its guest size; a letterbox on the atomic path
        // for the guest size whose scaling was refused.
        let reuse = self
            .conns
            .get(&conn)
            .and_then(|c| c.active.as_ref())
            .is_some_and(|a| {
                a.mode == mode
                    && Layout {
                        plane_fit: a.plane_fit,
                        atomic: a.atomic.is_some(),
                        size: a.size,
                        guest: a.guest,
                    }
                    .holds_for(fit, (fw, fh))
            });
        if reuse {
            let (b, fb) = self.stage(conn, frame)?;
            let unproven = self.unproven(frame, fb);
            if unproven {
                self.test_import(conn, fb, frame)?;
            }
            let Some(a) = self.conns.get_mut(&conn).and_then(|c| c.active.as_mut()) else {
                return Err(OutputError::NotConfigured);
            };
            // The planned modeset has not gone out yet: it shows this frame instead.
            if let Some(u) = a.unsent.as_mut() {
                u.fb = fb;
                u.geom.src.x = pos.0;
                u.geom.src.y = pos.1;
                let dropped = a.flips.retarget(b);
                self.immediate.extend(
                    dropped
                        .into_iter()
                        .map(|fb_cookie| FlipDone { conn, fb_cookie }),
                );
                self.counts.count(frame);
                return Ok(());
            }
            // Latest wins, like a flip: submitted now (non-blocking, with an event) if
            // nothing is in flight, else once the flip in flight completes.
            self.queue_flip(conn, b, None, unproven)?;
            self.counts.count(frame);
            return Ok(());
        }

        tracing::info!(
            ?conn,
            connector = %name,
            guest = %format_args!("{fw}x{fh}"),
            mode = %format_args!("{}x{}@{}", mode_size.0, mode_size.1, infos[idx].refresh),
            ?fit,
            "mode chosen"
        );
        // A different mode: new buffers on the CRTC we already hold, on the CRTC of
        // this connector's pending restore (taken back), or on a CRTC we take now.
        let old = self.conns.get_mut(&conn).and_then(|c| c.active.take());
        let reclaimed = match old {
            Some(_) => None,
            None => self
                .restores
                .iter()
                .position(|r| r.conn == conn)
                .map(|i| self.restores.remove(i)),
        };
        let (crtc, fresh_save) = match (&old, &reclaimed) {
            (Some(o), _) => (o.crtc, None),
            (None, Some(r)) => (r.crtc, None),
            (None, None) => {
                let crtc = self.pick_crtc(&info, conn).ok_or_else(|| {
                    crate::warn_limited!(?conn, connector = %name, "no free CRTC");
                    OutputError::InUse(name.clone())
                })?;
                (crtc, Some(self.save_crtc(crtc)))
            }
        };
        // An event of ours still due on the CRTC: the new mode is only planned now and
        // goes out when it came (never a blocking commit on the shared loop).
        let busy = self.stray_due(crtc)
            || old
                .as_ref()
                .is_some_and(|o| o.flips.busy() && o.unsent.is_none());
        // The path: the old mode's (with the state saved when the CRTC was taken), or
        // atomic if the driver and the objects allow it.
        let mut st = match (&old, &reclaimed, &fresh_save) {
            (Some(o), _, _) => o.atomic.clone(),
            (None, Some(r), _) => r.atomic.clone(),
            (None, None, Some(saved)) if self.atomic && !legacy_only => {
                let taken: Vec<plane::Handle> = self
                    .conns
                    .iter()
                    .filter(|(id, _)| **id != conn)
                    .filter_map(|(_, c)| c.active.as_ref()?.atomic.as_ref().map(|s| s.plane))
                    .collect();
                match AtomicState::probe(&*self.card, crtc, phys, &saved.conns, &taken) {
                    Ok(st) => Some(st),
                    Err(why) => {
                        tracing::info!(?conn, connector = %name, "atomic modesetting not usable: {why}");
                        self.fell_back(conn);
                        None
                    }
                }
            }
            _ => None,
        };

        // An imported framebuffer no commit has shown: TEST_ONLY it first, and a refused
        // or failed commit is the import's (the buffer goes to the copy path), not
        // atomic's. Legacy SET_CRTC (off the loop) has no test: see the README.
        let unproven_fb = match frame {
            FrameSource::Imported(f) => self
                .imported_fbs
                .get(&f.fb)
                .map(|&(_, fb)| fb)
                .filter(|fb| !self.proven.contains(fb)),
            FrameSource::Mapped(_) => None,
        };
        let unproven = unproven_fb.is_some();
        // Not an exact mode: try the plane scaling the guest image to fit (TEST_ONLY
        // first), else letterbox (or crop) by the copy into mode-sized buffers.
        let mut decided: Option<Result<(Shown, bool), OutputError>> = None;
        let mut scaling_refused = None;
        if fit != Fit::Exact {
            if let (Some(s), Some(geom)) =
                (st.as_mut(), PlaneGeom::scaled(pos, (fw, fh), mode_size))
            {
                match self.show_in_new_buffers(
                    conn,
                    crtc,
                    phys,
                    &mode,
                    (fw, fh),
                    frame,
                    Some(s),
                    &geom,
                    true,
                    busy,
                ) {
                    Ok(shown) => decided = Some(Ok((shown, true))),
                    Err(ShowError::Refused(e)) => scaling_refused = Some(e),
                    Err(ShowError::Commit(e)) if unproven => {
                        decided = Some(Err(OutputError::ImportRefused(e)));
                    }
                    Err(ShowError::Commit(e)) => {
                        crate::warn_limited!(?conn, connector = %name, "atomic modeset failed: {e}; legacy from now on");
                        st = None;
                        self.fell_back(conn);
                    }
                    Err(ShowError::Other(e)) => decided = Some(Err(e)),
                }
            }
        }
        let full = PlaneGeom::full(pos, mode_size);
        let decided = match decided {
            Some(d) => d,
            None => {
                let mut r = self.show_in_new_buffers(
                    conn,
                    crtc,
                    phys,
                    &mode,
                    mode_size,
                    frame,
                    st.as_mut(),
                    &full,
                    unproven,
                    busy,
                );
                if let (true, Some(_), Err(ShowError::Refused(e) | ShowError::Commit(e))) =
                    (unproven, st.as_ref(), r.as_mut())
                {
                    let e = std::mem::replace(e, std::io::ErrorKind::Other.into());
                    r = Err(ShowError::Other(OutputError::ImportRefused(e)));
                }
                if let Err(ShowError::Commit(e)) = &r {
                    crate::warn_limited!(?conn, connector = %name, "atomic modeset failed: {e}; legacy from now on");
                    st = None;
                    self.fell_back(conn);
                    r = self.show_in_new_buffers(
                        conn, crtc, phys, &mode, mode_size, frame, None, &full, false, busy,
                    );
                }
                r.map(|shown| (shown, false)).map_err(|e| match e {
                    ShowError::Refused(e) | ShowError::Commit(e) => OutputError::from(e),
                    ShowError::Other(e) => e,
                })
            }
        };
        let (shown, plane_fit) = match decided {
            Ok(d) => d,
            Err(e) => {
                if let OutputError::ImportRefused(why) = &e {
                    self.imports_refused += 1;
                    tracing::debug!(?conn, connector = %name, "a modeset with an imported framebuffer was refused: {why}");
                } else {
                    crate::warn_limited!(?conn, connector = %name, "SET_CONFIG failed: {e}");
                }
                // Nothing was committed (a refused atomic commit changes nothing): put
                // back what was there.
                if let Some(o) = old {
                    if let Some(kc) = self.conns.get_mut(&conn) {
                        kc.active = Some(o);
                    }
                }
                if let Some(r) = reclaimed {
                    self.restores.push(r);
                    self.advance();
                }
                return Err(e);
            }
        };
        let size = if plane_fit { (fw, fh) } else { mode_size };
        let scanout = match (plane_fit, fit, st.as_ref()) {
            (true, _, Some(s)) => format!(
                "plane-scaled {fw}x{fh} to {}x{}+{}+{}",
                s.geom.dst.w, s.geom.dst.h, s.geom.dst.x, s.geom.dst.y
            ),
            (_, Fit::Exact, _) => "exact".to_owned(),
            (_, Fit::Letterbox, _) => "letterbox (centred copy)".to_owned(),
            (_, Fit::Crop, _) => "crop (centre copied)".to_owned(),
        };
        let scaling = match (&scaling_refused, fit, st.is_some()) {
            (Some(e), _, _) => format!("refused by the plane (TEST_ONLY: {e})"),
            (None, Fit::Exact, _) => "not needed".to_owned(),
            (None, _, true) => "accepted by the plane (TEST_ONLY)".to_owned(),
            (None, _, false) => "unavailable (legacy path)".to_owned(),
        };
        tracing::info!(
            ?conn,
            connector = %name,
            path = if st.is_some() { "atomic" } else { "legacy" },
            guest = %format_args!("{fw}x{fh}"),
            mode = %format_args!("{}x{}@{}", mode_size.0, mode_size.1, infos[idx].refresh),
            %scanout,
            %scaling,
            planned = shown.unsent.is_some(),
            "scanout configured"
        );
        // What the CRTC showed before, and whether an event of it is still due.
        let (saved, on_screen) = match (old, reclaimed, fresh_save) {
            (Some(mut o), _, _) => {
                let event_due = o.flips.busy() && o.unsent.is_none();
                let cookies = o.flips.drain();
                self.immediate.extend(
                    cookies
                        .into_iter()
                        .map(|fb_cookie| FlipDone { conn, fb_cookie }),
                );
                if event_due {
                    self.expect_stray(crtc);
                }
                // Its own planned modeset never went out: the buffers before it show.
                let on_screen = if o.unsent.is_some() {
                    o.waiting_old
                } else {
                    o.bufs
                };
                (o.saved, on_screen)
            }
            (None, Some(r), _) => (r.saved, r.keep),
            (None, None, Some(saved)) => (saved, Vec::new()),
            (None, None, None) => (self.save_crtc(crtc), Vec::new()),
        };
        // Submitted: the kernel holds its own references to what is still on screen
        // (atomic); the legacy worker frees it after its queued modeset.
        let waiting_old = if shown.unsent.is_some() {
            on_screen
        } else {
            if st.is_none() && !on_screen.is_empty() {
                self.legacy.submit(legacy::Job::Free(on_screen));
            } else {
                drop(on_screen);
            }
            Vec::new()
        };
        self.counts.count(frame);
        let (direct, front) = match frame {
            FrameSource::Imported(f) => match self.imported_fbs.get(&f.fb) {
                Some(&(_, fb)) => (vec![Some(DirectFb { fb, pos })], NBUF),
                None => (Vec::new(), 0),
            },
            FrameSource::Mapped(_) => (Vec::new(), 0),
        };
        let submitted = shown.event && shown.unsent.is_none();
        if let (true, Some(fb)) = (submitted && st.is_some(), unproven_fb) {
            self.proven.insert(fb);
        }
        if shown.unsent.is_some() {
            self.planned_modesets += 1;
        }
        if let Some(kc) = self.conns.get_mut(&conn) {
            kc.note_path(conn, st.is_some());
            kc.active = Some(Active {
                crtc,
                mode,
                size,
                plane_fit,
                guest: (fw, fh),
                bufs: shown.bufs,
                direct,
                flips: if shown.event {
                    FlipQueue::showing(front)
                } else {
                    FlipQueue::new(front)
                },
                saved,
                atomic: st,
                last_submit: submitted.then(Instant::now),
                paced: std::cell::Cell::new(false),
                unsent: shown.unsent,
                waiting_old,
            });
        }
        self.advance();
        Ok(())
    }

    /// Read DRM events until none are left, completing flips into `done`.
    fn read_events(&mut self, done: &mut Vec<FlipDone>) {
        // The fd is non-blocking: read until the kernel has nothing more.
        for _ in 0..64 {
            let events = match self.card.receive_events() {
                Ok(ev) => ev,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("reading DRM events: {e}");
                    break;
                }
            };
            let mut any = false;
            for ev in events {
                any = true;
                if let Event::PageFlip(pf) = ev {
                    self.on_flip_complete(pf.crtc, done);
                }
            }
            if !any {
                break;
            }
        }
    }

    fn on_flip_complete(&mut self, crtc: crtc::Handle, done: &mut Vec<FlipDone>) {
        // Events that complete nothing of ours come first: nothing of ours was
        // submitted on this CRTC while they were due.
        if let Some((n, _)) = self.stray.get_mut(&crtc) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.stray.remove(&crtc);
            }
            return;
        }
        let Some((&conn, kc)) = self
            .conns
            .iter_mut()
            .find(|(_, c)| c.active.as_ref().is_some_and(|a| a.crtc == crtc))
        else {
            return;
        };
        let Some(a) = kc.active.as_mut() else {
            return;
        };
        let (cookies, next) = a.flips.complete();
        done.extend(
            cookies
                .into_iter()
                .map(|fb_cookie| FlipDone { conn, fb_cookie }),
        );
        if let Some(b) = next {
            match a.submit_flip(&self.card, b, true) {
                Ok(false) => {}
                Ok(true) => kc.fell_back(conn),
                Err(e) => {
                    crate::warn_limited!(?conn, connector = %kc.name, "queued page flip failed: {e}");
                    let cookies = a.flips.submit_failed();
                    done.extend(
                        cookies
                            .into_iter()
                            .map(|fb_cookie| FlipDone { conn, fb_cookie }),
                    );
                }
            }
        }
    }
}

impl Drop for Kms {
    fn drop(&mut self) {
        self.restore();
    }
}

impl Output for Kms {
    fn add_connector(
        &mut self,
        conn: ConnectorId,
        unique_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), OutputError> {
        let name = self
            .mapping
            .get(unique_id)
            .cloned()
            .unwrap_or_else(|| unique_id.to_owned());
        if let Some((other, _)) = self
            .conns
            .iter()
            .find(|(id, c)| **id != conn && c.name == name)
        {
            tracing::warn!(
                ?conn,
                unique_id,
                connector = %name,
                ?other,
                "physical connector already used by another guest connector"
            );
            return Err(OutputError::InUse(name));
        }
        let Some(phys) = self.find_connector(&name) else {
            tracing::warn!(
                ?conn,
                unique_id,
                connector = %name,
                available = ?self.connector_names(),
                "no such KMS connector"
            );
            return Err(OutputError::NoConnector(name));
        };
        // One forced probe at connect time so the connection state and modes are fresh.
        let _ = self.card.get_connector(phys, true);
        self.remove_connector(conn);
        tracing::info!(?conn, unique_id, connector = %name, width, height, "guest connector added");
        self.conns.insert(
            conn,
            KmsConn {
                unique_id: unique_id.to_owned(),
                phys,
                name,
                active: None,
                legacy_only: false,
                path_logged: None,
            },
        );
        Ok(())
    }

    fn remove_connector(&mut self, conn: ConnectorId) {
        self.deactivate(conn, false);
        self.immediate.retain(|d| d.conn != conn);
        if let Some(kc) = self.conns.remove(&conn) {
            tracing::debug!(?conn, unique_id = %kc.unique_id, "guest connector removed");
        }
    }

    fn set_config(
        &mut self,
        conn: ConnectorId,
        frame: Option<&FrameSource<'_>>,
    ) -> Result<(), OutputError> {
        if !self.conns.contains_key(&conn) {
            return Err(OutputError::NotConfigured);
        }
        match frame {
            Some(f) => self.enable(conn, f),
            None => {
                self.deactivate(conn, true);
                Ok(())
            }
        }
    }

    fn page_flip(&mut self, conn: ConnectorId, frame: &FrameSource<'_>) -> Result<(), OutputError> {
        let (target, fb) = self.stage(conn, frame)?;
        let unproven = self.unproven(frame, fb);
        if unproven {
            self.test_import(conn, fb, frame)?;
        }
        self.queue_flip(conn, target, Some(frame.fb_cookie()), unproven)?;
        self.counts.count(frame);
        Ok(())
    }

    fn target(&self, conn: ConnectorId) -> Option<String> {
        self.conns.get(&conn).map(|c| c.name.clone())
    }

    fn flip_busy(&self, conn: ConnectorId) -> bool {
        let Some(a) = self.conns.get(&conn).and_then(|c| c.active.as_ref()) else {
            return false;
        };
        if a.flips.busy() {
            return true;
        }
        let paced = a.paced_until(Instant::now()).is_some();
        a.paced.set(paced);
        paced
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.card.0.as_raw_fd())
    }

    fn next_deadline(&self) -> Option<Instant> {
        let now = Instant::now();
        if !self.immediate.is_empty() {
            return Some(now);
        }
        // Connectors whose flip waits for the refresh pacing; an EBUSY retry; the
        // timeout of an event that may never come.
        self.conns
            .values()
            .filter_map(|c| c.active.as_ref())
            .filter(|a| a.paced.get())
            .map(|a| a.paced_until(now).unwrap_or(now))
            .chain(self.retry_at)
            // Legacy modesets in the worker: look for its failures now and then.
            .chain((self.legacy.pending() > 0).then(|| now + LEGACY_POLL))
            .chain(
                self.stray
                    .values()
                    .map(|(_, since)| *since + STRAY_EVENT_TIMEOUT),
            )
            .chain(
                self.rmfb_later
                    .iter()
                    .map(|l| l.since + STRAY_EVENT_TIMEOUT),
            )
            .min()
    }

    fn dispatch(&mut self, now: Instant, done: &mut Vec<FlipDone>) {
        // A pacing pause that ended: the next `flip_busy` says free again.
        for a in self.conns.values().filter_map(|c| c.active.as_ref()) {
            if a.paced.get() && a.paced_until(now).is_none() {
                a.paced.set(false);
            }
        }
        done.append(&mut self.immediate);
        self.read_events(done);
        // Legacy modesets the worker could not make: that connector is disabled.
        for f in self.legacy.failures() {
            let ours = self
                .conns
                .get(&f.conn)
                .and_then(|c| c.active.as_ref())
                .is_some_and(|a| a.crtc == f.crtc && a.atomic.is_none());
            crate::warn_limited!(conn = ?f.conn, "legacy modeset failed: {}", f.error);
            if ours {
                self.deactivate(f.conn, true);
            }
        }
        // Restores and planned modesets whose CRTC became idle, EBUSY retries, late
        // events.
        if !self.restores.is_empty()
            || !self.rmfb_later.is_empty()
            || !self.stray.is_empty()
            || self.retry_at.is_some()
            || self
                .conns
                .values()
                .any(|c| c.active.as_ref().is_some_and(|a| a.unsent.is_some()))
        {
            self.advance();
            done.append(&mut self.immediate);
        }
    }

    fn import_dmabuf(&mut self, dmabuf: &DmaBufFd) -> Result<ImportId, OutputError> {
        let fd = dmabuf.as_fd().ok_or(OutputError::Unsupported)?;
        let handle = self.card.prime_fd_to_buffer(fd)?;
        let id = ImportId(self.new_id());
        self.imports.insert(
            id,
            KmsImport {
                handle,
                close_handle: true,
                fbs: Vec::new(),
            },
        );
        Ok(id)
    }

    fn create_dumb(
        &mut self,
        width: u32,
        height: u32,
        bpp: u32,
    ) -> Result<(ImportId, Box<dyn crate::zcopy::DumbBuffer>), OutputError> {
        // The fourcc only labels the drm crate's struct; CREATE_DUMB takes the bpp.
        let db = self
            .card
            .create_dumb_buffer((width, height), DrmFourcc::Xrgb8888, bpp)?;
        let id = ImportId(self.new_id());
        self.imports.insert(
            id,
            KmsImport {
                handle: db.handle(),
                close_handle: false,
                fbs: Vec::new(),
            },
        );
        let dumb = KmsDumb {
            card: self.card.clone(),
            db,
            freed: false,
        };
        Ok((id, Box::new(dumb)))
    }

    fn add_imported_fb(
        &mut self,
        import: ImportId,
        layout: &FbLayout,
    ) -> Result<ImportedFb, OutputError> {
        let handle = self
            .imports
            .get(&import)
            .ok_or(OutputError::NotConfigured)?
            .handle;
        let format = DrmFourcc::try_from(layout.format.fourcc())
            .map_err(|_| OutputError::Format(layout.format))?;
        let planar = Planar {
            size: (layout.width, layout.height),
            format,
            pitch: layout.pitch,
            offset: layout.offset,
            handle,
        };
        let fb = self
            .card
            .add_planar_framebuffer(&planar, FbCmd2Flags::empty())?;
        let id = ImportedFb(self.new_id());
        self.imported_fbs.insert(id, (import, fb));
        if let Some(i) = self.imports.get_mut(&import) {
            i.fbs.push(id);
        }
        Ok(id)
    }

    fn remove_imported_fb(&mut self, id: ImportedFb) {
        let Some((import, fb)) = self.imported_fbs.remove(&id) else {
            return;
        };
        if let Some(i) = self.imports.get_mut(&import) {
            i.fbs.retain(|f| *f != id);
        }
        self.proven.remove(&fb);
        if self.take_off_screen(fb) {
            if let Err(e) = self.card.destroy_framebuffer(fb) {
                tracing::warn!("removing an imported framebuffer: {e}");
            }
        }
    }

    fn release_import(&mut self, import: ImportId) {
        let Some(i) = self.imports.get(&import) else {
            return;
        };
        for fb in i.fbs.clone() {
            self.remove_imported_fb(fb);
        }
        let Some(i) = self.imports.remove(&import) else {
            return;
        };
        if i.close_handle {
            if let Err(e) = self.card.close_buffer(i.handle) {
                tracing::warn!("closing an imported GEM handle: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_without_a_card_fails_cleanly() {
        let err = Kms::open(Some(Path::new("/nonexistent/card0")), HashMap::new());
        assert!(err.is_err());
    }
}
