//! What every request passes before it reaches a protocol: the server-side
//! request timeout, `grpc-timeout`, the body read timeout, the global bound
//! on buffered request bytes and gRPC framing checks. Refusals are answered
//! in the protocol the request spoke (see `connect::error_response`).
//!
//! These are hand-written tower layers rather than tower-http's: the
//! timeout and limit layers there answer with plain HTTP statuses (408,
//! 413), which gRPC clients read as UNKNOWN or UNAVAILABLE; actionsd's
//! clients must see a gRPC or Connect status that names the limit.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::body::Body;
use tonic::Status;
use tower::{Layer, Service};

use super::connect::{error_response, SERVICES};

/// The path prefix of gRPC server reflection (v1 and v1alpha).
const REFLECTION: &str = "/grpc.reflection.";

/// The limits applied to every request.
#[derive(Debug, Clone)]
pub struct EdgeSettings {
    /// How long a call may take to produce its response (a unary call's
    /// whole handling; only the opening of a stream).
    pub request_timeout: Duration,
    /// How long a request body may take to arrive, from the request's
    /// headers on.
    pub body_read_timeout: Duration,
    /// Request body bytes held in memory at once, over all requests.
    pub max_buffered_request_bytes: usize,
}

#[derive(Clone)]
pub struct EdgeLayer {
    settings: Arc<EdgeSettings>,
    budget: Arc<Semaphore>,
}

impl EdgeLayer {
    pub fn new(settings: EdgeSettings) -> Self {
        let permits = settings
            .max_buffered_request_bytes
            .min(Semaphore::MAX_PERMITS);
        Self {
            settings: Arc::new(settings),
            budget: Arc::new(Semaphore::new(permits)),
        }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Edge {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    layer: EdgeLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What kind of gRPC body a request carries, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grpc {
    /// Not gRPC (Connect or anything else).
    No,
    /// gRPC or binary gRPC-Web: length-prefixed messages.
    Framed,
    /// gRPC-Web text: base64, checked by tonic-web after decoding.
    Text,
}

fn grpc_kind(headers: &HeaderMap) -> Grpc {
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type.starts_with("application/grpc-web-text") {
        Grpc::Text
    } else if content_type.starts_with("application/grpc") {
        Grpc::Framed
    } else {
        Grpc::No
    }
}

impl<S> Service<Request<Body>> for Edge<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let settings = &self.layer.settings;
        let grpc = grpc_kind(request.headers());
        let mut timeout = settings.request_timeout;
        if grpc != Grpc::No {
            if let Some(value) = request.headers().get("grpc-timeout") {
                match parse_grpc_timeout(value.as_bytes()) {
                    Some(client) => timeout = timeout.min(client),
                    None => {
                        let status = Status::invalid_argument(
                            "malformed grpc-timeout header (expected 1 to 8 digits and a unit: H, M, S, m, u or n)",
                        );
                        let response = error_response(request.headers(), &status);
                        return Box::pin(async move { Ok(response) });
                    }
                }
            }
        }
        // Every method of actionsd's own services takes exactly one request
        // message; reflection streams several, and is left alone.
        let one_message =
            grpc == Grpc::Framed && SERVICES.iter().any(|s| request.uri().path().starts_with(s));
        let framing = one_message.then(|| OneMessage::new(request.headers()));
        let headers = request.headers().clone();
        // Server reflection is the one client-streaming service: its body
        // stays open for a whole session of queries, each bounded in size
        // by tonic, so neither the body timer nor the byte budget (held
        // until a body is dropped) applies to it.
        if request.uri().path().starts_with(REFLECTION) {
            return Box::pin(self.inner.call(request));
        }
        let request = request.map(|body| {
            Body::new(EdgeBody {
                inner: body,
                deadline: Some(Box::pin(tokio::time::sleep(settings.body_read_timeout))),
                read_timeout: settings.body_read_timeout,
                budget: self.layer.budget.clone(),
                budget_size: settings.max_buffered_request_bytes,
                held: None,
                framing,
                failed: false,
            })
        });
        let future = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout(timeout, future).await {
                Ok(response) => response,
                Err(_) => Ok(error_response(
                    &headers,
                    &Status::deadline_exceeded(format!(
                        "the call did not complete within {}",
                        format_args!("{timeout:?}")
                    )),
                )),
            }
        })
    }
}

/// `grpc-timeout`: 1 to 8 ASCII digits and a unit (gRPC over HTTP/2).
fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A request body under the listener's limits.
struct EdgeBody {
    inner: Body,
    /// Fires when the body has not ended in time; `None` once it has.
    deadline: Option<Pin<Box<Sleep>>>,
    read_timeout: Duration,
    budget: Arc<Semaphore>,
    budget_size: usize,
    /// This body's share of the buffered-bytes budget, returned when the
    /// body is dropped (tonic and the Connect handler drop it once the
    /// message is decoded).
    held: Option<OwnedSemaphorePermit>,
    framing: Option<OneMessage>,
    failed: bool,
}

impl EdgeBody {
    fn fail(&mut self, status: Status) -> Poll<Option<Result<Frame<bytes::Bytes>, Status>>> {
        self.failed = true;
        self.deadline = None;
        Poll::Ready(Some(Err(status)))
    }
}

impl HttpBody for EdgeBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let size = u32::try_from(data.len()).unwrap_or(u32::MAX);
                    if size > 0 {
                        match this.budget.clone().try_acquire_many_owned(size) {
                            Ok(permit) => match &mut this.held {
                                Some(held) => held.merge(permit),
                                None => this.held = Some(permit),
                            },
                            Err(_) => {
                                tracing::warn!(
                                    limit = this.budget_size,
                                    "request refused: buffered request bytes at their limit"
                                );
                                return this.fail(Status::resource_exhausted(format!(
                                    "the daemon holds its limit of {} buffered request bytes; retry later",
                                    this.budget_size
                                )));
                            }
                        }
                    }
                    if let Some(framing) = &mut this.framing {
                        if let Err(status) = framing.feed(data) {
                            return this.fail(status);
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.deadline = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err))),
            Poll::Pending => {
                if let Some(deadline) = &mut this.deadline {
                    if deadline.as_mut().poll(cx).is_ready() {
                        let timeout = this.read_timeout;
                        return this.fail(Status::deadline_exceeded(format!(
                            "the request body did not arrive within {}",
                            format_args!("{timeout:?}")
                        )));
                    }
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Follows the length-prefixed messages of a gRPC request body and refuses
/// a second message, flags other than "compressed", and the compressed
/// flag on a call that names no `grpc-encoding`.
struct OneMessage {
    header: [u8; 5],
    have: usize,
    remaining: u64,
    messages: u32,
    encoded: bool,
}

impl OneMessage {
    fn new(headers: &HeaderMap) -> Self {
        let encoded = headers
            .get("grpc-encoding")
            .is_some_and(|v| !v.is_empty() && v != "identity");
        Self {
            header: [0; 5],
            have: 0,
            remaining: 0,
            messages: 0,
            encoded,
        }
    }

    fn feed(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.remaining -= take as u64;
                data = &data[take..];
                continue;
            }
            if self.have == 0 {
                self.messages += 1;
                if self.messages > 1 {
                    return Err(Status::invalid_argument(
                        "this call takes exactly one request message; the request carries more",
                    ));
                }
            }
            let take = (5 - self.have).min(data.len());
            self.header[self.have..self.have + take].copy_from_slice(&data[..take]);
            self.have += take;
            data = &data[take..];
            if self.have == 5 {
                match self.header[0] {
                    0 => {}
                    1 if self.encoded => {}
                    1 => {
                        return Err(Status::invalid_argument(
                            "the request message is flagged compressed but the call names no grpc-encoding",
                        ))
                    }
                    flags => {
                        return Err(Status::invalid_argument(format!(
                            "invalid message flags {flags:#04x}"
                        )))
                    }
                }
                self.remaining = u64::from(u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]));
                self.have = 0;
            }
        }
        Ok(())
    }
}

/// tonic answers a message over the size limit with OUT_OF_RANGE, in the
/// response headers or, once the response has started, in its trailers;
/// gRPC specifies RESOURCE_EXHAUSTED. actionsd never answers OUT_OF_RANGE
/// itself (see `rpc::status`), so every such status is rewritten. Sits
/// inside the gRPC-Web layer, which turns trailers into body frames.
#[derive(Clone, Default)]
pub struct SizeStatusLayer;

impl<S> Layer<S> for SizeStatusLayer {
    type Service = SizeStatus<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SizeStatus { inner }
    }
}

#[derive(Clone)]
pub struct SizeStatus<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for SizeStatus<S>
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
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            rewrite_out_of_range(response.headers_mut());
            Ok(response.map(|body| Body::new(RewriteTrailers { inner: body })))
        })
    }
}

fn rewrite_out_of_range(headers: &mut HeaderMap) {
    const OUT_OF_RANGE: &str = "11";
    const RESOURCE_EXHAUSTED: &str = "8";
    debug_assert_eq!(OUT_OF_RANGE, (tonic::Code::OutOfRange as i32).to_string());
    debug_assert_eq!(
        RESOURCE_EXHAUSTED,
        (tonic::Code::ResourceExhausted as i32).to_string()
    );
    if headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == OUT_OF_RANGE.as_bytes())
    {
        headers.insert(
            "grpc-status",
            http::HeaderValue::from_static(RESOURCE_EXHAUSTED),
        );
    }
}

struct RewriteTrailers {
    inner: Body,
}

impl HttpBody for RewriteTrailers {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner)
            .poll_frame(cx)
            .map_ok(|frame| match frame.into_trailers() {
                Ok(mut trailers) => {
                    rewrite_out_of_range(&mut trailers);
                    Frame::trailers(trailers)
                }
                Err(frame) => frame,
            })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_follow_the_spec() {
        assert_eq!(parse_grpc_timeout(b"10S"), Some(Duration::from_secs(10)));
        assert_eq!(
            parse_grpc_timeout(b"250m"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        for bad in [
            &b""[..],
            b"S",
            b"10",
            b"10s",
            b"-1S",
            b"123456789S",
            b"1.5S",
            b"10 S",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn one_message_is_followed_across_frames() {
        let mut framing = OneMessage::new(&HeaderMap::new());
        // One 3-byte message split over three frames.
        framing.feed(&[0, 0, 0]).unwrap();
        framing.feed(&[0, 3, b'a']).unwrap();
        framing.feed(b"bc").unwrap();
        // A second one, even empty, is refused.
        assert!(framing.feed(&[0]).is_err());

        let mut compressed = OneMessage::new(&HeaderMap::new());
        assert!(compressed.feed(&[1, 0, 0, 0, 0]).is_err());
        let mut headers = HeaderMap::new();
        headers.insert("grpc-encoding", http::HeaderValue::from_static("gzip"));
        OneMessage::new(&headers).feed(&[1, 0, 0, 0, 0]).unwrap();
        assert!(OneMessage::new(&headers).feed(&[2, 0, 0, 0, 0]).is_err());
    }
}
