//! The connection to the compositor: connecting off the loop (a helper thread), the
//! setup (globals, formats), reading and flushing, and the reconnect with backoff.

use super::*;

/// A connection that has not bound its globals in this long is dropped and retried.
pub(super) const SETUP_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) struct Up {
    pub(super) conn: Connection,
    pub(super) queue: EventQueue<Session>,
    pub(super) st: Session,
    /// Globals bound and formats known.
    pub(super) ready: bool,
    pub(super) sync2_sent: bool,
    pub(super) started: Instant,
    pub(super) surfaces: BTreeMap<ConnectorId, Surf>,
}

pub(super) enum Link {
    Down { retry_at: Instant },
    Up(Box<Up>),
}

pub(super) const TOK_WL: Token = Token(0);

pub(super) const TOK_CONNECT: Token = Token(1);

pub(super) struct Connecting {
    pub(super) rx: std::sync::mpsc::Receiver<io::Result<UnixStream>>,
    pub(super) since: Instant,
    pub(super) warned: bool,
}

impl Wayland {
    /// Start connecting on a helper thread: `connect(2)` on a Unix socket blocks while
    /// the listener's backlog is full (a compositor that listens but never accepts), and
    /// the shared loop must not. The thread wakes the loop through our epoll fd.
    pub(super) fn start_connect(&mut self, now: Instant) {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = self.socket.clone();
        let waker = self.waker.clone();
        let spawned = std::thread::Builder::new()
            .name("wayland-connect".into())
            .spawn(move || {
                let _ = tx.send(UnixStream::connect(&path));
                let _ = waker.wake();
            });
        match spawned {
            Ok(_) => {
                self.connecting = Some(Connecting {
                    rx,
                    since: now,
                    warned: false,
                })
            }
            Err(e) => self.retry_later(now, format!("starting a connection thread: {e}")),
        }
    }

    /// Check on the connection thread.
    pub(super) fn poll_connect(&mut self, now: Instant) {
        let Some(c) = self.connecting.as_mut() else {
            return;
        };
        match c.rx.try_recv() {
            Ok(Ok(stream)) => {
                self.connecting = None;
                self.try_connect(now, stream);
            }
            Ok(Err(e)) => {
                self.connecting = None;
                self.retry_later(now, format!("connecting to {}: {e}", self.socket.display()));
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => {
                if !c.warned && now.saturating_duration_since(c.since) > SETUP_TIMEOUT {
                    c.warned = true;
                    warn!(socket = %self.socket.display(), "wayland: connecting blocks (the compositor does not accept); still waiting");
                }
            }
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                self.connecting = None;
                self.retry_later(now, "connection thread ended without a result".into());
            }
        }
    }

    pub(super) fn try_connect(&mut self, now: Instant, stream: UnixStream) {
        let fd = stream.as_raw_fd();
        let conn = match Connection::from_socket(stream) {
            Ok(c) => c,
            Err(e) => {
                self.retry_later(now, format!("wayland handshake: {e}"));
                return;
            }
        };
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut SourceFd(&fd), TOK_WL, Interest::READABLE)
        {
            self.retry_later(now, format!("polling the wayland socket: {e}"));
            return;
        }
        let queue = conn.new_event_queue::<Session>();
        let qh = queue.handle();
        let display = conn.display();
        display.get_registry(&qh, ());
        display.sync(&qh, CbData::Sync(1));
        let up = Box::new(Up {
            conn,
            queue,
            st: Session {
                seat_input: self.cfg.seat_input,
                ..Session::default()
            },
            ready: false,
            sync2_sent: false,
            started: now,
            surfaces: BTreeMap::new(),
        });
        if let Err(e) = up.conn.flush() {
            self.link = Link::Up(up);
            self.disconnect(now, format!("wayland flush: {e}"));
            return;
        }
        self.link = Link::Up(up);
    }

    pub(super) fn retry_later(&mut self, now: Instant, why: String) {
        let backoff = self.backoff;
        warn_limited!(retry_ms = backoff.as_millis() as u64, "wayland: {why}");
        self.backoff = (backoff * 2).min(MAX_BACKOFF);
        self.link = Link::Down {
            retry_at: now + backoff,
        };
    }

    /// Drop the connection: flips in flight complete now, the last frame stays to show
    /// after the reconnect, nothing is held by a compositor any more.
    pub(super) fn disconnect(&mut self, now: Instant, why: String) {
        if let Link::Up(up) = &self.link {
            let fd = up.conn.backend().poll_fd().as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
            if up.ready {
                self.stats.disconnects += 1;
            }
            warn!(event = "wayland_disconnected", reason = %why, "wayland compositor connection lost; retrying");
        }
        self.seat.forget_all(&mut self.seat_out);
        // The wl_buffers died with the connection: asked for again on the next one.
        self.doomed.clear();
        for d in self.dfbs.values_mut() {
            d.state = DmaState::Unsent;
            d.held = false;
        }
        let ids: Vec<ConnectorId> = self.conns.keys().copied().collect();
        for id in ids {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            if let Some(s) = c.store.as_mut() {
                s.forget_held();
            }
            c.committed = None;
            let mut cookies = Vec::new();
            if let Some(f) = c.inflight.take() {
                c.front = Some(f.slot);
                cookies.extend(f.cookies);
            }
            if let Some(d) = c.deferred.take() {
                c.front = Some(Pic::Dma(d.key));
                cookies.extend(d.cookies);
            }
            if let Some(q) = c.queued.take() {
                c.front = Some(q.slot);
                cookies.extend(q.cookies);
            }
            self.complete(id, cookies);
        }
        self.retry_later(now, why);
    }

    /// Read and handle everything the compositor sent; `Err` = the connection is unusable.
    pub(super) fn pump(up: &mut Up) -> Result<(), String> {
        loop {
            up.queue
                .dispatch_pending(&mut up.st)
                .map_err(|e| format!("wayland dispatch: {e}"))?;
            match up.conn.flush() {
                Ok(()) => {}
                Err(WaylandError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("wayland flush: {e}")),
            }
            let Some(guard) = up.queue.prepare_read() else {
                continue;
            };
            match guard.read() {
                Ok(_) => continue,
                Err(WaylandError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    let proto = up.conn.protocol_error();
                    return Err(match proto {
                        Some(p) => format!("wayland protocol error: {p}"),
                        None => format!("wayland read: {e}"),
                    });
                }
            }
        }
        if let Some(p) = up.conn.protocol_error() {
            return Err(format!("wayland protocol error: {p}"));
        }
        Ok(())
    }

    /// Setup: after the first sync the globals are known (bound as announced); check
    /// them and sync again, after which the `wl_shm` formats are known too.
    pub(super) fn advance_setup(&mut self, now: Instant) -> Result<(), String> {
        let Link::Up(up) = &mut self.link else {
            return Ok(());
        };
        if up.ready {
            return Ok(());
        }
        if up.st.syncs_done >= 2 {
            up.ready = true;
            self.backoff = MIN_BACKOFF;
            self.stats.connects += 1;
            let mut formats = up.st.shm_formats.clone();
            formats.sort_unstable();
            info!(
                event = "wayland_connected",
                socket = %self.socket.display(),
                globals = %up.st.globals.names(),
                shm_formats = ?formats,
                // zwp_linux_dmabuf_v1 (format, modifier) pairs (0 without the global).
                dmabuf_pairs = up.st.dmabuf_formats.len(),
                "wayland compositor connected"
            );
            return Ok(());
        }
        if up.st.syncs_done == 1 && !up.sync2_sent {
            let g = &up.st.globals;
            if g.compositor.is_none() || g.shm.is_none() {
                return Err(format!(
                    "compositor lacks wl_compositor or wl_shm ({})",
                    g.names()
                ));
            }
            if g.wm_base.is_none() && g.ivi.is_none() {
                return Err(format!("compositor offers no shell ({})", g.names()));
            }
            up.conn.display().sync(&up.queue.handle(), CbData::Sync(2));
            up.sync2_sent = true;
            up.conn.flush().map_err(|e| format!("wayland flush: {e}"))?;
        }
        if now.saturating_duration_since(up.started) > SETUP_TIMEOUT {
            return Err("compositor did not answer the setup in time".into());
        }
        Ok(())
    }
}
