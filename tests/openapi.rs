//! `GET /openapi.json` on a real node: an OpenAPI 3.1 document that documents every route
//! the router serves. (tests/schemathesis.sh checks the answers against it.)

mod common;

use common::*;
use oonode::agent::Echo;
use oonode::Host;
use serde_json::{json, Value};

/// The routes of the router, read from its source, so a route added without its
/// `#[utoipa::path]` fails here.
fn router_routes() -> Vec<String> {
    let src = include_str!("../src/transport/http.rs");
    let routes: Vec<String> = src
        .split(".route(\"")
        .skip(1)
        .filter_map(|rest| rest.split_once('"').map(|(path, _)| path.to_string()))
        .collect();
    assert!(routes.len() >= 10, "routes read from http.rs: {routes:?}");
    routes
}

#[tokio::test]
async fn openapi_json_documents_every_route() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(Host::new(Echo), dir.path()).await;

    let res = client()
        .get(format!("{}/openapi.json", node.url))
        // Public like /health: a page of any origin may read it.
        .header("origin", "https://anywhere.example")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let doc: Value = res.json().await.unwrap();

    let version = doc["openapi"].as_str().expect("an `openapi` version field");
    assert!(version.starts_with("3.1."), "openapi: {version}");
    assert!(doc["info"]["title"].is_string());
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    let paths = doc["paths"].as_object().expect("`paths` is an object");

    for route in router_routes() {
        let item = paths
            .get(&route)
            .unwrap_or_else(|| panic!("{route} is not in /openapi.json"));
        let ops: Vec<&String> = item.as_object().unwrap().keys().collect();
        assert!(!ops.is_empty(), "{route} has no operation");
        for (method, op) in item.as_object().unwrap() {
            assert!(
                ["get", "post"].contains(&method.as_str()),
                "{method} {route}"
            );
            let responses = op["responses"].as_object().unwrap();
            assert!(!responses.is_empty(), "{method} {route} has no responses");
            // Every error answer is documented with the error shape.
            for (status, response) in responses {
                let json = &response["content"]["application/json"]["schema"]["$ref"];
                if status.starts_with('4') && json.is_string() || status.starts_with('5') {
                    assert_eq!(
                        json, "#/components/schemas/ErrorBody",
                        "{method} {route} {status}"
                    );
                }
            }
        }
    }
    assert_eq!(paths.len(), router_routes().len(), "{:?}", paths.keys());

    // The shapes the handlers answer with.
    let schemas = &doc["components"]["schemas"];
    let error = &schemas["ErrorBody"];
    assert_eq!(error["required"], serde_json::json!(["error", "code"]));
    let input = &paths["/input"]["post"];
    assert_eq!(
        input["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/InputRequest"
    );
    for status in ["200", "400", "401", "403", "413", "500", "503"] {
        assert!(input["responses"][status].is_object(), "/input {status}");
    }

    // An answer links to reading its session back, in the spec's own field names.
    let link = &input["responses"]["200"]["links"]["GetSession"];
    assert_eq!(link["operationId"], "get_session", "{link}");
    assert_eq!(paths["/sessions/{id}"]["get"]["operationId"], "get_session");

    // Session reads name their headers: the signed-read ones and the session secret.
    for route in ["/sessions", "/sessions/{id}"] {
        let names: Vec<&str> = paths[route]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["in"] == "header")
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        for h in [
            "x-co-from",
            "x-co-signature",
            "x-co-timestamp",
            "x-co-to",
            "x-co-request-id",
            "x-co-session-secret",
        ] {
            assert!(names.contains(&h), "{route} lacks {h}: {names:?}");
        }
    }

    // A listing comes in pages: `limit` and `cursor` in the query, `next` in the answer.
    let query: Vec<&Value> = paths["/sessions"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["in"] == "query")
        .collect();
    let limit = query.iter().find(|p| p["name"] == "limit").expect("limit");
    assert_eq!(limit["schema"]["maximum"], 200, "{limit}");
    assert!(query.iter().any(|p| p["name"] == "cursor"), "{query:?}");
    let list = &doc["components"]["schemas"]["SessionList"];
    assert!(
        list["required"]
            .as_array()
            .unwrap()
            .contains(&json!("next")),
        "{list}"
    );

    // The /docs page points at the document.
    let page = client()
        .get(format!("{}/docs", node.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("href=\"/openapi.json\""));

    node.stop().await;
}
