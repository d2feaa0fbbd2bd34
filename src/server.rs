//! The listener: accepts TCP connections and serves HTTP/1.1 and HTTP/2
//! (h2c) on each with hyper, under bounds on connections, streams, header
//! reads and idle time.
//!
//! The accept loop is written here rather than left to tonic's
//! `Server::serve`: tonic offers stream and concurrency limits but no bound
//! on connections, no idle-connection timeout and no HTTP/1 header read
//! timeout of its own choosing. hyper-util's connection builder has them
//! (or, for idle time, the hook to add it); this loop adds the connection
//! bound and graceful shutdown on the daemon's token.
//!
//! With TLS configured (see `crate::tls`), each accepted connection first
//! completes a TLS handshake within `tls.handshake_timeout` (it holds a
//! connection permit meanwhile, so handshakes in progress count against
//! `server.max_connections`); then HTTP/2 or HTTP/1.1 is served over it,
//! as over plain TCP.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::Status;
use tower::Service;
use tracing::{debug, info, warn};

use crate::rpc::connect::error_response;
use crate::tls::Tls;

/// Connections accepted beyond `max_connections` are answered
/// RESOURCE_EXHAUSTED on every request for this long, then closed; at most
/// this many such connections are open at once (more are closed at once).
const OVERFLOW_LINGER: Duration = Duration::from_secs(2);
const MAX_OVERFLOW_CONNECTIONS: usize = 64;
/// After accept fails (say, out of file descriptors), wait this long
/// before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The listener's bounds.
#[derive(Debug, Clone)]
pub struct ListenerSettings {
    pub max_connections: usize,
    pub max_concurrent_streams: u32,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub http2_keepalive_interval: Duration,
    pub http2_keepalive_timeout: Duration,
    pub tcp_keepalive: Duration,
}

/// Serves `service` on every connection `listener` accepts until `stop`
/// fires; then stops accepting, asks every connection to close gracefully
/// (HTTP/2 GOAWAY; HTTP/1.1 after the response in flight) and returns once
/// all have closed. Dropping the future closes every connection at once.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    settings: ListenerSettings,
    tls: Option<Tls>,
    stop: CancellationToken,
) where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let builder = Arc::new(connection_builder(&settings));
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let overflow = Arc::new(Semaphore::new(MAX_OVERFLOW_CONNECTIONS));
    let at_limit = AtomicBool::new(false);
    // Connection tasks live in the set, so that dropping this future (the
    // shutdown deadline passed) aborts them all.
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(error = %err, "cannot accept a connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        configure(&stream, &settings);
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                if at_limit.swap(false, Ordering::Relaxed) {
                    info!("accepting connections again: below the connection limit");
                }
                let connection = Connection {
                    builder: builder.clone(),
                    service: service.clone(),
                    idle_timeout: settings.idle_timeout,
                    stop: stop.clone(),
                };
                let tls = tls.clone();
                let stop = stop.clone();
                connections.spawn(async move {
                    match tls {
                        None => connection.serve(stream, peer).await,
                        Some(tls) => {
                            if let Some(stream) = handshake(&tls, stream, peer, &stop).await {
                                connection.serve(stream, peer).await;
                            }
                        }
                    }
                    drop(permit);
                });
            }
            Err(_) => {
                if !at_limit.swap(true, Ordering::Relaxed) {
                    warn!(
                        limit = settings.max_connections,
                        "connection limit reached: further connections are refused with \
                         RESOURCE_EXHAUSTED until some close"
                    );
                }
                let Ok(permit) = overflow.clone().try_acquire_owned() else {
                    continue;
                };
                let builder = builder.clone();
                let limit = settings.max_connections;
                let tls = tls.clone();
                let stop = stop.clone();
                connections.spawn(async move {
                    // The handshake and the answer share the linger time.
                    let _ = tokio::time::timeout(OVERFLOW_LINGER, async {
                        match tls {
                            None => refuse(&builder, stream, limit).await,
                            Some(tls) => {
                                if let Some(stream) = handshake(&tls, stream, peer, &stop).await {
                                    refuse(&builder, stream, limit).await;
                                }
                            }
                        }
                    })
                    .await;
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

fn connection_builder(settings: &ListenerSettings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.max_concurrent_streams)
        .keep_alive_interval(settings.http2_keepalive_interval)
        .keep_alive_timeout(settings.http2_keepalive_timeout);
    builder
}

/// The server side of a TLS handshake, within `tls.handshake_timeout`;
/// `None` (the connection is dropped) when it fails or takes too long, e.g.
/// a plain HTTP client on the TLS port, or when shutdown begins meanwhile.
async fn handshake(
    tls: &Tls,
    stream: TcpStream,
    peer: SocketAddr,
    stop: &CancellationToken,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let accept = tokio::time::timeout(tls.handshake_timeout, tls.acceptor().accept(stream));
    let result = tokio::select! {
        result = accept => result,
        () = stop.cancelled() => return None,
    };
    match result {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(err)) => {
            debug!(%peer, error = %err, "TLS handshake failed");
            None
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

fn configure(stream: &TcpStream, settings: &ListenerSettings) {
    if let Err(err) = stream.set_nodelay(true) {
        debug!(error = %err, "cannot set TCP_NODELAY");
    }
    let keepalive = socket2::TcpKeepalive::new().with_time(settings.tcp_keepalive);
    if let Err(err) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        debug!(error = %err, "cannot set TCP keepalive");
    }
}

/// Answers every request of a connection over the limit with
/// RESOURCE_EXHAUSTED (in the request's protocol) for a short while.
async fn refuse<I>(builder: &auto::Builder<TokioExecutor>, stream: I, limit: usize)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<Incoming>| async move {
        let status = Status::resource_exhausted(format!(
            "the daemon is at its limit of {limit} connections; retry later"
        ));
        Ok::<_, Infallible>(error_response(request.headers(), &status))
    });
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    let _ = connection.await;
}

struct Connection<S> {
    builder: Arc<auto::Builder<TokioExecutor>>,
    service: S,
    idle_timeout: Duration,
    stop: CancellationToken,
}

impl<S> Connection<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    async fn serve<I>(self, stream: I, peer: SocketAddr)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        });
        let service = TowerToHyperService::new(Tracked {
            inner: self.service,
            activity: activity.clone(),
        });
        let connection = self.builder.serve_connection(TokioIo::new(stream), service);
        tokio::pin!(connection);
        let mut closing = false;
        // Once an idle connection was asked to close, it gets one more idle
        // period to do so, then it is dropped.
        let mut hard_close: Option<Instant> = None;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(err) = result {
                        debug!(%peer, error = %err, "connection ended with an error");
                    }
                    break;
                }
                () = self.stop.cancelled(), if !closing => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                () = idle(&activity, self.idle_timeout), if !closing => {
                    debug!(%peer, "closing an idle connection");
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                    hard_close = Some(Instant::now() + self.idle_timeout);
                }
                () = tokio::time::sleep_until(hard_close.unwrap_or_else(Instant::now)), if hard_close.is_some() => {
                    debug!(%peer, "dropping an idle connection that did not close");
                    break;
                }
            }
        }
    }
}

/// Requests in flight on one connection, and since when it has had none.
struct Activity {
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Activity {
    fn idle_since(&self) -> Instant {
        *self.idle_since.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Resolves once the connection has had no request in flight for
/// `timeout`. A watch stream is a request in flight, however quiet.
async fn idle(activity: &Activity, timeout: Duration) {
    loop {
        let wait = if activity.in_flight.load(Ordering::Acquire) > 0 {
            timeout
        } else {
            let idle_for = activity.idle_since().elapsed();
            if idle_for >= timeout {
                return;
            }
            timeout - idle_for
        };
        tokio::time::sleep(wait).await;
    }
}

/// Counts a connection's requests in flight: from the call until its
/// response body is finished or dropped.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> Service<Request<Incoming>> for Tracked<S>
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

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let guard = InFlight::new(self.activity.clone());
        let future = self.inner.call(request.map(Body::new));
        Box::pin(async move {
            let response = future.await?;
            Ok(response.map(|body| {
                Body::new(Guarded {
                    inner: body,
                    _guard: guard,
                })
            }))
        })
    }
}

struct Guarded {
    inner: Body,
    _guard: InFlight,
}

impl HttpBody for Guarded {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
