//! One error type for every handler: a stable code, a sanitized message, the field at fault and
//! the HTTP status, rendered as [`veil_api::ErrorBody`] (OpenAI's error shape). Details that
//! could help an attacker or leak data go to the log, not the client.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use veil_api::{ErrorBody, ErrorDetail};

use crate::store::StoreError;

/// An error answered to a client.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine code.
    pub code: &'static str,
    /// Human-readable message (no secrets, no payload).
    pub message: String,
    /// The request field at fault.
    pub param: Option<String>,
    /// Seconds until a retry makes sense (429).
    pub retry_after: Option<u64>,
}

/// `Result` for handlers.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }
    /// Names the field at fault.
    pub fn param(mut self, p: impl Into<String>) -> Self {
        self.param = Some(p.into());
        self
    }
    /// 400 `invalid_request` naming `field`.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message).param(field)
    }
    /// 401.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }
    /// 403.
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }
    /// 404.
    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }
    /// 409.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
    /// 500, with the detail logged (not shown).
    pub fn internal(context: &str, detail: impl std::fmt::Display) -> Self {
        tracing::error!(context, error = %detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            format!("internal error while {context}; see the router log"),
        )
    }
    /// 503.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 409 | 413 | 415 | 422 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            _ => "server_error",
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
                kind: self.kind().to_string(),
                param: self.param.clone(),
            },
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { what } => ApiError::not_found(what),
            StoreError::Conflict { code, message } => ApiError::conflict(code, message),
            StoreError::AlreadyExists { what } => {
                if what == "nonce" {
                    ApiError::conflict(
                        "replayed_nonce",
                        "this (signer, nonce) pair was already used; sign a new message",
                    )
                    .param("message.nonce")
                } else {
                    ApiError::conflict("already_exists", format!("{what} already exists"))
                }
            }
            other => ApiError::internal("using the database", other),
        }
    }
}

impl From<veil_api::VerifyError> for ApiError {
    fn from(e: veil_api::VerifyError) -> Self {
        let field = match e {
            veil_api::VerifyError::BadSignature(_) => "signature",
            _ => "message.expiresAt",
        };
        ApiError::new(StatusCode::UNAUTHORIZED, e.code(), e.to_string()).param(field)
    }
}

/// JSON body extractor whose rejections use [`ApiError`] and name the field at fault.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for Json<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let ct_ok = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !ct_ok {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected Content-Type: application/json",
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        e.body_text(),
                    )
                } else {
                    ApiError::invalid("body", e.body_text())
                }
            })?;
        parse_json(&bytes).map(Json)
    }
}

/// Parses JSON, naming the path of the field at fault (`messages[0].role`).
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = if path == "." || path.is_empty() {
            "body".to_string()
        } else {
            path
        };
        // serde quotes an offending string value (`invalid type: string "…"`); that value may
        // be prompt text sent in the wrong field, so it is cut out of the message.
        ApiError::invalid(
            &field,
            format!("{field}: {}", redact_quoted(&inner.to_string())),
        )
    })
}

/// Replaces every double-quoted span with `"…"`.
fn redact_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut inside = false;
    for c in msg.chars() {
        if c == '"' {
            if inside {
                out.push_str("…\"");
            } else {
                out.push('"');
            }
            inside = !inside;
        } else if !inside {
            out.push(c);
        }
    }
    out
}

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_name_the_field_and_hide_values() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct B {
            messages: Vec<u32>,
        }
        let e = parse_json::<B>(br#"{"messages": "the secret canary"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert!(!e.message.contains("canary"), "{}", e.message);
        let e = parse_json::<B>(b"{not json").unwrap_err();
        assert_eq!(e.code, "invalid_request");
    }
}
