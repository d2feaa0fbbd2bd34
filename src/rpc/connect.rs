//! The Connect protocol (connectrpc.com/docs/protocol), served on the same
//! port as gRPC and gRPC-Web.
//!
//! Why this is written here rather than taken from a library: the Connect
//! server crates for Rust (connectrpc-axum) generate their code from
//! `.proto` sources with a `protoc` binary, which a fresh machine does not
//! have (actionsd compiles its protos with protox), and describe themselves
//! as not ready for production. The protocol surface actionsd needs is
//! small — unary and server-streaming calls, proto and JSON codecs, gzip,
//! timeouts, error bodies — and every call is dispatched to the same
//! service implementation as gRPC, so the two cannot disagree.
//!
//! Supported: POST with `application/proto` or `application/json` (unary)
//! and `application/connect+proto` or `application/connect+json` (server
//! streaming); `content-encoding` / `connect-content-encoding` gzip on
//! requests and, when accepted, on responses; `connect-timeout-ms`.

use std::convert::Infallible;
use std::future::Future;
use std::io::Read;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use http::header::{HeaderMap, HeaderValue, CONTENT_ENCODING, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited, StreamBody};
use prost::Message;
use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::Status;
use tower::{Layer, Service};

use super::executor::ExecutorApi;
use super::flyte::FlyteApi;
use super::status::connect_code;
use super::{ActionsApi, ReadApi};
use crate::auth::service::AuthMetadataApi;
use crate::proto::actionsd::executor::v1::executor_service_server::ExecutorService;
use crate::proto::actionsd::read::v1::read_service_server::ReadService;
use crate::proto::flyteidl2::actions::actions_service_server::ActionsService;
use crate::proto::flyteidl2::auth::auth_metadata_service_server::AuthMetadataService;
use crate::proto::flyteidl2::cluster::cluster_service_server::ClusterService;
use crate::proto::flyteidl2::dataproxy::data_proxy_service_server::DataProxyService;
use crate::proto::flyteidl2::workflow::run_service_server::RunService;
use crate::schema;

/// The services served over Connect (and whose calls all carry exactly one
/// request message, on every protocol).
pub(crate) const SERVICES: [&str; 7] = [
    "/flyteidl2.auth.AuthMetadataService/",
    "/flyteidl2.actions.ActionsService/",
    "/actionsd.executor.v1.ExecutorService/",
    "/actionsd.read.v1.ReadService/",
    "/flyteidl2.workflow.RunService/",
    "/flyteidl2.dataproxy.DataProxyService/",
    "/flyteidl2.cluster.ClusterService/",
];
const TIMEOUT_HEADER: &str = "connect-timeout-ms";
const STREAM_ENCODING: &str = "connect-content-encoding";
const STREAM_ACCEPT_ENCODING: &str = "connect-accept-encoding";
const ACCEPT_ENCODING: &str = "accept-encoding";
/// Responses smaller than this are not worth compressing.
const COMPRESS_MIN: usize = 1024;
/// Envelope flags.
const FLAG_COMPRESSED: u8 = 0b01;
const FLAG_END_STREAM: u8 = 0b10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Proto,
    Json,
}

/// What a request's content type asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unary(Codec),
    Stream(Codec),
}

fn kind(headers: &HeaderMap) -> Option<Kind> {
    let content_type = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    let essence = content_type.split(';').next()?.trim();
    Some(match essence {
        "application/proto" => Kind::Unary(Codec::Proto),
        "application/json" => Kind::Unary(Codec::Json),
        "application/connect+proto" => Kind::Stream(Codec::Proto),
        "application/connect+json" => Kind::Stream(Codec::Json),
        _ => return None,
    })
}

/// The full protobuf names of a method's request and response, read from
/// the schema by the method's path.
struct Types {
    request: String,
    response: String,
}

impl Codec {
    /// JSON is read under the official flyteidl2 schema (see `schema`), so
    /// opaque payloads such as TaskSpec arrive as JSON objects.
    fn decode<M: Message + Default>(self, name: &str, bytes: &[u8]) -> Result<M, Status> {
        let binary = match self {
            Self::Proto => {
                return M::decode(bytes)
                    .map_err(|e| Status::invalid_argument(format!("invalid request message: {e}")))
            }
            Self::Json => {
                schema::json_to_binary(name, if bytes.is_empty() { b"{}" } else { bytes })
                    .map_err(|e| Status::invalid_argument(format!("invalid request JSON: {e}")))?
            }
        };
        M::decode(binary.as_slice())
            .map_err(|e| Status::invalid_argument(format!("invalid request message: {e}")))
    }

    fn encode<M: Message>(self, name: &str, message: &M) -> Result<Bytes, Status> {
        let binary = message.encode_to_vec();
        match self {
            Self::Proto => Ok(Bytes::from(binary)),
            Self::Json => schema::binary_to_json(name, &binary)
                .map(Bytes::from)
                .map_err(|e| {
                    tracing::error!(error = %e, "cannot encode a response as JSON");
                    Status::internal("cannot encode the response")
                }),
        }
    }

    fn unary_content_type(self) -> &'static str {
        match self {
            Self::Proto => "application/proto",
            Self::Json => "application/json",
        }
    }

    fn stream_content_type(self) -> &'static str {
        match self {
            Self::Proto => "application/connect+proto",
            Self::Json => "application/connect+json",
        }
    }
}

/// Serves Connect requests for actionsd's services; everything else goes
/// to the inner (gRPC, gRPC-Web) service.
#[derive(Clone)]
pub struct ConnectLayer {
    handler: Arc<Handler>,
}

impl ConnectLayer {
    pub fn new(
        actions: ActionsApi,
        executor: ExecutorApi,
        read: ReadApi,
        max_message_size: usize,
    ) -> Self {
        Self {
            handler: Arc::new(Handler {
                actions,
                executor,
                read,
                max_message_size,
                flyte: None,
                auth: None,
            }),
        }
    }

    /// Serves `flyteidl2.auth.AuthMetadataService` too (authentication on).
    pub fn with_auth(mut self, auth: AuthMetadataApi) -> Self {
        Arc::get_mut(&mut self.handler)
            .expect("the layer is configured before it is used")
            .auth = Some(auth);
        self
    }

    /// Serves the Flyte SDK's services too (see `rpc::flyte`).
    pub fn with_flyte(mut self, flyte: FlyteApi) -> Self {
        Arc::get_mut(&mut self.handler)
            .expect("the layer is configured before it is used")
            .flyte = Some(flyte);
        self
    }
}

impl<S> Layer<S> for ConnectLayer {
    type Service = ConnectService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConnectService {
            inner,
            handler: self.handler.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ConnectService<S> {
    inner: S,
    handler: Arc<Handler>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<Request<Body>> for ConnectService<S>
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
        let is_grpc = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        if request.method() != Method::POST || is_grpc {
            let future = self.inner.call(request);
            return Box::pin(future);
        }
        // Every Connect request is answered here: a method of a service
        // actionsd does not serve is 404 `unimplemented`, as for an
        // unknown method of a known service.
        if kind(request.headers()).is_some() {
            let handler = self.handler.clone();
            return Box::pin(async move { Ok(handler.handle(request).await) });
        }
        // Neither gRPC nor Connect: say so rather than fail to decode.
        Box::pin(async {
            Ok(plain(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported content type; use application/grpc, application/grpc-web, \
                 application/proto, application/json or application/connect+proto/+json",
            ))
        })
    }
}

struct Handler {
    actions: ActionsApi,
    executor: ExecutorApi,
    read: ReadApi,
    max_message_size: usize,
    flyte: Option<FlyteApi>,
    auth: Option<AuthMetadataApi>,
}

impl Handler {
    async fn handle(&self, request: Request<Body>) -> Response<Body> {
        let path = request.uri().path().to_owned();
        let Some(kind) = kind(request.headers()) else {
            return plain(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported content type",
            );
        };
        let unknown = || {
            unary_error(
                &Status::unimplemented(format!(
                    "actionsd does not serve the {} method {path}",
                    match kind {
                        Kind::Unary(_) => "unary",
                        Kind::Stream(_) => "server-streaming",
                    }
                )),
                StatusCode::NOT_FOUND,
            )
        };
        let Some((request_type, response_type)) = schema::method_messages(&path) else {
            return unknown();
        };
        let types = Types {
            request: request_type,
            response: response_type,
        };
        let (actions, executor, read) = (&self.actions, &self.executor, &self.read);
        match (path.as_str(), kind) {
            ("/flyteidl2.actions.ActionsService/Enqueue", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| actions.enqueue(r))
                    .await
            }
            ("/flyteidl2.actions.ActionsService/Update", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| actions.update(r))
                    .await
            }
            ("/flyteidl2.actions.ActionsService/Abort", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| actions.abort(r))
                    .await
            }
            ("/flyteidl2.actions.ActionsService/Signal", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| actions.signal(r))
                    .await
            }
            ("/flyteidl2.actions.ActionsService/WatchForUpdates", Kind::Stream(codec)) => {
                self.server_stream(request, codec, types, |r| actions.watch_for_updates(r))
                    .await
            }
            ("/actionsd.executor.v1.ExecutorService/Lease", Kind::Stream(codec)) => {
                self.server_stream(request, codec, types, |r| executor.lease(r))
                    .await
            }
            ("/actionsd.executor.v1.ExecutorService/Heartbeat", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| executor.heartbeat(r))
                    .await
            }
            ("/actionsd.executor.v1.ExecutorService/Finish", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| executor.finish(r))
                    .await
            }
            ("/actionsd.executor.v1.ExecutorService/AppendLogs", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| executor.append_logs(r))
                    .await
            }
            ("/actionsd.read.v1.ReadService/GetAction", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| read.get_action(r))
                    .await
            }
            ("/actionsd.read.v1.ReadService/ListActions", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| read.list_actions(r))
                    .await
            }
            ("/actionsd.read.v1.ReadService/ListRuns", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| read.list_runs(r))
                    .await
            }
            ("/actionsd.read.v1.ReadService/GetHistory", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| read.get_history(r))
                    .await
            }
            ("/actionsd.read.v1.ReadService/DeleteRun", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| read.delete_run(r))
                    .await
            }
            ("/actionsd.read.v1.ReadService/WatchRun", Kind::Stream(codec)) => {
                self.server_stream(request, codec, types, |r| read.watch_run(r))
                    .await
            }
            ("/flyteidl2.auth.AuthMetadataService/GetOAuth2Metadata", Kind::Unary(codec))
                if self.auth.is_some() =>
            {
                let auth = self.auth.as_ref().expect("checked");
                self.unary(request, codec, types, |r| auth.get_o_auth2_metadata(r))
                    .await
            }
            ("/flyteidl2.auth.AuthMetadataService/GetPublicClientConfig", Kind::Unary(codec))
                if self.auth.is_some() =>
            {
                let auth = self.auth.as_ref().expect("checked");
                self.unary(request, codec, types, |r| auth.get_public_client_config(r))
                    .await
            }
            _ => match &self.flyte {
                Some(flyte) => {
                    self.handle_flyte(flyte, &path, request, kind, types, unknown)
                        .await
                }
                None => unknown(),
            },
        }
    }

    async fn handle_flyte(
        &self,
        flyte: &FlyteApi,
        path: &str,
        request: Request<Body>,
        kind: Kind,
        types: Types,
        unknown: impl FnOnce() -> Response<Body>,
    ) -> Response<Body> {
        match (path, kind) {
            ("/flyteidl2.cluster.ClusterService/SelectCluster", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| flyte.select_cluster(r))
                    .await
            }
            ("/flyteidl2.dataproxy.DataProxyService/CreateUploadLocation", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| flyte.create_upload_location(r))
                    .await
            }
            ("/flyteidl2.dataproxy.DataProxyService/CreateDownloadLink", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| flyte.create_download_link(r))
                    .await
            }
            ("/flyteidl2.dataproxy.DataProxyService/UploadInputs", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| flyte.upload_inputs(r))
                    .await
            }
            ("/flyteidl2.dataproxy.DataProxyService/GetActionData", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| flyte.get_action_data(r))
                    .await
            }
            ("/flyteidl2.dataproxy.DataProxyService/TailLogs", Kind::Stream(codec)) => {
                self.server_stream(request, codec, types, |r| flyte.tail_logs(r))
                    .await
            }
            ("/flyteidl2.workflow.RunService/CreateRun", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| flyte.create_run(r))
                    .await
            }
            ("/flyteidl2.workflow.RunService/AbortRun", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| flyte.abort_run(r))
                    .await
            }
            ("/flyteidl2.workflow.RunService/GetRunDetails", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| flyte.get_run_details(r))
                    .await
            }
            ("/flyteidl2.workflow.RunService/GetActionDetails", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| flyte.get_action_details(r))
                    .await
            }
            ("/flyteidl2.workflow.RunService/WatchActionDetails", Kind::Stream(codec)) => {
                self.server_stream(request, codec, types, |r| flyte.watch_action_details(r))
                    .await
            }
            ("/flyteidl2.workflow.RunService/ListRuns", Kind::Unary(codec)) => {
                self.unary(request, codec, types, |r| flyte.list_runs(r))
                    .await
            }
            _ => unknown(),
        }
    }

    async fn unary<Req, Resp, F, Fut>(
        &self,
        request: Request<Body>,
        codec: Codec,
        types: Types,
        call: F,
    ) -> Response<Body>
    where
        Req: Message + Default,
        Resp: Message,
        F: FnOnce(tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let (parts, body) = request.into_parts();
        let accepts_gzip = accepts_gzip(&parts.headers, ACCEPT_ENCODING);
        let result = async {
            let timeout = timeout(&parts.headers)?;
            let bytes = self.read_body(body).await?;
            let bytes = self.decompress(encoding(&parts.headers, CONTENT_ENCODING)?, bytes)?;
            let message: Req = codec.decode(&types.request, &bytes)?;
            let request = tonic::Request::from_parts(
                MetadataMap::from_headers(parts.headers.clone()),
                parts.extensions,
                message,
            );
            let response = with_timeout(timeout, call(request)).await?;
            let body = codec.encode(&types.response, response.get_ref())?;
            self.check_response_size(body.len())?;
            Ok::<_, Status>(body)
        }
        .await;
        match result {
            Ok(body) => {
                let mut builder = Response::builder()
                    .status(StatusCode::OK)
                    .header(CONTENT_TYPE, codec.unary_content_type());
                let body = if accepts_gzip && body.len() >= COMPRESS_MIN {
                    builder = builder.header(CONTENT_ENCODING, "gzip");
                    gzip(&body)
                } else {
                    body
                };
                builder
                    .body(Body::new(http_body_util::Full::new(body)))
                    .expect("valid response")
            }
            Err(status) => {
                let http = connect_code(status.code()).1;
                unary_error(&status, http)
            }
        }
    }

    async fn server_stream<Req, Resp, F, Fut, St>(
        &self,
        request: Request<Body>,
        codec: Codec,
        types: Types,
        call: F,
    ) -> Response<Body>
    where
        Req: Message + Default,
        Resp: Message + 'static,
        F: FnOnce(tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<St>, Status>>,
        St: Stream<Item = Result<Resp, Status>> + Send + 'static,
    {
        let (parts, body) = request.into_parts();
        let compress = accepts_gzip(&parts.headers, STREAM_ACCEPT_ENCODING);
        let max_message_size = self.max_message_size;
        let opened = async {
            let timeout = timeout(&parts.headers)?;
            let bytes = self.read_body(body).await?;
            let (flags, payload) = unenvelope(bytes)?;
            let encoding = encoding(&parts.headers, STREAM_ENCODING)?;
            let payload = match (flags, encoding) {
                (0, _) => payload,
                (FLAG_COMPRESSED, Encoding::Gzip) => self.decompress(encoding, payload)?,
                (FLAG_COMPRESSED, Encoding::Identity) => {
                    return Err(Status::invalid_argument(format!(
                        "the request message is flagged compressed but no \
                         {STREAM_ENCODING} was negotiated"
                    )))
                }
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "invalid request envelope flags {flags:#04x}"
                    )))
                }
            };
            let message: Req = codec.decode(&types.request, &payload)?;
            let request = tonic::Request::from_parts(
                MetadataMap::from_headers(parts.headers.clone()),
                parts.extensions,
                message,
            );
            let stream = with_timeout(timeout, call(request)).await?.into_inner();
            Ok::<_, Status>((stream, timeout))
        }
        .await;

        let frames: Pin<Box<dyn Stream<Item = Bytes> + Send>> = match opened {
            Err(status) => Box::pin(futures_util::stream::once(async move {
                end_stream(Some(&status))
            })),
            Ok((stream, timeout)) => {
                let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
                Box::pin(async_stream::stream! {
                    let mut stream = std::pin::pin!(stream);
                    loop {
                        let next = match deadline {
                            Some(deadline) => match tokio::time::timeout_at(deadline, stream.next()).await {
                                Ok(next) => next,
                                Err(_) => {
                                    yield end_stream(Some(&Status::deadline_exceeded("the call's deadline passed")));
                                    break;
                                }
                            },
                            None => stream.next().await,
                        };
                        match next {
                            Some(Ok(message)) => match codec.encode(&types.response, &message) {
                                Ok(bytes) if bytes.len() > max_message_size => {
                                    yield end_stream(Some(&response_too_large(bytes.len(), max_message_size)));
                                    break;
                                }
                                Ok(bytes) => yield message_frame(bytes, compress),
                                Err(status) => {
                                    yield end_stream(Some(&status));
                                    break;
                                }
                            },
                            Some(Err(status)) => {
                                yield end_stream(Some(&status));
                                break;
                            }
                            None => {
                                yield end_stream(None);
                                break;
                            }
                        }
                    }
                })
            }
        };
        let mut builder = Response::builder()
            .status(StatusCode::OK)
            .header(CONTENT_TYPE, codec.stream_content_type());
        if compress {
            builder = builder.header(STREAM_ENCODING, "gzip");
        }
        let body = StreamBody::new(frames.map(|b| Ok::<_, Infallible>(http_body::Frame::data(b))));
        builder.body(Body::new(body)).expect("valid response")
    }

    /// Reads the whole request body, refusing more than the message limit.
    async fn read_body(&self, body: Body) -> Result<Bytes, Status> {
        // Room for a stream envelope's 5-byte prefix on top of the message.
        match Limited::new(body, self.max_message_size + 5)
            .collect()
            .await
        {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(err) if err.is::<http_body_util::LengthLimitError>() => {
                Err(Status::resource_exhausted(format!(
                    "request larger than the limit of {} bytes",
                    self.max_message_size
                )))
            }
            // The listener's limits (body read timeout, buffered bytes)
            // end a body with their own status.
            Err(err) => Err(match err.downcast::<Status>() {
                Ok(status) => *status,
                Err(_) => Status::invalid_argument("cannot read the request body"),
            }),
        }
    }

    fn check_response_size(&self, size: usize) -> Result<(), Status> {
        if size > self.max_message_size {
            return Err(response_too_large(size, self.max_message_size));
        }
        Ok(())
    }

    fn decompress(&self, encoding: Encoding, bytes: Bytes) -> Result<Bytes, Status> {
        match encoding {
            Encoding::Identity => Ok(bytes),
            Encoding::Gzip => {
                let limit = self.max_message_size;
                let mut out = Vec::new();
                let read = flate2::read::GzDecoder::new(bytes.as_ref())
                    .take(limit as u64 + 1)
                    .read_to_end(&mut out);
                match read {
                    Err(_) => Err(Status::invalid_argument("invalid gzip request body")),
                    Ok(n) if n > limit => Err(Status::resource_exhausted(format!(
                        "decompressed request larger than the limit of {limit} bytes"
                    ))),
                    Ok(_) => Ok(Bytes::from(out)),
                }
            }
        }
    }
}

/// A response over the message limit: RESOURCE_EXHAUSTED, as on gRPC.
fn response_too_large(size: usize, limit: usize) -> Status {
    Status::resource_exhausted(format!(
        "the response ({size} bytes) is larger than the limit of {limit} bytes"
    ))
}

/// An error response in the protocol a request spoke, for refusals made
/// before a call reaches its service (the listener's limits): gRPC and
/// gRPC-Web get a trailers-only response, Connect unary calls a JSON error
/// with its HTTP status, Connect streams an end-of-stream message.
pub(crate) fn error_response(headers: &HeaderMap, status: &Status) -> Response<Body> {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type.starts_with("application/grpc") {
        let (mut parts, ()) = status.clone().into_http::<()>().into_parts();
        if let Ok(value) = HeaderValue::from_str(content_type) {
            parts.headers.insert(CONTENT_TYPE, value);
        }
        return Response::from_parts(parts, Body::empty());
    }
    match kind(headers) {
        Some(Kind::Unary(_)) | None => unary_error(status, connect_code(status.code()).1),
        Some(Kind::Stream(codec)) => Response::builder()
            .status(StatusCode::OK)
            .header(CONTENT_TYPE, codec.stream_content_type())
            .body(Body::new(http_body_util::Full::new(end_stream(Some(
                status,
            )))))
            .expect("valid response"),
    }
}

#[derive(Debug, Clone, Copy)]
enum Encoding {
    Identity,
    Gzip,
}

fn encoding(
    headers: &HeaderMap,
    name: impl http::header::AsHeaderName,
) -> Result<Encoding, Status> {
    match headers.get(name).map(|v| v.to_str().map(str::trim)) {
        None | Some(Ok("" | "identity")) => Ok(Encoding::Identity),
        Some(Ok("gzip")) => Ok(Encoding::Gzip),
        Some(_) => Err(Status::unimplemented(
            "unsupported compression; actionsd accepts gzip and identity",
        )),
    }
}

fn accepts_gzip(headers: &HeaderMap, name: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| e.split(';').next().is_some_and(|e| e.trim() == "gzip"))
}

/// `connect-timeout-ms`: at most 10 digits, per the protocol.
fn timeout(headers: &HeaderMap) -> Result<Option<Duration>, Status> {
    let Some(value) = headers.get(TIMEOUT_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .filter(|v| !v.is_empty() && v.len() <= 10 && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|ms| Some(Duration::from_millis(ms)))
        .ok_or_else(|| Status::invalid_argument(format!("invalid {TIMEOUT_HEADER} header")))
}

async fn with_timeout<T>(
    timeout: Option<Duration>,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match timeout {
        None => call.await,
        Some(timeout) => tokio::time::timeout(timeout, call)
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("the call's deadline passed"))),
    }
}

/// Splits one enveloped message: a flags byte, a big-endian u32 length,
/// the payload.
fn unenvelope(bytes: Bytes) -> Result<(u8, Bytes), Status> {
    if bytes.len() < 5 {
        return Err(Status::invalid_argument(
            "request is not an enveloped message",
        ));
    }
    let flags = bytes[0];
    let length = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    if bytes.len() - 5 != length {
        return Err(Status::invalid_argument(
            "request envelope length does not match its body (one message expected)",
        ));
    }
    Ok((flags, bytes.slice(5..)))
}

fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + payload.len());
    out.put_u8(flags);
    out.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    out.put_slice(payload);
    out.freeze()
}

fn message_frame(payload: Bytes, compress: bool) -> Bytes {
    if compress && payload.len() >= COMPRESS_MIN {
        envelope(FLAG_COMPRESSED, &gzip(&payload))
    } else {
        envelope(0, &payload)
    }
}

/// The end-of-stream message: `{}` or `{"error": {...}}`. It is never
/// compressed, so any client can read why a stream ended.
fn end_stream(status: Option<&Status>) -> Bytes {
    let body = match status {
        None => serde_json::json!({}),
        Some(status) => serde_json::json!({ "error": error_json(status) }),
    };
    envelope(FLAG_END_STREAM, body.to_string().as_bytes())
}

fn error_json(status: &Status) -> serde_json::Value {
    serde_json::json!({
        "code": connect_code(status.code()).0,
        "message": status.message(),
    })
}

fn unary_error(status: &Status, http: StatusCode) -> Response<Body> {
    let body = error_json(status).to_string();
    Response::builder()
        .status(http)
        .header(CONTENT_TYPE, "application/json")
        .body(Body::new(http_body_util::Full::new(Bytes::from(body))))
        .expect("valid response")
}

fn plain(status: StatusCode, message: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::new(http_body_util::Full::new(Bytes::from_static(
        message.as_bytes(),
    ))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

fn gzip(bytes: &[u8]) -> Bytes {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut encoder, bytes).expect("writing to memory");
    Bytes::from(encoder.finish().expect("writing to memory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_bad_ones_are_refused() {
        let framed = envelope(0, b"abc");
        let (flags, payload) = unenvelope(framed).ok().unwrap();
        assert_eq!((flags, payload.as_ref()), (0, &b"abc"[..]));
        assert!(unenvelope(Bytes::from_static(b"\0\0\0")).is_err());
        assert!(unenvelope(Bytes::from_static(b"\0\0\0\0\x05ab")).is_err());
    }

    #[test]
    fn timeouts_follow_the_protocol() {
        let mut headers = HeaderMap::new();
        assert!(matches!(timeout(&headers), Ok(None)));
        headers.insert(TIMEOUT_HEADER, HeaderValue::from_static("1500"));
        assert!(matches!(timeout(&headers), Ok(Some(d)) if d == Duration::from_millis(1500)));
        headers.insert(TIMEOUT_HEADER, HeaderValue::from_static("12345678901"));
        assert!(timeout(&headers).is_err());
        headers.insert(TIMEOUT_HEADER, HeaderValue::from_static("-1"));
        assert!(timeout(&headers).is_err());
    }

    #[test]
    fn accept_encoding_lists_are_parsed() {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("br, gzip;q=0.8"));
        assert!(accepts_gzip(&headers, ACCEPT_ENCODING));
        headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        assert!(!accepts_gzip(&headers, ACCEPT_ENCODING));
    }
}
