//! Uploads: a body of an allowed content type, at most
//! `workspace.uploads.max_bytes`, stored in PostgreSQL with its SHA-256.
//!
//! # Why `bytea`
//!
//! Uploads here are attachments to a chat (a document, an image), at most
//! `max_bytes` (1 MiB by default). At that size a `bytea` column is the
//! simplest store that is transactional with the rest of the workspace,
//! backed up with it, and deleted with its row; PostgreSQL compresses and
//! moves such values out of line (TOAST) by itself. Large objects
//! (`lo_*`) pay off for files of many megabytes read in pieces, which
//! these are not; past tens of megabytes an object store with the
//! checksum and owner kept here would be the choice.
//!
//! # Integrity and scope
//!
//! The SHA-256 of the body is computed on upload, stored, returned, and
//! checked again on every read: a stored body that no longer matches
//! answers `500 upload_corrupt`, never the wrong bytes. An upload belongs
//! to its tenant and its uploader: anyone else gets `404`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use soma_observability::http::RequestId;
use soma_policy::{Principal, Resource};
use uuid::Uuid;

use super::{
    Shared, UPLOAD_ROUTE, UPLOADS_ROUTE, audit, authorize_owned, not_found, parse_id, problem,
    store_unavailable,
};

/// Response header carrying an upload's SHA-256 (hex).
pub const CHECKSUM_HEADER: &str = "x-checksum-sha256";

/// The uploads' settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct UploadSettings {
    /// Largest accepted upload, in bytes (`413` past it).
    pub max_bytes: usize,
    /// Accepted `Content-Type`s (media type only, parameters ignored;
    /// `415` for any other).
    pub allowed_content_types: Vec<String>,
}

impl Default for UploadSettings {
    fn default() -> Self {
        Self {
            max_bytes: 1024 * 1024,
            allowed_content_types: [
                "text/plain",
                "text/markdown",
                "application/json",
                "application/pdf",
                "image/png",
                "image/jpeg",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// `201` body of an upload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Uploaded {
    /// The attachment id.
    pub id: Uuid,
    /// SHA-256 of the stored bytes, hex.
    pub sha256: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// The content type it was stored with.
    pub content_type: String,
}

/// The uploads' routes; the upload route reads bodies up to `max_bytes`
/// (past the gateway's own `http.max_body_bytes`).
pub(super) fn router(settings: &UploadSettings) -> Router<Arc<Shared>> {
    Router::new()
        .route(
            UPLOADS_ROUTE,
            post(upload).layer(DefaultBodyLimit::max(settings.max_bytes)),
        )
        .route(UPLOAD_ROUTE, get(download))
}

/// The media type of `headers`' `Content-Type`, lower-cased, without
/// parameters.
fn media_type(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let t = v.split(';').next()?.trim().to_ascii_lowercase();
    (!t.is_empty()).then_some(t)
}

async fn upload(
    State(ws): State<Arc<Shared>>,
    Extension(principal): Extension<Principal>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let settings = &ws.settings.uploads;
    let allowed =
        media_type(&headers).filter(|t| settings.allowed_content_types.iter().any(|a| a == t));
    let Some(content_type) = allowed else {
        return problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            &format!(
                "Content-Type must be one of: {}",
                settings.allowed_content_types.join(", ")
            ),
        );
    };
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return too_large(settings.max_bytes);
        }
        Err(e) => return problem(StatusCode::BAD_REQUEST, "invalid_body", &e.body_text()),
    };
    if body.len() > settings.max_bytes {
        return too_large(settings.max_bytes);
    }
    if body.is_empty() {
        return problem(StatusCode::BAD_REQUEST, "empty_upload", "the body is empty");
    }
    let sha256 = hex::encode(Sha256::digest(&body));
    let id = Uuid::now_v7();
    let sql = format!(
        "INSERT INTO {} (id, tenant, owner, content_type, size_bytes, sha256, data)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        ws.tables.uploads
    );
    let size = i64::try_from(body.len()).unwrap_or(i64::MAX);
    let stored = sqlx::query(&sql)
        .bind(id)
        .bind(&principal.tenant)
        .bind(&principal.subject)
        .bind(&content_type)
        .bind(size)
        .bind(&sha256)
        .bind(body.as_ref())
        .execute(&ws.pool)
        .await;
    if let Err(e) = stored {
        return store_unavailable(&e);
    }
    audit(
        &ws,
        &principal,
        "uploads.write",
        upload_resource(id),
        vec![content_type.clone()],
        &request_id,
    );
    let uploaded = Uploaded {
        id,
        sha256,
        size_bytes: body.len() as u64,
        content_type,
    };
    (StatusCode::CREATED, Json(uploaded)).into_response()
}

fn too_large(max: usize) -> Response {
    problem(
        StatusCode::PAYLOAD_TOO_LARGE,
        "upload_too_large",
        &format!("uploads are at most {max} bytes"),
    )
}

fn upload_resource(id: Uuid) -> Resource {
    Resource {
        kind: "upload".into(),
        id: Some(id.to_string()),
    }
}

#[derive(sqlx::FromRow)]
struct StoredUpload {
    owner: String,
    content_type: String,
    sha256: String,
    data: Vec<u8>,
}

async fn download(
    State(ws): State<Arc<Shared>>,
    Extension(principal): Extension<Principal>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(p) => return p.into_response(),
    };
    let sql = format!(
        "SELECT owner, content_type, sha256, data FROM {} WHERE id = $1 AND tenant = $2",
        ws.tables.uploads
    );
    let row = sqlx::query_as::<_, StoredUpload>(&sql)
        .bind(id)
        .bind(&principal.tenant)
        .fetch_optional(&ws.pool)
        .await;
    let up = match row {
        Ok(Some(u)) => u,
        Ok(None) => return not_found("upload"),
        Err(e) => return store_unavailable(&e),
    };
    // Private to the uploader: another subject of the tenant is told it
    // does not exist, like another tenant.
    if up.owner != principal.subject {
        return not_found("upload");
    }
    let request = ("GET", UPLOAD_ROUTE, &request_id);
    if let Err(r) = authorize_owned(
        &ws,
        &principal,
        "uploads.read",
        upload_resource(id),
        &up.owner,
        request,
    )
    .await
    {
        return r;
    }
    if hex::encode(Sha256::digest(&up.data)) != up.sha256 {
        tracing::error!(event = "upload_checksum_mismatch", upload_id = %id);
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "upload_corrupt",
            "the stored upload does not match its checksum",
        );
    }
    let mut response = up.data.into_response();
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&up.content_type) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&up.sha256) {
        headers.insert(CHECKSUM_HEADER, v);
    }
    response
}
