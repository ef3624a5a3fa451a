//! A handshake that asks to resume, before it is answered: as read on the shard that
//! accepted it ([`Resuming`]), and as it crosses to the shard that owns the connection it
//! names ([`Handoff`]: sockets deregistered from the runtime they were read on).

use std::net::SocketAddr;

use crate::compression::Deflate;
use crate::event::HandshakeRequest;
use crate::handshake::UpgradeRequest;
use crate::limits::AdmissionTicket;
use crate::resume::ResumeRequest;
use crate::transport::answer::Answer;
use crate::transport::{SendableSocket, Socket};

/// A handshake that asks to resume, not answered yet.
pub struct Resuming {
    pub(crate) answer: Answer,
    pub(crate) peer: SocketAddr,
    /// Headers and query, as `$connect` sees them.
    pub(crate) request: HandshakeRequest,
    pub(crate) user_agent: String,
    pub(crate) host: String,
    pub(crate) resume: ResumeRequest,
    /// The admission of the new socket: kept if it becomes a new connection.
    pub(crate) ticket: Option<AdmissionTicket>,
}

impl Resuming {
    /// A WebSocket upgrade request that asks to resume.
    /// `deflate`: what the new socket's offer agreed (the session's queue takes it on).
    pub(crate) fn websocket(
        socket: Socket,
        upgrade: UpgradeRequest,
        resume: ResumeRequest,
        peer: SocketAddr,
        deflate: Option<Deflate>,
    ) -> Box<Self> {
        Box::new(Self {
            answer: Answer::WebSocket {
                socket,
                key: upgrade.key,
                leftover: upgrade.leftover,
                deflate,
            },
            peer,
            request: upgrade.request,
            user_agent: upgrade.user_agent,
            host: upgrade.host,
            resume,
            ticket: None,
        })
    }
}

/// A resume on its way to the shard that owns its connection.
pub struct Handoff {
    answer: SendableAnswer,
    peer: SocketAddr,
    request: HandshakeRequest,
    user_agent: String,
    host: String,
    resume: ResumeRequest,
    ticket: Option<AdmissionTicket>,
}

/// An [`Answer`] as it can cross threads: a TCP or TLS socket deregistered from its
/// runtime, or the WebTransport session request as it is.
enum SendableAnswer {
    WebSocket {
        socket: SendableSocket,
        key: String,
        leftover: Vec<u8>,
        deflate: Option<Deflate>,
    },
    WebTransport {
        request: Box<wtransport::endpoint::SessionRequest>,
        datagrams: bool,
    },
}

impl SendableAnswer {
    fn of(answer: Answer) -> Option<Self> {
        Some(match answer {
            Answer::WebSocket {
                socket,
                key,
                leftover,
                deflate,
            } => Self::WebSocket {
                socket: socket.into_sendable()?,
                key,
                leftover,
                deflate,
            },
            Answer::WebTransport { request, datagrams } => {
                Self::WebTransport { request, datagrams }
            }
        })
    }

    fn into_answer(self) -> std::io::Result<Answer> {
        Ok(match self {
            Self::WebSocket {
                socket,
                key,
                leftover,
                deflate,
            } => Answer::WebSocket {
                socket: socket.into_socket()?,
                key,
                leftover,
                deflate,
            },
            Self::WebTransport { request, datagrams } => {
                Answer::WebTransport { request, datagrams }
            }
        })
    }
}

impl Handoff {
    /// `resuming`, ready to cross threads; `None` if its socket cannot leave its runtime.
    pub(crate) fn of(resuming: Resuming) -> Option<Self> {
        let Resuming {
            answer,
            peer,
            request,
            user_agent,
            host,
            resume,
            ticket,
        } = resuming;
        Some(Self {
            answer: SendableAnswer::of(answer)?,
            peer,
            request,
            user_agent,
            host,
            resume,
            ticket,
        })
    }

    /// The handshake again, its socket registered with this thread's runtime.
    pub(crate) fn into_resuming(self) -> std::io::Result<Resuming> {
        Ok(Resuming {
            answer: self.answer.into_answer()?,
            peer: self.peer,
            request: self.request,
            user_agent: self.user_agent,
            host: self.host,
            resume: self.resume,
            ticket: self.ticket,
        })
    }
}
