//! The OpenAPI document is generated from the handlers; `docs/openapi.json` is its
//! reviewed snapshot. Any API change must update it on purpose:
//! `UPDATE_OPENAPI=1 cargo test -p atelier-server --test openapi`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[test]
fn openapi_document_matches_the_reviewed_snapshot() {
    let doc = atelier_server::api::openapi();
    let mut text = serde_json::to_string_pretty(&doc).unwrap();
    text.push('\n');
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let stored = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        stored == text,
        "docs/openapi.json is out of date with the API; review the change and run \
         UPDATE_OPENAPI=1 cargo test -p atelier-server --test openapi"
    );
    // Every route under /api/v1 is documented and requires the bearer token.
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let paths = v["paths"].as_object().unwrap();
    for p in [
        "/api/v1/sandboxes",
        "/api/v1/sandboxes/{id}",
        "/api/v1/sandboxes/{id}/exec",
        "/api/v1/sandboxes/{id}/files",
        "/api/v1/status",
    ] {
        assert!(paths.contains_key(p), "{p} missing from the document");
    }
    assert_eq!(v["security"][0]["bearer"], serde_json::json!([]));
}
