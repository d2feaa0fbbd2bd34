//! Signed uploads and downloads served on the daemon's own port:
//! `PUT /blobs/v1/upload` with the query parameters `CreateUploadLocation`
//! signed, and `GET /blobs/v1/download` with those `CreateDownloadLink`
//! signed (see `blob::Signer`). Everything else passes to the inner service.
//!
//! A download is served if the signature matches and the URL has not
//! expired; the object is streamed from the store, not held in memory, and
//! shares the [`MAX_UPLOADS`] permits with uploads.
//!
//! A body is accepted only if the signature matches, the URL has not
//! expired, the body is no larger than the signed size limit and its MD5
//! equals the signed one (and the `Content-MD5` header, when sent). Bodies
//! are held in memory up to that limit; at most [`MAX_UPLOADS`] uploads run
//! at once, so memory is bounded by their product, and a body must arrive
//! within [`UPLOAD_TIMEOUT`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use md5::Digest as _;
use object_store::path::Path;
use tokio::sync::Semaphore;
use tonic::body::Body;
use tower::{Layer, Service};

use super::flyte::{DOWNLOAD_PATH, UPLOAD_PATH};
use crate::blob::{Blobs, DownloadGrant, UploadGrant};

/// Uploads handled at once; more wait.
pub const MAX_UPLOADS: usize = 4;
/// How long an upload's body may take to arrive.
pub const UPLOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

#[derive(Clone)]
pub struct BlobHttpLayer {
    blobs: Option<Blobs>,
    permits: Arc<Semaphore>,
}

impl BlobHttpLayer {
    /// Without a blob store every request passes through.
    pub fn new(blobs: Option<Blobs>) -> Self {
        Self {
            blobs,
            permits: Arc::new(Semaphore::new(MAX_UPLOADS)),
        }
    }
}

impl<S> Layer<S> for BlobHttpLayer {
    type Service = BlobHttp<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BlobHttp {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct BlobHttp<S> {
    inner: S,
    layer: BlobHttpLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<Request<Body>> for BlobHttp<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        match &self.layer.blobs {
            Some(blobs) if request.uri().path() == UPLOAD_PATH => {
                let (blobs, permits) = (blobs.clone(), self.layer.permits.clone());
                Box::pin(async move { Ok(upload(blobs, permits, request).await) })
            }
            Some(blobs) if request.uri().path() == DOWNLOAD_PATH => {
                let (blobs, permits) = (blobs.clone(), self.layer.permits.clone());
                Box::pin(async move { Ok(download(blobs, permits, request).await) })
            }
            _ => Box::pin(self.inner.call(request)),
        }
    }
}

fn reply(status: StatusCode, message: &str) -> Response<Body> {
    if !status.is_success() {
        tracing::info!(%status, message, "blob request refused");
    }
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(Body::new(Full::new(Bytes::from(format!("{message}\n")))))
        .expect("valid response")
}

/// The signed grant a URL's query carries, and its signature.
fn grant_of(query: &str) -> Option<(UploadGrant, String)> {
    let mut key = None;
    let mut expires = None;
    let mut md5 = None;
    let mut max = None;
    let mut signature = None;
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=')?;
        match name {
            "k" => key = String::from_utf8(URL_SAFE_NO_PAD.decode(value).ok()?).ok(),
            "e" => expires = value.parse::<i64>().ok(),
            "m" => md5 = Some(STANDARD.encode(URL_SAFE_NO_PAD.decode(value).ok()?)),
            "n" => max = value.parse::<u64>().ok(),
            "s" => signature = Some(value.to_owned()),
            _ => {}
        }
    }
    Some((
        UploadGrant {
            key: key?,
            expires: expires?,
            content_md5: md5?,
            max_bytes: max?,
        },
        signature?,
    ))
}

/// The signed grant a download URL's query carries, and its signature.
fn download_grant_of(query: &str) -> Option<(DownloadGrant, String)> {
    let mut key = None;
    let mut expires = None;
    let mut signature = None;
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=')?;
        match name {
            "k" => key = String::from_utf8(URL_SAFE_NO_PAD.decode(value).ok()?).ok(),
            "e" => expires = value.parse::<i64>().ok(),
            "s" => signature = Some(value.to_owned()),
            _ => {}
        }
    }
    Some((
        DownloadGrant {
            key: key?,
            expires: expires?,
        },
        signature?,
    ))
}

async fn download(blobs: Blobs, permits: Arc<Semaphore>, request: Request<Body>) -> Response<Body> {
    if request.method() != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "use GET");
    }
    let Some((grant, signature)) = request.uri().query().and_then(download_grant_of) else {
        return reply(
            StatusCode::FORBIDDEN,
            "missing or malformed signature parameters",
        );
    };
    if !blobs.signer().verify_download(&grant, &signature) {
        return reply(StatusCode::FORBIDDEN, "invalid signature");
    }
    if grant.expires < chrono::Utc::now().timestamp() {
        return reply(StatusCode::FORBIDDEN, "the download URL has expired");
    }
    let Ok(key) = Path::parse(&grant.key) else {
        return reply(StatusCode::BAD_REQUEST, "invalid key");
    };
    let Ok(permit) = permits.acquire_owned().await else {
        return reply(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    };
    let (size, stream) = match blobs.read_stream(&key).await {
        Ok(Some(found)) => found,
        Ok(None) => return reply(StatusCode::NOT_FOUND, "no such object"),
        Err(_) => {
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "the blob store is unavailable",
            )
        }
    };
    // The permit is held until the body has been sent (or dropped).
    let frames = futures_util::StreamExt::map(stream, move |chunk| {
        let _held = &permit;
        chunk.map(http_body::Frame::data)
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/octet-stream")
        .header(http::header::CONTENT_LENGTH, size)
        .body(Body::new(http_body_util::StreamBody::new(frames)))
        .expect("valid response")
}

async fn upload(blobs: Blobs, permits: Arc<Semaphore>, request: Request<Body>) -> Response<Body> {
    if request.method() != Method::PUT {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "use PUT");
    }
    let Some((grant, signature)) = request.uri().query().and_then(grant_of) else {
        return reply(
            StatusCode::FORBIDDEN,
            "missing or malformed signature parameters",
        );
    };
    if !blobs.signer().verify(&grant, &signature) {
        return reply(StatusCode::FORBIDDEN, "invalid signature");
    }
    if grant.expires < chrono::Utc::now().timestamp() {
        return reply(StatusCode::FORBIDDEN, "the upload URL has expired");
    }
    let headers = request.headers();
    if let Some(sent) = headers.get("content-md5") {
        if sent.as_bytes() != grant.content_md5.as_bytes() {
            return reply(
                StatusCode::BAD_REQUEST,
                "Content-MD5 differs from the one the URL was signed for",
            );
        }
    }
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > grant.max_bytes) {
        return reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the body exceeds the signed size limit",
        );
    }
    let Ok(key) = Path::parse(&grant.key) else {
        return reply(StatusCode::BAD_REQUEST, "invalid key");
    };
    let Ok(_permit) = permits.acquire().await else {
        return reply(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    };
    let limit = usize::try_from(grant.max_bytes).unwrap_or(usize::MAX);
    let read = Limited::new(request.into_body(), limit).collect();
    let Ok(read) = tokio::time::timeout(UPLOAD_TIMEOUT, read).await else {
        return reply(
            StatusCode::REQUEST_TIMEOUT,
            "the body did not arrive in time",
        );
    };
    let body = match read {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the body exceeds the signed size limit",
            )
        }
        Err(_) => return reply(StatusCode::BAD_REQUEST, "cannot read the body"),
    };
    if !grant.content_md5.is_empty()
        && STANDARD.encode(md5::Md5::digest(&body)) != grant.content_md5
    {
        return reply(
            StatusCode::BAD_REQUEST,
            "the body's MD5 differs from the signed Content-MD5",
        );
    }
    match blobs.put(&key, body).await {
        Ok(()) => reply(StatusCode::OK, "stored"),
        Err(_) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "the blob store is unavailable",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_parse_from_queries() {
        let query = format!(
            "k={}&e=5&m={}&n=10&s=ab",
            URL_SAFE_NO_PAD.encode("uploads/x"),
            URL_SAFE_NO_PAD.encode([1u8; 16])
        );
        let (grant, signature) = grant_of(&query).unwrap();
        assert_eq!(grant.key, "uploads/x");
        assert_eq!(grant.content_md5, STANDARD.encode([1u8; 16]));
        assert_eq!(
            (grant.expires, grant.max_bytes, signature.as_str()),
            (5, 10, "ab")
        );
        assert!(grant_of("k=&e=1").is_none());
        assert!(grant_of("garbage").is_none());
        let (download, signature) =
            download_grant_of(&format!("k={}&e=7&s=cd", URL_SAFE_NO_PAD.encode("a/b"))).unwrap();
        assert_eq!((download.key.as_str(), download.expires), ("a/b", 7));
        assert_eq!(signature, "cd");
        assert!(download_grant_of("k=&e=1").is_none());
    }
}
