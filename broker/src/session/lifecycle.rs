//! Where a connection is in its life, as a pure state machine: no sockets, no tasks, no
//! clock of its own (every decision takes `now`). The session task, the shard, the resume
//! handshake and the management API all change a connection's state only through it, so
//! the races between them (a DELETE during a resume, a window that runs out under a
//! resume, a takeover of a socket that still looks alive, an overflow while parked) are
//! decided in one place and tested here without a socket or a sleep.
//!
//! ```text
//!            let_go                 park                    attach
//!   Live ──────────────▶ LettingGo ──────▶ Parked { until } ──────────▶ Attached
//!    │ ▲                                     │  (window, close)            │
//!    │ └─────────────────────────────────────┼─────────────── resumed ─────┘
//!    ▼ close                                 ▼
//!  Closing ◀─────────────────────────────── end
//! ```
//!
//! Beside the phase, two facts cut across it: a close someone asked for that the session
//! has not acted on yet (the first wins), and whether a resume handshake holds a claim on
//! the connection (while it does, nothing ends the connection under it).

use std::time::{Duration, Instant};

use crate::disconnect::DisconnectReason;
use crate::frame::close_code;
use crate::outbound::Wire;
use crate::resume::Refusal;

/// The phase of a connection's life.
#[derive(Debug)]
enum Phase {
    /// Served on a socket.
    Live,
    /// A resume takes over while its socket still looks alive: the session lets go of the
    /// socket and parks. Frames keep queueing meanwhile.
    LettingGo,
    /// Its socket is gone and it waits for its client to resume until `until`: frames
    /// queue (within the same bounds) but are not written.
    Parked { until: Instant },
    /// A resume attached a new socket; the parked session serves again on it, starting
    /// with `leftover`, the bytes the client sent after its request head.
    Attached { leftover: Vec<u8> },
    /// Closing or closed: it takes no more frames.
    Closing,
}

/// One connection's lifecycle. See the module documentation.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    phase: Phase,
    /// Asked for (by a DELETE, an overflow, the sweep, a shutdown) and not yet acted on.
    close: Option<DisconnectReason>,
    /// A resume handshake for it is running.
    claimed: bool,
}

/// Why the serving loop must stop now, if it must.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// End the connection (the close frame `reason` calls for, unless it parks).
    Close(DisconnectReason),
    /// A resume takes over: let go of the socket and park.
    LetGo,
}

/// What a parked connection does next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ParkStep {
    /// Its client resumed: serve again, starting with these bytes.
    Resumed(Vec<u8>),
    /// It ends for `reason`; a later resume is told `refusal`, if anything particular.
    End {
        reason: DisconnectReason,
        refusal: Option<Refusal>,
    },
    /// Nothing to do until woken, or until `until` if given.
    Wait { until: Option<Instant> },
}

/// Whether a resume may claim the connection, and if not why.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ClaimError {
    /// Another resume holds it.
    Claimed,
    /// It is closing.
    Closing,
}

impl Lifecycle {
    pub(crate) fn new() -> Self {
        Self {
            phase: Phase::Live,
            close: None,
            claimed: false,
        }
    }

    /// Whether it takes frames: not closing, and no close asked for.
    pub(crate) fn takes_frames(&self) -> bool {
        !matches!(self.phase, Phase::Closing) && self.close.is_none()
    }

    /// Whether its frames wait for a socket (parked, or resumed and not yet served).
    pub(crate) fn is_parked(&self) -> bool {
        matches!(self.phase, Phase::Parked { .. })
    }

    /// Whether it has a socket to write to.
    pub(crate) fn is_writable(&self) -> bool {
        matches!(self.phase, Phase::Live | Phase::LettingGo)
    }

    pub(crate) fn close_requested(&self) -> bool {
        self.close.is_some()
    }

    /// Asks it to close with `reason`; the first request wins, and none is taken once it
    /// is closing. Returns whether the request was taken (its session must be woken).
    pub(crate) fn request_close(&mut self, reason: DisconnectReason) -> bool {
        if self.close.is_some() || matches!(self.phase, Phase::Closing) {
            return false;
        }
        self.close = Some(reason);
        true
    }

    /// A resume handshake claims it: until [`Lifecycle::release`], no second resume runs,
    /// and neither its window nor a close request ends it.
    pub(crate) fn claim(&mut self) -> Result<(), ClaimError> {
        if self.claimed {
            return Err(ClaimError::Claimed);
        }
        if matches!(self.phase, Phase::Closing) {
            return Err(ClaimError::Closing);
        }
        self.claimed = true;
        Ok(())
    }

    /// The resume handshake settled (attached a socket, or gave up).
    pub(crate) fn release(&mut self) {
        self.claimed = false;
    }

    /// A resume takes over while its socket still looks alive. Returns whether the
    /// session must be woken to let go (false when it has no socket to let go of).
    pub(crate) fn let_go(&mut self) -> bool {
        if matches!(self.phase, Phase::Live) {
            self.phase = Phase::LettingGo;
            return true;
        }
        false
    }

    /// Asked by the serving loop after each round of work: whether it must stop, and why.
    /// A close request is taken (acted on now); letting go comes after it.
    pub(crate) fn stop(&mut self) -> Option<Stop> {
        if let Some(reason) = self.close.take() {
            return Some(Stop::Close(reason));
        }
        if matches!(self.phase, Phase::LettingGo) {
            return Some(Stop::LetGo);
        }
        None
    }

    /// Its socket is gone (or let go of): it waits for a resume until `now + window`.
    pub(crate) fn park(&mut self, now: Instant, window: Duration) {
        self.phase = Phase::Parked {
            until: now + window,
        };
    }

    /// A resume attaches a new socket; refused unless it is parked.
    pub(crate) fn attach(&mut self, leftover: Vec<u8>) -> Result<(), NotParked> {
        if !self.is_parked() {
            return Err(NotParked);
        }
        self.phase = Phase::Attached { leftover };
        Ok(())
    }

    /// What a parked connection does at `now`. A resume that attached wins (a close asked
    /// for meanwhile is then acted on by the resumed session); while a resume holds its
    /// claim nothing ends it; then a close request; then its window.
    pub(crate) fn poll_parked(&mut self, now: Instant) -> ParkStep {
        let until = match &mut self.phase {
            Phase::Attached { leftover } => {
                let leftover = std::mem::take(leftover);
                self.phase = Phase::Live;
                return ParkStep::Resumed(leftover);
            }
            Phase::Parked { until } => *until,
            // Not parked: nothing to wait for.
            _ => return ParkStep::Wait { until: None },
        };
        if self.claimed {
            return ParkStep::Wait { until: None };
        }
        if let Some(reason) = self.close.take() {
            self.phase = Phase::Closing;
            let refusal = unresumable_because(&reason);
            return ParkStep::End { reason, refusal };
        }
        if now >= until {
            self.phase = Phase::Closing;
            return ParkStep::End {
                reason: DisconnectReason::ResumeExpired,
                refusal: Some(Refusal::Expired),
            };
        }
        ParkStep::Wait { until: Some(until) }
    }

    /// It is closing: no more frames, no resume.
    pub(crate) fn begin_closing(&mut self) {
        self.phase = Phase::Closing;
    }
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

/// [`Lifecycle::attach`] on a connection that is not parked.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct NotParked;

/// What a connection whose serving ended for `reason` does: `None` parks it for a resume
/// (its socket was lost or let go of, it is resumable, and the gateway is not shutting
/// down); `Some` ends it with that reason.
pub(crate) fn end_of_serving(
    reason: DisconnectReason,
    resumable: bool,
    shutting_down: bool,
) -> Option<DisconnectReason> {
    let socket_gone = matches!(
        reason,
        DisconnectReason::ConnectionLost | DisconnectReason::Superseded
    );
    if socket_gone && resumable && !shutting_down {
        return None;
    }
    Some(match reason {
        // A takeover that met the shutdown: the shutdown is what ended it.
        DisconnectReason::Superseded => DisconnectReason::ServerShutdown,
        reason => reason,
    })
}

/// How a connection that ends is closed: the code and reason its client is told, and
/// whether what it has not read yet is dropped first.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Farewell {
    pub(crate) code: u16,
    pub(crate) reason: String,
    /// A slow consumer's or an overloaded gateway's: only the verdict goes out.
    pub(crate) abandon_queue: bool,
}

/// How a connection that ended for `reason` is closed on `wire`; `None` when its socket is
/// gone and nothing can be said. A WebSocket client that closed hears its own code back
/// (RFC 6455 echo); a WebTransport session is closed with the reason's code and text.
pub(crate) fn farewell(reason: &DisconnectReason, wire: Wire) -> Option<Farewell> {
    let (code, text) = match (reason, wire) {
        (DisconnectReason::ConnectionLost, _) => return None,
        (DisconnectReason::ClientClosed(code, _), Wire::WebSocket) => {
            (code.unwrap_or(close_code::NORMAL), String::new())
        }
        (reason, _) => (reason.status_code(), reason.description()),
    };
    let abandon_queue = matches!(
        reason,
        DisconnectReason::SlowConsumer | DisconnectReason::Overloaded
    );
    Some(Farewell {
        code,
        reason: text,
        abandon_queue,
    })
}

/// What a later resume of a connection that ended for `reason` while parked is told.
fn unresumable_because(reason: &DisconnectReason) -> Option<Refusal> {
    match reason {
        DisconnectReason::SlowConsumer | DisconnectReason::Overloaded => Some(Refusal::Overflow),
        DisconnectReason::IdleTimeout | DisconnectReason::MaxDuration => Some(Refusal::Expired),
        _ => None,
    }
}

/// Why a connection should be closed at `now`, if a time limit has run out: its maximum
/// age (`expires_at`) or its idle timeout since `last_active`.
pub(crate) fn timed_out(
    now: Instant,
    expires_at: Instant,
    last_active: Instant,
    idle_timeout: Duration,
) -> Option<DisconnectReason> {
    if now >= expires_at {
        Some(DisconnectReason::MaxDuration)
    } else if now.saturating_duration_since(last_active) >= idle_timeout {
        Some(DisconnectReason::IdleTimeout)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(30);

    fn parked_at(now: Instant) -> Lifecycle {
        let mut life = Lifecycle::new();
        assert_eq!(
            end_of_serving(DisconnectReason::ConnectionLost, true, false),
            None
        );
        life.park(now, WINDOW);
        life
    }

    #[test]
    fn a_live_connection_takes_frames_until_a_close_is_asked_for() {
        let mut life = Lifecycle::new();
        assert!(life.takes_frames() && life.is_writable() && !life.is_parked());
        assert_eq!(life.stop(), None);
        assert!(life.request_close(DisconnectReason::Deleted));
        assert!(!life.takes_frames());
        // The first request wins.
        assert!(!life.request_close(DisconnectReason::SlowConsumer));
        assert_eq!(life.stop(), Some(Stop::Close(DisconnectReason::Deleted)));
        life.begin_closing();
        assert!(!life.takes_frames());
        assert!(!life.request_close(DisconnectReason::ServerShutdown));
        assert_eq!(life.stop(), None);
    }

    #[test]
    fn a_lost_socket_parks_a_resumable_connection_and_ends_any_other() {
        let lost = || DisconnectReason::ConnectionLost;
        assert_eq!(end_of_serving(lost(), true, false), None);
        assert_eq!(end_of_serving(lost(), false, false), Some(lost()));
        assert_eq!(end_of_serving(lost(), true, true), Some(lost()));
        assert_eq!(
            end_of_serving(DisconnectReason::Superseded, true, false),
            None
        );
        assert_eq!(
            end_of_serving(DisconnectReason::Superseded, true, true),
            Some(DisconnectReason::ServerShutdown)
        );
        assert_eq!(
            end_of_serving(DisconnectReason::Deleted, true, false),
            Some(DisconnectReason::Deleted)
        );
    }

    #[test]
    fn a_parked_connection_takes_frames_but_writes_none_and_expires_with_its_window() {
        let start = Instant::now();
        let mut life = parked_at(start);
        assert!(life.takes_frames() && life.is_parked() && !life.is_writable());
        assert_eq!(
            life.poll_parked(start),
            ParkStep::Wait {
                until: Some(start + WINDOW)
            }
        );
        assert_eq!(
            life.poll_parked(start + WINDOW),
            ParkStep::End {
                reason: DisconnectReason::ResumeExpired,
                refusal: Some(Refusal::Expired)
            }
        );
        assert!(!life.takes_frames());
        assert_eq!(life.claim(), Err(ClaimError::Closing));
    }

    #[test]
    fn a_resume_attaches_to_a_parked_connection_and_serving_starts_with_its_bytes() {
        let start = Instant::now();
        let mut life = parked_at(start);
        life.claim().unwrap();
        life.attach(b"hello".to_vec()).unwrap();
        life.release();
        assert_eq!(
            life.poll_parked(start),
            ParkStep::Resumed(b"hello".to_vec())
        );
        assert!(life.is_writable() && !life.is_parked());
        // It can be lost and resumed again.
        life.park(start, WINDOW);
        assert!(life.is_parked());
    }

    #[test]
    fn only_a_parked_connection_can_be_attached() {
        let mut life = Lifecycle::new();
        assert_eq!(life.attach(Vec::new()), Err(NotParked));
        life.begin_closing();
        assert_eq!(life.attach(Vec::new()), Err(NotParked));
    }

    #[test]
    fn one_resume_at_a_time() {
        let mut life = parked_at(Instant::now());
        life.claim().unwrap();
        assert_eq!(life.claim(), Err(ClaimError::Claimed));
        life.release();
        life.claim().unwrap();
    }

    #[test]
    fn a_delete_during_a_resume_waits_for_it_and_then_ends_the_connection() {
        let start = Instant::now();
        let mut life = parked_at(start);
        life.claim().unwrap();
        assert!(life.request_close(DisconnectReason::Deleted));
        // The resume's handshake runs on: nothing ends the connection under it.
        assert_eq!(life.poll_parked(start), ParkStep::Wait { until: None });
        // It failed (the client left): the DELETE takes effect.
        life.release();
        assert_eq!(
            life.poll_parked(start),
            ParkStep::End {
                reason: DisconnectReason::Deleted,
                refusal: None
            }
        );
    }

    #[test]
    fn a_delete_during_a_resume_that_succeeds_is_acted_on_by_the_resumed_session() {
        let start = Instant::now();
        let mut life = parked_at(start);
        life.claim().unwrap();
        life.request_close(DisconnectReason::Deleted);
        life.attach(Vec::new()).unwrap();
        life.release();
        assert_eq!(life.poll_parked(start), ParkStep::Resumed(Vec::new()));
        assert_eq!(life.stop(), Some(Stop::Close(DisconnectReason::Deleted)));
    }

    #[test]
    fn the_window_does_not_run_out_under_a_running_resume() {
        let start = Instant::now();
        let mut life = parked_at(start);
        life.claim().unwrap();
        let late = start + WINDOW + Duration::from_secs(5);
        assert_eq!(life.poll_parked(late), ParkStep::Wait { until: None });
        life.release();
        assert_eq!(
            life.poll_parked(late),
            ParkStep::End {
                reason: DisconnectReason::ResumeExpired,
                refusal: Some(Refusal::Expired)
            }
        );
    }

    #[test]
    fn a_takeover_makes_the_live_session_let_go_and_park_for_the_resume() {
        let start = Instant::now();
        let mut life = Lifecycle::new();
        life.claim().unwrap();
        assert!(life.let_go());
        // Frames keep queueing while it lets go; a second takeover has nothing to do.
        assert!(life.takes_frames());
        assert!(!life.let_go());
        assert_eq!(life.stop(), Some(Stop::LetGo));
        let ended = end_of_serving(DisconnectReason::Superseded, true, false);
        assert_eq!(ended, None);
        life.park(start, WINDOW);
        assert!(life.is_parked());
        life.attach(b"x".to_vec()).unwrap();
        life.release();
        assert_eq!(life.poll_parked(start), ParkStep::Resumed(b"x".to_vec()));
        assert_eq!(life.stop(), None);
    }

    #[test]
    fn a_close_asked_for_before_a_takeover_is_acted_on_first() {
        let mut life = Lifecycle::new();
        life.claim().unwrap();
        life.request_close(DisconnectReason::SlowConsumer);
        life.let_go();
        assert_eq!(
            life.stop(),
            Some(Stop::Close(DisconnectReason::SlowConsumer))
        );
    }

    #[test]
    fn an_overflow_while_parked_ends_it_and_tells_a_later_resume_why() {
        let start = Instant::now();
        let mut life = parked_at(start);
        assert!(life.request_close(DisconnectReason::SlowConsumer));
        assert_eq!(
            life.poll_parked(start),
            ParkStep::End {
                reason: DisconnectReason::SlowConsumer,
                refusal: Some(Refusal::Overflow)
            }
        );
        let mut life = parked_at(start);
        life.request_close(DisconnectReason::MaxDuration);
        assert_eq!(
            life.poll_parked(start),
            ParkStep::End {
                reason: DisconnectReason::MaxDuration,
                refusal: Some(Refusal::Expired)
            }
        );
    }

    #[test]
    fn a_claim_sees_a_close_asked_for_before_it_and_the_close_stands() {
        // A move to another node checks this after claiming: the DELETE came first, so the
        // connection stays and is closed once the claim lets go.
        let start = Instant::now();
        let mut life = parked_at(start);
        life.request_close(DisconnectReason::Deleted);
        life.claim().unwrap();
        assert!(life.close_requested());
        life.release();
        assert_eq!(
            life.poll_parked(start),
            ParkStep::End {
                reason: DisconnectReason::Deleted,
                refusal: None
            }
        );
    }

    #[test]
    fn each_end_is_closed_with_the_code_its_reason_calls_for() {
        assert_eq!(
            farewell(&DisconnectReason::ConnectionLost, Wire::WebSocket),
            None
        );
        let echoed = farewell(
            &DisconnectReason::ClientClosed(Some(4000), "bye".into()),
            Wire::WebSocket,
        );
        assert_eq!(
            echoed,
            Some(Farewell {
                code: 4000,
                reason: String::new(),
                abandon_queue: false
            })
        );
        let bare = farewell(
            &DisconnectReason::ClientClosed(None, String::new()),
            Wire::WebSocket,
        );
        assert_eq!(bare.map(|f| f.code), Some(close_code::NORMAL));
        let slow = farewell(&DisconnectReason::SlowConsumer, Wire::WebTransport).unwrap();
        assert_eq!(slow.code, DisconnectReason::SlowConsumer.status_code());
        assert!(slow.abandon_queue && !slow.reason.is_empty());
        let deleted = farewell(&DisconnectReason::Deleted, Wire::WebSocket).unwrap();
        assert_eq!(
            (deleted.code, deleted.reason, deleted.abandon_queue),
            (
                DisconnectReason::Deleted.status_code(),
                DisconnectReason::Deleted.description(),
                false
            )
        );
    }

    #[test]
    fn time_limits_close_with_the_reason_that_ran_out_first() {
        let start = Instant::now();
        let idle = Duration::from_secs(10);
        let age = start + Duration::from_secs(60);
        assert_eq!(timed_out(start, age, start, idle), None);
        assert_eq!(
            timed_out(start + idle, age, start, idle),
            Some(DisconnectReason::IdleTimeout)
        );
        assert_eq!(
            timed_out(age, age, age, idle),
            Some(DisconnectReason::MaxDuration)
        );
    }
}
