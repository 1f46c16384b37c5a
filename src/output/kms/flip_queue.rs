//! Which scan-out buffer is shown, in flight or queued on a CRTC: pure state, the
//! caller does the ioctls.

/// Scanout buffers per active connector: front, in flight, and queued (latest wins).
pub const NBUF: usize = 3;

#[derive(Debug)]
struct InFlight {
    buf: usize,
    cookies: Vec<u64>,
}

/// Which of the [`NBUF`] buffers is scanned out, in flight, or queued, and which guest
/// cookies each flip completes. Pure state; the caller does the ioctls.
///
/// Indices from [`NBUF`] on name imported guest framebuffers (zero-copy targets, pushed
/// with [`FlipQueue::push_to`]); [`FlipQueue::back`] only ever returns our own buffers.
#[derive(Debug)]
pub struct FlipQueue {
    front: usize,
    in_flight: Option<InFlight>,
    queued: Option<(usize, Vec<u64>)>,
}

impl FlipQueue {
    /// Buffer `front` is being scanned out, nothing pending.
    pub fn new(front: usize) -> Self {
        FlipQueue {
            front,
            in_flight: None,
            queued: None,
        }
    }

    /// The buffer being scanned out.
    pub fn front(&self) -> usize {
        self.front
    }

    /// Buffer `front` is being put on screen by a commit whose completion event is to
    /// come (a non-blocking modeset): busy until [`FlipQueue::complete`], which reports
    /// no cookies.
    pub fn showing(front: usize) -> Self {
        FlipQueue {
            front,
            in_flight: Some(InFlight {
                buf: front,
                cookies: Vec::new(),
            }),
            queued: None,
        }
    }

    /// True while a flip is submitted and not yet complete.
    pub fn busy(&self) -> bool {
        self.in_flight.is_some()
    }

    /// The buffer to draw the next image into: neither scanned out nor in flight (the
    /// queued buffer if there is one: latest wins overwrites it).
    pub fn back(&self) -> usize {
        if let Some((b, _)) = &self.queued {
            if *b < NBUF {
                return *b;
            }
        }
        let busy = self.in_flight.as_ref().map(|f| f.buf);
        (0..NBUF)
            .find(|&b| b != self.front && Some(b) != busy)
            .unwrap_or((self.front + 1) % NBUF)
    }

    /// A flip of [`FlipQueue::back`] with `cookie` was drawn. Returns the buffer to
    /// submit now, or `None` if it is queued behind the flip in flight.
    pub fn push(&mut self, cookie: u64) -> Option<usize> {
        self.push_to(self.back(), cookie)
    }

    /// A flip to buffer `b` (ours from [`FlipQueue::back`], or an imported target).
    /// Returns the buffer to submit now, or `None` if it is queued (latest wins).
    pub fn push_to(&mut self, b: usize, cookie: u64) -> Option<usize> {
        if self.in_flight.is_none() {
            self.in_flight = Some(InFlight {
                buf: b,
                cookies: vec![cookie],
            });
            return Some(b);
        }
        match &mut self.queued {
            Some((target, cookies)) => {
                *target = b;
                cookies.push(cookie);
            }
            None => self.queued = Some((b, vec![cookie])),
        }
        None
    }

    /// A SET_CONFIG in the same mode wants `b` shown (no guest cookie of its own): like
    /// a flip, submitted now if nothing is in flight, else queued (latest wins; the
    /// cookies already queued then complete when `b` is on screen).
    pub fn push_show(&mut self, b: usize) -> Option<usize> {
        if self.in_flight.is_none() {
            self.in_flight = Some(InFlight {
                buf: b,
                cookies: Vec::new(),
            });
            return Some(b);
        }
        match &mut self.queued {
            Some((target, _)) => *target = b,
            None => self.queued = Some((b, Vec::new())),
        }
        None
    }

    /// The modeset this queue waits for (built with [`FlipQueue::showing`]) has not
    /// been submitted yet and will show `b` instead. Flips queued behind it are older:
    /// returns their cookies to report done now.
    pub fn retarget(&mut self, b: usize) -> Vec<u64> {
        if let Some(f) = &mut self.in_flight {
            f.buf = b;
        }
        self.front = b;
        self.queued.take().map(|(_, c)| c).unwrap_or_default()
    }

    /// True if `b` is scanned out, in flight or queued.
    pub fn uses(&self, b: usize) -> bool {
        self.front == b
            || self.in_flight.as_ref().is_some_and(|f| f.buf == b)
            || self.queued.as_ref().is_some_and(|(q, _)| *q == b)
    }

    /// Submitting the flip in flight failed: drop it; returns its cookies.
    pub fn submit_failed(&mut self) -> Vec<u64> {
        self.in_flight.take().map(|f| f.cookies).unwrap_or_default()
    }

    /// The flip in flight completed: returns its cookies (oldest first) and the queued
    /// buffer to submit next, which becomes the flip in flight.
    pub fn complete(&mut self) -> (Vec<u64>, Option<usize>) {
        let Some(f) = self.in_flight.take() else {
            return (Vec::new(), None);
        };
        self.front = f.buf;
        let next = self.queued.take().map(|(b, cookies)| {
            self.in_flight = Some(InFlight { buf: b, cookies });
            b
        });
        (f.cookies, next)
    }

    /// Forget everything; returns all outstanding cookies, oldest first.
    pub fn drain(&mut self) -> Vec<u64> {
        let mut out = self.submit_failed();
        if let Some((_, c)) = self.queued.take() {
            out.extend(c);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flip_queue_single_flips() {
        let mut q = FlipQueue::new(0);
        assert_eq!(q.back(), 1);
        assert_eq!(q.push(10), Some(1));
        assert!(q.busy());
        assert_eq!(q.front(), 0);
        assert_eq!(q.complete(), (vec![10], None));
        assert_eq!(q.front(), 1);
        assert!(!q.busy());
        assert_eq!(q.back(), 0);
        assert_eq!(q.push(11), Some(0));
        assert_eq!(q.complete(), (vec![11], None));
        assert_eq!(q.front(), 0);
        // A stray event with nothing in flight does nothing.
        assert_eq!(q.complete(), (vec![], None));
        assert_eq!(q.front(), 0);
    }

    #[test]
    fn flip_queue_latest_wins() {
        let mut q = FlipQueue::new(0);
        assert_eq!(q.push(1), Some(1));
        // Queued behind the flip in flight, into the third buffer...
        assert_eq!(q.back(), 2);
        assert_eq!(q.push(2), None);
        // ...and a newer one overwrites that same buffer.
        assert_eq!(q.back(), 2);
        assert_eq!(q.push(3), None);
        assert_eq!(q.complete(), (vec![1], Some(2)));
        assert_eq!(q.front(), 1);
        assert!(q.busy());
        // Drawing now must avoid the front (1) and the in-flight buffer (2).
        assert_eq!(q.back(), 0);
        assert_eq!(q.complete(), (vec![2, 3], None));
        assert_eq!(q.front(), 2);
    }

    #[test]
    fn flip_queue_failures_and_config() {
        let mut q = FlipQueue::new(0);
        assert_eq!(q.push(1), Some(1));
        assert_eq!(q.submit_failed(), vec![1]);
        assert!(!q.busy());
        assert_eq!(q.front(), 0);

        // A same-mode SET_CONFIG while a flip is in flight and another queued: it
        // replaces the queued one (latest wins), whose cookie completes when it shows.
        assert_eq!(q.push(2), Some(1));
        assert_eq!(q.push(3), None);
        let b = q.back();
        assert_eq!(b, 2);
        assert_eq!(q.push_show(b), None);
        assert_eq!(q.complete(), (vec![2], Some(2)));
        assert_eq!(q.front(), 1);
        assert_eq!(q.complete(), (vec![3], None));
        assert_eq!(q.front(), 2);

        assert_eq!(q.push(4), Some(0));
        assert_eq!(q.push(5), None);
        assert_eq!(q.drain(), vec![4, 5]);
        assert!(!q.busy());
        assert_eq!(q.front(), 2);
    }

    #[test]
    fn flip_queue_non_blocking_modeset_and_config() {
        // A non-blocking modeset: busy until its event, which completes no cookie.
        let mut q = FlipQueue::showing(0);
        assert!(q.busy());
        assert_eq!(q.push(7), None, "a flip waits for the modeset");
        assert_eq!(q.complete(), (vec![], Some(1)));
        assert_eq!(q.complete(), (vec![7], None));
        assert_eq!(q.front(), 1);
        // A same-mode SET_CONFIG with nothing in flight: submitted now.
        let b = q.back();
        assert_eq!(q.push_show(b), Some(b));
        assert!(q.busy());
        // Another one while that is in flight waits, latest wins, and the flip queued
        // before it completes when it shows.
        let c = q.back();
        assert_eq!(q.push(8), None);
        assert_eq!(q.push_show(c), None);
        assert_eq!(q.complete(), (vec![], Some(c)));
        assert_eq!(q.front(), b);
        assert_eq!(q.complete(), (vec![8], None));
        assert_eq!(q.front(), c);
    }

    #[test]
    fn flip_queue_planned_modeset_retargeted() {
        // A modeset planned while the CRTC was busy, not yet submitted.
        let mut q = FlipQueue::showing(0);
        assert_eq!(q.push(1), None, "flips wait behind the planned modeset");
        // A same-mode SET_CONFIG before it went out: it shows that frame instead, and
        // the older queued flip is reported now.
        let b = q.back();
        assert_ne!(b, 0);
        assert_eq!(q.retarget(b), vec![1]);
        assert_eq!(q.complete(), (vec![], None));
        assert_eq!(q.front(), b);
    }

    #[test]
    fn flip_queue_direct_targets() {
        let direct = NBUF;
        let mut q = FlipQueue::new(0);
        assert_eq!(q.push_to(direct, 1), Some(direct));
        // A copy flip queued behind it draws into one of ours, never the import.
        assert_eq!(q.back(), 1);
        assert_eq!(q.push(2), None);
        // A direct flip replaces the queued copy (latest wins), keeping its cookie.
        assert_eq!(q.push_to(direct + 1, 3), None);
        assert!(q.uses(direct + 1));
        assert!(q.back() < NBUF);
        assert_eq!(q.complete(), (vec![1], Some(direct + 1)));
        assert_eq!(q.front(), direct);
        assert_eq!(q.complete(), (vec![2, 3], None));
        assert_eq!(q.front(), direct + 1);
        assert!(!q.uses(direct));
    }
}
