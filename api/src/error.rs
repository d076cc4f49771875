//! The error body of every Veil HTTP endpoint: `{"error": {"code", "message", "field"?}}`.
//!
//! `code` is stable and machine-readable; `message` is for people and never holds a secret or
//! payload; `field` names the request field at fault where there is one. The shape is the one
//! OpenAI clients already parse (`error.code`, `error.message`), with `type` and `param` filled in
//! for them.

use serde::{Deserialize, Serialize};

/// Top-level error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable machine code, e.g. `not_allowed`, `lease_expired`, `invalid_request`.
    pub code: String,
    /// Human-readable explanation, without secrets or payload.
    pub message: String,
    /// OpenAI's error class: `invalid_request_error`, `authentication_error`,
    /// `permission_error`, `not_found_error`, `rate_limit_error`, `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when there is one (OpenAI calls it `param`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub param: Option<String>,
}
