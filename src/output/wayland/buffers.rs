//! The pictures: copies in the connector's `wl_shm` store, and guest dma-bufs' own
//! `wl_buffer`s (asked for, answered, refused, copied out when removed).

use super::*;

/// Buffer geometry for a `width` x `height` frame of `format` stored as `choice`.
pub(super) fn geometry(
    format: PixelFormat,
    width: u32,
    height: u32,
    choice: ShmChoice,
) -> Option<Geometry> {
    let row = if choice.same {
        row_bytes(format, width)?
    } else {
        (width as usize).checked_mul(4)?
    };
    let stride = u32::try_from(row.checked_add(3)? & !3).ok()?;
    if width == 0 || height == 0 || i32::try_from(width).is_err() || i32::try_from(height).is_err()
    {
        return None;
    }
    Some(Geometry {
        width,
        height,
        stride,
        shm_format: choice.shm_format,
    })
}

/// A picture to attach: a slot of the connector's `wl_shm` store (a copy), or the
/// `wl_buffer` of a dma-buf framebuffer (zero-copy, [`DmaFb`] by key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pic {
    Shm(usize),
    Dma(u64),
}

/// How far the `wl_buffer` of a dma-buf framebuffer is on the current connection.
pub(super) enum DmaState {
    /// Not asked for on this connection (no compositor yet, or a new connection).
    Unsent,
    /// `create` sent at this instant, no answer yet.
    Pending(Instant),
    Ready(WlBuffer),
    /// The compositor cannot import it (`failed`, no linux-dmabuf, format not offered):
    /// the buffer is refused as an import and the caller copies it.
    Failed(&'static str),
}

/// A framebuffer on a guest dma-buf ([`Output::add_imported_fb`]).
pub(super) struct DmaFb {
    pub(super) import: ImportId,
    pub(super) layout: FbLayout,
    pub(super) state: DmaState,
    /// The compositor holds the `wl_buffer` (attached, not released yet).
    pub(super) held: bool,
    /// The connector it was last committed on.
    pub(super) conn: Option<ConnectorId>,
}

/// The `wl_shm` slot of a picture, if it is one.
pub(super) fn shm_slot(pic: Option<Pic>) -> Option<usize> {
    match pic {
        Some(Pic::Shm(i)) => Some(i),
        _ => None,
    }
}

impl Wayland {
    pub(super) fn offered_formats(&self) -> Vec<u32> {
        match &self.link {
            Link::Up(up) if up.ready => up.st.shm_formats.clone(),
            // Unknown yet: every compositor has XRGB8888.
            _ => vec![SHM_XRGB8888],
        }
    }

    /// Copy `frame` into a free slot of `conn`'s store (replacing the store if the
    /// geometry or format changed); returns the slot.
    pub(super) fn render(
        &mut self,
        id: ConnectorId,
        frame: &Frame<'_>,
    ) -> Result<usize, OutputError> {
        let offered = self.offered_formats();
        let choice = choose_format(frame.format, &offered).ok_or_else(|| {
            warn_limited!(?id, format = ?frame.format, "compositor offers neither the format nor XRGB8888");
            OutputError::Format(frame.format)
        })?;
        let (bw, bh) = self.buffer_size(id, frame, choice);
        let geo =
            geometry(frame.format, bw, bh, choice).ok_or(OutputError::Format(frame.format))?;
        // Letterboxed: the frame centred, the rest black (zero in every format but YUYV,
        // which is never letterboxed).
        let bpp = if choice.same {
            (frame.format.bpp() / 8) as usize
        } else {
            4
        };
        let origin = ((bh - frame.height) / 2) as usize * geo.stride as usize
            + ((bw - frame.width) / 2) as usize * bpp;
        let Some(c) = self.conns.get_mut(&id) else {
            return Err(OutputError::NotConfigured);
        };
        if c.store.as_ref().is_none_or(|s| s.geo != geo) {
            let gen = self.next_gen;
            self.next_gen += 1;
            c.store = Some(Store::new(geo, gen)?);
            c.committed = None;
            // The old slots are gone: what referred to them now refers to nothing.
            if matches!(c.front, Some(Pic::Shm(_))) {
                c.front = None;
            }
            if let Some(f) = c
                .inflight
                .as_mut()
                .filter(|f| matches!(f.prev, Some(Pic::Shm(_))))
            {
                f.prev = None;
            }
            if let Some(d) = c.deferred.take() {
                self.immediate
                    .extend(d.cookies.into_iter().map(|fb_cookie| FlipDone {
                        conn: id,
                        fb_cookie,
                    }));
            }
            for w in c.queued.take().into_iter() {
                self.immediate
                    .extend(w.cookies.into_iter().map(|fb_cookie| FlipDone {
                        conn: id,
                        fb_cookie,
                    }));
            }
            if let Some(s) = c.sim.take() {
                self.immediate
                    .extend(s.cookies.into_iter().map(|fb_cookie| FlipDone {
                        conn: id,
                        fb_cookie,
                    }));
            }
            if let Some(f) = c.inflight.take() {
                self.immediate
                    .extend(f.cookies.into_iter().map(|fb_cookie| FlipDone {
                        conn: id,
                        fb_cookie,
                    }));
            }
        }
        let slot = (0..SLOTS)
            .find(|&i| !c.busy_slot(i))
            .or_else(|| shm_slot(c.queued.as_ref().map(|q| q.slot)))
            .or_else(|| shm_slot(c.sim.as_ref().map(|s| s.slot)))
            .or_else(|| {
                // Every slot held by a compositor that stopped releasing: reuse one it
                // already replaced on screen (it will not show it again).
                let inflight = c.inflight.as_ref().map(|f| f.slot);
                let spare = (0..SLOTS)
                    .find(|&i| c.front != Some(Pic::Shm(i)) && inflight != Some(Pic::Shm(i)));
                warn_limited!(
                    ?id,
                    "wayland: compositor holds every buffer; reusing a replaced one"
                );
                spare
            })
            .ok_or_else(|| OutputError::Device(io::Error::from_raw_os_error(libc::EBUSY)))?;
        let Some(store) = c.store.as_ref() else {
            return Err(OutputError::NotConfigured);
        };
        let n = geo.slot_bytes().unwrap_or(0);
        if self.scratch_geo != Some(geo) {
            // Only the frame's rectangle is written per frame: the border must be black.
            self.scratch.clear();
            self.scratch.resize(n, 0);
            // Opaque black (a letterbox border).
            force_opaque(
                &mut self.scratch,
                geo.stride as usize,
                bw as usize,
                bh as usize,
                geo.shm_format,
            );
            self.scratch_geo = Some(geo);
        }
        let pitch = geo.stride as usize;
        let dst = self
            .scratch
            .get_mut(origin..)
            .ok_or(OutputError::Format(frame.format))?;
        if choice.same {
            self.copier.copy_same(frame, dst, pitch)?;
        } else {
            self.copier.convert(frame, dst, pitch)?;
        }
        force_opaque(
            dst,
            pitch,
            frame.width as usize,
            frame.height as usize,
            geo.shm_format,
        );
        store.write(slot, &self.scratch)?;
        c.frame_size = Some((frame.width, frame.height));
        Ok(slot)
    }

    /// The buffer size for `frame`: the frame's own, or the surface's configured size
    /// when the compositor has no `wp_viewporter` and asked for a larger surface (the
    /// frame is then letterboxed in the buffer, unscaled).
    pub(super) fn buffer_size(
        &self,
        id: ConnectorId,
        frame: &Frame<'_>,
        choice: ShmChoice,
    ) -> (u32, u32) {
        let own = (frame.width, frame.height);
        let Link::Up(up) = &self.link else {
            return own;
        };
        let Some(s) = up.surfaces.get(&id) else {
            return own;
        };
        let (w, h) = s.size;
        let letterbox = s.configured
            && s.viewport.is_none()
            && !(choice.same && frame.format == PixelFormat::Yuyv)
            && w > 0
            && h > 0
            && (w as u32, h as u32) != own
            && w as u32 >= frame.width
            && h as u32 >= frame.height;
        if letterbox {
            (w as u32, h as u32)
        } else {
            own
        }
    }

    /// Ask the compositor for the `wl_buffer` of every dma-buf framebuffer that has
    /// none on this connection; what cannot be asked for is `Failed` (copied).
    pub(super) fn create_dmabufs(&mut self) {
        let Link::Up(up) = &mut self.link else {
            return;
        };
        if !up.ready {
            return;
        }
        let qh = up.queue.handle();
        let mut sent = false;
        for (key, d) in self
            .dfbs
            .iter_mut()
            .filter(|(_, d)| matches!(d.state, DmaState::Unsent))
        {
            let Some(dm) = up.st.globals.dmabuf.as_ref() else {
                d.state = DmaState::Failed("the compositor offers no zwp_linux_dmabuf_v1");
                continue;
            };
            let Some(choice) = dmabuf::choose_dmabuf(d.layout.format, &up.st.dmabuf_formats) else {
                d.state =
                    DmaState::Failed("the compositor imports no linear dma-buf of this format");
                continue;
            };
            let Some(fd) = self.imports.get(&d.import) else {
                d.state = DmaState::Failed("import released");
                continue;
            };
            match dmabuf::create_buffer(
                dm,
                fd.as_fd(),
                &d.layout,
                choice,
                dmabuf::DmabufKey(*key),
                &qh,
            ) {
                Some(_) => {
                    d.state = DmaState::Pending(Instant::now());
                    sent = true;
                }
                None => d.state = DmaState::Failed("layout too large for the protocol"),
            }
        }
        if sent {
            if let Err(e) = up.conn.flush() {
                if !matches!(&e, WaylandError::Io(io) if io.kind() == io::ErrorKind::WouldBlock) {
                    self.broken = Some(format!("wayland flush: {e}"));
                }
            }
        }
    }

    /// Take the compositor's answers to buffer creations and its releases of dma-buf
    /// buffers; a released buffer of a removed framebuffer is destroyed now.
    pub(super) fn handle_dmabuf(&mut self) {
        let Link::Up(up) = &mut self.link else {
            return;
        };
        let mut failed = Vec::new();
        for (key, answer) in std::mem::take(&mut up.st.dmabuf_created) {
            let d = self
                .dfbs
                .get_mut(&key.0)
                .filter(|d| matches!(d.state, DmaState::Pending(_)));
            match (d, answer) {
                (Some(d), dmabuf::Created::Buffer(b)) => {
                    d.state = DmaState::Ready(b);
                    self.stats.dmabuf_imported += 1;
                }
                (Some(d), dmabuf::Created::Failed) => {
                    d.state = DmaState::Failed("the compositor failed to import it");
                    failed.push(key.0);
                }
                // Removed (or refused after waiting) meanwhile.
                (None, dmabuf::Created::Buffer(b)) => {
                    up.st.dmabuf_ids.remove(&b.id());
                    b.destroy();
                }
                (None, dmabuf::Created::Failed) => {}
            }
        }
        for key in std::mem::take(&mut up.st.dmabuf_released) {
            if let Some(d) = self.dfbs.get_mut(&key.0) {
                d.held = false;
            }
            self.doomed.retain(|(k, _, b)| {
                let keep = *k != key.0;
                if !keep {
                    up.st.dmabuf_ids.remove(&b.id());
                    b.destroy();
                }
                keep
            });
        }
        self.fail_over(failed, Instant::now());
    }

    /// Dma-buf framebuffers the compositor cannot show (`failed`, or no answer in
    /// time): the pictures that use them (on screen since SET_CONFIG, deferred, queued)
    /// become copies of their pixels, so that nothing waits for a buffer that never
    /// comes. Later flips of them are refused (the caller copies them).
    pub(super) fn fail_over(&mut self, mut keys: Vec<u64>, now: Instant) {
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            let dma = Pic::Dma(key);
            let user = self
                .conns
                .iter()
                .find(|(_, c)| {
                    c.front == Some(dma)
                        || c.deferred.as_ref().is_some_and(|d| d.key == key)
                        || c.queued.as_ref().is_some_and(|q| q.slot == dma)
                        || c.sim.as_ref().is_some_and(|s| s.slot == dma)
                })
                .map(|(id, _)| *id);
            let Some(id) = user else {
                continue;
            };
            if let Some(DmaState::Failed(why)) = self.dfbs.get(&key).map(|d| &d.state) {
                let _ = self.refuse_dma(id, key, why);
            }
            self.copy_out(key, now);
        }
    }

    /// The picture of an imported frame: its dma-buf `wl_buffer`, created or still
    /// pending (the flip is then deferred, never waited for: [`Deferred`]). A buffer the
    /// compositor cannot take is refused ([`OutputError::ImportRefused`]): the caller
    /// copies that buffer from then on. Without a compositor the frame is taken (its
    /// flip completes on the timer) and checked once one is connected.
    pub(super) fn dma_pic(
        &mut self,
        id: ConnectorId,
        f: &ImportedFrame,
    ) -> Result<Pic, OutputError> {
        let key = f.fb.0;
        let Some(d) = self.dfbs.get(&key) else {
            return Err(OutputError::NotConfigured);
        };
        let whole = (f.x, f.y, f.width, f.height) == (0, 0, d.layout.width, d.layout.height);
        if !whole {
            return Err(self.refuse_dma(
                id,
                key,
                "a source rectangle other than the whole framebuffer",
            ));
        }
        self.create_dmabufs();
        // Answers already read (by an earlier dispatch) count; nothing is waited for.
        self.handle_dmabuf();
        match self.dfbs.get(&key).map(|d| &d.state) {
            Some(DmaState::Failed(why)) => Err(self.refuse_dma(id, key, why)),
            _ => Ok(Pic::Dma(key)),
        }
    }

    /// When a flip of dma-buf framebuffer `key` must stop waiting for its `wl_buffer`:
    /// `Some` while the creation is pending.
    pub(super) fn create_deadline(&self, key: u64) -> Option<Instant> {
        match self.dfbs.get(&key).map(|d| &d.state) {
            Some(DmaState::Pending(asked)) => Some(*asked + self.create_wait),
            _ => None,
        }
    }

    /// A copy of dma-buf framebuffer `key`'s pixels in a `wl_shm` slot of `id`, read
    /// through the import's [`PixelSource`] (the guest's grants: gntdev's dma-bufs have
    /// no `mmap`) or, without one, our own reference to the dma-buf; mapped for the copy
    /// and unmapped after.
    pub(super) fn copy_dfb(&mut self, id: ConnectorId, key: u64) -> Result<Pic, String> {
        let d = self.dfbs.get(&key).ok_or("framebuffer removed")?;
        let layout = d.layout;
        let need = (layout.pitch as usize)
            .checked_mul(layout.height as usize)
            .and_then(|n| n.checked_add(layout.offset as usize))
            .ok_or("layout overflows")?;
        let min_pitch = row_bytes(layout.format, layout.width).ok_or("layout overflows")?;
        if (layout.pitch as usize) < min_pitch {
            return Err("pitch shorter than a row".into());
        }
        let mem = match self.import_pixels.get(&d.import) {
            Some(pixels) => {
                let mem = pixels().map_err(|e| format!("mapping the guest's pages: {e}"))?;
                if mem.len() < need {
                    return Err(format!(
                        "{} bytes of guest pages, the framebuffer needs {need}",
                        mem.len()
                    ));
                }
                mem
            }
            None => {
                let fd = self.imports.get(&d.import).ok_or("import released")?;
                map_dmabuf(fd, need)?
            }
        };
        let frame = Frame {
            mem: &mem,
            offset: layout.offset as usize,
            width: layout.width,
            height: layout.height,
            pitch: layout.pitch,
            format: layout.format,
            fb_cookie: 0,
        };
        let slot = self.render(id, &frame).map_err(|e| e.to_string())?;
        self.stats.copied += 1;
        Ok(Pic::Shm(slot))
    }

    pub(super) fn refuse_dma(&mut self, id: ConnectorId, key: u64, why: &str) -> OutputError {
        self.stats.dmabuf_refused += 1;
        warn_limited!(
            ?id,
            fb = key,
            refused = self.stats.dmabuf_refused,
            "wayland: the compositor cannot show a guest dma-buf ({why}); that buffer is copied"
        );
        OutputError::ImportRefused(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }

    /// Forget dma-buf framebuffer `key`; its `wl_buffer` is destroyed now if the
    /// compositor does not hold it, else when it is released.
    pub(super) fn remove_dfb(&mut self, key: u64) {
        if !self.dfbs.contains_key(&key) {
            return;
        }
        self.copy_out(key, Instant::now());
        let Some(d) = self.dfbs.remove(&key) else {
            return;
        };
        for c in self.conns.values_mut() {
            if c.front == Some(Pic::Dma(key)) {
                c.front = None;
            }
        }
        if let DmaState::Ready(b) = d.state {
            if d.held {
                self.doomed.push((key, d.conn, b));
            } else {
                if let Link::Up(up) = &mut self.link {
                    up.st.dmabuf_ids.remove(&b.id());
                    let _ = up.conn.flush();
                }
                b.destroy();
            }
        }
    }

    /// Dma-buf framebuffer `key` is being removed: each connector picture that still
    /// names it (on screen, committed, in flight, deferred, queued, simulated) becomes a
    /// copy of its pixels, and a copy replaces it on the surface at once: the compositor
    /// then releases the dma-buf's `wl_buffer` (destroyed then, never before) without a
    /// further guest flip, so that DBUF_DESTROY's wait for the guest's pages ends. The
    /// picture stays as it was; nothing here waits.
    pub(super) fn copy_out(&mut self, key: u64, now: Instant) {
        let dma = Pic::Dma(key);
        let users: Vec<ConnectorId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.front == Some(dma)
                    || c.committed == Some(dma)
                    || c.inflight.as_ref().is_some_and(|f| f.slot == dma)
                    || c.deferred.as_ref().is_some_and(|d| d.key == key)
                    || c.queued.as_ref().is_some_and(|q| q.slot == dma)
                    || c.sim.as_ref().is_some_and(|s| s.slot == dma)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in users {
            let copy = match self.copy_dfb(id, key) {
                Ok(pic) => Some(pic),
                Err(why) => {
                    // Taken off the surface all the same (below): the compositor must
                    // let go of the guest's pages.
                    warn_limited!(
                        ?id,
                        fb = key,
                        "wayland: copying a removed dma-buf failed ({why}); its picture is dropped"
                    );
                    None
                }
            };
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            let mut done = Vec::new();
            if c.front == Some(dma) {
                c.front = copy;
            }
            if let Some(s) = c.sim.as_mut().filter(|s| s.slot == dma) {
                match copy {
                    Some(p) => s.slot = p,
                    None => {
                        if let Some(s) = c.sim.take() {
                            done.extend(s.cookies);
                        }
                    }
                }
            }
            if let Some(q) = c.queued.as_mut().filter(|q| q.slot == dma) {
                match copy {
                    Some(p) => q.slot = p,
                    None => {
                        if let Some(q) = c.queued.take() {
                            done.extend(q.cookies);
                        }
                    }
                }
            }
            let deferred = c.deferred.take_if(|d| d.key == key);
            let retarget = c.inflight.as_ref().is_some_and(|f| f.slot == dma);
            let committed = c.committed == Some(dma);
            if !done.is_empty() {
                self.stats.unshown += 1;
                self.complete(id, done);
            }
            match (copy, deferred) {
                (Some(p), Some(d)) => self.submit(id, p, d.cookies, now),
                (None, Some(d)) => {
                    self.stats.unshown += 1;
                    self.complete(id, d.cookies);
                }
                _ => {}
            }
            let Some(p) = copy else {
                if committed {
                    // No copy to attach instead: a new surface (attaching no buffer
                    // would unmap an xdg toplevel for good); the old one's buffers are
                    // the compositor's no more.
                    self.destroy_surface(id);
                    self.sync_surfaces();
                }
                continue;
            };
            if retarget {
                // The flip in flight now shows the copy; its presentation is tracked
                // anew (the compositor discards the feedback of the replaced commit).
                if let Some(seq) = self.commit(id, p, true) {
                    if let Some(f) = self.conns.get_mut(&id).and_then(|c| c.inflight.as_mut()) {
                        f.slot = p;
                        f.seq = seq;
                        f.shown = false;
                    }
                } else if let Some(f) = self.conns.get_mut(&id).and_then(|c| c.inflight.as_mut()) {
                    // Not committed now (the compositor holds too many buffers): the
                    // copy goes out when it releases them (`handle_events` catches up).
                    f.slot = p;
                }
            } else if committed {
                let _ = self.commit(id, p, false);
            }
        }
    }
}

/// The first `need` bytes of dma-buf `fd`, mapped read-only (a mapping past the end of
/// the file would fault on access: its size is checked first).
fn map_dmabuf(fd: &OwnedFd, need: usize) -> Result<crate::backend::mem::MappedRegion, String> {
    let mut file = std::fs::File::from(fd.try_clone().map_err(|e| e.to_string())?);
    let size = std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))
        .map_err(|e| format!("dma-buf size: {e}"))?;
    if (size as usize) < need {
        return Err(format!(
            "dma-buf of {size} bytes, the framebuffer needs {need}"
        ));
    }
    crate::backend::mem::shared(file.as_fd(), need).map_err(|e| format!("mapping the dma-buf: {e}"))
}
