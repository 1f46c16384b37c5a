//! Surfaces and shells: one surface per enabled guest connector (`ivi-application` or an
//! `xdg-shell` toplevel), and committing a picture to it.

use super::*;

pub(super) enum Role {
    Xdg(XdgSurface, XdgToplevel),
    Ivi(proto::ivi::ivi_surface::IviSurface),
}

pub(super) struct Surf {
    pub(super) wl: WlSurface,
    pub(super) role: Role,
    pub(super) viewport: Option<WpViewport>,
    pub(super) configured: bool,
    /// The compositor's suggested size (0 = ours).
    pub(super) size: (i32, i32),
    /// Pool and buffers of store generation `.0`.
    pub(super) pool: Option<(u64, WlShmPool, Vec<Option<WlBuffer>>)>,
    pub(super) next_seq: u64,
    /// Buffer size the opaque region was set for.
    pub(super) opaque: Option<(u32, u32)>,
    /// The viewport destination last set (None: the buffer's own size).
    pub(super) dest: Option<(i32, i32)>,
}

impl Surf {
    pub(super) fn destroy(self) {
        if let Some((_, pool, bufs)) = self.pool {
            for b in bufs.into_iter().flatten() {
                b.destroy();
            }
            pool.destroy();
        }
        if let Some(v) = self.viewport {
            v.destroy();
        }
        match self.role {
            Role::Xdg(s, t) => {
                t.destroy();
                s.destroy();
            }
            Role::Ivi(i) => i.destroy(),
        }
        self.wl.destroy();
    }
}

pub(super) fn surface_config(cfg: &WaylandConfig, unique_id: &str) -> SurfaceConfig {
    cfg.surfaces.get(unique_id).cloned().unwrap_or_default()
}

pub(super) fn store_offset(store: &Store, slot: usize) -> i32 {
    store.offset(slot) as i32
}

/// A new surface for connector `id` with the shell its config asks for.
pub(super) fn create_surface(
    up: &mut Up,
    cfg: &WaylandConfig,
    sc: &SurfaceConfig,
    id: ConnectorId,
    unique_id: &str,
) -> Option<Surf> {
    let qh = up.queue.handle();
    let g = &up.st.globals;
    let compositor = g.compositor.as_ref()?;
    let shell = sc.shell.unwrap_or(cfg.shell);
    let ivi_id = sc.ivi_id.or_else(|| unique_id.parse::<u32>().ok());
    let use_ivi = match (shell, &g.ivi, ivi_id) {
        (ShellChoice::Xdg, _, _) => false,
        (_, Some(_), Some(_)) => true,
        (ShellChoice::Ivi, _, _) => {
            warn!(
                ?id,
                unique_id,
                "ivi shell asked for but not offered (or no numeric id): using xdg-shell"
            );
            false
        }
        _ => false,
    };
    let wl = compositor.create_surface(&qh, id);
    let viewport = g.viewporter.as_ref().map(|v| v.get_viewport(&wl, &qh, ()));
    let role = if use_ivi {
        let (Some(ivi), Some(n)) = (&g.ivi, ivi_id) else {
            return None;
        };
        let s = ivi.surface_create(n, &wl, &qh, id);
        info!(
            ?id,
            unique_id,
            ivi_id = n,
            "wayland surface (ivi-application)"
        );
        Role::Ivi(s)
    } else {
        let Some(wm) = &g.wm_base else {
            warn!(?id, "no xdg_wm_base: connector not shown");
            wl.destroy();
            return None;
        };
        let xs = wm.get_xdg_surface(&wl, &qh, id);
        let top = xs.get_toplevel(&qh, id);
        let title = sc
            .title
            .clone()
            .unwrap_or_else(|| format!("dom{} {unique_id}", id.dom.0));
        top.set_title(title.clone());
        top.set_app_id("displback".into());
        if sc.fullscreen.unwrap_or(cfg.fullscreen) {
            top.set_fullscreen(None);
        }
        info!(
            ?id,
            unique_id, title, "wayland surface (xdg-shell toplevel)"
        );
        Role::Xdg(xs, top)
    };
    let ivi = matches!(role, Role::Ivi(_));
    // xdg-shell: the first commit without a buffer asks for the first configure;
    // ivi-shell needs none (configure events come from the IVI controller).
    wl.commit();
    Some(Surf {
        wl,
        role,
        viewport: if ivi { None } else { viewport },
        configured: ivi,
        size: (0, 0),
        pool: None,
        next_seq: 1,
        opaque: None,
        dest: None,
    })
}

impl Wayland {
    /// Create surfaces for enabled connectors that have none; show their front slot.
    pub(super) fn sync_surfaces(&mut self) {
        let Link::Up(up) = &mut self.link else {
            return;
        };
        if !up.ready {
            return;
        }
        let want: Vec<ConnectorId> = self
            .conns
            .iter()
            .filter(|(id, c)| c.enabled && !up.surfaces.contains_key(id))
            .map(|(id, _)| *id)
            .collect();
        let mut created = Vec::new();
        for id in want {
            let Some(c) = self.conns.get(&id) else {
                continue;
            };
            let sc = surface_config(&self.cfg, &c.unique_id);
            if let Some(s) = create_surface(up, &self.cfg, &sc, id, &c.unique_id) {
                match s.role {
                    Role::Ivi(_) => self.stats.ivi_surfaces += 1,
                    Role::Xdg(..) => self.stats.xdg_surfaces += 1,
                }
                up.surfaces.insert(id, s);
                created.push((id, c.front));
            }
        }
        // A surface that needs no configure (ivi) shows the picture at once.
        for (id, front) in created {
            if let Some(slot) = front {
                let _ = self.commit(id, slot, false);
            }
        }
    }

    /// Buffers of `id` other than `pic` that the compositor still holds.
    fn held_besides(
        c: &Conn,
        dfbs: &BTreeMap<u64, DmaFb>,
        doomed: &[(u64, Option<ConnectorId>, WlBuffer)],
        id: ConnectorId,
        pic: Pic,
    ) -> usize {
        let shm_held = c.store.as_ref().map_or(0, |store| {
            (0..SLOTS)
                .filter(|&i| Pic::Shm(i) != pic && store.held[i])
                .count()
        });
        let dma_held = dfbs
            .iter()
            .filter(|(k, d)| Pic::Dma(**k) != pic && d.held && d.conn == Some(id))
            .count()
            + doomed
                .iter()
                .filter(|(_, conn, _)| *conn == Some(id))
                .count();
        shm_held + dma_held
    }

    /// `commit` of `pic` would be refused only because the compositor holds the buffers
    /// it may have (the surface is there and configured): the flip waits for a release.
    pub(super) fn held_back(&self, id: ConnectorId, pic: Pic) -> bool {
        let Link::Up(up) = &self.link else {
            return false;
        };
        let (Some(c), Some(surf)) = (self.conns.get(&id), up.surfaces.get(&id)) else {
            return false;
        };
        surf.configured && Self::held_besides(c, &self.dfbs, &self.doomed, id, pic) > 1
    }

    /// Attach picture `pic` of `conn` and commit; `track`: ask for presentation of it.
    pub(super) fn commit(&mut self, id: ConnectorId, pic: Pic, track: bool) -> Option<u64> {
        let Link::Up(up) = &mut self.link else {
            return None;
        };
        let qh = up.queue.handle();
        let c = self.conns.get_mut(&id)?;
        let surf = up.surfaces.get_mut(&id)?;
        if !surf.configured {
            return None;
        }
        // A compositor that stopped releasing (hung, stopped) gets no more buffers than
        // the one on screen and one more: further frames wait in our slots.
        if Self::held_besides(c, &self.dfbs, &self.doomed, id, pic) > 1 {
            return None;
        }
        let g = &up.st.globals;
        let (buf, width, height) = match pic {
            Pic::Shm(slot) => {
                let store = c.store.as_mut()?;
                let shm = g.shm.as_ref()?;
                if surf
                    .pool
                    .as_ref()
                    .is_none_or(|(gen, _, _)| *gen != store.gen)
                {
                    if let Some((_, pool, bufs)) = surf.pool.take() {
                        for b in bufs.into_iter().flatten() {
                            b.destroy();
                        }
                        pool.destroy();
                    }
                    let pool =
                        shm.create_pool(store.file.as_fd(), store.file_len() as i32, &qh, ());
                    surf.pool = Some((store.gen, pool, vec![None; SLOTS]));
                }
                let (_, pool, bufs) = surf.pool.as_mut()?;
                let geo = store.geo;
                let buf = bufs.get_mut(slot)?.get_or_insert_with(|| {
                    let format = wl_shm::Format::try_from(geo.shm_format)
                        .unwrap_or(wl_shm::Format::Xrgb8888);
                    pool.create_buffer(
                        store_offset(store, slot),
                        geo.width as i32,
                        geo.height as i32,
                        geo.stride as i32,
                        format,
                        &qh,
                        BufData {
                            conn: id,
                            gen: store.gen,
                            slot,
                        },
                    )
                });
                store.held[slot] = true;
                (buf.clone(), geo.width, geo.height)
            }
            Pic::Dma(key) => {
                let d = self.dfbs.get_mut(&key)?;
                let DmaState::Ready(buf) = &d.state else {
                    return None;
                };
                d.held = true;
                d.conn = Some(id);
                c.frame_size = Some((d.layout.width, d.layout.height));
                (buf.clone(), d.layout.width, d.layout.height)
            }
        };
        surf.wl.attach(Some(&buf), 0, 0);
        if surf.opaque != Some((width, height)) {
            // A guest display has no transparency: say so, so that the compositor never
            // blends the X byte (guests often leave it 0) as alpha.
            if let Some(comp) = &g.compositor {
                let region = comp.create_region(&qh, ());
                region.add(0, 0, width as i32, height as i32);
                surf.wl.set_opaque_region(Some(&region));
                region.destroy();
                surf.opaque = Some((width, height));
            }
        }
        if surf.wl.version() >= 4 {
            surf.wl.damage_buffer(0, 0, width as i32, height as i32);
        } else {
            surf.wl.damage(0, 0, width as i32, height as i32);
        }
        if let Some(vp) = &surf.viewport {
            let (w, h) = surf.size;
            if w > 0 && h > 0 && (w as u32, h as u32) != (width, height) {
                let (dw, dh) = fit(width, height, w, h);
                vp.set_destination(dw, dh);
                surf.dest = Some((dw, dh));
            } else {
                vp.set_destination(-1, -1);
                surf.dest = None;
            }
        }
        let seq = surf.next_seq;
        surf.next_seq += 1;
        if track {
            match &g.presentation {
                Some(p) => {
                    p.feedback(&surf.wl, &qh, FeedbackData { conn: id, seq });
                }
                None => {
                    surf.wl.frame(&qh, CbData::Frame(id, seq));
                }
            }
        }
        surf.wl.commit();
        c.committed = Some(pic);
        if let Err(e) = up.conn.flush() {
            if !matches!(&e, WaylandError::Io(io) if io.kind() == io::ErrorKind::WouldBlock) {
                self.broken = Some(format!("wayland flush: {e}"));
            }
        }
        Some(seq)
    }

    pub(super) fn destroy_surface(&mut self, id: ConnectorId) {
        if let Link::Up(up) = &mut self.link {
            if let Some(s) = up.surfaces.remove(&id) {
                s.destroy();
                self.seat.forget(id, &mut self.seat_out);
                if let Some(c) = self.conns.get_mut(&id) {
                    c.committed = None;
                    if let Some(st) = c.store.as_mut() {
                        // A destroyed buffer is never released: ours again.
                        st.forget_held();
                    }
                }
                // Off the destroyed surface, its dma-buf buffers are the compositor's no
                // more: live ones are ours again, removed ones can go.
                for d in self.dfbs.values_mut().filter(|d| d.conn == Some(id)) {
                    d.held = false;
                }
                self.doomed.retain(|(_, conn, b)| {
                    let keep = *conn != Some(id);
                    if !keep {
                        up.st.dmabuf_ids.remove(&b.id());
                        b.destroy();
                    }
                    keep
                });
                up.st.toplevel_size.remove(&id);
                let _ = up.conn.flush();
            }
        }
    }
}
