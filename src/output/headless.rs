//! An output without a screen: each guest connector's current image is kept in memory
//! (as XRGB8888), flips complete on a simulated 60 Hz vblank, and images can be
//! dumped as PNG. Used by tests and `displback demo`.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::convert::Copier;
use super::{ConnectorId, FlipDone, Frame, FrameSource, Output, OutputError};
use crate::displif::format::PixelFormat;

/// The default refresh period (60 Hz).
pub const PERIOD_60HZ: Duration = Duration::from_nanos(16_666_667);

/// An image a connector shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    /// Row-major, `width * height` pixels, each 0xXXRRGGBB: X is 0 except for an
    /// XRGB8888 source, whose X byte is kept as the guest wrote it.
    pub pixels: Vec<u32>,
    /// The cookie of the guest framebuffer the image came from.
    pub fb_cookie: u64,
    /// Which image this is on its connector: 1 for the first one shown, then +1 per
    /// image made current (by a config or a completed flip).
    pub seq: u64,
}

impl Image {
    /// The pixel at (x, y), if inside.
    pub fn pixel(&self, x: u32, y: u32) -> Option<u32> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = (y as usize) * (self.width as usize) + x as usize;
        self.pixels.get(i).copied()
    }
}

#[derive(Default)]
struct Shown {
    current: Option<Arc<Image>>,
    frames_shown: u64,
}

/// A cloneable, thread-safe view of what each connector of a [`Headless`] shows.
#[derive(Clone, Default)]
pub struct HeadlessView {
    inner: Arc<Mutex<BTreeMap<ConnectorId, Shown>>>,
}

impl HeadlessView {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<ConnectorId, Shown>> {
        // A panic while holding the lock leaves only plain data behind: keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connector's current image (shared, no pixel copy).
    pub fn latest(&self, conn: ConnectorId) -> Option<Arc<Image>> {
        self.lock().get(&conn).and_then(|s| s.current.clone())
    }

    /// A copy of the connector's current image.
    pub fn frame(&self, conn: ConnectorId) -> Option<Image> {
        self.latest(conn).map(|i| (*i).clone())
    }

    /// Images made current on the connector so far (configs + completed flips; a tick
    /// completing several latest-wins flips counts once).
    pub fn frames_shown(&self, conn: ConnectorId) -> u64 {
        self.lock().get(&conn).map_or(0, |s| s.frames_shown)
    }

    /// The connectors currently added.
    pub fn connectors(&self) -> Vec<ConnectorId> {
        self.lock().keys().copied().collect()
    }
}

struct Pending {
    image: Image,
    /// Cookies completed by this flip, oldest first (latest wins replaced the rest).
    cookies: Vec<u64>,
    due: Instant,
}

struct Conn {
    unique_id: String,
    /// Vblank phase: ticks at `enabled_at + k * period`; `None` while disabled.
    enabled_at: Option<Instant>,
    /// The tick the last flip completed on: the next flip goes to a later one.
    last_tick: Option<Instant>,
    pending: Option<Pending>,
}

/// The headless [`Output`].
pub struct Headless {
    conns: BTreeMap<ConnectorId, Conn>,
    view: HeadlessView,
    copier: Copier,
    /// Pixel vectors of images no longer shown, reused for the next capture (a fresh
    /// multi-megabyte allocation per frame costs as much as the copy, in page faults).
    spare: Vec<Vec<u32>>,
    period: Duration,
    /// Flips to report at the next dispatch regardless of ticks (superseded by a
    /// config or a disable).
    immediate: Vec<FlipDone>,
}

impl Default for Headless {
    fn default() -> Self {
        Self::new()
    }
}

impl Headless {
    /// A headless output with a 60 Hz vblank.
    pub fn new() -> Self {
        Self::with_period(PERIOD_60HZ)
    }

    /// A headless output whose vblank ticks every `period` (at least 1 ms).
    pub fn with_period(period: Duration) -> Self {
        Headless {
            conns: BTreeMap::new(),
            view: HeadlessView::default(),
            copier: Copier::new(),
            spare: Vec::new(),
            period: period.max(Duration::from_millis(1)),
            immediate: Vec::new(),
        }
    }

    /// A copy of the connector's current image.
    pub fn frame(&self, conn: ConnectorId) -> Option<Image> {
        self.view.frame(conn)
    }

    /// Images made current on the connector so far (see [`HeadlessView::frames_shown`]).
    pub fn frames_shown(&self, conn: ConnectorId) -> u64 {
        self.view.frames_shown(conn)
    }

    /// A view of the current images that other threads can read.
    pub fn snapshot_handle(&self) -> HeadlessView {
        self.view.clone()
    }

    /// Copy `frame` into a new XRGB8888 image (one pass, into a recycled vector).
    fn capture(&mut self, frame: &Frame<'_>) -> Result<Image, OutputError> {
        let w = frame.width as usize;
        let h = frame.height as usize;
        let pitch = w.checked_mul(4).ok_or(OutputError::Format(frame.format))?;
        let n = w.checked_mul(h).ok_or(OutputError::Format(frame.format))?;
        let mut pixels = self.spare.pop().unwrap_or_default();
        // Every pixel is overwritten: only a size change needs (re)initialising.
        pixels.resize(n, 0);
        let bytes = zerocopy::IntoBytes::as_mut_bytes(pixels.as_mut_slice());
        // XRGB8888 is stored as the guest wrote it (one memcpy; the X byte is not
        // cleared, as on a real scan-out); every other format is converted, X = 0.
        let copied = if frame.format == PixelFormat::Xrgb8888 {
            self.copier.copy_same(frame, bytes, pitch)
        } else {
            self.copier.convert(frame, bytes, pitch)
        };
        if let Err(e) = copied {
            self.recycle_pixels(pixels);
            return Err(e.into());
        }
        if cfg!(target_endian = "big") {
            for p in &mut pixels {
                *p = u32::from_le(*p);
            }
        }
        Ok(Image {
            width: frame.width,
            height: frame.height,
            pixels,
            fb_cookie: frame.fb_cookie,
            seq: 0,
        })
    }

    fn show(&mut self, conn: ConnectorId, mut image: Image) {
        let old = {
            let mut v = self.view.lock();
            let s = v.entry(conn).or_default();
            s.frames_shown += 1;
            image.seq = s.frames_shown;
            s.current.replace(Arc::new(image))
        };
        // Reuse its pixels unless a reader still holds the image.
        if let Some(image) = old.and_then(|a| Arc::try_unwrap(a).ok()) {
            self.recycle_pixels(image.pixels);
        }
    }

    /// Keep `pixels` for a later capture: two per connector at most (its pending image
    /// and the one it replaces).
    fn recycle_pixels(&mut self, pixels: Vec<u32>) {
        if self.spare.len() < 2 * self.conns.len().max(1) {
            self.spare.push(pixels);
        }
    }

    /// The first vblank tick strictly after `now` for a connector enabled at `start`.
    fn next_tick(&self, start: Instant, now: Instant) -> Instant {
        let period = self.period.as_nanos();
        let elapsed = now.saturating_duration_since(start).as_nanos();
        let k = elapsed / period + 1;
        let nanos = k.saturating_mul(period);
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX);
        start + Duration::from_nanos(nanos)
    }

    /// Report a connector's pending flip at the next dispatch (it was superseded).
    fn flush_pending(&mut self, conn: ConnectorId) {
        if let Some(p) = self.conns.get_mut(&conn).and_then(|c| c.pending.take()) {
            self.immediate.extend(
                p.cookies
                    .into_iter()
                    .map(|fb_cookie| FlipDone { conn, fb_cookie }),
            );
        }
    }
}

/// Headless keeps pixels, so it can only show what it can read: never imports.
fn mapped<'a, 'b>(frame: &'b FrameSource<'a>) -> Result<&'b Frame<'a>, OutputError> {
    match frame {
        FrameSource::Mapped(f) => Ok(f),
        FrameSource::Imported(_) => Err(OutputError::Unsupported),
    }
}

impl Output for Headless {
    fn add_connector(
        &mut self,
        conn: ConnectorId,
        unique_id: &str,
        _width: u32,
        _height: u32,
    ) -> Result<(), OutputError> {
        if self
            .conns
            .iter()
            .any(|(id, c)| *id != conn && c.unique_id == unique_id)
        {
            tracing::warn!(?conn, unique_id, "headless connector already in use");
            return Err(OutputError::InUse(unique_id.to_owned()));
        }
        self.remove_connector(conn);
        self.conns.insert(
            conn,
            Conn {
                unique_id: unique_id.to_owned(),
                enabled_at: None,
                last_tick: None,
                pending: None,
            },
        );
        self.view.lock().insert(conn, Shown::default());
        Ok(())
    }

    fn remove_connector(&mut self, conn: ConnectorId) {
        self.conns.remove(&conn);
        self.immediate.retain(|d| d.conn != conn);
        self.view.lock().remove(&conn);
    }

    fn set_config(
        &mut self,
        conn: ConnectorId,
        frame: Option<&FrameSource<'_>>,
    ) -> Result<(), OutputError> {
        if !self.conns.contains_key(&conn) {
            return Err(OutputError::NotConfigured);
        }
        let frame = frame.map(mapped).transpose()?;
        // Whatever was pending is older than this config: complete it now.
        self.flush_pending(conn);
        let Some(frame) = frame else {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.enabled_at = None;
                c.last_tick = None;
            }
            if let Some(s) = self.view.lock().get_mut(&conn) {
                s.current = None;
            }
            return Ok(());
        };
        let image = self.capture(frame)?;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.enabled_at.get_or_insert_with(Instant::now);
        }
        self.show(conn, image);
        Ok(())
    }

    fn page_flip(&mut self, conn: ConnectorId, frame: &FrameSource<'_>) -> Result<(), OutputError> {
        let frame = mapped(frame)?;
        let (start, last) = match self.conns.get(&conn) {
            Some(Conn {
                enabled_at: Some(t),
                last_tick,
                ..
            }) => (*t, *last_tick),
            _ => return Err(OutputError::NotConfigured),
        };
        let image = self.capture(frame)?;
        let now = Instant::now();
        let due = self.next_tick(start, last.map_or(now, |l| l.max(now)));
        let Some(c) = self.conns.get_mut(&conn) else {
            return Err(OutputError::NotConfigured);
        };
        match &mut c.pending {
            Some(p) => {
                // Latest wins: keep the tick, replace the image, remember the cookie.
                let old = std::mem::replace(&mut p.image, image);
                p.cookies.push(frame.fb_cookie);
                self.recycle_pixels(old.pixels);
            }
            None => {
                c.pending = Some(Pending {
                    image,
                    cookies: vec![frame.fb_cookie],
                    due,
                })
            }
        }
        Ok(())
    }

    fn target(&self, conn: ConnectorId) -> Option<String> {
        self.conns
            .contains_key(&conn)
            .then(|| "headless".to_owned())
    }

    fn flip_busy(&self, conn: ConnectorId) -> bool {
        self.conns.get(&conn).is_some_and(|c| c.pending.is_some())
    }

    fn next_deadline(&self) -> Option<Instant> {
        let tick = self
            .conns
            .values()
            .filter_map(|c| c.pending.as_ref().map(|p| p.due))
            .min();
        if self.immediate.is_empty() {
            tick
        } else {
            Some(Instant::now().min(tick.unwrap_or_else(Instant::now)))
        }
    }

    fn dispatch(&mut self, now: Instant, done: &mut Vec<FlipDone>) {
        done.append(&mut self.immediate);
        let due: Vec<ConnectorId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.pending.as_ref().is_some_and(|p| p.due <= now))
            .map(|(id, _)| *id)
            .collect();
        for conn in due {
            let Some(c) = self.conns.get_mut(&conn) else {
                continue;
            };
            let Some(p) = c.pending.take() else {
                continue;
            };
            c.last_tick = Some(p.due);
            self.show(conn, p.image);
            done.extend(
                p.cookies
                    .into_iter()
                    .map(|fb_cookie| FlipDone { conn, fb_cookie }),
            );
        }
    }
}

/// Write `image` as an 8-bit RGB PNG.
pub fn write_png(image: &Image, path: &Path) -> io::Result<()> {
    let file = std::fs::File::create(path)?;
    let mut enc = png::Encoder::new(io::BufWriter::new(file), image.width, image.height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(io::Error::other)?;
    let rgb: Vec<u8> = image
        .pixels
        .iter()
        .flat_map(|p| {
            let [b, g, r, _] = p.to_le_bytes();
            [r, g, b]
        })
        .collect();
    writer.write_image_data(&rgb).map_err(io::Error::other)?;
    writer.finish().map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::mem::{anonymous, MappedRegion};
    use crate::backend::DomId;
    use crate::displif::format::PixelFormat;

    fn cid(idx: u32) -> ConnectorId {
        ConnectorId {
            dom: DomId(1),
            dev: 0,
            idx,
        }
    }

    fn frame(mem: &MappedRegion, cookie: u64) -> FrameSource<'_> {
        FrameSource::Mapped(Frame {
            mem,
            offset: 0,
            width: 4,
            height: 2,
            pitch: 16,
            format: PixelFormat::Xrgb8888,
            fb_cookie: cookie,
        })
    }

    fn filled(v: u32) -> MappedRegion {
        let m = anonymous(32).unwrap();
        for i in 0..8 {
            m.write(i * 4, &v.to_le_bytes()).unwrap();
        }
        m
    }

    #[test]
    fn flip_completes_at_the_next_tick_latest_wins() {
        let mut h = Headless::new();
        let c = cid(0);
        let (a, b, d) = (
            filled(0x0011_2233),
            filled(0xff44_5566),
            filled(0x0077_8899),
        );
        h.add_connector(c, "Virtual-1", 4, 2).unwrap();
        assert!(matches!(
            h.page_flip(c, &frame(&a, 1)),
            Err(OutputError::NotConfigured)
        ));
        h.set_config(c, Some(&frame(&a, 1))).unwrap();
        assert_eq!(h.frames_shown(c), 1);
        assert_eq!(h.frame(c).unwrap().pixels, vec![0x112233; 8]);
        assert_eq!(h.next_deadline(), None);

        h.page_flip(c, &frame(&b, 2)).unwrap();
        let due = h.next_deadline().unwrap();
        assert!(due > Instant::now() - Duration::from_millis(1));
        assert!(due <= Instant::now() + PERIOD_60HZ);
        h.page_flip(c, &frame(&d, 3)).unwrap();
        assert_eq!(h.next_deadline(), Some(due), "latest wins keeps the tick");

        let mut done = Vec::new();
        h.dispatch(due - Duration::from_micros(100), &mut done);
        assert!(done.is_empty());
        assert_eq!(h.frame(c).unwrap().fb_cookie, 1);

        h.dispatch(due, &mut done);
        assert_eq!(
            done,
            vec![
                FlipDone {
                    conn: c,
                    fb_cookie: 2
                },
                FlipDone {
                    conn: c,
                    fb_cookie: 3
                }
            ]
        );
        let img = h.frame(c).unwrap();
        assert_eq!((img.fb_cookie, img.seq), (3, 2));
        assert_eq!(img.pixels, vec![0x778899; 8]);
        assert_eq!(h.frames_shown(c), 2);
        assert_eq!(h.next_deadline(), None);

        // The next flip lands on a later tick of the same phase.
        h.page_flip(c, &frame(&a, 4)).unwrap();
        let due2 = h.next_deadline().unwrap();
        assert!(due2 > due);
        let phase = (due2 - due).as_nanos() % PERIOD_60HZ.as_nanos();
        assert!(phase == 0, "ticks stay on the 60 Hz grid");
    }

    #[test]
    fn converts_formats_into_the_image() {
        let mut h = Headless::new();
        let c = cid(1);
        h.add_connector(c, "x", 2, 1).unwrap();
        let m = anonymous(64).unwrap();
        m.write(0, &[0x00, 0xf8, 0xe0, 0x07]).unwrap(); // RGB565 red, green
        let f = Frame {
            mem: &m,
            offset: 0,
            width: 2,
            height: 1,
            pitch: 4,
            format: PixelFormat::Rgb565,
            fb_cookie: 9,
        };
        h.set_config(c, Some(&FrameSource::Mapped(f))).unwrap();
        let img = h.snapshot_handle().frame(c).unwrap();
        assert_eq!(img.pixels, vec![0xff0000, 0x00ff00]);
        assert_eq!(img.pixel(1, 0), Some(0x00ff00));
        assert_eq!(img.pixel(2, 0), None);
        h.set_config(c, None).unwrap();
        assert!(h.frame(c).is_none());
    }

    #[test]
    fn unique_ids_are_exclusive_and_disable_flushes() {
        let mut h = Headless::with_period(Duration::from_secs(10));
        h.add_connector(cid(0), "A", 4, 2).unwrap();
        assert!(matches!(
            h.add_connector(cid(1), "A", 4, 2),
            Err(OutputError::InUse(_))
        ));
        h.add_connector(cid(1), "B", 4, 2).unwrap();
        let m = filled(1);
        h.set_config(cid(0), Some(&frame(&m, 1))).unwrap();
        h.page_flip(cid(0), &frame(&m, 2)).unwrap();
        // Disabling completes the pending flip without waiting for the tick.
        h.set_config(cid(0), None).unwrap();
        assert!(h.next_deadline().unwrap() <= Instant::now());
        let mut done = Vec::new();
        h.dispatch(Instant::now(), &mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].fb_cookie, 2);
        h.remove_connector(cid(0));
        h.add_connector(cid(2), "A", 4, 2).unwrap();
        assert_eq!(h.snapshot_handle().connectors(), vec![cid(1), cid(2)]);
    }

    #[test]
    fn view_is_readable_from_another_thread() {
        let mut h = Headless::new();
        let view = h.snapshot_handle();
        h.add_connector(cid(0), "A", 4, 2).unwrap();
        let m = filled(0x123456);
        h.set_config(cid(0), Some(&frame(&m, 5))).unwrap();
        let got = std::thread::spawn(move || view.frame(cid(0)).map(|i| i.fb_cookie))
            .join()
            .unwrap();
        assert_eq!(got, Some(5));
    }

    #[test]
    fn png_round_trip() {
        let img = Image {
            width: 3,
            height: 2,
            pixels: vec![0xff0000, 0x00ff00, 0x0000ff, 0x123456, 0xffffff, 0],
            fb_cookie: 0,
            seq: 1,
        };
        let dir = std::env::temp_dir().join(format!("displback-png-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.png");
        write_png(&img, &path).unwrap();
        let file = io::BufReader::new(std::fs::File::open(&path).unwrap());
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (3, 2));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        let px: Vec<u32> = buf[..info.buffer_size()]
            .chunks_exact(3)
            .map(|c| u32::from(c[0]) << 16 | u32::from(c[1]) << 8 | u32::from(c[2]))
            .collect();
        assert_eq!(px, img.pixels);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
