//! The local HTTP transport (axum): the seed's API. `POST /input` waits for the OUTPUT;
//! reads of sessions may be signed with the `x-co-*` headers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{FromRef, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::DropGuard;
use tracing::{debug, info_span, Instrument};

use super::error_response as error;
use super::openapi::{
    AdminRequest, AdminResult, ErrorBody, Health, Info, InputRequest, ListParams, OutputEnvelope,
    ReadHeaders, Session, SessionList,
};
use super::relay_link::LinkState;
use super::ws::WsState;
use super::PeerIp;
use crate::dispatch::{Dispatcher, Reader, Refusal, Route, SignedRead, Transport};
use crate::envelope::{decode_object, Envelope, EnvelopeError, Kind};
use crate::proto::{self, BodyLimits, BodyScanner, BodyViolation, ErrorCode};
use crate::store::{PageCursor, SessionRecord, DEFAULT_PAGE, MAX_PAGE};

/// What `/info` and `/health` tell about the node.
#[derive(Debug, Clone)]
pub(crate) struct NodeInfo {
    pub name: String,
    pub tools: Vec<String>,
    pub summary: Option<String>,
    pub examples: Vec<String>,
    pub max_file_size_mb: u64,
    pub max_files_per_request: usize,
}

pub(crate) struct HttpState {
    pub dispatcher: Dispatcher,
    pub info: NodeInfo,
    pub max_body_bytes: usize,
    /// Limits checked while a body arrives (prompt, each file, the rest).
    pub body_limits: BodyLimits,
    /// Bytes of request bodies being read at once, in KiB: a burst of large requests
    /// waits or is refused instead of growing memory past it.
    pub body_budget: Arc<Semaphore>,
    /// The budget's size, in KiB.
    pub body_budget_kib: u32,
    /// Web origins allowed to call the API from a browser (besides the node's own).
    pub cors_origins: Vec<String>,
    pub started: Instant,
    /// What `/ws` needs (the dispatcher, its frame limit and connection cap).
    pub ws: WsState,
    /// The relay link, when the node announces on one.
    pub relay: Option<super::relay_link::RelayLink>,
    /// The swarm, when the node joined one.
    pub p2p: Option<super::p2p::P2p>,
    /// Stops the node's background tasks once the last router clone is gone.
    pub _background: Option<DropGuard>,
}

impl FromRef<Arc<HttpState>> for WsState {
    fn from_ref(st: &Arc<HttpState>) -> Self {
        st.ws.clone()
    }
}

/// The router serving the seed's endpoints.
pub(crate) fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/input", post(post_input))
        .route("/sessions", get(list_sessions))
        .route("/sessions/{id}", get(get_session))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/info", get(info))
        .route("/ws", get(super::ws::upgrade))
        // A browser pointed at the node lands on the page for trying the agent.
        .route("/", get(root))
        .route("/docs", get(docs))
        .route("/openapi.json", get(openapi_json))
        .route("/admin/trust", post(admin_trust))
        .fallback(|| async { error(ErrorCode::NotFound, "not found") })
        .method_not_allowed_fallback(|| async {
            error(ErrorCode::MethodNotAllowed, "method not allowed")
        })
        .layer(middleware::from_fn_with_state(state.clone(), cors))
        .with_state(state)
}

fn refusal(r: &Refusal) -> Response {
    let mut res = error(r.code(), &r.to_string());
    if res.status().is_server_error() {
        tracing::warn!(error = ?r, "request failed");
    }
    if matches!(r, Refusal::Busy { .. }) {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    res
}

/// Browsers: the node's own pages, and the origins of `cors_origins`, may call the API;
/// a page from anywhere else is refused before it can run the agent or read a session
/// (a `/ws` upgrade included, which browsers never check themselves). `/health`, `/info`,
/// `/metrics` and `/openapi.json` are public. Requests without `Origin` (not from a browser) pass.
async fn cors(State(st): State<Arc<HttpState>>, req: Request, next: Next) -> Response {
    let origin = req.headers().get(header::ORIGIN).cloned();
    let public = matches!(
        req.uri().path(),
        "/health" | "/info" | "/metrics" | "/openapi.json"
    );
    if let Some(o) = &origin {
        let same_origin = {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok());
            let authority = o
                .to_str()
                .ok()
                .and_then(|o| o.split_once("://"))
                .map(|(_, a)| a);
            host.is_some() && host == authority
        };
        let listed = o
            .to_str()
            .is_ok_and(|o| st.cors_origins.iter().any(|allowed| allowed == o));
        if !(public || same_origin || listed) {
            return error(
                ErrorCode::Forbidden,
                "this web page's origin may not use the node's API (add it to cors_origins in host.yaml)",
            );
        }
    }
    let mut res = if req.method() == Method::OPTIONS {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(req).await
    };
    let Some(origin) = origin else { return res };
    let h = res.headers_mut();
    if public {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
    } else {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(header::VARY, HeaderValue::from_static("origin"));
    }
    for (name, value) in [
        (header::ACCESS_CONTROL_ALLOW_METHODS, "GET, POST, OPTIONS"),
        (
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            "content-type, x-co-from, x-co-signature, x-co-timestamp, x-co-to, x-co-request-id, x-co-session-secret",
        ),
        (header::ACCESS_CONTROL_MAX_AGE, "86400"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    res
}

#[utoipa::path(
    post,
    path = "/input",
    tag = "agent",
    summary = "Run the agent on one INPUT and wait for its answer",
    request_body(content = InputRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The flat OUTPUT envelope of the run", body = OutputEnvelope,
            links(
                ("GetSession" = (
                    operation_id = "get_session",
                    parameters(
                        ("path.id" = "$response.body#/session_id"),
                        ("header.x-co-session-secret" = "$response.body#/session_secret")
                    ),
                    description = "An unsigned caller reads back the session it started"
                )),
                ("ListSessions" = (
                    operation_id = "list_sessions",
                    parameters(("header.x-co-session-secret" = "$response.body#/session_secret")),
                    description = "An unsigned caller lists the sessions of its secret"
                ))
            )
        ),
        (status = 400, description = "`invalid_json`, `bad_request`, `too_many_files`, `file_too_large`, `hop_limit` (the INPUT's `hops` is over 8: agents calling agents in a loop)", body = ErrorBody),
        (status = 401, description = "`invalid_signature`, `signature_required`, `stale`, `wrong_recipient`, `replayed`", body = ErrorBody),
        (status = 402, description = "`insufficient_credits`", body = ErrorBody),
        (status = 403, description = "`blocked`, `forbidden` (a web page of another origin), `onboarding_required`, `not_allowed`", body = ErrorBody),
        (status = 404, description = "`not_found`: the request names a session the node does not have (never started, another caller's, or expired) and does not carry its `messages`", body = ErrorBody),
        (status = 408, description = "`timeout`: the body stalled for 15 s", body = ErrorBody),
        (status = 409, description = "`session_busy`: the session still runs its previous turn", body = ErrorBody),
        (status = 413, description = "`too_large`", body = ErrorBody),
        (status = 429, description = "`rate_limited`: too many wrong invite codes", body = ErrorBody),
        (status = 500, description = "The flat ERROR envelope of a failed run (`agent_error`, `agent_panicked`, `agent_cancelled`, `internal`), or `internal`", body = ErrorBody),
        (status = 503, description = "`busy` (with `Retry-After: 1`), `shutting_down`, `list_unreadable`", body = ErrorBody),
    )
)]
async fn post_input(
    State(st): State<Arc<HttpState>>,
    PeerIp(peer): PeerIp,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let began = Instant::now();
    // Refusals before the dispatcher sees the request are counted like its own.
    let early = |code: ErrorCode, res: Response| {
        st.dispatcher.refused_early(Transport::Http, code, began);
        res
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let too_large = |len: usize| {
        let r = Refusal::too_large(len, st.max_body_bytes);
        early(r.code(), refusal(&r))
    };
    if let Some(len) = declared.filter(|&l| l > st.max_body_bytes) {
        return too_large(len);
    }
    let bytes = match read_body(&st, body, declared).await {
        Ok(read) => read,
        Err(BodyRefusal::Limit(v)) => {
            let code = match v {
                BodyViolation::TooManyFiles { .. } => ErrorCode::TooManyFiles,
                BodyViolation::File { .. } => ErrorCode::FileTooLarge,
                _ => ErrorCode::TooLarge,
            };
            return early(code, error(code, &v.to_string()));
        }
        Err(BodyRefusal::TooLarge) => return too_large(declared.unwrap_or(st.max_body_bytes + 1)),
        Err(BodyRefusal::Busy) => {
            let msg = "too many large requests at once; try again shortly";
            let mut res = error(ErrorCode::Busy, msg);
            res.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return early(ErrorCode::Busy, res);
        }
        Err(BodyRefusal::Read) => {
            let msg = "the request body could not be read";
            return early(ErrorCode::BadRequest, error(ErrorCode::BadRequest, msg));
        }
        Err(BodyRefusal::Slow) => {
            debug!(?peer, "a request body stalled; refused");
            let msg = "the request body stalled for 15 s; send it without pauses";
            return early(ErrorCode::Timeout, error(ErrorCode::Timeout, msg));
        }
    };
    let (bytes, _budget) = bytes;
    let parsed = decode_object(&bytes, st.max_body_bytes);
    // Parsed: the raw body is no longer needed (its budget is held until the files are
    // decoded and saved).
    drop(bytes);
    let obj = match parsed {
        Ok(o) => o,
        Err(EnvelopeError::InvalidJson(detail)) => {
            return early(
                ErrorCode::InvalidJson,
                error(ErrorCode::InvalidJson, &format!("Invalid JSON: {detail}")),
            )
        }
        Err(e) => {
            let r = Refusal::Envelope(e);
            return early(r.code(), refusal(&r));
        }
    };
    let mut submission = match super::submission_from_json(obj) {
        Ok(s) => s,
        Err(r) => return early(r.code(), refusal(&r)),
    };
    submission.peer = peer;
    submission.may_open = false;
    submission.streams = false;
    let submitted = st.dispatcher.submit(submission).await;
    drop(_budget);
    let mut accepted = match submitted {
        Ok(a) => a,
        Err(rejected) => {
            debug!(code = %rejected.refusal.code(), "input refused");
            return refusal(&rejected.refusal);
        }
    };
    let span = info_span!("http_input", session = %accepted.session_id);
    async move {
        // HTTP has no stream: wait for the final envelope, skipping STREAM chunks.
        while let Some(env) = accepted.replies.recv().await {
            match env.kind() {
                Some(Kind::Output) => {
                    return (StatusCode::OK, Json(env.to_flat_json())).into_response()
                }
                Some(Kind::Error) => {
                    return (StatusCode::INTERNAL_SERVER_ERROR, Json(env.to_flat_json()))
                        .into_response()
                }
                _ => {}
            }
        }
        error(ErrorCode::Internal, "the run ended without a result")
    }
    .instrument(span)
    .await
}

/// Who is reading: unsigned (with the `x-co-session-secret` it holds, if any), or signed
/// with the `x-co-*` headers of [`SignedRead`]; the dispatcher decides.
async fn reader(
    st: &HttpState,
    method: &Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
) -> Result<Reader, Refusal> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let signed = match (
        get("x-co-from"),
        get("x-co-signature"),
        get("x-co-timestamp"),
    ) {
        (None, None, None) => None,
        (Some(from), Some(signature), Some(timestamp)) => {
            let (Some(to), Some(request_id)) =
                (get(proto::TO_HEADER), get(proto::REQUEST_ID_HEADER))
            else {
                return Err(Refusal::BadRequest(
                    "signed reads name this node and a one-time id: add x-co-to and x-co-request-id (the shape of sign_http_request)".into(),
                ));
            };
            Some(SignedRead {
                from,
                signature,
                timestamp,
                to,
                request_id,
                method: method.as_str(),
                path: uri.path(),
                query: uri.query().unwrap_or(""),
                body: b"",
            })
        }
        _ => {
            return Err(Refusal::BadRequest(
                "signed reads need all of x-co-from, x-co-signature and x-co-timestamp".into(),
            ))
        }
    };
    st.dispatcher
        .reader(signed, get(proto::SESSION_SECRET_HEADER))
        .await
}

fn session_json(rec: &SessionRecord) -> Value {
    let mut v = serde_json::to_value(rec).unwrap_or(Value::Null);
    if let Some(obj) = v.as_object_mut() {
        for internal in ["owner", "secret_hash", "origin", "history"] {
            obj.remove(internal);
        }
    }
    v
}

/// The reader of a `GET /sessions…`, as the dispatcher judged it; a refusal answers at
/// once.
struct SessionReader(Reader);

impl axum::extract::FromRequestParts<Arc<HttpState>> for SessionReader {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        st: &Arc<HttpState>,
    ) -> Result<Self, Self::Rejection> {
        reader(st, &parts.method, &parts.uri, &parts.headers)
            .await
            .map(SessionReader)
            .map_err(|r| refusal(&r))
    }
}

#[utoipa::path(
    get,
    path = "/sessions/{id}",
    tag = "sessions",
    summary = "One session of the reader's scope",
    params(("id" = String, Path, description = "The session id"), ReadHeaders),
    responses(
        (status = 200, description = "The session", body = Session),
        (status = 400, description = "`bad_request`: some of the signed-read headers only, or malformed ones", body = ErrorBody),
        (status = 401, description = "`invalid_signature`, `signature_required`, `stale`, `wrong_recipient`, `replayed`", body = ErrorBody),
        (status = 403, description = "`blocked`, `forbidden`", body = ErrorBody),
        (status = 404, description = "`not_found`: no such session in the reader's scope", body = ErrorBody),
        (status = 500, description = "`internal`: the store failed", body = ErrorBody),
        (status = 503, description = "`list_unreadable`, `shutting_down`", body = ErrorBody),
    )
)]
async fn get_session(
    State(st): State<Arc<HttpState>>,
    Path(id): Path<String>,
    SessionReader(reader): SessionReader,
) -> Response {
    let began = std::time::Instant::now();
    let (refused, response) = match st.dispatcher.session(&id, &reader).await {
        Ok(Some(rec)) => (None, Json(session_json(&rec)).into_response()),
        Ok(None) => (
            Some(ErrorCode::NotFound),
            error(ErrorCode::NotFound, "not found"),
        ),
        Err(r) => (Some(r.code()), refusal(&r)),
    };
    st.dispatcher
        .count(Transport::Http, Route::Session, refused, began);
    response
}

#[utoipa::path(
    get,
    path = "/sessions",
    tag = "sessions",
    summary = "The sessions of the reader's scope, a page at a time, newest first",
    params(ListParams, ReadHeaders),
    responses(
        (status = 200, description = "A page of the reader's sessions (none for an unsigned reader without a secret), and the cursor of the next page", body = SessionList),
        (status = 400, description = "`bad_request`: a `limit` outside 1–200, a `cursor` this node did not return, a query string that cannot be read, or some of the signed-read headers only, or malformed ones", body = ErrorBody),
        (status = 401, description = "`invalid_signature`, `signature_required`, `stale`, `wrong_recipient`, `replayed`", body = ErrorBody),
        (status = 403, description = "`blocked`, `forbidden`", body = ErrorBody),
        (status = 500, description = "`internal`: the store failed", body = ErrorBody),
        (status = 503, description = "`list_unreadable`, `shutting_down`", body = ErrorBody),
    )
)]
async fn list_sessions(
    State(st): State<Arc<HttpState>>,
    uri: axum::http::Uri,
    SessionReader(reader): SessionReader,
) -> Response {
    let began = std::time::Instant::now();
    let listed = match page_request(uri.query().unwrap_or("")) {
        Ok((limit, cursor)) => st.dispatcher.sessions(&reader, limit, cursor).await,
        Err(r) => Err(r),
    };
    let (refused, response) = match listed {
        Ok(page) => {
            let sessions: Vec<Value> = page
                .sessions
                .iter()
                .map(|m| json!({"session_id": m.session_id, "status": m.status, "created": m.created}))
                .collect();
            let next = page.next.map(|c| c.to_string());
            (
                None,
                Json(json!({ "sessions": sessions, "next": next })).into_response(),
            )
        }
        Err(r) => (Some(r.code()), refusal(&r)),
    };
    st.dispatcher
        .count(Transport::Http, Route::Sessions, refused, began);
    response
}

/// `GET /sessions`' query: `limit` (default [`DEFAULT_PAGE`], at most [`MAX_PAGE`]) and
/// `cursor` (a page's `next`); other parameters are ignored.
fn page_request(query: &str) -> Result<(usize, Option<PageCursor>), Refusal> {
    #[derive(serde::Deserialize)]
    struct Query {
        limit: Option<String>,
        cursor: Option<String>,
    }
    let q: Query = serde_urlencoded::from_str(query)
        .map_err(|e| Refusal::BadRequest(format!("the query string cannot be read: {e}")))?;
    let limit = match q.limit {
        None => DEFAULT_PAGE,
        Some(text) => text
            .parse()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| {
                Refusal::BadRequest(format!(
                    "`limit` must be a whole number from 1 to {MAX_PAGE}"
                ))
            })?,
    };
    let cursor = match q.cursor {
        None => None,
        Some(text) => {
            Some(PageCursor::parse(&text).map_err(|e| Refusal::BadRequest(e.to_string()))?)
        }
    };
    Ok((limit, cursor))
}

/// A trust admin action: a signed ADMIN envelope in the nested shape.
#[utoipa::path(
    post,
    path = "/admin/trust",
    tag = "admin",
    summary = "Change a caller's trust (signed by the node or an admin)",
    request_body(content = AdminRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "What changed", body = AdminResult),
        (status = 400, description = "`invalid_json`, `bad_request`", body = ErrorBody),
        (status = 401, description = "`invalid_signature`, `signature_required`, `stale`, `wrong_recipient`, `replayed`", body = ErrorBody),
        (status = 403, description = "`not_admin`, `blocked`, `forbidden`", body = ErrorBody),
        (status = 413, description = "`too_large`", body = ErrorBody),
        (status = 500, description = "`internal`: the store failed", body = ErrorBody),
        (status = 503, description = "`shutting_down`, `list_unreadable`", body = ErrorBody),
    )
)]
async fn admin_trust(State(st): State<Arc<HttpState>>, body: axum::body::Bytes) -> Response {
    let obj = match decode_object(&body, crate::envelope::MAX_ENVELOPE_BYTES) {
        Ok(o) => o,
        Err(e) => return refusal(&Refusal::Envelope(e)),
    };
    let env = match Envelope::from_nested(&obj) {
        Ok(e) => e,
        Err(e) => return refusal(&Refusal::Envelope(e)),
    };
    let began = std::time::Instant::now();
    let (refused, response) = match st.dispatcher.admin(&env).await {
        Ok(result) => (None, Json(result).into_response()),
        Err(r) => (Some(r.code()), refusal(&r)),
    };
    st.dispatcher
        .count(Transport::Http, Route::Admin, refused, began);
    response
}

/// A browser pointed at the node lands on the page for trying the agent.
#[utoipa::path(
    get,
    path = "/",
    tag = "pages",
    responses((status = 303, description = "To `/docs`", headers(("location" = String, description = "`/docs`"))))
)]
async fn root() -> Redirect {
    Redirect::to("/docs")
}

/// The page for trying the agent in a browser; embedded, no CDN.
#[utoipa::path(
    get,
    path = "/docs",
    tag = "pages",
    responses((status = 200, description = "The page for trying the agent", body = String, content_type = "text/html"))
)]
async fn docs() -> Response {
    axum::response::Html(include_str!("docs.html")).into_response()
}

#[utoipa::path(
    get,
    path = "/health",
    tag = "node",
    responses((status = 200, description = "The node is up", body = Health))
)]
async fn health(State(st): State<Arc<HttpState>>) -> Response {
    Json(json!({
        "status": "healthy",
        "agent": st.info.name,
        "uptime": st.started.elapsed().as_secs(),
        "address": st.dispatcher.address().to_string(),
        "in_flight": st.dispatcher.in_flight(),
        "relay": st.relay.as_ref().map(|r| r.status()),
    }))
    .into_response()
}

/// Prometheus text format: request counters and histograms from the dispatcher, and the
/// gauges read now (in flight, relay link state, swarm peers).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "node",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"))
)]
async fn metrics(State(st): State<Arc<HttpState>>) -> Response {
    let relay_states = st.relay.as_ref().map(|r| {
        let current = r.status().state;
        LinkState::ALL.map(|s| (s.as_str(), s == current))
    });
    let swarm = st.p2p.as_ref().map(|p| {
        let status = p.status();
        (status.connected_peers, status.paths)
    });
    let body = st
        .dispatcher
        .metrics_text(relay_states.as_ref().map(|s| &s[..]), swarm);
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response()
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "node",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", body = Object, content_type = "application/json"))
)]
async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi::document(),
    )
        .into_response()
}

#[utoipa::path(
    get,
    path = "/info",
    tag = "node",
    responses((status = 200, description = "The agent and the node", body = Info))
)]
async fn info(State(st): State<Arc<HttpState>>) -> Response {
    let i = &st.info;
    let address = st.dispatcher.address();
    Json(json!({
        "name": i.name,
        "address": address.to_string(),
        "peer_id": address.peer_id().to_string(),
        "tools": i.tools,
        "trust": st.dispatcher.trust().describe(),
        "version": env!("CARGO_PKG_VERSION"),
        "summary": i.summary,
        "examples": i.examples,
        "relay": st.relay.as_ref().map(|r| r.status()),
        "p2p": st.p2p.as_ref().map(|p| p.status()),
        "accepted_inputs": {
            "text": true,
            "images": true,
            "files": {
                "max_file_size_mb": i.max_file_size_mb,
                "max_files_per_request": i.max_files_per_request,
            },
        },
    }))
    .into_response()
}

/// How long a request waits for room in the body budget before it is refused (503).
const BODY_BUDGET_WAIT: Duration = Duration::from_secs(5);
/// The longest a body may pause between two pieces before the request is refused (408):
/// a client that trickles its body holds budget and a connection.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(15);

enum BodyRefusal {
    Limit(BodyViolation),
    TooLarge,
    Busy,
    Read,
    Slow,
}

/// Reads a body within the node's limits, checking them as the bytes arrive, and holding
/// room in the body budget for it: all of a declared length before reading (a burst of
/// large requests waits its turn), chunk by chunk otherwise (refused once full).
async fn read_body(
    st: &HttpState,
    body: Body,
    declared: Option<usize>,
) -> Result<(Vec<u8>, OwnedSemaphorePermit), BodyRefusal> {
    use futures::StreamExt;
    // A body larger than the whole budget takes all of it: it is read alone.
    let total = st.body_budget_kib;
    let kib = |n: usize| {
        u32::try_from(n.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .min(total)
    };
    let mut held = match declared {
        Some(len) => tokio::time::timeout(
            BODY_BUDGET_WAIT,
            st.body_budget.clone().acquire_many_owned(kib(len)),
        )
        .await
        .map_err(|_| BodyRefusal::Busy)?
        .map_err(|_| BodyRefusal::Busy)?,
        None => st
            .body_budget
            .clone()
            .try_acquire_many_owned(0)
            .map_err(|_| BodyRefusal::Busy)?,
    };
    let mut scanner = BodyScanner::new(st.body_limits);
    let mut bytes = Vec::with_capacity(declared.unwrap_or(0).min(st.max_body_bytes));
    let mut stream = body.into_data_stream();
    loop {
        let next = tokio::time::timeout(BODY_READ_TIMEOUT, stream.next()).await;
        let Some(chunk) = next.map_err(|_| BodyRefusal::Slow)? else {
            break;
        };
        let chunk = chunk.map_err(|_| BodyRefusal::Read)?;
        if bytes.len() + chunk.len() > st.max_body_bytes {
            return Err(BodyRefusal::TooLarge);
        }
        scanner.feed(&chunk).map_err(BodyRefusal::Limit)?;
        let want = kib(bytes.len() + chunk.len());
        if want > held.num_permits() as u32 {
            let more = st
                .body_budget
                .clone()
                .try_acquire_many_owned(want - held.num_permits() as u32)
                .map_err(|_| BodyRefusal::Busy)?;
            held.merge(more);
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok((bytes, held))
}
