//! The kbdif in-event ring: backend produces, frontend consumes (`in_cons`, `in_prod` at
//! the start of the shared page, 51 slots of 40 bytes at offset 1024).
//!
//! Our producer index is private: we never read `in_prod` back from the page. The
//! guest's `in_cons` is read once per batch (one acquire load, the copy) and validated:
//! it may lag at most a full ring behind our producer; anything else is garbage and
//! the ring is broken.

use crate::xen::mem::MappedRegion;

use super::wire::{EventSlot, InEvent, EVENT_SIZE, IN_RING_LEN, IN_RING_OFFS};

const IN_CONS: usize = 0;
const IN_PROD: usize = 4;

/// The guest wrote a consumer index no consumer could have written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("in-event ring: consumer index {cons} is not within {IN_RING_LEN} behind producer {prod}")]
pub struct GarbageIndex {
    pub prod: u32,
    pub cons: u32,
}

/// What one batch put on the ring.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pushed {
    pub sent: u32,
    /// Events that found the ring full (lost).
    pub dropped: u32,
}

/// The backend end of the in-event ring.
pub struct InProducer {
    page: MappedRegion,
    prod: u32,
}

impl InProducer {
    /// Take over an event page at connect time: start where the consumer is (events a
    /// previous backend left unconsumed are dropped, as the frontend reconnects anyway).
    pub fn new(page: MappedRegion) -> Self {
        assert!(page.len() >= 4096, "event page mapping too small");
        let prod = page.load_u32(IN_CONS);
        page.store_u32(IN_PROD, prod);
        InProducer { page, prod }
    }

    /// Our producer index.
    pub fn prod(&self) -> u32 {
        self.prod
    }

    /// Put `events` on the ring, as many as fit, and publish them. The caller notifies
    /// if anything was sent.
    pub fn push(&mut self, events: &[EventSlot]) -> Result<Pushed, GarbageIndex> {
        let cons = self.page.load_u32(IN_CONS);
        let used = self.prod.wrapping_sub(cons);
        if used > IN_RING_LEN {
            return Err(GarbageIndex {
                prod: self.prod,
                cons,
            });
        }
        let free = (IN_RING_LEN - used) as usize;
        let n = events.len().min(free);
        for ev in &events[..n] {
            let offset = IN_RING_OFFS + (self.prod % IN_RING_LEN) as usize * EVENT_SIZE;
            self.page
                .write(offset, ev)
                .expect("event slot lies within the page");
            self.prod = self.prod.wrapping_add(1);
        }
        if n > 0 {
            // Release: the slots are visible before the index (ring.h's wmb()).
            self.page.store_u32(IN_PROD, self.prod);
        }
        Ok(Pushed {
            sent: n as u32,
            dropped: (events.len() - n) as u32,
        })
    }
}

/// The frontend end (simulated guest), consuming like xen-kbdfront's `input_handler`.
pub struct InConsumer {
    page: MappedRegion,
}

impl InConsumer {
    /// A fresh, zeroed event page.
    pub fn init(page: MappedRegion) -> Self {
        page.fill(0, 4096, 0).expect("event page");
        InConsumer { page }
    }

    /// Events published and not yet consumed.
    pub fn pending(&self) -> u32 {
        self.page
            .load_u32(IN_PROD)
            .wrapping_sub(self.page.load_u32(IN_CONS))
    }

    /// Take every published event.
    pub fn drain(&mut self, out: &mut Vec<InEvent>) {
        let prod = self.page.load_u32(IN_PROD);
        let mut cons = self.page.load_u32(IN_CONS);
        while cons != prod {
            let offset = IN_RING_OFFS + (cons % IN_RING_LEN) as usize * EVENT_SIZE;
            let mut slot = [0u8; EVENT_SIZE];
            self.page.read(offset, &mut slot).expect("slot in page");
            out.push(InEvent::decode(&slot));
            cons = cons.wrapping_add(1);
        }
        self.page.store_u32(IN_CONS, cons);
    }

    /// Write a consumer index of the guest's choosing (hostile-guest tests).
    pub fn set_cons(&mut self, cons: u32) {
        self.page.store_u32(IN_CONS, cons);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimXen;
    use crate::xen::{DomId, GrantAllocator, GrantMapper};

    /// The guest's page (granted through its gntalloc) and the backend's mapping of it.
    fn pair() -> (InProducer, InConsumer, SimXen) {
        let sim = SimXen::new();
        let granted = sim.gntalloc(DomId(1)).alloc(DomId(0), 1, true).unwrap();
        let back = sim
            .grant_mapper(DomId(0))
            .map(DomId(1), &granted.refs, true)
            .unwrap();
        let front = InConsumer::init(granted.region);
        (InProducer::new(back), front, sim)
    }

    fn key(code: u32) -> EventSlot {
        InEvent::Key {
            pressed: true,
            keycode: code,
        }
        .encode()
    }

    #[test]
    fn events_flow_and_wrap_the_51_slot_ring() {
        let (mut back, mut front, _pages) = pair();
        let mut got = Vec::new();
        let mut next = 0u32;
        for round in 0..7u32 {
            let batch: Vec<EventSlot> = (0..(20 + round)).map(|k| key(next + k)).collect();
            let p = back.push(&batch).unwrap();
            assert_eq!(
                p,
                Pushed {
                    sent: batch.len() as u32,
                    dropped: 0
                }
            );
            front.drain(&mut got);
            for (k, e) in got.drain(..).enumerate() {
                assert_eq!(
                    e,
                    InEvent::Key {
                        pressed: true,
                        keycode: next + k as u32
                    }
                );
            }
            next += 20 + round;
        }
    }

    #[test]
    fn a_guest_that_never_consumes_loses_events_and_stalls_nothing() {
        let (mut back, front, _pages) = pair();
        let batch: Vec<EventSlot> = (0..60).map(key).collect();
        assert_eq!(
            back.push(&batch).unwrap(),
            Pushed {
                sent: 51,
                dropped: 9
            }
        );
        assert_eq!(
            back.push(&batch[..1]).unwrap(),
            Pushed {
                sent: 0,
                dropped: 1
            }
        );
        assert_eq!(front.pending(), 51);
    }

    #[test]
    fn garbage_consumer_index_is_refused() {
        let (mut back, mut front, _pages) = pair();
        back.push(&[key(1), key(2)]).unwrap();
        // Ahead of the producer, or further behind than a ring: both impossible.
        for bad in [3u32, 1000, u32::MAX - 60] {
            front.set_cons(bad);
            assert!(back.push(&[key(3)]).is_err(), "cons {bad}");
        }
        // A sane index again: the ring works on.
        front.set_cons(2);
        assert_eq!(back.push(&[key(3)]).unwrap().sent, 1);
        // The producer index was never read back from the page.
        assert_eq!(back.prod(), 3);
    }
}
