//! The OpenAPI copy in docs/ is the one the code generates, and the served one is the same.

#[test]
fn docs_copy_matches_the_code() {
    let generated = veil_router::openapi().to_pretty_json().unwrap();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    let copy = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        copy.trim_end() == generated.trim_end(),
        "docs/openapi.json is stale; regenerate it with `cargo run -p veil-router -- openapi > docs/openapi.json`"
    );
    let doc: serde_json::Value = serde_json::from_str(&generated).unwrap();
    for path in [
        "/api/v2/completions",
        "/api/v2/chat/completions",
        "/api/v2/models",
        "/api/v2/tasks/{task_id}",
        "/api/v2/sessions",
        "/api/admin/api-keys",
        "/api/admin/audit/verify",
        "/api/admin/keys",
        "/api/admin/keys/rotate",
        "/api/admin/keys/retire",
        "/api/admin/keys/destroy",
        "/api/admin/keys/rewrap",
        "/api/miner/login",
        "/api/miner/lease",
        "/api/miner/leases/{lease_id}/key",
        "/api/miner/leases/{lease_id}/result",
        "/api/miner/leases/{lease_id}/complete",
        "/healthz",
        "/metrics",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
}
