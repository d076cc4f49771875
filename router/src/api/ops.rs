//! `/healthz`, `/readyz`, `/metrics`.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::error::ApiResult;
use crate::state::AppState;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics_text))
}

/// Liveness: the process serves requests.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, description = "alive")))]
async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the database answers and the keyring is loaded.
#[utoipa::path(get, path = "/readyz", tag = "ops", responses(
    (status = 200, description = "ready"),
    (status = 503, description = "not ready", body = veil_api::ErrorBody)))]
async fn readyz(State(state): State<AppState>) -> ApiResult<&'static str> {
    state.store.ping().await.map_err(|e| {
        tracing::warn!(error = %e, "readiness: database unreachable");
        crate::error::ApiError::unavailable("database_unavailable", "the database does not answer")
    })?;
    let _ = state.keys.active_version();
    Ok("ready")
}

/// Prometheus metrics: requests by route and status, latencies, queue depth, leases expired,
/// keys released, ACL denials, the on-chain ACL's staleness and blocks, and the flushes of a
/// local blob directory.
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    crate::acl::export_metrics(&state);
    if let Ok(depth) = state.store.queue_depth().await {
        metrics::gauge!("veil_queue_depth", "state" => "queued").set(depth.queued as f64);
        metrics::gauge!("veil_queue_depth", "state" => "leased").set(depth.leased as f64);
    }
    // Local blobs flushed to disk in groups: how many flushes their puts have shared.
    if let Some(n) = state.blobs.grouped_flushes() {
        metrics::counter!("veil_blob_flushes_total").absolute(n);
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
