//! A small in-process Wayland compositor for the Wayland output's tests: it listens on a
//! Unix socket, offers `wl_compositor`, `wl_shm` (formats chosen by the test),
//! `xdg_wm_base`, optionally `wp_presentation` and `ivi_application`, records the
//! requests it gets, and presents / releases / configures only when the test says so.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;

use wayland_protocols::wp::linux_dmabuf::zv1::server::{
    zwp_linux_buffer_params_v1::{self, ZwpLinuxBufferParamsV1},
    zwp_linux_dmabuf_v1::{self, ZwpLinuxDmabufV1},
};
use wayland_protocols::wp::presentation_time::server::{
    wp_presentation::{self, WpPresentation},
    wp_presentation_feedback::{Kind, WpPresentationFeedback},
};
use wayland_protocols::xdg::shell::server::{
    xdg_surface::{self, XdgSurface},
    xdg_toplevel::{self, XdgToplevel},
    xdg_wm_base::{self, XdgWmBase},
};
use wayland_server::backend::{ClientData, ObjectId};
use wayland_server::protocol::{
    wl_buffer::{self, WlBuffer},
    wl_callback::WlCallback,
    wl_compositor::{self, WlCompositor},
    wl_keyboard::{self, WlKeyboard},
    wl_pointer::{self, WlPointer},
    wl_region::{self, WlRegion},
    wl_seat::{self, WlSeat},
    wl_shm::{self, WlShm},
    wl_shm_pool::{self, WlShmPool},
    wl_surface::{self, WlSurface},
    wl_touch::{self, WlTouch},
};
use wayland_server::{
    Client, DataInit, Dispatch, Display, DisplayHandle, GlobalDispatch, New, Resource, WEnum,
};

/// `ivi-application`, server side.
#[allow(missing_docs, clippy::all, unused_imports, non_upper_case_globals)]
pub mod ivi {
    use wayland_server;
    use wayland_server::protocol::*;

    pub mod __interfaces {
        use wayland_server::backend as wayland_backend;
        use wayland_server::protocol::__interfaces::*;
        wayland_scanner::generate_interfaces!("src/output/wayland/ivi-application.xml");
    }
    use self::__interfaces::*;

    wayland_scanner::generate_server_code!("src/output/wayland/ivi-application.xml");
}
use ivi::ivi_application::{self, IviApplication};
use ivi::ivi_surface::{self, IviSurface};

/// What the compositor offers.
#[derive(Clone, Debug)]
pub struct Offer {
    pub shm_formats: Vec<u32>,
    pub presentation: bool,
    pub xdg: bool,
    pub ivi: bool,
    /// A `wl_seat` with pointer, keyboard and touch.
    pub seat: bool,
    /// `zwp_linux_dmabuf_v1` (version 3) advertising these (fourcc, modifier) pairs.
    pub dmabuf: Option<Vec<(u32, u64)>>,
    /// Answer every dma-buf buffer creation with `failed` (an import the compositor's
    /// renderer cannot do).
    pub dmabuf_fail: bool,
}

impl Default for Offer {
    fn default() -> Self {
        Offer {
            shm_formats: vec![0, 1],
            presentation: true,
            xdg: true,
            ivi: false,
            seat: false,
            dmabuf: None,
            dmabuf_fail: false,
        }
    }
}

/// A buffer as the client described it.
#[derive(Clone)]
pub struct BufInfo {
    pool: Arc<File>,
    pub offset: i32,
    pub width: i32,
    pub height: i32,
    pub stride: i32,
    pub format: u32,
}

impl BufInfo {
    /// The buffer's bytes (`stride * height`).
    pub fn bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; (self.stride * self.height) as usize];
        self.pool
            .read_exact_at(&mut v, self.offset as u64)
            .expect("reading the shm pool");
        v
    }
}

/// One client surface.
#[derive(Default)]
pub struct Surface {
    pub title: Option<String>,
    pub ivi_id: Option<u32>,
    pub toplevel: Option<XdgToplevel>,
    pub xdg: Option<XdgSurface>,
    pub fullscreen: bool,
    pending_buffer: Option<Option<WlBuffer>>,
    pub current: Option<WlBuffer>,
    pending_frames: Vec<WlCallback>,
    pending_feedback: Vec<WpPresentationFeedback>,
    frames: Vec<WlCallback>,
    feedback: Vec<WpPresentationFeedback>,
    pub commits: u32,
    pub acked: Option<u32>,
    /// An opaque region was set.
    pub opaque: bool,
}

/// The compositor's state.
#[derive(Default)]
pub struct Comp {
    pub offer: Offer,
    /// Requests received, as `interface.request` strings.
    pub log: Vec<String>,
    pub surfaces: HashMap<ObjectId, Surface>,
    /// Buffers replaced on screen but not released yet (when `hold_releases`).
    pub unreleased: Vec<WlBuffer>,
    /// Keep replaced buffers until [`TestCompositor::release_all`].
    pub hold_releases: bool,
    serial: u32,
    /// The seat's devices the client asked for.
    pub pointers: Vec<WlPointer>,
    pub keyboards: Vec<WlKeyboard>,
    pub touches: Vec<WlTouch>,
    /// dma-buf buffers created (`created` sent), in order, and their resources.
    pub dmabufs: Vec<DmabufInfo>,
    pub dmabuf_buffers: Vec<WlBuffer>,
    /// Leave dma-buf buffer creations unanswered until
    /// [`TestCompositor::answer_dmabufs`] (a slow or stuck compositor).
    pub defer_dmabuf: bool,
    /// Creations left unanswered: the params, their client, what would be created.
    deferred_dmabufs: Vec<(ZwpLinuxBufferParamsV1, Client, DmabufInfo, OwnedFd)>,
    /// The dma-buf each live dma-buf `wl_buffer` holds (as a renderer's import does),
    /// closed when the client destroys the buffer.
    pub dmabuf_fds: Vec<(WlBuffer, OwnedFd)>,
}

/// One plane of a dma-buf buffer as the client described it.
#[derive(Debug)]
pub struct Plane {
    pub fd: std::os::fd::OwnedFd,
    pub idx: u32,
    pub offset: u32,
    pub stride: u32,
    pub modifier: u64,
}

/// A dma-buf buffer creation as the client asked for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmabufInfo {
    pub width: i32,
    pub height: i32,
    pub format: u32,
    /// (plane index, offset, stride, modifier) of each plane.
    pub planes: Vec<(u32, u32, u32, u64)>,
    /// Device and inode of plane 0's fd (which file the client passed).
    pub file: (u64, u64),
}

struct Cd;
impl ClientData for Cd {}

/// The compositor with its display and socket.
pub struct TestCompositor {
    pub display: Display<Comp>,
    pub state: Comp,
    listener: UnixListener,
    clients: Vec<Client>,
}

impl TestCompositor {
    /// Listen at `path` (replacing a stale socket).
    pub fn start(path: &Path, offer: Offer) -> Self {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind test compositor");
        listener.set_nonblocking(true).unwrap();
        let display: Display<Comp> = Display::new().unwrap();
        let dh = display.handle();
        dh.create_global::<Comp, WlCompositor, ()>(4, ());
        dh.create_global::<Comp, WlShm, ()>(1, ());
        if offer.xdg {
            dh.create_global::<Comp, XdgWmBase, ()>(2, ());
        }
        if offer.presentation {
            dh.create_global::<Comp, WpPresentation, ()>(1, ());
        }
        if offer.ivi {
            dh.create_global::<Comp, IviApplication, ()>(1, ());
        }
        if offer.seat {
            dh.create_global::<Comp, WlSeat, ()>(5, ());
        }
        if offer.dmabuf.is_some() {
            dh.create_global::<Comp, ZwpLinuxDmabufV1, ()>(3, ());
        }
        TestCompositor {
            display,
            state: Comp {
                offer,
                ..Comp::default()
            },
            listener,
            clients: Vec::new(),
        }
    }

    /// Accept clients, handle their requests, send what is queued.
    pub fn pump(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            let c = self
                .display
                .handle()
                .insert_client(stream, Arc::new(Cd))
                .unwrap();
            self.clients.push(c);
        }
        self.display.dispatch_clients(&mut self.state).unwrap();
        self.display.flush_clients().unwrap();
    }

    /// The only surface (panics unless exactly one).
    pub fn surface(&self) -> &Surface {
        assert_eq!(self.state.surfaces.len(), 1, "surfaces");
        self.state.surfaces.values().next().unwrap()
    }

    /// What the only surface shows.
    pub fn shown(&self) -> BufInfo {
        let b = self.surface().current.as_ref().expect("a buffer attached");
        b.data::<BufInfo>().expect("buffer data").clone()
    }

    /// Send every xdg surface a configure of `w` x `h`.
    pub fn configure_all(&mut self, w: i32, h: i32) {
        for s in self.state.surfaces.values() {
            if let (Some(t), Some(x)) = (&s.toplevel, &s.xdg) {
                t.configure(w, h, Vec::new());
                self.state.serial += 1;
                x.configure(self.state.serial);
            }
        }
        self.display.flush_clients().unwrap();
    }

    /// Present every committed frame: presentation feedback and frame callbacks.
    pub fn present_all(&mut self) {
        for s in self.state.surfaces.values_mut() {
            for f in s.feedback.drain(..) {
                f.presented(0, 1, 0, 16_666_666, 0, 1, Kind::Vsync);
            }
            for cb in s.frames.drain(..) {
                cb.done(1);
            }
        }
        self.display.flush_clients().unwrap();
    }

    /// Answer the creations left unanswered (`defer_dmabuf`): `created`, or `failed`.
    pub fn answer_dmabufs(&mut self, ok: bool) {
        let dh = self.display.handle();
        for (params, client, info, fd) in std::mem::take(&mut self.state.deferred_dmabufs) {
            if ok {
                self.state.create_dmabuf(&params, &client, info, fd, &dh);
            } else {
                params.failed();
            }
        }
        self.display.flush_clients().unwrap();
    }

    /// Creations not answered yet.
    pub fn unanswered_dmabufs(&self) -> usize {
        self.state.deferred_dmabufs.len()
    }

    /// Release replaced buffers at once again (as Weston does).
    pub fn hold_releases_off(&mut self) {
        self.state.hold_releases = false;
    }

    /// Release the buffers held back by `hold_releases`.
    pub fn release_all(&mut self) {
        for b in self.state.unreleased.drain(..) {
            b.release();
        }
        self.display.flush_clients().unwrap();
    }

    /// The surface of the toplevel titled `title`.
    pub fn surface_titled(&self, title: &str) -> WlSurface {
        let id = self
            .state
            .surfaces
            .iter()
            .find(|(_, s)| s.title.as_deref() == Some(title))
            .map(|(id, _)| id.clone())
            .expect("a surface with that title");
        WlSurface::from_id(&self.display.handle(), id).unwrap()
    }

    /// Send seat events (`f` gets the pointers, keyboards, touches and a serial) and flush.
    pub fn seat(&mut self, f: impl FnOnce(&[WlPointer], &[WlKeyboard], &[WlTouch], u32)) {
        self.state.serial += 1;
        f(
            &self.state.pointers,
            &self.state.keyboards,
            &self.state.touches,
            self.state.serial,
        );
        self.display.flush_clients().unwrap();
    }

    /// Post a protocol error on the first surface (the client is disconnected).
    pub fn protocol_error(&mut self) {
        let s = self.state.surfaces.keys().next().cloned().unwrap();
        let dh = self.display.handle();
        let surface = WlSurface::from_id(&dh, s).unwrap();
        surface.post_error(wl_surface::Error::InvalidSize, "test: protocol error");
        self.display.flush_clients().unwrap();
    }
}

impl GlobalDispatch<WlCompositor, ()> for Comp {
    fn bind(
        _: &mut Self,
        _: &DisplayHandle,
        _: &Client,
        r: New<WlCompositor>,
        _: &(),
        di: &mut DataInit<'_, Self>,
    ) {
        di.init(r, ());
    }
}

impl Dispatch<WlCompositor, ()> for Comp {
    fn request(
        st: &mut Self,
        _: &Client,
        _: &WlCompositor,
        req: wl_compositor::Request,
        _: &(),
        _: &DisplayHandle,
        di: &mut DataInit<'_, Self>,
    ) {
        match req {
            wl_compositor::Request::CreateSurface { id } => {
                let s = di.init(id, ());
                st.log.push("wl_compositor.create_surface".into());
                st.surfaces.insert(s.id(), Surface::default());
            }
            wl_compositor::Request::CreateRegion { id } => {
                di.init(id, ());
            }
            _ => {}
        }
    }
}

impl Dispatch<WlSurface, ()> for Comp {
    fn request(
        st: &mut Self,
        _: &Client,
        surface: &WlSurface,
        req: wl_surface::Request,
        _: &(),
        _: &DisplayHandle,
        di: &mut DataInit<'_, Self>,
    ) {
        let id = surface.id();
        let Some(s) = st.surfaces.get_mut(&id) else {
            return;
        };
        match req {
            wl_surface::Request::Attach { buffer, .. } => {
                st.log.push("wl_surface.attach".into());
                s.pending_buffer = Some(buffer);
            }
            wl_surface::Request::SetOpaqueRegion { region } => {
                s.opaque = region.is_some();
            }
            wl_surface::Request::Frame { callback } => {
                s.pending_frames.push(di.init(callback, ()));
            }
            wl_surface::Request::Commit => {
                st.log.push("wl_surface.commit".into());
                s.commits += 1;
                if let Some(b) = s.pending_buffer.take() {
                    let old = std::mem::replace(&mut s.current, b);
                    if let Some(old) = old.filter(|o| Some(o) != s.current.as_ref()) {
                        if st.hold_releases {
                            st.unreleased.push(old);
                        } else {
                            old.release();
                        }
                    }
                }
                s.frames.append(&mut s.pending_frames);
                s.feedback.append(&mut s.pending_feedback);
            }
            wl_surface::Request::Destroy => {
                st.log.push("wl_surface.destroy".into());
                st.surfaces.remove(&id);
            }
            _ => {}
        }
    }
}

impl Dispatch<WlRegion, ()> for Comp {
    fn request(
        _: &mut Self,
        _: &Client,
        _: &WlRegion,
        _: wl_region::Request,
        _: &(),
        _: &DisplayHandle,
        _: &mut DataInit<'_, Self>,
    ) {
    }
}

impl Dispatch<WlCallback, ()> for Comp {
    fn request(
        _: &mut Self,
        _: &Client,
        _: &WlCallback,
        _: <WlCallback as Resource>::Request,
        _: &(),
        _: &DisplayHandle,
        _: &mut DataInit<'_, Self>,
    ) {
    }
}

impl GlobalDispatch<WlShm, ()> for Comp {
    fn bind(
        st: &mut Self,
        _: &DisplayHandle,
        _: &Client,
        r: New<WlShm>,
        _: &(),
        di: &mut DataInit<'_, Self>,
    ) {
        let shm = di.init(r, ());
        for &f in &st.offer.shm_formats {
            if let Ok(f) = wl_shm::Format::try_from(f) {
                shm.format(f);
            }
        }
    }
}

impl Dispatch<WlShm, ()> for Comp {
    fn request(
        st: &mut Self,
        _: &Client,
        _: &WlShm,
        req: wl_shm::Request,
        _: &(),
        _: &DisplayHandle,
        di: &mut DataInit<'_, Self>,
    ) {
        if let wl_shm::Request::CreatePool { id, fd, .. } = req {
            st.log.push("wl_shm.create_pool".into());
            di.init(id, Arc::new(File::from(fd)));
        }
    }
}

impl Dispatch<WlShmPool, Arc<File>> for Comp {
    fn request(
        st: &mut Self,
        _: &Client,
        _: &WlShmPool,
        req: wl_shm_pool::Request,
        pool: &Arc<File>,
        _: &DisplayHandle,
        di: &mut DataInit<'_, Self>,
    ) {
        if let wl_shm_pool::Request::CreateBuffer {
            id,
            offset,
            width,
            height,
            stride,
            format,
        } = req
        {
            st.log.push("wl_shm_pool.create_buffer".into());
            let format = match format {
                WEnum::Value(f) => f as u32,
                WEnum::Unknown(u) => u,
            };
            di.init(
                id,
                BufInfo {
                    pool: pool.clone(),
                    offset,
                    width,
                    height,
                    stride,
                    format,
                },
            );
        }
    }
}

impl Dispatch<WlBuffer, BufInfo> for Comp {
    fn request(
        _: &mut Self,
        _: &Client,
        _: &WlBuffer,
        _: wl_buffer::Request,
        _: &BufInfo,
        _: &DisplayHandle,
        _: &mut DataInit<'_, Self>,
    ) {
    }
}

impl GlobalDispatch<XdgWmBase, ()> for Comp {
    fn bind(
        _: &mut Self,
        _: &DisplayHandle,
        _: &Client,
        r: New<XdgWmBase>,
        _: &(),
        di: &mut DataInit<'_, Self>,
    ) {
        di.init(r, ());
    }
}

impl Dispatch<XdgWmBase, ()> for Comp {
    fn request(
        st: &mut Self,
        _: &Client,
        _: &XdgWmBase,
        req: xdg_wm_base::Request,
        _: &(),
        _: &DisplayHandle,
        di: &mut DataInit<'_, Self>,
    ) {
        if let xdg_wm_base::Request::GetXdgSurface { id, surface } = req {
            st.log.push("xdg_wm_base.get_xdg_surface".into());
            let x = di.init(id, surface.id());
            if let Some(s) = st.surfaces.get_mut(&surface.id()) {
                s.xdg = Some(x);
            }
        }
    }
}

impl Dispatch<XdgSurface, ObjectId> for Comp {
    fn request(
        st: &mut Self,
        _: &Client,
        _: &XdgSurface,
        req: xdg_surface::Request,
        sid: &ObjectId,
        _: &DisplayHandle,
        di: &mut DataInit<'_, Self>,
    ) {
        match req {
            xdg_surface::Request::GetToplevel { id } => {
                st.log.push("xdg_surface.get_toplevel".into());
                let t = di.init(id, sid.clone());
                if let Some(s) = st.surfaces.get_mut(sid) {
                    s.toplevel = Some(t);
                }
            }
            xdg_surface::Request::AckConfigure { serial } => {
                if let Some(s) = st.surfaces.get_mut(sid) {
                    s.acked = Some(serial);
                }
            }
            _ => {}
        }
    }
}

impl Dispatch<XdgToplevel, ObjectId> for Comp {
    fn request(
        st: &mut Self,
        _: &Client,
        _: &XdgToplevel,
        req: xdg_toplevel::Request,
        sid: &ObjectId,
        _: &DisplayHandle,
        _: &mut DataInit<'_, Self>,
    ) {
        let Some(s) = st.surfaces.get_mut(sid) else {
            return;
        };
        match req {
            xdg_toplevel::Request::SetTitle { title } => s.title = Some(title),
            xdg_toplevel::Request::SetFullscreen { .. } => s.fullscreen = true,
            _ => {}
        }
    }
}

impl GlobalDispatch<WpPresentation, ()> for Comp {
    fn bind(
        _: &mut Self,
        _: &DisplayHandle,
        _: &Client,
        r: New<WpPresentation>,
        _: &(),
        di: &mut DataInit<'_, Self>,
    ) {
        let p = di.init(r, ());
        p.clock_id(libc::CLOCK_MONOTONIC as u32);
    }
}

impl Dispatch<WpPresentation, ()> for Comp {
    fn request(
        st: &mut Self,
        _: &Client,
        _: &WpPresentation,
        req: wp_presentation::Request,
        _: &(),
        _: &DisplayHandle,
        di: &mut DataInit<'_, Self>,
    ) {
        if let wp_presentation::Request::Feedback { surface, callback } = req {
            let f = di.init(callback, ());
            if let Some(s) = st.surfaces.get_mut(&surface.id()) {
                s.pending_feedback.push(f);
            }
        }
    }
}

impl Dispatch<WpPresentationFeedback, ()> for Comp {
    fn request(
        _: &mut Self,
        _: &Client,
        _: &WpPresentationFeedback,
        _: <WpPresentationFeedback as Resource>::Request,
        _: &(),
        _: &DisplayHandle,
        _: &mut DataInit<'_, Self>,
    ) {
    }
}

impl GlobalDispatch<IviApplication, ()> for Comp {
    fn bind(
        _: &mut Self,
        _: &DisplayHandle,
        _: &Client,
        r: New<IviApplication>,
        _: &(),
        di: &mut DataInit<'_, Self>,
    ) {
        di.init(r, ());
    }
}

impl Dispatch<IviApplication, ()> for Comp {
    fn request(
        st: &mut Self,
        _: &Client,
        _: &IviApplication,
        req: ivi_application::Request,
        _: &(),
        _: &DisplayHandle,
        di: &mut DataInit<'_, Self>,
    ) {
        let ivi_application::Request::SurfaceCreate {
            ivi_id,
            surface,
            id,
        } = req;
        st.log
            .push(format!("ivi_application.surface_create {ivi_id}"));
        di.init(id, ());
        if let Some(s) = st.surfaces.get_mut(&surface.id()) {
            s.ivi_id = Some(ivi_id);
        }
    }
}

impl Dispatch<IviSurface, ()> for Comp {
    fn request(
        _: &mut Self,
        _: &Client,
        _: &IviSurface,
        _: ivi_surface::Request,
        _: &(),
        _: &DisplayHandle,
        _: &mut DataInit<'_, Self>,
    ) {
    }
}

impl GlobalDispatch<WlSeat, ()> for Comp {
    fn bind(
        st: &mut Self,
        _: &DisplayHandle,
        _: &Client,
        r: New<WlSeat>,
        _: &(),
        di: &mut DataInit<'_, Self>,
    ) {
        st.log.push("wl_seat.bind".into());
        let seat = di.init(r, ());
        seat.capabilities(
            wl_seat::Capability::Pointer
                | wl_seat::Capability::Keyboard
                | wl_seat::Capability::Touch,
        );
    }
}

impl Dispatch<WlSeat, ()> for Comp {
    fn request(
        st: &mut Self,
        _: &Client,
        _: &WlSeat,
        req: wl_seat::Request,
        _: &(),
        _: &DisplayHandle,
        di: &mut DataInit<'_, Self>,
    ) {
        match req {
            wl_seat::Request::GetPointer { id } => st.pointers.push(di.init(id, ())),
            wl_seat::Request::GetKeyboard { id } => st.keyboards.push(di.init(id, ())),
            wl_seat::Request::GetTouch { id } => st.touches.push(di.init(id, ())),
            _ => {}
        }
    }
}

impl Dispatch<WlPointer, ()> for Comp {
    fn request(
        _: &mut Self,
        _: &Client,
        _: &WlPointer,
        _: wl_pointer::Request,
        _: &(),
        _: &DisplayHandle,
        _: &mut DataInit<'_, Self>,
    ) {
    }
}

impl Dispatch<WlKeyboard, ()> for Comp {
    fn request(
        _: &mut Self,
        _: &Client,
        _: &WlKeyboard,
        _: wl_keyboard::Request,
        _: &(),
        _: &DisplayHandle,
        _: &mut DataInit<'_, Self>,
    ) {
    }
}

impl Dispatch<WlTouch, ()> for Comp {
    fn request(
        _: &mut Self,
        _: &Client,
        _: &WlTouch,
        _: wl_touch::Request,
        _: &(),
        _: &DisplayHandle,
        _: &mut DataInit<'_, Self>,
    ) {
    }
}

impl GlobalDispatch<ZwpLinuxDmabufV1, ()> for Comp {
    fn bind(
        st: &mut Self,
        _: &DisplayHandle,
        _: &Client,
        r: New<ZwpLinuxDmabufV1>,
        _: &(),
        di: &mut DataInit<'_, Self>,
    ) {
        let d = di.init(r, ());
        for &(format, modifier) in st.offer.dmabuf.iter().flatten() {
            d.modifier(format, (modifier >> 32) as u32, modifier as u32);
        }
    }
}

impl Dispatch<ZwpLinuxDmabufV1, ()> for Comp {
    fn request(
        st: &mut Self,
        _: &Client,
        _: &ZwpLinuxDmabufV1,
        req: zwp_linux_dmabuf_v1::Request,
        _: &(),
        _: &DisplayHandle,
        di: &mut DataInit<'_, Self>,
    ) {
        if let zwp_linux_dmabuf_v1::Request::CreateParams { params_id } = req {
            st.log.push("zwp_linux_dmabuf_v1.create_params".into());
            di.init(params_id, std::sync::Mutex::new(Vec::<Plane>::new()));
        }
    }
}

impl Dispatch<ZwpLinuxBufferParamsV1, std::sync::Mutex<Vec<Plane>>> for Comp {
    fn request(
        st: &mut Self,
        client: &Client,
        params: &ZwpLinuxBufferParamsV1,
        req: zwp_linux_buffer_params_v1::Request,
        planes: &std::sync::Mutex<Vec<Plane>>,
        dh: &DisplayHandle,
        _: &mut DataInit<'_, Self>,
    ) {
        use std::os::unix::fs::MetadataExt;
        match req {
            zwp_linux_buffer_params_v1::Request::Add {
                fd,
                plane_idx,
                offset,
                stride,
                modifier_hi,
                modifier_lo,
            } => planes.lock().unwrap().push(Plane {
                fd,
                idx: plane_idx,
                offset,
                stride,
                modifier: (u64::from(modifier_hi) << 32) | u64::from(modifier_lo),
            }),
            zwp_linux_buffer_params_v1::Request::Create {
                width,
                height,
                format,
                ..
            } => {
                st.log.push("zwp_linux_buffer_params_v1.create".into());
                let planes = planes.lock().unwrap();
                let known = st
                    .offer
                    .dmabuf
                    .iter()
                    .flatten()
                    .any(|&(f, m)| f == format && planes.iter().all(|p| p.modifier == m));
                if st.offer.dmabuf_fail || !known || planes.is_empty() {
                    params.failed();
                    return;
                }
                let meta = std::fs::File::from(planes[0].fd.try_clone().unwrap())
                    .metadata()
                    .unwrap();
                let info = DmabufInfo {
                    width,
                    height,
                    format,
                    planes: planes
                        .iter()
                        .map(|p| (p.idx, p.offset, p.stride, p.modifier))
                        .collect(),
                    file: (meta.dev(), meta.ino()),
                };
                let fd = planes[0].fd.try_clone().unwrap();
                if st.defer_dmabuf {
                    st.deferred_dmabufs
                        .push((params.clone(), client.clone(), info, fd));
                    return;
                }
                st.create_dmabuf(params, client, info, fd, dh);
            }
            _ => {}
        }
    }
}

impl Comp {
    fn create_dmabuf(
        &mut self,
        params: &ZwpLinuxBufferParamsV1,
        client: &Client,
        info: DmabufInfo,
        fd: OwnedFd,
        dh: &DisplayHandle,
    ) {
        let buf = client
            .create_resource::<WlBuffer, DmabufInfo, Comp>(dh, 1, info.clone())
            .unwrap();
        params.created(&buf);
        self.dmabuf_fds.push((buf.clone(), fd));
        self.dmabufs.push(info);
        self.dmabuf_buffers.push(buf);
    }
}

impl Dispatch<WlBuffer, DmabufInfo> for Comp {
    fn request(
        st: &mut Self,
        _: &Client,
        buf: &WlBuffer,
        req: wl_buffer::Request,
        _: &DmabufInfo,
        _: &DisplayHandle,
        _: &mut DataInit<'_, Self>,
    ) {
        if let wl_buffer::Request::Destroy = req {
            // A client must not destroy a buffer the compositor still uses (on screen,
            // or replaced but not released yet).
            let held = st.unreleased.contains(buf)
                || st
                    .surfaces
                    .values()
                    .any(|s| s.current.as_ref() == Some(buf));
            st.dmabuf_fds.retain(|(b, _)| b != buf);
            st.log.push(if held {
                "dmabuf wl_buffer.destroy WHILE HELD".into()
            } else {
                "dmabuf wl_buffer.destroy".into()
            });
        }
    }
}
