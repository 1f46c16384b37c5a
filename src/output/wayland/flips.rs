//! Flips: in flight, deferred, queued and simulated per connector; completion by
//! presentation (or frame callback) and the release of the previous buffer.

use super::*;

pub(super) struct Inflight {
    pub(super) slot: Pic,
    pub(super) seq: u64,
    pub(super) cookies: Vec<u64>,
    /// The picture that was on screen before (must be released before the flip is done).
    pub(super) prev: Option<Pic>,
    pub(super) shown: bool,
    pub(super) deadline: Instant,
}

pub(super) struct Waiting {
    pub(super) slot: Pic,
    pub(super) cookies: Vec<u64>,
    /// Set when no flip is in flight and this one waits only because the compositor holds
    /// the buffers it may have ([`Wayland::held_back`]): it is committed once one comes
    /// back, or completes unshown at this deadline (the guest never stalls). A flip is
    /// never completed by the 60 Hz timer while the compositor may still read its
    /// predecessor.
    pub(super) stalled: Option<Instant>,
}

/// A flip of a dma-buf whose `wl_buffer` the compositor has not answered yet: it is
/// the connector's next flip (like one submitted: a later flip queues behind it, it is
/// never superseded), committed once the buffer is created, or copied if the creation
/// fails or is not answered by `deadline` (checked from the loop's timer).
pub(super) struct Deferred {
    pub(super) key: u64,
    pub(super) cookies: Vec<u64>,
    pub(super) deadline: Instant,
}

/// A flip with no surface to show it on: completes at the next 60 Hz tick.
pub(super) struct Simulated {
    pub(super) slot: Pic,
    pub(super) cookies: Vec<u64>,
    pub(super) due: Instant,
}

pub(super) struct Conn {
    pub(super) unique_id: String,
    pub(super) enabled: bool,
    pub(super) store: Option<Store>,
    /// The picture on screen (or to show once a surface is back).
    pub(super) front: Option<Pic>,
    pub(super) inflight: Option<Inflight>,
    /// A flip waiting for its dma-buf `wl_buffer` (then `inflight` is `None`).
    pub(super) deferred: Option<Deferred>,
    /// Flip waiting for `inflight` (or `deferred`) to finish (latest wins).
    pub(super) queued: Option<Waiting>,
    pub(super) sim: Option<Simulated>,
    /// 60 Hz phase of simulated flips.
    pub(super) last_tick: Option<Instant>,
    /// The picture last committed to the current surface.
    pub(super) committed: Option<Pic>,
    /// Size of the guest frame last rendered (inside the buffer when letterboxed).
    pub(super) frame_size: Option<(u32, u32)>,
}

impl Conn {
    pub(super) fn busy_slot(&self, i: usize) -> bool {
        let i = Pic::Shm(i);
        self.front == Some(i)
            || self.inflight.as_ref().is_some_and(|f| f.slot == i)
            || self.queued.as_ref().is_some_and(|q| q.slot == i)
            || self.sim.as_ref().is_some_and(|s| s.slot == i)
            || matches!(i, Pic::Shm(n) if self.store.as_ref().is_some_and(|s| s.held[n]))
    }
}

impl Wayland {
    /// Report flips at the next dispatch.
    pub(super) fn complete(&mut self, conn: ConnectorId, cookies: Vec<u64>) {
        self.immediate.extend(
            cookies
                .into_iter()
                .map(|fb_cookie| FlipDone { conn, fb_cookie }),
        );
    }

    /// Every pending flip of `conn` completes now (a config or disable superseded them).
    pub(super) fn flush_pending(&mut self, id: ConnectorId) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let mut cookies = Vec::new();
        if let Some(f) = c.inflight.take() {
            cookies.extend(f.cookies);
        }
        if let Some(d) = c.deferred.take() {
            cookies.extend(d.cookies);
        }
        if let Some(q) = c.queued.take() {
            cookies.extend(q.cookies);
        }
        if let Some(s) = c.sim.take() {
            cookies.extend(s.cookies);
        }
        self.complete(id, cookies);
    }

    /// The first 60 Hz tick after `now` on `conn`'s phase.
    pub(super) fn next_tick(c: &Conn, now: Instant) -> Instant {
        let start = c.last_tick.unwrap_or(now);
        let period = PERIOD_60HZ.as_nanos();
        let elapsed = now.saturating_duration_since(start).as_nanos();
        let k = elapsed / period + 1;
        start + Duration::from_nanos(u64::try_from(k * period).unwrap_or(u64::MAX))
    }

    /// Commit `slot` as a tracked flip of `conn` (it has no flip in flight). A dma-buf
    /// whose `wl_buffer` is still pending defers the flip ([`Deferred`]); one the
    /// compositor failed (or did not answer in time) goes as a copy of its pixels.
    pub(super) fn submit(&mut self, id: ConnectorId, slot: Pic, cookies: Vec<u64>, now: Instant) {
        self.submit_stalled(id, slot, cookies, now, None);
    }

    /// [`Self::submit`] of a flip that has waited for a release since `stalled` (its
    /// deadline) if `Some`.
    pub(super) fn submit_stalled(
        &mut self,
        id: ConnectorId,
        mut slot: Pic,
        cookies: Vec<u64>,
        now: Instant,
        stalled: Option<Instant>,
    ) {
        if let Pic::Dma(key) = slot {
            if let Some(deadline) = self.create_deadline(key) {
                if now < deadline {
                    if let Some(c) = self.conns.get_mut(&id) {
                        c.deferred = Some(Deferred {
                            key,
                            cookies,
                            deadline,
                        });
                    }
                    return;
                }
                if let Some(d) = self.dfbs.get_mut(&key) {
                    // A late `created` is destroyed when it comes (`handle_dmabuf`).
                    d.state = DmaState::Failed("the compositor did not answer in time");
                }
            }
            if let Some(DmaState::Failed(why)) = self.dfbs.get(&key).map(|d| &d.state) {
                let _ = self.refuse_dma(id, key, why);
                match self.copy_dfb(id, key) {
                    Ok(pic) => slot = pic,
                    Err(why) => {
                        // Nothing new to show: the flip completes, counted as unshown.
                        warn_limited!(
                            ?id,
                            fb = key,
                            "wayland: copying a refused dma-buf failed ({why}); flip not shown"
                        );
                        self.stats.unshown += 1;
                        self.complete(id, cookies);
                        return;
                    }
                }
            }
        }
        match self.commit(id, slot, true) {
            Some(seq) => {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.inflight = Some(Inflight {
                        slot,
                        seq,
                        cookies,
                        prev: c.front,
                        shown: false,
                        deadline: now + UNSHOWN_FLIP,
                    });
                }
            }
            None if self.held_back(id, slot) => {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.queued = Some(Waiting {
                        slot,
                        cookies,
                        stalled: Some(stalled.unwrap_or(now + UNSHOWN_FLIP)),
                    });
                }
            }
            None => self.simulate(id, slot, cookies, now),
        }
    }

    /// Flips held back by the compositor's buffers ([`Waiting::stalled`]): committed once
    /// a buffer came back, or completed unshown at their deadline.
    pub(super) fn retry_stalled(&mut self, now: Instant) {
        let ids: Vec<ConnectorId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.inflight.is_none()
                    && c.deferred.is_none()
                    && c.queued.as_ref().is_some_and(|q| q.stalled.is_some())
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            let Some(q) = c.queued.take() else {
                continue;
            };
            if q.stalled.is_some_and(|t| now >= t) {
                // Shown later by the catch-up commit, once buffers come back.
                c.front = Some(q.slot);
                self.stats.unshown += q.cookies.len() as u64;
                self.complete(id, q.cookies);
                continue;
            }
            self.submit_stalled(id, q.slot, q.cookies, now, q.stalled);
        }
    }

    /// No surface to show `slot` on: complete at the next 60 Hz tick (latest wins).
    pub(super) fn simulate(
        &mut self,
        id: ConnectorId,
        slot: Pic,
        mut cookies: Vec<u64>,
        now: Instant,
    ) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        match c.sim.take() {
            Some(mut s) => {
                s.cookies.append(&mut cookies);
                s.slot = slot;
                c.sim = Some(s);
            }
            None => {
                let due = Self::next_tick(c, now);
                c.sim = Some(Simulated { slot, cookies, due });
            }
        }
    }

    /// Deferred flips whose dma-buf `wl_buffer` was answered (or whose deadline passed)
    /// go out now: committed, or copied.
    pub(super) fn resolve_deferred(&mut self, now: Instant) {
        let due: Vec<ConnectorId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.deferred
                    .as_ref()
                    .is_some_and(|d| now >= d.deadline || self.create_deadline(d.key).is_none())
            })
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(d) = self.conns.get_mut(&id).and_then(|c| c.deferred.take()) {
                self.submit(id, Pic::Dma(d.key), d.cookies, now);
            }
        }
        // A SET_CONFIG picture whose buffer was not answered in time: a copy instead.
        let expired: Vec<u64> = self
            .conns
            .values()
            .filter_map(|c| match c.front {
                Some(Pic::Dma(k)) if self.create_deadline(k).is_some_and(|t| now >= t) => Some(k),
                _ => None,
            })
            .collect();
        for k in &expired {
            if let Some(d) = self.dfbs.get_mut(k) {
                d.state = DmaState::Failed("the compositor did not answer in time");
            }
        }
        self.fail_over(expired, now);
    }

    pub(super) fn handle_events(&mut self, now: Instant) {
        self.handle_dmabuf();
        let events = match &mut self.link {
            Link::Up(up) => std::mem::take(&mut up.st.events),
            Link::Down { .. } => return,
        };
        for ev in events {
            match ev {
                Ev::Configured {
                    conn,
                    width,
                    height,
                } => {
                    let first = match &mut self.link {
                        Link::Up(up) => match up.surfaces.get_mut(&conn) {
                            Some(s) => {
                                let first = !s.configured;
                                s.configured = true;
                                s.size = (width, height);
                                first
                            }
                            None => false,
                        },
                        Link::Down { .. } => false,
                    };
                    let front = self.conns.get(&conn).and_then(|c| c.front);
                    if let Some(slot) = front {
                        // Map the surface (first configure) or apply the new size.
                        let _ = self.commit(conn, slot, false);
                    } else if first {
                        tracing::debug!(?conn, "surface configured, nothing to show yet");
                    }
                }
                Ev::Released(b) => {
                    if let Some(s) = self.conns.get_mut(&b.conn).and_then(|c| c.store.as_mut()) {
                        if s.gen == b.gen && b.slot < SLOTS {
                            s.held[b.slot] = false;
                        }
                    }
                }
                Ev::Shown {
                    conn,
                    seq,
                    discarded,
                } => {
                    if let Some(f) = self
                        .conns
                        .get_mut(&conn)
                        .and_then(|c| c.inflight.as_mut())
                        .filter(|f| f.seq == seq)
                    {
                        f.shown = true;
                        if discarded {
                            self.stats.unshown += 1;
                        } else {
                            self.stats.presented += 1;
                        }
                    }
                }
                Ev::CloseRequested(conn) => {
                    info!(
                        ?conn,
                        "compositor asked to close a guest's window: it stays (the guest owns it)"
                    );
                }
            }
        }
        self.finish_flips(now);
        // Catch up: a picture that could not be committed (buffers not released) goes
        // out once the compositor gives buffers back.
        let behind: Vec<(ConnectorId, Pic)> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.inflight.is_none()
                    && c.deferred.is_none()
                    && c.sim.is_none()
                    && c.front != c.committed
            })
            .filter_map(|(id, c)| c.front.map(|f| (*id, f)))
            .collect();
        for (id, slot) in behind {
            let _ = self.commit(id, slot, false);
        }
    }

    /// Complete in-flight flips that were shown (and whose previous buffer came back),
    /// or that waited too long; submit the queued ones.
    pub(super) fn finish_flips(&mut self, now: Instant) {
        let ids: Vec<ConnectorId> = self.conns.keys().copied().collect();
        for id in ids {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            let Some(f) = c.inflight.as_ref() else {
                continue;
            };
            let prev_free = match (f.prev, c.store.as_ref()) {
                (Some(p), _) if p == f.slot => true,
                (Some(Pic::Shm(p)), Some(s)) => !s.held[p],
                // A dma-buf picture: its wl_buffer (live or removed) came back.
                (Some(Pic::Dma(k)), _) => {
                    !self.dfbs.get(&k).is_some_and(|d| d.held)
                        && !self.doomed.iter().any(|(d, _, _)| *d == k)
                }
                _ => true,
            };
            let late = now >= f.deadline;
            let finished = late || (f.shown && prev_free);
            if !finished {
                continue;
            }
            if late && !f.shown {
                self.stats.unshown += 1;
            }
            let Some(f) = c.inflight.take() else {
                continue;
            };
            c.front = Some(f.slot);
            let queued = c.queued.take();
            self.complete(id, f.cookies);
            if let Some(q) = queued {
                self.submit(id, q.slot, q.cookies, now);
            }
        }
    }

    pub(super) fn finish_simulated(&mut self, now: Instant) {
        let due: Vec<ConnectorId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.sim.as_ref().is_some_and(|s| s.due <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            let Some(s) = c.sim.take() else {
                continue;
            };
            c.last_tick = Some(s.due);
            c.front = Some(s.slot);
            self.stats.simulated += s.cookies.len() as u64;
            self.complete(id, s.cookies);
            // A surface may have appeared meanwhile: show the picture.
            let _ = self.commit(id, s.slot, false);
        }
    }
}
