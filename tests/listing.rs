//! `GET /sessions` a page at a time, on a real node (in-process, real sockets, real sled
//! files): every session exactly once, newest first, `next` null at the end, 400 for a
//! bad `limit` or `cursor`, and a cursor that never reaches another caller's sessions.

mod common;

use std::collections::HashSet;

use common::*;
use oonode::agent::Echo;
use oonode::{Host, Identity};
use serde_json::{json, Value};

const OTHER_SECRET: &str = "other-secret-0123456789abcdef0123456789";

/// Every page of `secret`'s sessions with `limit` per page: the pages' ids, in order.
async fn all_pages(node: &TestNode, secret: &str, limit: usize) -> Vec<Vec<Value>> {
    let mut pages = Vec::new();
    let mut path = format!("/sessions?limit={limit}");
    loop {
        let (status, page) = node.get_with_secret(&path, secret).await;
        assert_eq!(status, 200, "{page}");
        let sessions = page["sessions"].as_array().unwrap().clone();
        assert!(sessions.len() <= limit);
        pages.push(sessions);
        match page["next"].as_str() {
            Some(next) => path = format!("/sessions?limit={limit}&cursor={next}"),
            None => {
                assert!(page["next"].is_null(), "{page}");
                return pages;
            }
        }
        assert!(pages.len() < 1000, "the pages never end");
    }
}

#[tokio::test]
async fn listings_come_in_pages_that_cover_every_session_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Echo), dir.path()).await;
    let mut mine = HashSet::new();
    for i in 0..120 {
        let (status, body) = node
            .post(&json!({"prompt": format!("p{i}"), "session_secret": SECRET}))
            .await;
        assert_eq!(status, 200, "{body}");
        mine.insert(body["session_id"].as_str().unwrap().to_owned());
    }
    for i in 0..3 {
        let body = json!({"prompt": format!("q{i}"), "session_secret": OTHER_SECRET});
        assert_eq!(node.post(&body).await.0, 200);
    }

    // The default page: the newest 50, and a cursor.
    let (status, first) = node.get_with_secret("/sessions", SECRET).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["sessions"].as_array().unwrap().len(), 50);
    assert!(first["next"].is_string());
    let item = &first["sessions"][0];
    assert!(item["created"].is_u64() && item["status"] == "done");
    assert_eq!(item.as_object().unwrap().len(), 3, "{item}");

    for limit in [7, 50, 200] {
        let pages = all_pages(&node, SECRET, limit).await;
        assert_eq!(pages.len(), 120usize.div_ceil(limit), "limit {limit}");
        let listed: Vec<&Value> = pages.iter().flatten().collect();
        let ids: Vec<String> = listed
            .iter()
            .map(|s| s["session_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.len(), 120, "limit {limit}");
        assert_eq!(ids.iter().cloned().collect::<HashSet<_>>(), mine);
        let created: Vec<u64> = listed
            .iter()
            .map(|s| s["created"].as_u64().unwrap())
            .collect();
        assert!(created.windows(2).all(|w| w[0] >= w[1]), "newest first");
    }

    // The other caller sees its own three only, its cursor or not.
    let other = all_pages(&node, OTHER_SECRET, 2).await;
    let other_ids: Vec<&str> = other
        .iter()
        .flatten()
        .map(|s| s["session_id"].as_str().unwrap())
        .collect();
    assert_eq!(other_ids.len(), 3);
    assert!(other_ids.iter().all(|id| !mine.contains(*id)));
    let cursor = first["next"].as_str().unwrap();
    let (status, theirs) = node
        .get_with_secret(&format!("/sessions?cursor={cursor}"), OTHER_SECRET)
        .await;
    assert_eq!(status, 200, "{theirs}");
    for s in theirs["sessions"].as_array().unwrap() {
        assert!(
            !mine.contains(s["session_id"].as_str().unwrap()),
            "{theirs}"
        );
    }

    for bad in [
        "limit=0",
        "limit=201",
        "limit=-1",
        "limit=ten",
        "cursor=",
        "cursor=not-a-cursor",
        "cursor=%FF%FE",
        "limit=5&limit=6",
    ] {
        let (status, body) = node
            .get_with_secret(&format!("/sessions?{bad}"), SECRET)
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["code"], "bad_request", "{bad}: {body}");
        assert!(body["error"].as_str().unwrap().len() > 10, "{bad}: {body}");
    }
    node.stop().await;
}

#[tokio::test]
async fn a_signed_reader_pages_with_a_signed_query() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Echo), dir.path()).await;
    let alice = Identity::generate();
    for i in 0..3 {
        let (status, body) = node
            .post(&signed_input(&alice, node.address, &format!("a{i}")))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let get = |query: String| {
        let path = format!("/sessions?{query}");
        let headers =
            oonode::proto::sign_request(&alice, &node.address, "GET", "/sessions", &query, b"");
        let mut req = client().get(format!("{}{path}", node.url));
        for (k, v) in headers {
            req = req.header(k, v);
        }
        send(req)
    };
    let (status, first) = get("limit=2".into()).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["sessions"].as_array().unwrap().len(), 2);
    let next = first["next"].as_str().unwrap();
    let (status, second) = get(format!("limit=2&cursor={next}")).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["sessions"].as_array().unwrap().len(), 1);
    assert!(second["next"].is_null());
    node.stop().await;
}
