//! Every integration kind, by the `type` it is written with: one line each. The enums of
//! the kinds as written and as validated, and the matches over them, are generated from
//! this list.

use serde::{Deserialize, Serialize};

use super::context::{Caller, Received};
use super::{echo, http, mock, presence, queue, room};
use crate::config::check::ConfigError;

macro_rules! integrations {
    ($($variant:ident => $raw:ty, $ready:ty, $kind:expr;)*) => {
        /// A route's integration as written (`type = "…"` and its keys).
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[serde(tag = "type", rename_all = "snake_case")]
        pub enum RawIntegration {
            $($variant($raw),)*
        }

        /// A route's integration, validated and ready to run.
        #[derive(Debug, Clone)]
        pub enum Integration {
            $($variant($ready),)*
        }

        impl RawIntegration {
            /// Validates the integration of the route at `path` (`routes."KEY"`).
            pub fn validate(&self, path: &str) -> Result<Integration, ConfigError> {
                match self {
                    $(Self::$variant(raw) => raw.validate(path).map(Integration::$variant),)*
                }
            }
        }

        impl Integration {
            /// Its `type`, the metric label for it.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(Self::$variant(_) => $kind,)*
                }
            }

            /// Whether a route with it sends its answer back unless told otherwise.
            pub fn responds_by_default(&self) -> bool {
                match self {
                    $(Self::$variant(_) => <$ready>::RESPONDS,)*
                }
            }

            /// Handles `message` for `caller`.
            pub fn run(&self, message: Received, caller: &dyn Caller) {
                match self {
                    $(Self::$variant(integration) => integration.run(message, caller),)*
                }
            }
        }
    };
}

integrations! {
    Http => http::RawHttp, http::Http, http::KIND;
    Mock => mock::RawMock, mock::Mock, mock::KIND;
    Echo => echo::RawEcho, echo::Echo, echo::KIND;
    RoomJoin => room::RawRoomJoin, room::RoomJoin, room::JOIN;
    RoomLeave => room::RawRoomLeave, room::RoomLeave, room::LEAVE;
    RoomPublish => room::RawRoomPublish, room::RoomPublish, room::PUBLISH;
    RoomPresence => presence::RawRoomPresence, presence::RoomPresence, presence::KIND;
    Queue => queue::RawQueue, queue::Queue, queue::KIND;
}
