//! How a node's agent calls other agents: with the node's own identity, over the node's
//! own paths (its swarm, its relay, and direct endpoints learnt from them), the best that
//! works, as `oonode call` would.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Semaphore;

use crate::agent::{PeerAnswer, PeerCall, PeerFailure, Peers};
use crate::client::{connect, CallError, ConnectOptions};
use crate::proto::ErrorCode;

/// Calls to other agents one node may have in flight at once, over all its turns: a
/// node's outbound calls count against its own limits, like its inbound runs.
const MAX_OUTBOUND_CALLS: usize = 64;
/// The longest one call may take, connecting included. An exec agent's turn has a
/// timeout of its own around it, which may end a call sooner.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// The node's identity and paths, shared by every turn.
pub(super) struct NodePeers {
    options: ConnectOptions,
    in_flight: Arc<Semaphore>,
}

impl NodePeers {
    pub(super) fn new(options: ConnectOptions) -> Self {
        NodePeers {
            options,
            in_flight: Arc::new(Semaphore::new(MAX_OUTBOUND_CALLS)),
        }
    }
}

#[async_trait]
impl Peers for NodePeers {
    async fn call(&self, call: PeerCall) -> Result<PeerAnswer, PeerFailure> {
        let _permit = self
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| PeerFailure {
                code: ErrorCode::Busy,
                message: format!(
                    "this node already has {MAX_OUTBOUND_CALLS} calls to other agents in flight"
                ),
            })?;
        let options = self.options.clone();
        let work = async move {
            let mut remote = connect(&call.to, options).await?;
            remote.set_hops(call.hops);
            if let Some(id) = call.session_id {
                remote.set_session_id(id);
            }
            let answer = remote.input(&call.prompt).await?;
            Ok::<_, CallError>(PeerAnswer {
                result: answer.result,
                session_id: answer.session_id,
                via: remote.path(),
            })
        };
        match tokio::time::timeout(CALL_TIMEOUT, work).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(failure(e)),
            Err(_) => Err(failure(CallError::Timeout(CALL_TIMEOUT))),
        }
    }
}

/// A failed call as a wire code and a message: the callee's own code and words when it
/// answered with them, else the code that says best why it could not be reached.
fn failure(e: CallError) -> PeerFailure {
    let code = match e {
        // Its message already says what it is ("the agent failed: …"); the code is beside.
        CallError::Refused { code, message } | CallError::Failed { code, message } => {
            return PeerFailure { code, message }
        }
        CallError::Relay { code, .. } => code,
        CallError::BadAddress(_) | CallError::BadRelayUrl(_) => ErrorCode::BadRequest,
        CallError::Unknown(_) => ErrorCode::UnknownAgent,
        CallError::NoPath
        | CallError::Ca(_)
        | CallError::NoEndpoint
        | CallError::Swarm(_)
        | CallError::Unreachable { .. }
        | CallError::Offline(_)
        | CallError::NotInSwarm(_) => ErrorCode::AgentOffline,
        CallError::Disconnected(_) => ErrorCode::AgentDisconnected,
        CallError::Tampered(_) => ErrorCode::InvalidSignature,
        CallError::Timeout(_) => ErrorCode::Timeout,
    };
    PeerFailure {
        code,
        message: e.to_string(),
    }
}
