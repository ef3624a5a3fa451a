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
    /// with `leftover`, the bytes the client sent after its request head. `letting_go`: a
    /// later resume already asked it to let go of that socket.
    Attached { leftover: Vec<u8>, letting_go: bool },
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
    /// session must be woken to let go (false when it has no socket to let go of). A
    /// socket just attached (not yet served) is let go of as soon as it is.
    pub(crate) fn let_go(&mut self) -> bool {
        match &mut self.phase {
            Phase::Live => {
                self.phase = Phase::LettingGo;
                true
            }
            Phase::Attached { letting_go, .. } => {
                *letting_go = true;
                true
            }
            _ => false,
        }
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
        self.phase = Phase::Attached {
            leftover,
            letting_go: false,
        };
        Ok(())
    }

    /// What a parked connection does at `now`. A resume that attached wins (a close asked
    /// for meanwhile is then acted on by the resumed session); while a resume holds its
    /// claim nothing ends it; then a close request; then its window.
    pub(crate) fn poll_parked(&mut self, now: Instant) -> ParkStep {
        let until = match &mut self.phase {
            Phase::Attached {
                leftover,
                letting_go,
            } => {
                let leftover = std::mem::take(leftover);
                self.phase = match letting_go {
                    true => Phase::LettingGo,
                    false => Phase::Live,
                };
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
mod tests;
