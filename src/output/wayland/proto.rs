//! The Wayland protocol side of the Wayland output: the objects of one connection, the
//! event handlers (which only record what happened, in [`Session::events`]), and the
//! generated `ivi-application` client code.

use std::collections::HashMap;

use wayland_client::protocol::{
    wl_buffer::{self, WlBuffer},
    wl_callback::{self, WlCallback},
    wl_compositor::WlCompositor,
    wl_keyboard::{self, WlKeyboard},
    wl_pointer::{self, WlPointer},
    wl_registry::{self, WlRegistry},
    wl_seat::{self, WlSeat},
    wl_shm::{self, WlShm},
    wl_shm_pool::WlShmPool,
    wl_surface::WlSurface,
    wl_touch::{self, WlTouch},
};
use wayland_client::{delegate_noop, Connection, Dispatch, Proxy, QueueHandle, WEnum};
use wayland_protocols::wp::presentation_time::client::{
    wp_presentation::{self, WpPresentation},
    wp_presentation_feedback::{self, WpPresentationFeedback},
};
use wayland_protocols::wp::viewporter::client::{
    wp_viewport::WpViewport, wp_viewporter::WpViewporter,
};
use wayland_protocols::xdg::shell::client::{
    xdg_surface::{self, XdgSurface},
    xdg_toplevel::{self, XdgToplevel},
    xdg_wm_base::{self, XdgWmBase},
};

use super::dmabuf::{Created, DmabufKey, V_DMABUF};
use super::seat::SeatEv;
use crate::output::ConnectorId;
use wayland_protocols::wp::linux_dmabuf::zv1::client::zwp_linux_dmabuf_v1::ZwpLinuxDmabufV1;

/// Weston's `ivi-application` (client side), generated from our copy of its wire signature.
#[allow(missing_docs, clippy::all, unused_imports, non_upper_case_globals)]
pub mod ivi {
    use wayland_client;
    use wayland_client::protocol::*;

    pub mod __interfaces {
        use wayland_client::backend as wayland_backend;
        use wayland_client::protocol::__interfaces::*;
        wayland_scanner::generate_interfaces!("src/output/wayland/ivi-application.xml");
    }
    use self::__interfaces::*;

    wayland_scanner::generate_client_code!("src/output/wayland/ivi-application.xml");
}

use ivi::ivi_application::IviApplication;
use ivi::ivi_surface::{self, IviSurface};

/// Highest versions we use of each global.
const V_COMPOSITOR: u32 = 4;
const V_WM_BASE: u32 = 2;
/// wl_seat 5: pointer frames exist, keys have no `repeated` state (v10).
const V_SEAT: u32 = 5;

/// Who a callback belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CbData {
    /// `wl_display.sync` number `n`.
    Sync(u32),
    /// Frame callback of the commit number `seq` on a connector's surface.
    Frame(ConnectorId, u64),
}

/// A `wl_buffer`'s identity: slot `slot` of the connector's store generation `gen`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufData {
    pub conn: ConnectorId,
    pub gen: u64,
    pub slot: usize,
}

/// Presentation feedback of commit `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeedbackData {
    pub conn: ConnectorId,
    pub seq: u64,
}

/// Something the compositor told us, for the output to act on after dispatching.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ev {
    /// The surface may be shown; suggested size (0 = ours to choose).
    Configured {
        conn: ConnectorId,
        width: i32,
        height: i32,
    },
    /// The compositor no longer reads the buffer.
    Released(BufData),
    /// Commit `seq` reached the screen (presented) or never will (discarded); `frame`
    /// is true for a frame callback (no presentation protocol).
    Shown {
        conn: ConnectorId,
        seq: u64,
        discarded: bool,
    },
    /// The user asked to close the toplevel (ignored: guests own their connectors).
    CloseRequested(ConnectorId),
}

/// The globals we bind.
#[derive(Default)]
pub struct Globals {
    pub compositor: Option<WlCompositor>,
    pub shm: Option<WlShm>,
    pub wm_base: Option<XdgWmBase>,
    pub presentation: Option<WpPresentation>,
    pub viewporter: Option<WpViewporter>,
    pub ivi: Option<IviApplication>,
    /// `zwp_linux_dmabuf_v1` (version up to [`super::dmabuf::V_DMABUF`]).
    pub dmabuf: Option<ZwpLinuxDmabufV1>,
    /// Bound only with `seat_input`.
    pub seat: Option<WlSeat>,
}

impl Globals {
    /// Names of the bound globals, for logs.
    pub fn names(&self) -> String {
        let mut v = Vec::new();
        for (present, name) in [
            (self.compositor.is_some(), "wl_compositor"),
            (self.shm.is_some(), "wl_shm"),
            (self.wm_base.is_some(), "xdg_wm_base"),
            (self.presentation.is_some(), "wp_presentation"),
            (self.viewporter.is_some(), "wp_viewporter"),
            (self.ivi.is_some(), "ivi_application"),
            (self.dmabuf.is_some(), "zwp_linux_dmabuf_v1"),
            (self.seat.is_some(), "wl_seat"),
        ] {
            if present {
                v.push(name);
            }
        }
        v.join(",")
    }
}

/// The dispatch state of one connection.
#[derive(Default)]
pub struct Session {
    pub globals: Globals,
    /// `wl_shm` formats offered (wl_shm codes: 0 = ARGB8888, 1 = XRGB8888, else fourcc).
    pub shm_formats: Vec<u32>,
    /// Highest `wl_display.sync` number answered.
    pub syncs_done: u32,
    /// Size from the latest `xdg_toplevel.configure`, applied at `xdg_surface.configure`.
    pub toplevel_size: HashMap<ConnectorId, (i32, i32)>,
    pub events: Vec<Ev>,
    /// Bind the seat and record its input (`[wayland] seat_input`).
    pub seat_input: bool,
    pub pointer: Option<WlPointer>,
    pub keyboard: Option<WlKeyboard>,
    pub touch: Option<WlTouch>,
    /// Seat input, in order.
    pub seat_events: Vec<SeatEv>,
    /// (DRM fourcc, modifier) pairs the compositor imports (`zwp_linux_dmabuf_v1`).
    pub dmabuf_formats: Vec<(u32, u64)>,
    /// Answers to dma-buf buffer creations, in order.
    pub dmabuf_created: Vec<(DmabufKey, Created)>,
    /// dma-buf `wl_buffer`s the compositor released, in order.
    pub dmabuf_released: Vec<DmabufKey>,
    /// The key of each dma-buf `wl_buffer` the compositor created (until destroyed).
    pub dmabuf_ids: HashMap<wayland_client::backend::ObjectId, DmabufKey>,
}

impl Dispatch<WlRegistry, ()> for Session {
    fn event(
        st: &mut Self,
        registry: &WlRegistry,
        event: wl_registry::Event,
        _: &(),
        _: &Connection,
        qh: &QueueHandle<Self>,
    ) {
        let wl_registry::Event::Global {
            name,
            interface,
            version,
        } = event
        else {
            return;
        };
        let g = &mut st.globals;
        match interface.as_str() {
            "wl_compositor" if g.compositor.is_none() => {
                g.compositor = Some(registry.bind(name, version.min(V_COMPOSITOR), qh, ()));
            }
            "wl_shm" if g.shm.is_none() => g.shm = Some(registry.bind(name, 1, qh, ())),
            "xdg_wm_base" if g.wm_base.is_none() => {
                g.wm_base = Some(registry.bind(name, version.min(V_WM_BASE), qh, ()));
            }
            "wp_presentation" if g.presentation.is_none() => {
                g.presentation = Some(registry.bind(name, 1, qh, ()));
            }
            "wp_viewporter" if g.viewporter.is_none() => {
                g.viewporter = Some(registry.bind(name, 1, qh, ()));
            }
            "ivi_application" if g.ivi.is_none() => g.ivi = Some(registry.bind(name, 1, qh, ())),
            "zwp_linux_dmabuf_v1" if g.dmabuf.is_none() => {
                g.dmabuf = Some(registry.bind(name, version.min(V_DMABUF), qh, ()));
            }
            // The first seat only (compositors have one; a second would be another user).
            "wl_seat" if st.seat_input && g.seat.is_none() => {
                g.seat = Some(registry.bind(name, version.min(V_SEAT), qh, ()));
            }
            _ => {}
        }
    }
}

impl Dispatch<WlCallback, CbData> for Session {
    fn event(
        st: &mut Self,
        _: &WlCallback,
        event: wl_callback::Event,
        data: &CbData,
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        let wl_callback::Event::Done { .. } = event else {
            return;
        };
        match *data {
            CbData::Sync(n) => st.syncs_done = st.syncs_done.max(n),
            CbData::Frame(conn, seq) => st.events.push(Ev::Shown {
                conn,
                seq,
                discarded: false,
            }),
        }
    }
}

impl Dispatch<WlShm, ()> for Session {
    fn event(
        st: &mut Self,
        _: &WlShm,
        event: wl_shm::Event,
        _: &(),
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        if let wl_shm::Event::Format { format } = event {
            let code = match format {
                WEnum::Value(f) => f as u32,
                WEnum::Unknown(u) => u,
            };
            if !st.shm_formats.contains(&code) {
                st.shm_formats.push(code);
            }
        }
    }
}

impl Dispatch<WlBuffer, BufData> for Session {
    fn event(
        st: &mut Self,
        _: &WlBuffer,
        event: wl_buffer::Event,
        data: &BufData,
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        if let wl_buffer::Event::Release = event {
            st.events.push(Ev::Released(*data));
        }
    }
}

impl Dispatch<XdgWmBase, ()> for Session {
    fn event(
        _: &mut Self,
        wm: &XdgWmBase,
        event: xdg_wm_base::Event,
        _: &(),
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        if let xdg_wm_base::Event::Ping { serial } = event {
            wm.pong(serial);
        }
    }
}

impl Dispatch<XdgSurface, ConnectorId> for Session {
    fn event(
        st: &mut Self,
        surface: &XdgSurface,
        event: xdg_surface::Event,
        conn: &ConnectorId,
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        if let xdg_surface::Event::Configure { serial } = event {
            surface.ack_configure(serial);
            let (width, height) = st.toplevel_size.get(conn).copied().unwrap_or((0, 0));
            st.events.push(Ev::Configured {
                conn: *conn,
                width,
                height,
            });
        }
    }
}

impl Dispatch<XdgToplevel, ConnectorId> for Session {
    fn event(
        st: &mut Self,
        _: &XdgToplevel,
        event: xdg_toplevel::Event,
        conn: &ConnectorId,
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        match event {
            xdg_toplevel::Event::Configure { width, height, .. } => {
                st.toplevel_size.insert(*conn, (width, height));
            }
            xdg_toplevel::Event::Close => st.events.push(Ev::CloseRequested(*conn)),
            _ => {}
        }
    }
}

impl Dispatch<WpPresentation, ()> for Session {
    fn event(
        _: &mut Self,
        _: &WpPresentation,
        _: wp_presentation::Event,
        _: &(),
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        // clock_id: we only need the "presented" edge, not its timestamp.
    }
}

impl Dispatch<WpPresentationFeedback, FeedbackData> for Session {
    fn event(
        st: &mut Self,
        _: &WpPresentationFeedback,
        event: wp_presentation_feedback::Event,
        data: &FeedbackData,
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        let discarded = match event {
            wp_presentation_feedback::Event::Presented { .. } => false,
            wp_presentation_feedback::Event::Discarded => true,
            _ => return,
        };
        st.events.push(Ev::Shown {
            conn: data.conn,
            seq: data.seq,
            discarded,
        });
    }
}

impl Dispatch<IviSurface, ConnectorId> for Session {
    fn event(
        st: &mut Self,
        _: &IviSurface,
        event: ivi_surface::Event,
        conn: &ConnectorId,
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        let ivi_surface::Event::Configure { width, height } = event;
        st.events.push(Ev::Configured {
            conn: *conn,
            width,
            height,
        });
    }
}

impl Dispatch<WlSurface, ConnectorId> for Session {
    fn event(
        _: &mut Self,
        _: &WlSurface,
        _: <WlSurface as Proxy>::Event,
        _: &ConnectorId,
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        // enter/leave/preferred scale: not needed.
    }
}

delegate_noop!(Session: WlCompositor);
delegate_noop!(Session: wayland_client::protocol::wl_region::WlRegion);
delegate_noop!(Session: WlShmPool);
delegate_noop!(Session: WpViewporter);
delegate_noop!(Session: WpViewport);
delegate_noop!(Session: IviApplication);

/// The connector a surface was created for (None: not one of ours, or already dead).
fn surface_conn(s: &WlSurface) -> Option<ConnectorId> {
    s.data::<ConnectorId>().copied()
}

/// A Wayland fixed-point coordinate as f64 (wayland-client already converted it).
fn coord(v: f64) -> f64 {
    if v.is_finite() {
        v
    } else {
        0.0
    }
}

impl Dispatch<WlSeat, ()> for Session {
    fn event(
        st: &mut Self,
        seat: &WlSeat,
        event: wl_seat::Event,
        _: &(),
        _: &Connection,
        qh: &QueueHandle<Self>,
    ) {
        let wl_seat::Event::Capabilities { capabilities } = event else {
            return;
        };
        let caps = match capabilities {
            WEnum::Value(c) => c,
            WEnum::Unknown(u) => wl_seat::Capability::from_bits_truncate(u),
        };
        let v3 = seat.version() >= 3;
        match (
            caps.contains(wl_seat::Capability::Pointer),
            st.pointer.take(),
        ) {
            (true, None) => st.pointer = Some(seat.get_pointer(qh, ())),
            (true, Some(p)) => st.pointer = Some(p),
            (false, Some(p)) => {
                if v3 {
                    p.release();
                }
                st.seat_events.push(SeatEv::PointerLeave);
            }
            (false, None) => {}
        }
        match (
            caps.contains(wl_seat::Capability::Keyboard),
            st.keyboard.take(),
        ) {
            (true, None) => st.keyboard = Some(seat.get_keyboard(qh, ())),
            (true, Some(k)) => st.keyboard = Some(k),
            (false, Some(k)) => {
                if v3 {
                    k.release();
                }
                st.seat_events.push(SeatEv::KeyboardLeave);
            }
            (false, None) => {}
        }
        match (caps.contains(wl_seat::Capability::Touch), st.touch.take()) {
            (true, None) => st.touch = Some(seat.get_touch(qh, ())),
            (true, Some(t)) => st.touch = Some(t),
            (false, Some(t)) => {
                if v3 {
                    t.release();
                }
                st.seat_events.push(SeatEv::TouchCancel);
            }
            (false, None) => {}
        }
    }
}

impl Dispatch<WlPointer, ()> for Session {
    fn event(
        st: &mut Self,
        _: &WlPointer,
        event: wl_pointer::Event,
        _: &(),
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        let ev = match event {
            wl_pointer::Event::Enter {
                surface,
                surface_x,
                surface_y,
                ..
            } => SeatEv::PointerEnter {
                surface: surface_conn(&surface),
                x: coord(surface_x),
                y: coord(surface_y),
            },
            wl_pointer::Event::Leave { .. } => SeatEv::PointerLeave,
            wl_pointer::Event::Motion {
                surface_x,
                surface_y,
                ..
            } => SeatEv::PointerMotion {
                x: coord(surface_x),
                y: coord(surface_y),
            },
            wl_pointer::Event::Button { button, state, .. } => SeatEv::Button {
                code: button,
                pressed: matches!(state, WEnum::Value(wl_pointer::ButtonState::Pressed)),
            },
            wl_pointer::Event::Axis {
                axis: WEnum::Value(wl_pointer::Axis::VerticalScroll),
                value,
                ..
            } => SeatEv::Wheel(value),
            _ => return,
        };
        st.seat_events.push(ev);
    }
}

impl Dispatch<WlKeyboard, ()> for Session {
    fn event(
        st: &mut Self,
        _: &WlKeyboard,
        event: wl_keyboard::Event,
        _: &(),
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        let ev = match event {
            // The keymap's fd is dropped (closed) here: the guest has its own keymap.
            wl_keyboard::Event::Keymap { .. } => return,
            wl_keyboard::Event::Enter { surface, .. } => SeatEv::KeyboardEnter {
                surface: surface_conn(&surface),
            },
            wl_keyboard::Event::Leave { .. } => SeatEv::KeyboardLeave,
            wl_keyboard::Event::Key { key, state, .. } => SeatEv::Key {
                code: key,
                pressed: matches!(state, WEnum::Value(wl_keyboard::KeyState::Pressed)),
            },
            _ => return,
        };
        st.seat_events.push(ev);
    }
}

impl Dispatch<WlTouch, ()> for Session {
    fn event(
        st: &mut Self,
        _: &WlTouch,
        event: wl_touch::Event,
        _: &(),
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        let ev = match event {
            wl_touch::Event::Down {
                surface, id, x, y, ..
            } => SeatEv::TouchDown {
                surface: surface_conn(&surface),
                id,
                x: coord(x),
                y: coord(y),
            },
            wl_touch::Event::Motion { id, x, y, .. } => SeatEv::TouchMotion {
                id,
                x: coord(x),
                y: coord(y),
            },
            wl_touch::Event::Up { id, .. } => SeatEv::TouchUp { id },
            wl_touch::Event::Frame => SeatEv::TouchFrame,
            wl_touch::Event::Cancel => SeatEv::TouchCancel,
            _ => return,
        };
        st.seat_events.push(ev);
    }
}
