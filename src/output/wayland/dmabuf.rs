//! `zwp_linux_dmabuf_v1`, client side: what the compositor can import (format +
//! modifier pairs), the choice for a guest's dma-buf, and the asynchronous creation of a
//! `wl_buffer` from it (`created`, or `failed` → that buffer is copied instead).
//!
//! Guest dma-bufs (gntdev `EXP_FROM_REFS`, udmabuf) are linear pages, so a buffer can
//! only be imported as `DRM_FORMAT_MOD_LINEAR`, or with the implicit modifier
//! ([`MOD_INVALID`], "the driver's default") when the compositor advertises no explicit
//! one for the format. There is no conversion without a copy: the guest format's own
//! layout (alpha variants as their X variant, as on the `wl_shm` path) must be offered,
//! else the frame takes the `wl_shm` copy path with its conversions.
//!
//! [`super::Wayland`] asks for a buffer per dma-buf framebuffer at FB_ATTACH and attaches
//! it on flips of that framebuffer; a buffer the compositor cannot take is refused as an
//! import, and the caller copies it.

use std::os::fd::BorrowedFd;

use wayland_client::protocol::wl_buffer::{self, WlBuffer};
use wayland_client::{Connection, Dispatch, Proxy, QueueHandle};
use wayland_protocols::wp::linux_dmabuf::zv1::client::{
    zwp_linux_buffer_params_v1::{self, ZwpLinuxBufferParamsV1},
    zwp_linux_dmabuf_v1::{self, ZwpLinuxDmabufV1},
};

use super::proto::Session;
use crate::displif::format::{fourcc, PixelFormat};
use crate::output::FbLayout;

/// `DRM_FORMAT_MOD_LINEAR`.
pub const MOD_LINEAR: u64 = 0;
/// `DRM_FORMAT_MOD_INVALID`: no explicit modifier (the implicit, driver-chosen layout).
pub const MOD_INVALID: u64 = 0x00ff_ffff_ffff_ffff;
/// Version 3: `modifier` events for every supported pair (v4's feedback objects carry
/// the same table in a shared-memory file; v3 is what every compositor still answers).
pub const V_DMABUF: u32 = 3;
/// At most this many (format, modifier) pairs are kept from a compositor.
pub const MAX_PAIRS: usize = 4096;

/// The DRM fourcc a guest format is imported as (alpha variants as their X variant: a
/// guest's display has no transparency).
pub fn dmabuf_fourcc(format: PixelFormat) -> u32 {
    match format {
        PixelFormat::Xrgb8888 | PixelFormat::Argb8888 => fourcc(b"XR24"),
        PixelFormat::Rgb565 => fourcc(b"RG16"),
        PixelFormat::Rgb888 => fourcc(b"RG24"),
        PixelFormat::Xrgb4444 | PixelFormat::Argb4444 => fourcc(b"XR12"),
        PixelFormat::Xrgb1555 | PixelFormat::Argb1555 => fourcc(b"XR15"),
        PixelFormat::Yuyv => fourcc(b"YUYV"),
    }
}

/// How a guest dma-buf is imported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmabufChoice {
    pub fourcc: u32,
    pub modifier: u64,
}

/// The import of a linear guest buffer of `format` among the compositor's `offered`
/// (format, modifier) pairs: the format's own fourcc with `MOD_LINEAR`, else with the
/// implicit modifier; `None` (copy path) if neither is offered.
pub fn choose_dmabuf(format: PixelFormat, offered: &[(u32, u64)]) -> Option<DmabufChoice> {
    let f = dmabuf_fourcc(format);
    [MOD_LINEAR, MOD_INVALID]
        .into_iter()
        .find(|m| offered.contains(&(f, *m)))
        .map(|modifier| DmabufChoice {
            fourcc: f,
            modifier,
        })
}

/// Which buffer a `zwp_linux_buffer_params_v1` (and the `wl_buffer` made of it) is for:
/// the output's key of an imported framebuffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DmabufKey(pub u64);

/// The answer to a buffer creation.
#[derive(Debug)]
pub enum Created {
    /// The compositor imported the dma-buf: attach this buffer.
    Buffer(WlBuffer),
    /// It could not (`failed`): copy this framebuffer instead.
    Failed,
}

/// Ask the compositor to make a `wl_buffer` of the dma-buf `fd` laid out as `layout`;
/// the answer arrives as a [`Session::dmabuf_created`] entry for `key`. Refuses (None)
/// a layout that does not fit the protocol's signed sizes.
pub fn create_buffer(
    dmabuf: &ZwpLinuxDmabufV1,
    fd: BorrowedFd<'_>,
    layout: &FbLayout,
    choice: DmabufChoice,
    key: DmabufKey,
    qh: &QueueHandle<Session>,
) -> Option<ZwpLinuxBufferParamsV1> {
    let width = i32::try_from(layout.width).ok().filter(|w| *w > 0)?;
    let height = i32::try_from(layout.height).ok().filter(|h| *h > 0)?;
    let params = dmabuf.create_params(qh, key);
    params.add(
        fd,
        0,
        layout.offset,
        layout.pitch,
        (choice.modifier >> 32) as u32,
        choice.modifier as u32,
    );
    params.create(
        width,
        height,
        choice.fourcc,
        zwp_linux_buffer_params_v1::Flags::empty(),
    );
    Some(params)
}

impl Dispatch<ZwpLinuxDmabufV1, ()> for Session {
    fn event(
        st: &mut Self,
        _: &ZwpLinuxDmabufV1,
        event: zwp_linux_dmabuf_v1::Event,
        _: &(),
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        let pair = match event {
            // v1/v2: formats without modifiers (implicit layout).
            zwp_linux_dmabuf_v1::Event::Format { format } => (format, MOD_INVALID),
            zwp_linux_dmabuf_v1::Event::Modifier {
                format,
                modifier_hi,
                modifier_lo,
            } => (
                format,
                (u64::from(modifier_hi) << 32) | u64::from(modifier_lo),
            ),
            _ => return,
        };
        // The compositor is not trusted to be small: a bounded, duplicate-free table.
        if st.dmabuf_formats.len() < MAX_PAIRS && !st.dmabuf_formats.contains(&pair) {
            st.dmabuf_formats.push(pair);
        }
    }
}

impl Dispatch<ZwpLinuxBufferParamsV1, DmabufKey> for Session {
    fn event(
        st: &mut Self,
        params: &ZwpLinuxBufferParamsV1,
        event: zwp_linux_buffer_params_v1::Event,
        key: &DmabufKey,
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        let answer = match event {
            zwp_linux_buffer_params_v1::Event::Created { buffer } => {
                st.dmabuf_ids.insert(buffer.id(), *key);
                Created::Buffer(buffer)
            }
            zwp_linux_buffer_params_v1::Event::Failed => Created::Failed,
            _ => return,
        };
        params.destroy();
        st.dmabuf_created.push((*key, answer));
    }

    wayland_client::event_created_child!(Session, ZwpLinuxBufferParamsV1, [
        zwp_linux_buffer_params_v1::EVT_CREATED_OPCODE => (WlBuffer, DmabufBuf),
    ]);
}

/// User data of a `wl_buffer` the compositor created from a dma-buf (its key is found
/// by object id in [`Session::dmabuf_ids`]: the child's data cannot name its parent's).
#[derive(Debug)]
pub struct DmabufBuf;

impl Dispatch<WlBuffer, DmabufBuf> for Session {
    fn event(
        st: &mut Self,
        buffer: &WlBuffer,
        event: wl_buffer::Event,
        _: &DmabufBuf,
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        if let wl_buffer::Event::Release = event {
            if let Some(key) = st.dmabuf_ids.get(&buffer.id()) {
                st.dmabuf_released.push(*key);
            }
        }
    }
}
