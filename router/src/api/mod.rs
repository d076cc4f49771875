//! HTTP routes. [`app`] builds the whole service so tests can drive it in-process.

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::state::AppState;

pub mod admin;
pub mod deployment;
pub mod keys;
pub mod miner;
pub mod ops;
pub mod v2;
pub mod v3;

/// The OpenAPI document's fixed parts; paths are collected from the handlers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Veil router",
        description = "Private LLM inference over sealed blobs: OpenAI-compatible /api/v2, wallet-signed client-sealed /api/v3, admin API and miner API. Errors use {\"error\":{\"code\",\"message\",\"type\",\"param\"}}.",
        license(name = "Apache-2.0")
    ),
    components(schemas(veil_api::ErrorBody)),
    modifiers(&BearerAuth),
    tags(
        (name = "v2", description = "OpenAI-compatible completions with server-side sealing"),
        (name = "v3", description = "Wallet-signed (EIP-712), client-sealed completions: the router sees references only"),
        (name = "sessions", description = "Sessions and their privacy settings"),
        (name = "admin", description = "API keys, the key lifecycle and the audit log (admin API key)"),
        (name = "miner", description = "The miner protocol (MinerLogin bearer token)"),
        (name = "ops", description = "Health, readiness, metrics")
    )
)]
#[derive(Debug)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "miner_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "read_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// All routes and their OpenAPI description.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(ops::routes())
        .merge(v2::routes())
        .merge(v3::routes())
        .merge(deployment::routes())
        .merge(admin::routes())
        .merge(keys::routes())
        .merge(miner::routes())
}

/// The OpenAPI document (also served at `/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().split_for_parts().1
}

/// The whole service with its layers: request ids, tracing without payloads, per-route metrics,
/// body limits and timeouts.
pub fn app(state: AppState) -> Router {
    let (router, doc) = routes().split_for_parts();
    let doc = std::sync::Arc::new(doc);
    let request_timeout = Duration::from_millis(state.cfg.request_timeout_ms);
    let body_limit = state.cfg.max_body_bytes;
    router
        .route(
            veil_api::routes::OPENAPI,
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { axum::Json((*doc).clone()) }
            }),
        )
        .with_state(state)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            timeout_unless_long(req, next, request_timeout)
        }))
        .layer(middleware::from_fn(track))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request| {
                let rid = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                // The path only: query strings and bodies never reach the log.
                tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %rid)
            }),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// Routes whose handlers bound their own time (completions wait for a result, miners long-poll
/// and stream uploads, v3 callers long-poll, stream results and upload prompts) skip the
/// generic request timeout.
async fn timeout_unless_long(req: Request, next: Next, timeout: Duration) -> Response {
    let path = req.uri().path();
    let long = path.starts_with("/api/v2/completions")
        || path.starts_with("/api/v2/chat/completions")
        || path.starts_with("/api/miner/")
        || path.starts_with("/api/v3/tasks/")
        || (path.starts_with("/api/v3/sessions/") && path.ends_with("/prompt"));
    if long {
        return next.run(req).await;
    }
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            use axum::response::IntoResponse;
            crate::error::ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request took longer than the router's request timeout",
            )
            .into_response()
        }
    }
}

/// Counts requests by route template and status, and their latency.
async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("veil_http_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("veil_http_request_duration_seconds", "route" => route, "method" => method)
        .record(start.elapsed().as_secs_f64());
    resp
}
