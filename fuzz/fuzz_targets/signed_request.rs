//! Signed reads: the `x-co-*` headers of a `GET /sessions…` and the request they sign, as
//! the HTTP transport turns them into an envelope before checking it.
//!
//! The input is the headers and the request, one a line: from, signature, timestamp, to,
//! request id, method, path, query, then the body (the rest).
//!
//! Properties: any headers are refused or give an envelope whose checks answer; a request
//! we sign ourselves verifies, names its node and is fresh.

#![no_main]

use libfuzzer_sys::fuzz_target;
use oonode::fuzzing::signed_read_envelope;
use oonode::proto::{
    sign_request, FROM_HEADER, REQUEST_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, TO_HEADER,
};
use oonode::{Identity, SignedRead};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut fields = text.splitn(9, '\n');
    let mut next = || fields.next().unwrap_or("");
    let (from, signature, timestamp, to, request_id) = (next(), next(), next(), next(), next());
    let (method, path, query, body) = (next(), next(), next(), next());
    let node = Identity::from_seed([2; 32]);

    let read = SignedRead {
        from,
        signature,
        timestamp,
        to,
        request_id,
        method,
        path,
        query,
        body: body.as_bytes(),
    };
    if let Ok(env) = signed_read_envelope(&read) {
        let _ = env.verify();
        let _ = env.check_to(&node.address());
        let _ = env.replay_key();
        if let Some(ts) = env.timestamp() {
            env.check_fresh(ts)
                .expect("a timestamp is fresh at its own time");
        }
    }

    // The same request signed by a caller verifies.
    let caller = Identity::from_seed([1; 32]);
    let headers = sign_request(
        &caller,
        &node.address(),
        method,
        path,
        query,
        body.as_bytes(),
    );
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .expect("sign_request writes every header")
    };
    let read = SignedRead {
        from: header(FROM_HEADER),
        signature: header(SIGNATURE_HEADER),
        timestamp: header(TIMESTAMP_HEADER),
        to: header(TO_HEADER),
        request_id: header(REQUEST_ID_HEADER),
        method,
        path,
        query,
        body: body.as_bytes(),
    };
    let env = signed_read_envelope(&read).expect("our signed read reads");
    assert_eq!(env.verify().ok(), Some(caller.address()));
    env.check_to(&node.address()).expect("it names the node");
    env.check_fresh(env.timestamp().unwrap()).unwrap();
});
