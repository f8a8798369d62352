//! The wire: typed frames per link, error codes, ANNOUNCE signing and relay URLs. No I/O.
//!
//! The node (`transport/`, `client/`) and the relay server (`relay_server/`) both depend
//! on this layer and never on each other. Nothing outside it matches a frame type or an
//! error code as a string.

mod announce;
mod body_limits;
mod error;
mod frame;
mod relay_url;
pub mod seal;
mod signed_request;

pub use announce::{
    signed_announce, verify_announce, Announce, MAX_ENDPOINTS, MAX_ENDPOINT_BYTES,
    MAX_SUMMARY_CHARS,
};
pub use body_limits::{BodyLimits, BodyScanner, BodyViolation};
pub use error::ErrorCode;

/// The most agents one request may pass through: an INPUT whose signed `hops` (how many
/// agents called on before it; absent = 0) is above this is refused with
/// [`ErrorCode::HopLimit`]. Agents that call agents add one per call, so a loop
/// (A asks B, B asks A, …) ends here instead of running until every worker is taken.
pub const MAX_HOPS: u32 = 8;
pub use frame::{
    input_frame, session_of, valid_session_id, AgentToRelay, CallerToRelay, ClientFrame,
    ConnectStatus, FrameError, FrameType, NodeFrame, Object, RelayError, RelayToAgent,
    MAX_SESSION_ID_LEN,
};
pub use relay_url::{
    RelayUrl, RelayUrlError, ANNOUNCE_PATH, DIRECTORY_PREFIX, DIRECTORY_ROUTE, HEALTH_PATH,
    INPUT_PATH,
};
pub use signed_request::{
    canonical_query, request_payload, sign_request, FROM_HEADER, REQUEST_ID_HEADER,
    SESSION_SECRET_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, TO_HEADER,
};
