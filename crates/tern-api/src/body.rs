//! Request bodies: JSON only, bounded, every refusal a JSON error.
//!
//! axum's own `Json` extractor answers a wrong content type or an oversized
//! body in plain text; this one keeps the API's promise of a JSON error with
//! the status the failure deserves: 415 for a body that is not JSON, 413 for
//! one over [`MAX_BODY`], 400 for JSON that does not parse.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

/// The largest body any endpoint takes: a VM's configuration may hold 256
/// settings of up to 4 KiB each, and nothing else comes close.
pub const MAX_BODY: usize = 2 << 20;

/// The body as a `T`, or `None` when the request has no body at all.
pub fn json_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Option<T>, ApiError> {
    let bytes = bytes.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(format!("request body is larger than {MAX_BODY} bytes"))
        } else {
            ApiError::BadRequest(format!("cannot read request body: {}", e.body_text()))
        }
    })?;
    let content_type = headers.get(header::CONTENT_TYPE);
    if content_type.is_none() && bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    if !content_type.is_some_and(is_json) {
        return Err(ApiError::UnsupportedMediaType(
            "request body must be JSON (Content-Type: application/json)".into(),
        ));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ApiError::BadRequest(format!("bad request body: {e}")))
}

fn is_json(v: &axum::http::HeaderValue) -> bool {
    let Ok(v) = v.to_str() else { return false };
    let mime = v
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(ct: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(ct) = ct {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        }
        h
    }

    #[test]
    fn content_types() {
        let ok = |ct, body: &'static [u8]| {
            json_body::<serde_json::Value>(&headers(ct), Ok(Bytes::from_static(body)))
        };
        assert!(ok(None, b"").unwrap().is_none());
        assert!(ok(Some("application/json; charset=utf-8"), b"{}")
            .unwrap()
            .is_some());
        assert!(matches!(
            ok(Some("text/plain"), b"{}"),
            Err(ApiError::UnsupportedMediaType(_))
        ));
        assert!(matches!(
            ok(None, b"{}"),
            Err(ApiError::UnsupportedMediaType(_))
        ));
        assert!(matches!(
            ok(Some("application/json"), b"{"),
            Err(ApiError::BadRequest(_))
        ));
    }
}
