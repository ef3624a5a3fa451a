//! Why a connection ended: decides the close code the client gets, the
//! `disconnectStatusCode` / `disconnectReason` of the `$disconnect` event, and the metric
//! label, in one place.

use crate::frame::{ProtocolError, close_code};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The client sent a close frame (with this code, if any).
    ClientClosed(Option<u16>, String),
    /// The TCP connection dropped without a close frame.
    ConnectionLost,
    /// `DELETE @connections/{id}`.
    Deleted,
    IdleTimeout,
    MaxDuration,
    /// The client broke a limit or the protocol.
    BadFrame(ProtocolError),
    ServerShutdown,
    /// The outbound queue overflowed.
    SlowConsumer,
    /// The client stayed over its inbound rate limit (`limits.throttle_disconnect_secs`).
    RateLimited,
    /// The outbound memory budget ran out and this connection held one of the biggest
    /// queues.
    Overloaded,
    /// A crash cut the connection; reported at the next start.
    GatewayRestarted,
    /// Cluster mode: the node holding the connection died or was cut off from the
    /// cluster; reported by a surviving node.
    NodeLost,
    /// A resumable connection's client did not come back within `api.resume_window_secs`.
    ResumeExpired,
    /// The `$connect` route (or the authorizer) refused a resume: the session ends.
    ResumeRefused,
    /// A resume with its token took over while the old socket still looked alive: the
    /// old socket is dropped and the connection parks for the new one (never reported).
    Superseded,
    /// Cluster mode: the client resumed on another node, which carries the connection on
    /// (and reports its `$disconnect`); this node only forgets it.
    Moved,
    /// Cluster mode: this node handed the connection over to another node, which never
    /// received it (the answer was lost): it ends here, reported by this node.
    MoveLost,
}

impl DisconnectReason {
    /// The close code sent to the client and reported as `disconnectStatusCode`.
    pub fn status_code(&self) -> u16 {
        match self {
            Self::ClientClosed(code, _) => code.unwrap_or(close_code::NO_STATUS),
            Self::ConnectionLost | Self::GatewayRestarted => close_code::ABNORMAL,
            Self::NodeLost => close_code::TRY_AGAIN_LATER,
            Self::ResumeExpired | Self::Superseded | Self::Moved => close_code::GOING_AWAY,
            Self::MoveLost => close_code::ABNORMAL,
            Self::ResumeRefused => close_code::POLICY_VIOLATION,
            Self::Deleted => close_code::NORMAL,
            Self::IdleTimeout | Self::MaxDuration | Self::ServerShutdown => close_code::GOING_AWAY,
            Self::BadFrame(error) => error.close_code(),
            Self::SlowConsumer | Self::RateLimited => close_code::POLICY_VIOLATION,
            Self::Overloaded => close_code::TRY_AGAIN_LATER,
        }
    }

    /// The `reason` label of `switchboard_disconnects_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::ClientClosed(..) => "client_closed",
            Self::ConnectionLost => "connection_lost",
            Self::Deleted => "deleted",
            Self::IdleTimeout => "idle_timeout",
            Self::MaxDuration => "max_duration",
            Self::BadFrame(ProtocolError::FrameTooLarge { .. }) => "frame_too_large",
            Self::BadFrame(ProtocolError::MessageTooLarge { .. }) => "message_too_large",
            Self::BadFrame(ProtocolError::InvalidUtf8) => "invalid_utf8",
            Self::BadFrame(ProtocolError::Violation(_)) => "protocol_error",
            Self::ServerShutdown => "server_shutdown",
            Self::SlowConsumer => "slow_consumer",
            Self::RateLimited => "rate_limited",
            Self::Overloaded => "overloaded",
            Self::GatewayRestarted => "gateway_restarted",
            Self::NodeLost => "node_lost",
            Self::ResumeExpired => "resume_expired",
            Self::ResumeRefused => "resume_refused",
            Self::Superseded => "superseded",
            Self::Moved => "moved",
            Self::MoveLost => "move_lost",
        }
    }

    /// `disconnectReason` in the `$disconnect` event, and the close frame's reason.
    pub fn description(&self) -> String {
        match self {
            Self::ClientClosed(_, reason) if !reason.is_empty() => {
                format!("client closed: {reason}")
            }
            Self::ClientClosed(..) => "client closed".into(),
            Self::ConnectionLost => "connection lost".into(),
            Self::Deleted => "connection deleted via @connections".into(),
            Self::IdleTimeout => "idle timeout".into(),
            Self::MaxDuration => "max connection duration reached".into(),
            Self::BadFrame(error) => error.to_string(),
            Self::ServerShutdown => "server shutdown".into(),
            Self::SlowConsumer => "slow consumer".into(),
            Self::RateLimited => "rate limit exceeded".into(),
            Self::Overloaded => "server overloaded".into(),
            Self::GatewayRestarted => "gateway restarted".into(),
            Self::NodeLost => "node lost".into(),
            Self::ResumeExpired => "resume window expired".into(),
            Self::ResumeRefused => "resume refused".into(),
            Self::Superseded => "superseded by a resume".into(),
            Self::Moved => "resumed on another node".into(),
            Self::MoveLost => "lost in a move to another node".into(),
        }
    }

    /// Whether the gateway sends a close frame (it does not echo a close it received
    /// after the socket is gone).
    pub fn server_initiated(&self) -> bool {
        !matches!(
            self,
            Self::ConnectionLost
                | Self::GatewayRestarted
                | Self::ClientClosed(..)
                | Self::ResumeExpired
                | Self::Superseded
                | Self::Moved
                | Self::MoveLost
        )
    }
}
