//! One turn on one request ring: the single place requests are consumed, handled and
//! answered, used by the event loop ([`crate::displif::device::Device::serve_ring`]),
//! the fuzz target and the tests.
//!
//! A turn ends when the ring is empty (after ring.h's final check re-arms `req_event`),
//! or when it has used its share: [`REQUESTS_PER_TURN`] requests, [`TURN_BYTES`] copied
//! or mapped, or [`TURN_TIME`]. The rest waits until every other ready ring had a turn.
//! It also ends at a request answered later ([`Outcome::Deferred`]), which holds the
//! ring, or when the connection has been refused too often ([`Connection::misbehaving`]).

use std::time::{Duration, Instant};

use super::connection::{Connection, Outcome, PendingRelease};
use super::request::{decode, encode_response};
use super::ring::{BackRing, RingError};
use crate::output::Output;

/// Requests handled per ring per turn, so one busy guest cannot starve the others.
pub const REQUESTS_PER_TURN: usize = 64;
/// A ring's turn also ends once its requests copied or mapped this many bytes...
pub const TURN_BYTES: u64 = 8 << 20;
/// ... or took this long.
pub const TURN_TIME: Duration = Duration::from_millis(2);

/// A request whose answer waits for a blocking release.
#[derive(Debug)]
pub struct Deferred {
    pub id: u16,
    pub operation: u8,
    pub release: PendingRelease,
}

/// How a turn ended.
#[derive(Debug, Default)]
pub struct Turn {
    /// Requests remain (the turn's share is spent).
    pub more: bool,
    /// The guest keeps hitting its limits: close the connection.
    pub misbehaving: bool,
    /// The ring is held by this request until its answer is put on it.
    pub deferred: Option<Deferred>,
    /// Responses were pushed and the frontend asked to be notified.
    pub notify: bool,
}

/// Serve connector `idx`'s ring for one turn; `on_reply(operation, status)` sees every
/// answer given now.
pub fn serve_turn(
    ring: &mut BackRing,
    conn: &mut Connection,
    idx: u32,
    out: &mut dyn Output,
    mut on_reply: impl FnMut(u8, i32),
) -> Result<Turn, RingError> {
    let mut turn = Turn::default();
    let start = Instant::now();
    let (mut handled, mut cost) = (0usize, 0u64);
    let spent = |handled: usize, cost: u64| {
        handled >= REQUESTS_PER_TURN || cost >= TURN_BYTES || start.elapsed() >= TURN_TIME
    };
    turn.more = loop {
        while let Some(slot) = ring.next_request()? {
            let env = decode(&slot);
            handled += 1;
            let outcome = conn.serve(idx, env.request, out);
            cost += conn.take_cost();
            match outcome {
                Outcome::Done(reply) => {
                    on_reply(env.operation, reply.status);
                    ring.put_response(&encode_response(
                        env.id,
                        env.operation,
                        reply.status,
                        reply.edid_sz,
                    ));
                }
                Outcome::Deferred(release) => {
                    turn.deferred = Some(Deferred {
                        id: env.id,
                        operation: env.operation,
                        release,
                    });
                    break;
                }
            }
            if spent(handled, cost) || conn.misbehaving() {
                break;
            }
        }
        turn.notify |= ring.push_responses();
        if turn.deferred.is_some() {
            // Requests after it wait for its answer; completing it re-serves the ring.
            break false;
        }
        if conn.misbehaving() {
            turn.misbehaving = true;
            break false;
        }
        if spent(handled, cost) {
            break true;
        }
        if !ring.final_check_for_requests() {
            break false;
        }
    };
    Ok(turn)
}
