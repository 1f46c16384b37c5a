//! The request/response ring (Xen's `ring.h` protocol over one page) and the event page,
//! from both ends: the backend's side is what displback runs; the frontend's side drives
//! the simulated guest.
//!
//! Shared indices are read with acquire and written with release ordering; the full
//! barriers sit exactly where ring.h puts `xen_mb()`. Our private indices never come from
//! shared memory, so a guest scribbling over the header can only make us see a bogus
//! `req_prod` or `in_cons`, which is checked.

use crate::xen::mem::{full_barrier, MappedRegion};

use super::wire::{evt_page, ring, Slot, SLOT_SIZE};

/// The frontend broke the ring protocol: the connection must close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("ring producer overflow: req_prod {req_prod}, req_cons {req_cons}")]
    ProducerOverflow { req_prod: u32, req_cons: u32 },
}

/// The event page has no free slot (the frontend is not consuming).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("event page full: in_prod {prod}, in_cons {cons}")]
pub struct EventPageFull {
    pub prod: u32,
    pub cons: u32,
}

fn slot_offset(idx: u32) -> usize {
    ring::SLOTS + (idx & (ring::SIZE - 1)) as usize * SLOT_SIZE
}

fn copy_slot(page: &MappedRegion, offset: usize) -> Slot {
    let mut slot = [0u8; SLOT_SIZE];
    page.read(offset, &mut slot)
        .expect("slot offsets lie within the page");
    slot
}

/// The backend end of a request ring (`BACK_RING_INIT` state).
pub struct BackRing {
    page: MappedRegion,
    req_cons: u32,
    rsp_prod_pvt: u32,
    rsp_prod_published: u32,
}

impl BackRing {
    /// Take over a frontend-initialised ring page (the frontend ran `SHARED_RING_INIT`).
    pub fn new(page: MappedRegion) -> Self {
        assert!(page.len() >= 4096, "ring page mapping too small");
        BackRing {
            page,
            req_cons: 0,
            rsp_prod_pvt: 0,
            rsp_prod_published: 0,
        }
    }

    /// Copy the next request out of shared memory, if there is one.
    pub fn next_request(&mut self) -> Result<Option<Slot>, RingError> {
        let req_prod = self.page.load_u32(ring::REQ_PROD);
        if req_prod == self.req_cons {
            return Ok(None);
        }
        // More unconsumed requests than slots, or a request slot we have not answered yet
        // (RING_REQUEST_CONS_OVERFLOW): the frontend is broken.
        if req_prod.wrapping_sub(self.req_cons) > ring::SIZE
            || self.req_cons.wrapping_sub(self.rsp_prod_pvt) >= ring::SIZE
        {
            return Err(RingError::ProducerOverflow {
                req_prod,
                req_cons: self.req_cons,
            });
        }
        let slot = copy_slot(&self.page, slot_offset(self.req_cons));
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(Some(slot))
    }

    /// The shared page (tests count how often it was copied from).
    pub fn page(&self) -> &MappedRegion {
        &self.page
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`: re-arm `req_event` and report whether requests
    /// arrived meanwhile (then the caller must keep consuming; no wake-up is lost).
    pub fn final_check_for_requests(&mut self) -> bool {
        if self.page.load_u32(ring::REQ_PROD) != self.req_cons {
            return true;
        }
        self.page
            .store_u32(ring::REQ_EVENT, self.req_cons.wrapping_add(1));
        full_barrier();
        self.page.load_u32(ring::REQ_PROD) != self.req_cons
    }

    /// Queue a response (not yet visible to the frontend).
    pub fn put_response(&mut self, resp: &Slot) {
        self.page
            .write(slot_offset(self.rsp_prod_pvt), resp)
            .expect("slot offsets lie within the page");
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
    }

    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`: publish queued responses; true if the
    /// frontend asked to be notified.
    pub fn push_responses(&mut self) -> bool {
        let old = self.rsp_prod_published;
        let new = self.rsp_prod_pvt;
        if old == new {
            return false;
        }
        self.page.store_u32(ring::RSP_PROD, new);
        self.rsp_prod_published = new;
        full_barrier();
        let rsp_event = self.page.load_u32(ring::RSP_EVENT);
        new.wrapping_sub(rsp_event) < new.wrapping_sub(old)
    }
}

/// The frontend end of a request ring (used by the simulated guest).
pub struct FrontRing {
    page: MappedRegion,
    req_prod_pvt: u32,
    req_prod_published: u32,
    rsp_cons: u32,
}

impl FrontRing {
    /// `SHARED_RING_INIT` + `FRONT_RING_INIT` on a fresh page.
    pub fn init(page: MappedRegion) -> Self {
        page.fill(0, 64, 0).expect("ring page");
        page.store_u32(ring::REQ_EVENT, 1);
        page.store_u32(ring::RSP_EVENT, 1);
        FrontRing {
            page,
            req_prod_pvt: 0,
            req_prod_published: 0,
            rsp_cons: 0,
        }
    }

    /// Free request slots.
    pub fn free_requests(&self) -> u32 {
        ring::SIZE - self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// Write a request into the next slot (not yet visible).
    pub fn put_request(&mut self, req: &Slot) {
        self.page
            .write(slot_offset(self.req_prod_pvt), req)
            .expect("slot offsets lie within the page");
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
    }

    /// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`.
    pub fn push_requests(&mut self) -> bool {
        let old = self.req_prod_published;
        let new = self.req_prod_pvt;
        self.page.store_u32(ring::REQ_PROD, new);
        self.req_prod_published = new;
        full_barrier();
        let req_event = self.page.load_u32(ring::REQ_EVENT);
        new.wrapping_sub(req_event) < new.wrapping_sub(old)
    }

    /// Take the next response, re-arming `rsp_event` when the ring is drained.
    pub fn next_response(&mut self) -> Option<Slot> {
        loop {
            if self.page.load_u32(ring::RSP_PROD) != self.rsp_cons {
                let slot = copy_slot(&self.page, slot_offset(self.rsp_cons));
                self.rsp_cons = self.rsp_cons.wrapping_add(1);
                return Some(slot);
            }
            self.page
                .store_u32(ring::RSP_EVENT, self.rsp_cons.wrapping_add(1));
            full_barrier();
            if self.page.load_u32(ring::RSP_PROD) == self.rsp_cons {
                return None;
            }
        }
    }

    /// Raw access for tests that corrupt the ring on purpose.
    pub fn page(&self) -> &MappedRegion {
        &self.page
    }
}

/// The backend end of an event page: ids 0, 1, 2, ... per connection.
pub struct EventProducer {
    page: MappedRegion,
    prod: u32,
    next_id: u16,
}

impl EventProducer {
    /// Take over an event page at connect time: start where the consumer is.
    pub fn new(page: MappedRegion) -> Self {
        assert!(page.len() >= 4096, "event page mapping too small");
        let prod = page.load_u32(evt_page::IN_CONS);
        page.store_u32(evt_page::IN_PROD, prod);
        EventProducer {
            page,
            prod,
            next_id: 0,
        }
    }

    /// Write one event (built by `encode(id)`) and publish it. The caller notifies.
    pub fn push(&mut self, encode: impl FnOnce(u16) -> Slot) -> Result<(), EventPageFull> {
        let cons = self.page.load_u32(evt_page::IN_CONS);
        if self.prod.wrapping_sub(cons) >= evt_page::RING_LEN {
            return Err(EventPageFull {
                prod: self.prod,
                cons,
            });
        }
        let offset = evt_page::RING_OFFS + (self.prod % evt_page::RING_LEN) as usize * SLOT_SIZE;
        let slot = encode(self.next_id);
        self.page
            .write(offset, &slot)
            .expect("event slot lies within the page");
        self.prod = self.prod.wrapping_add(1);
        self.page.store_u32(evt_page::IN_PROD, self.prod);
        self.next_id = self.next_id.wrapping_add(1);
        Ok(())
    }
}

/// The frontend end of an event page (simulated guest).
pub struct EventConsumer {
    page: MappedRegion,
}

impl EventConsumer {
    /// A fresh, zeroed event page.
    pub fn init(page: MappedRegion) -> Self {
        page.fill(0, 64, 0).expect("event page");
        EventConsumer { page }
    }

    /// Take every published event.
    pub fn drain(&mut self, out: &mut Vec<Slot>) {
        let prod = self.page.load_u32(evt_page::IN_PROD);
        let mut cons = self.page.load_u32(evt_page::IN_CONS);
        while cons != prod {
            let offset = evt_page::RING_OFFS + (cons % evt_page::RING_LEN) as usize * SLOT_SIZE;
            out.push(copy_slot(&self.page, offset));
            cons = cons.wrapping_add(1);
        }
        self.page.store_u32(evt_page::IN_CONS, cons);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::displif::request::{
        decode, decode_event, encode_pg_flip_event, encode_response, Request,
    };
    use crate::xen::mem::anonymous;

    /// Two views of one page, like the frontend's and the backend's mappings.
    fn shared_page() -> (MappedRegion, MappedRegion) {
        let a = anonymous(4096).unwrap();
        let ptr = std::ptr::NonNull::new(a.as_ptr() as *mut u8).unwrap();
        // SAFETY: `a` outlives `b` in every test (the tuple keeps both; `a` drops last
        // because tests bind the tuple and drop rings before it), and `b` never unmaps.
        let b = unsafe { MappedRegion::from_raw(ptr, 4096, |_, _| {}) };
        (a, b)
    }

    #[test]
    fn requests_flow_and_final_check_rearms_req_event() {
        let (fpage, bpage) = shared_page();
        let mut front = FrontRing::init(bpage);
        let mut back = BackRing::new(fpage);
        assert_eq!(back.next_request().unwrap(), None);
        assert!(!back.final_check_for_requests());
        // req_event = req_cons + 1 = 1: the first push must notify.
        front.put_request(&Request::PgFlip { fb_cookie: 1 }.encode(0));
        assert!(front.push_requests());
        let slot = back.next_request().unwrap().unwrap();
        assert_eq!(decode(&slot).request, Request::PgFlip { fb_cookie: 1 });
        // Without re-arming, a second push does not notify ...
        front.put_request(&Request::PgFlip { fb_cookie: 2 }.encode(1));
        assert!(!front.push_requests());
        // ... and the final check catches it instead.
        assert!(back.final_check_for_requests());
        assert!(back.next_request().unwrap().is_some());
        assert!(!back.final_check_for_requests());
        front.put_request(&Request::PgFlip { fb_cookie: 3 }.encode(2));
        assert!(
            front.push_requests(),
            "re-armed req_event must produce a notification"
        );
    }

    #[test]
    fn responses_notify_only_when_asked() {
        let (fpage, bpage) = shared_page();
        let mut front = FrontRing::init(bpage);
        let mut back = BackRing::new(fpage);
        front.put_request(&Request::PgFlip { fb_cookie: 1 }.encode(0));
        front.push_requests();
        back.next_request().unwrap();
        back.put_response(&encode_response(0, 0x15, 0, 0));
        assert!(back.push_responses(), "rsp_event starts at 1");
        assert!(front.next_response().is_some());
        assert!(front.next_response().is_none());
        front.put_request(&Request::PgFlip { fb_cookie: 1 }.encode(1));
        front.push_requests();
        back.next_request().unwrap();
        back.put_response(&encode_response(1, 0x15, 0, 0));
        assert!(
            back.push_responses(),
            "frontend re-armed rsp_event when it drained"
        );
    }

    #[test]
    fn producer_overflow_is_detected() {
        let (fpage, bpage) = shared_page();
        let mut back = BackRing::new(fpage);
        bpage.store_u32(ring::REQ_PROD, 33);
        assert!(matches!(
            back.next_request(),
            Err(RingError::ProducerOverflow { .. })
        ));
        bpage.store_u32(ring::REQ_PROD, u32::MAX);
        assert!(back.next_request().is_err());
        bpage.store_u32(ring::REQ_PROD, 32);
        for _ in 0..32 {
            assert!(back.next_request().unwrap().is_some());
        }
        // 32 consumed but unanswered: one more claimed request is an overflow.
        bpage.store_u32(ring::REQ_PROD, 33);
        assert!(back.next_request().is_err());
    }

    #[test]
    fn events_use_modulo_63_and_sequential_ids() {
        let (fpage, bpage) = shared_page();
        let mut cons = EventConsumer::init(bpage);
        let mut prod = EventProducer::new(fpage);
        let mut out = Vec::new();
        let mut expect_id = 0u16;
        for round in 0..5 {
            for k in 0..40u64 {
                prod.push(|id| encode_pg_flip_event(id, round * 100 + k))
                    .unwrap();
            }
            cons.drain(&mut out);
            for (k, slot) in out.drain(..).enumerate() {
                let e = decode_event(&slot);
                assert_eq!(e.id, expect_id);
                assert_eq!(e.fb_cookie, round * 100 + k as u64);
                expect_id += 1;
            }
        }
        for _ in 0..63 {
            prod.push(|id| encode_pg_flip_event(id, 1)).unwrap();
        }
        assert!(prod.push(|id| encode_pg_flip_event(id, 1)).is_err());
    }
}
