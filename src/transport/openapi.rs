//! The OpenAPI 3.1 document of the HTTP API, served at `GET /openapi.json`.
//!
//! The operations are the `#[utoipa::path]` annotations on the handlers themselves (in
//! `http.rs` and `ws.rs`); this module holds the shapes they answer with. The handlers
//! build most bodies with `json!` (or pass a signed envelope through), so these types
//! describe those bodies rather than produce them: `tests/openapi.rs` and
//! `tests/schemathesis.sh` check that the two agree.
// Documentation types: read by the derive, never built.
#![allow(dead_code)]

use std::sync::OnceLock;

use serde_json::Value;
use utoipa::{IntoParams, OpenApi, ToSchema};

/// Every refusal: `{"error": message, "code": code}`. A failed run's flat ERROR envelope
/// (500 from `POST /input`) has these two fields as well, with the envelope's others
/// (`type`, `id`, `timestamp`, `from`, `session_id`, `status`, `message`, `signature`…).
#[derive(ToSchema)]
pub(crate) struct ErrorBody {
    /// For people: what went wrong.
    #[schema(example = "not found")]
    error: String,
    /// For programs: the wire code (`ErrorCode`), e.g. `bad_request`, `invalid_signature`,
    /// `stale`, `not_found`, `busy`.
    #[schema(example = "not_found")]
    code: String,
}

/// The body of `POST /input`: a signed (nested) INPUT, or an unsigned (plain) one. See
/// docs/protocol.md, "INPUT: what a caller sends". Fields not named here are signed with
/// the rest (nested) or ignored.
#[derive(serde::Deserialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum InputRequest {
    Signed(SignedInput),
    Unsigned(UnsignedInput),
}

/// A signed INPUT: only `payload` is signed, with the key named by `from`.
#[derive(serde::Deserialize, ToSchema)]
pub(crate) struct SignedInput {
    /// The signed fields: `type` ("INPUT" or absent), `to` (the node's address), `id`,
    /// `timestamp` (integer seconds), `prompt`, `session`, `hops`, `invite_code`…
    #[schema(value_type = Object)]
    payload: Value,
    /// The signer's address (`0x` + 64 hex).
    #[schema(pattern = "^0x[0-9a-fA-F]{64}$")]
    from: String,
    /// The ed25519 signature of `canonical(payload)`: 128 hex, optional `0x`.
    #[schema(pattern = "^(0x)?[0-9a-fA-F]{128}$")]
    signature: String,
    /// The session, when the payload names none (not signed).
    #[schema(value_type = Option<Object>, nullable = false)]
    session: Option<Value>,
    #[schema(nullable = false)]
    files: Option<Vec<FileUpload>>,
    /// Base64 data URLs (`data:image/png;base64,…`).
    #[schema(nullable = false, inline)]
    images: Option<Vec<DataUrl>>,
}

/// An unsigned INPUT: the object itself, less `session`, `files`, `images` and `from`, is
/// the payload.
#[derive(serde::Deserialize, ToSchema)]
pub(crate) struct UnsignedInput {
    /// What to ask the agent (not blank).
    #[schema(min_length = 1, pattern = "\\S")]
    prompt: String,
    /// The conversation state as a previous answer returned it:
    /// `{"session_id", "session_secret", "messages": [{"role","content"}], …}`.
    #[schema(value_type = Option<Object>, nullable = false)]
    session: Option<Value>,
    /// The session id when `session` names none (1–128 of letters, digits, `-`, `_`).
    #[schema(nullable = false, pattern = "^[A-Za-z0-9_-]{1,128}$")]
    session_id: Option<String>,
    /// The secret of the caller's session scope (32–128 of letters, digits, `-`, `_`),
    /// as a first answer returned it.
    #[schema(nullable = false, pattern = "^[A-Za-z0-9_-]{32,128}$")]
    session_secret: Option<String>,
    /// Agents this request has passed through (absent: 0); over 8 is refused with 400 `hop_limit`
    /// `hop_limit`.
    #[schema(nullable = false, minimum = 0)]
    hops: Option<u32>,
    /// A claimed address (`0x` + 64 hex): used only to refuse a blocked one.
    #[schema(nullable = false, pattern = "^0x[0-9a-fA-F]{64}$")]
    from: Option<String>,
    #[schema(nullable = false)]
    files: Option<Vec<FileUpload>>,
    /// Base64 data URLs (`data:image/png;base64,…`).
    #[schema(nullable = false, inline)]
    images: Option<Vec<DataUrl>>,
}

/// An attached file (docs/protocol.md, "Attachments").
#[derive(serde::Deserialize, ToSchema)]
pub(crate) struct FileUpload {
    name: String,
    data: DataUrl,
}

/// A base64 data URL (`data:text/plain;base64,aGVsbG8=`).
#[derive(serde::Deserialize, ToSchema)]
#[schema(pattern = "^data:[^,;]*;base64,[A-Za-z0-9+/]*={0,2}$")]
pub(crate) struct DataUrl(String);

/// A node's flat OUTPUT envelope (200 from `POST /input`); every field but `signature`
/// is signed, `from` included. See docs/protocol.md, "Replies".
#[derive(ToSchema)]
pub(crate) struct OutputEnvelope {
    /// `"OUTPUT"`.
    #[schema(example = "OUTPUT")]
    r#type: String,
    id: String,
    timestamp: u64,
    /// The node's address.
    from: String,
    /// The verified caller's address; absent for an unsigned INPUT.
    to: Option<String>,
    /// The INPUT's `id`, when it had one.
    in_reply_to: Option<String>,
    session_id: String,
    /// `"done"`.
    status: String,
    result: Option<String>,
    duration_ms: Option<u64>,
    /// The state to pass back with the next prompt.
    session: Option<Value>,
    /// How many STREAM chunks the run produced (not sent over HTTP).
    chunks: Option<u64>,
    /// For an unsigned caller's first answer: the secret of its session scope.
    session_secret: Option<String>,
    /// 128 hex.
    signature: Option<String>,
}

/// Who reads a session: a signed reader sends the five `x-co-*` headers (all or none; see
/// docs/protocol.md, "Signed reads"), an unsigned one the `x-co-session-secret` its first
/// answer returned ("Sessions and their scope"). Without either, unsigned reads list
/// nothing and find nothing.
#[derive(serde::Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
pub(crate) struct ReadHeaders {
    /// The reader's address (`0x` + 64 hex).
    #[serde(rename = "x-co-from")]
    #[param(nullable = false, pattern = "^0x[0-9a-fA-F]{64}$")]
    from: Option<String>,
    /// The signature (128 hex) over the form-A bytes of `{"method","path","query",
    /// "body_sha256","timestamp","request_id","to"}`.
    #[serde(rename = "x-co-signature")]
    #[param(nullable = false, pattern = "^(0x)?[0-9a-fA-F]{128}$")]
    signature: Option<String>,
    /// Integer seconds as decimal text, within 300 s of the node's clock.
    #[serde(rename = "x-co-timestamp")]
    #[param(nullable = false, pattern = "^[0-9]+$")]
    timestamp: Option<String>,
    /// The node's address.
    #[serde(rename = "x-co-to")]
    #[param(nullable = false, pattern = "^0x[0-9a-fA-F]{64}$")]
    to: Option<String>,
    /// A one-time id (any text); a second use is refused (401 `replayed`).
    #[serde(rename = "x-co-request-id")]
    #[param(nullable = false)]
    request_id: Option<String>,
    /// An unsigned reader's session secret (32–128 of letters, digits, `-`, `_`).
    #[serde(rename = "x-co-session-secret")]
    #[param(nullable = false, pattern = "^[A-Za-z0-9_-]{32,128}$")]
    session_secret: Option<String>,
}

/// Which page of `GET /sessions`.
#[derive(serde::Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListParams {
    /// How many sessions at most (default 50); a page may hold fewer and still have a
    /// `next`.
    #[param(nullable = false, minimum = 1, maximum = 200)]
    limit: Option<u32>,
    /// The `next` of the previous page (opaque); without it, the newest sessions. It is
    /// a position within the reader's own sessions only.
    #[param(
        nullable = false,
        min_length = 2,
        max_length = 512,
        pattern = "^[A-Za-z0-9_-]+$"
    )]
    cursor: Option<String>,
}

/// `GET /sessions`: a page of the reader's sessions only (its address, or its session
/// secret), newest first.
#[derive(ToSchema)]
pub(crate) struct SessionList {
    sessions: Vec<SessionSummary>,
    /// The `cursor` of the next page; null on the last page.
    #[schema(required = true)]
    next: Option<String>,
}

#[derive(ToSchema)]
pub(crate) struct SessionSummary {
    session_id: String,
    /// `running`, `done`, `failed` or `interrupted`.
    status: String,
    /// Unix seconds.
    created: u64,
}

/// `GET /sessions/{id}`: one stored session.
#[derive(ToSchema)]
pub(crate) struct Session {
    session_id: String,
    /// `running`, `done`, `failed` or `interrupted`.
    status: String,
    prompt: String,
    result: Option<String>,
    /// The state a caller passes back for the next turn, with the session's history as
    /// `messages`.
    session: Value,
    /// Unix seconds.
    created: u64,
    /// Unix seconds; null while running (running sessions never expire).
    expires: Option<u64>,
    duration_ms: Option<u64>,
    error: Option<String>,
}

/// `GET /health`.
#[derive(ToSchema)]
pub(crate) struct Health {
    /// `"healthy"`.
    status: String,
    /// The agent's name.
    agent: String,
    /// Seconds since the node started.
    uptime: u64,
    /// The node's address.
    address: String,
    /// Runs in progress.
    in_flight: u64,
    /// The relay link's state; null without a relay.
    relay: Option<Value>,
}

/// `GET /info`: what the node says about its agent.
#[derive(ToSchema)]
pub(crate) struct Info {
    name: String,
    address: String,
    peer_id: String,
    tools: Vec<String>,
    /// The trust level: `open`, `careful` or `strict`.
    trust: String,
    version: String,
    summary: Option<String>,
    examples: Vec<String>,
    /// The relay link's state; null without a relay.
    relay: Option<Value>,
    /// The swarm's state; null without one.
    p2p: Option<Value>,
    accepted_inputs: AcceptedInputs,
}

#[derive(ToSchema)]
pub(crate) struct AcceptedInputs {
    text: bool,
    images: bool,
    files: FileLimits,
}

#[derive(ToSchema)]
pub(crate) struct FileLimits {
    max_file_size_mb: u64,
    max_files_per_request: u64,
}

/// The body of `POST /admin/trust`: a signed ADMIN envelope, nested shape. See
/// docs/protocol.md, "Trust admin".
#[derive(ToSchema)]
pub(crate) struct AdminRequest {
    /// The signed part: `type` "ADMIN", `to`, `id`, `timestamp`, `action` (`promote`,
    /// `demote`, `block`, `unblock`, `level`, `credit`), `address`, `amount` (for
    /// `credit`).
    payload: Value,
    /// The admin's address: the node's own or one of `admins.txt`.
    #[schema(pattern = "^0x[0-9a-fA-F]{64}$")]
    from: String,
    /// 128 hex, optional `0x`.
    #[schema(pattern = "^(0x)?[0-9a-fA-F]{128}$")]
    signature: String,
}

/// The answer of `POST /admin/trust`.
#[derive(ToSchema)]
pub(crate) struct AdminResult {
    address: Option<String>,
    action: Option<String>,
    changed: Option<bool>,
    level: Option<String>,
    credits: Option<i64>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "oonode HTTP API",
        description = "A node that makes an AI agent reachable: `POST /input` runs it; \
            session reads may be signed with the `x-co-*` headers. The wire protocol is \
            docs/protocol.md."
    ),
    paths(
        super::http::post_input,
        super::http::list_sessions,
        super::http::get_session,
        super::http::health,
        super::http::info,
        super::http::openapi_json,
        super::http::metrics,
        super::http::docs,
        super::http::root,
        super::http::admin_trust,
        super::ws::upgrade,
    ),
    components(schemas(
        ErrorBody,
        InputRequest,
        SignedInput,
        UnsignedInput,
        FileUpload,
        DataUrl,
        OutputEnvelope,
        SessionList,
        SessionSummary,
        Session,
        Health,
        Info,
        AcceptedInputs,
        FileLimits,
        AdminRequest,
        AdminResult
    ))
)]
struct ApiDoc;

/// The document as JSON, built once.
pub(crate) fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
        camel_case_links(&mut doc);
        doc.to_string()
    })
}

/// utoipa 5.5 writes a response link's fields in snake case (`operation_id`), which
/// OpenAPI tools do not read (schemathesis refuses such a link); the spec's names are
/// camel case.
fn camel_case_links(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    let links = paths
        .values_mut()
        .filter_map(Value::as_object_mut)
        .flat_map(|item| item.values_mut())
        .filter_map(|op| op.get_mut("responses").and_then(Value::as_object_mut))
        .flat_map(|responses| responses.values_mut())
        .filter_map(|response| response.get_mut("links").and_then(Value::as_object_mut))
        .flat_map(|links| links.values_mut())
        .filter_map(Value::as_object_mut);
    for link in links {
        for (snake, camel) in [
            ("operation_id", "operationId"),
            ("operation_ref", "operationRef"),
            ("request_body", "requestBody"),
        ] {
            if let Some(v) = link.remove(snake) {
                link.insert(camel.into(), v);
            }
        }
    }
}
