//! The HTTP-level auth layer, in front of gRPC, gRPC-Web and Connect, and
//! the token endpoint.

use std::collections::HashMap;
use std::convert::Infallible;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use base64::Engine as _;
use bytes::Bytes;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use sha2::{Digest, Sha256};
use tonic::body::Body;
use tonic::Status;
use tower::{Layer, Service};
use tracing::info;

use super::config::{ClientEntry, Limits};
use super::roles::{self, Access};
use super::tokens::{self, Issuer, TASK_CLIENT_ID, TOKEN_PATH};
use super::{AuthSettings, Authorized, Principal};
use crate::metrics::names;
use crate::rpc::connect::error_response;
use crate::store::Store;

/// Largest token request body.
const MAX_TOKEN_REQUEST: usize = 16 * 1024;
/// The keyed rate limiter forgets idle principals every this many checks.
const RETAIN_EVERY: u64 = 4096;
/// Argon2 verifications at once (each takes ~20 MiB and tens of ms of
/// CPU), and how long a token request waits for a turn before it is told
/// to retry: the token endpoint is public, so this bounds what its
/// callers can make the daemon spend.
const MAX_SECRET_CHECKS: usize = 4;
const SECRET_CHECK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the layer and the token endpoint share.
pub struct AuthState {
    pub settings: AuthSettings,
    pub issuer: Arc<Issuer>,
    tokens: HashMap<[u8; 32], Arc<Principal>>,
    clients: HashMap<String, ClientEntry>,
    oidc: Option<super::oidc::Oidc>,
    store: Arc<dyn Store>,
    writes: DefaultKeyedRateLimiter<String>,
    checks: AtomicU64,
    secret_checks: tokio::sync::Semaphore,
    streams: Mutex<HashMap<String, usize>>,
}

impl AuthState {
    pub fn new(settings: AuthSettings, store: Arc<dyn Store>) -> Arc<Self> {
        let issuer = Arc::new(Issuer::new(&settings));
        let tokens = settings
            .tokens
            .iter()
            .map(|t| {
                (
                    t.sha256,
                    Arc::new(Principal {
                        name: t.name.clone(),
                        role: t.role,
                        scope: t.scope.clone(),
                        run: None,
                    }),
                )
            })
            .collect();
        let clients = settings
            .clients
            .iter()
            .map(|c| (c.client_id.clone(), c.clone()))
            .collect();
        let limits = &settings.limits;
        let quota =
            Quota::per_second(NonZeroU32::new(limits.writes_per_second).unwrap_or(NonZeroU32::MIN))
                .allow_burst(NonZeroU32::new(limits.write_burst).unwrap_or(NonZeroU32::MIN));
        let oidc = settings.oidc.clone().map(super::oidc::Oidc::new);
        Arc::new(Self {
            issuer,
            tokens,
            clients,
            oidc,
            store,
            writes: RateLimiter::keyed(quota),
            checks: AtomicU64::new(0),
            secret_checks: tokio::sync::Semaphore::new(MAX_SECRET_CHECKS),
            streams: Mutex::new(HashMap::new()),
            settings,
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.settings.limits
    }

    /// The principal of the request's bearer credential.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, Status> {
        let value = headers
            .get(AUTHORIZATION)
            .ok_or_else(|| Status::unauthenticated("a bearer credential is required"))?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated("the authorization header must be `Bearer <token>`")
            })?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(principal) = self.tokens.get(&digest) {
            return Ok(principal.as_ref().clone());
        }
        if let Some(principal) = self.issuer.verify_access(token) {
            return Ok(principal);
        }
        // A task credential presented directly (the SDK's external token
        // command): good while its attempt is current.
        if let Some(key) = self.issuer.verify_task_key(token) {
            if self.attempt_is_live(&key).await {
                return Ok(tokens::task_principal(&key));
            }
            return Err(Status::unauthenticated(
                "the task credential's attempt has ended",
            ));
        }
        if let Some(oidc) = &self.oidc {
            if let Some(principal) = oidc.verify(token).await {
                return Ok(principal);
            }
        }
        Err(Status::unauthenticated(
            "the credential is invalid or expired",
        ))
    }

    /// Whether the attempt a task key names is the action's current one
    /// and has not finished.
    async fn attempt_is_live(&self, key: &tokens::TaskKey) -> bool {
        match self.store.get_action(&key.action).await {
            Ok(record) => record.state.attempt == key.attempt && !record.state.phase.is_terminal(),
            Err(_) => false,
        }
    }

    fn check_write_rate(&self, principal: &str) -> bool {
        if self.checks.fetch_add(1, Ordering::Relaxed) % RETAIN_EVERY == RETAIN_EVERY - 1 {
            self.writes.retain_recent();
        }
        self.writes.check_key(&principal.to_owned()).is_ok()
    }

    fn open_stream(self: &Arc<Self>, principal: &str) -> Option<StreamGuard> {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let open = streams.entry(principal.to_owned()).or_insert(0);
        if *open >= self.settings.limits.max_streams_per_principal {
            return None;
        }
        *open += 1;
        Some(StreamGuard {
            state: self.clone(),
            principal: principal.to_owned(),
        })
    }
}

/// Counts one open stream of a principal until dropped.
struct StreamGuard {
    state: Arc<AuthState>,
    principal: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut streams = self.state.streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(open) = streams.get_mut(&self.principal) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                streams.remove(&self.principal);
            }
        }
    }
}

#[derive(Clone)]
pub struct AuthLayer {
    state: Arc<AuthState>,
}

impl AuthLayer {
    pub fn new(state: Arc<AuthState>) -> Self {
        Self { state }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    state: Arc<AuthState>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

fn refuse(
    headers: &HeaderMap,
    status: &Status,
    reason: &'static str,
    path: &str,
) -> Response<Body> {
    ::metrics::counter!(names::AUTH_DENIED, "reason" => reason).increment(1);
    info!(
        target: "actionsd::audit",
        rpc = path,
        result = ?status.code(),
        reason,
        "refused"
    );
    error_response(headers, status)
}

impl<S> Service<Request<Body>> for AuthService<S>
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

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let state = self.state.clone();
        let (path, rule) = roles::rule_of(request.uri().path());
        if path == TOKEN_PATH {
            return Box::pin(async move { Ok(token_endpoint(&state, request).await) });
        }
        if rule.access == Access::Public {
            return Box::pin(self.inner.call(request));
        }
        // The inner service was made ready by poll_ready; the clone is
        // called after the credential is checked.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let principal = match state.authenticate(request.headers()).await {
                Ok(principal) => principal,
                Err(status) => {
                    return Ok(refuse(
                        request.headers(),
                        &status,
                        "unauthenticated",
                        request.uri().path(),
                    ))
                }
            };
            if !roles::role_allows(rule, &principal) {
                let status = super::denied(&principal, request.uri().path());
                info!(target: "actionsd::audit", principal = %principal.name, rpc = path, result = "PERMISSION_DENIED", "role may not call this method");
                ::metrics::counter!(names::AUTH_DENIED, "reason" => "role").increment(1);
                return Ok(error_response(request.headers(), &status));
            }
            if rule.write && !state.check_write_rate(&principal.name) {
                ::metrics::counter!(names::LIMITED, "limit" => "write_rate").increment(1);
                tracing::warn!(principal = %principal.name, rpc = path, "write rate limit exceeded");
                let status = Status::resource_exhausted(format!(
                    "{} is over its write rate of {}/s (burst {}); retry later",
                    principal.name,
                    state.limits().writes_per_second,
                    state.limits().write_burst
                ));
                return Ok(error_response(request.headers(), &status));
            }
            let guard = if rule.stream {
                match state.open_stream(&principal.name) {
                    Some(guard) => Some(guard),
                    None => {
                        ::metrics::counter!(names::LIMITED, "limit" => "streams").increment(1);
                        tracing::warn!(principal = %principal.name, rpc = path, "open stream limit reached");
                        let status = Status::resource_exhausted(format!(
                            "{} has {} streams open, the limit; close some first",
                            principal.name,
                            state.limits().max_streams_per_principal
                        ));
                        return Ok(error_response(request.headers(), &status));
                    }
                }
            } else {
                None
            };
            request.extensions_mut().insert(Authorized {
                principal: Arc::new(principal),
                rule,
                path,
                max_lease_capacity: state.limits().max_lease_capacity,
            });
            let response = inner.call(request).await?;
            Ok(match guard {
                None => response,
                Some(guard) => response.map(|body| {
                    Body::new(Guarded {
                        inner: body,
                        _guard: guard,
                    })
                }),
            })
        })
    }
}

/// A response body that holds a stream slot until it ends or is dropped.
struct Guarded {
    inner: Body,
    _guard: StreamGuard,
}

impl HttpBody for Guarded {
    type Data = Bytes;
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

/// An OAuth2 error response (RFC 6749 §5.2).
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": error, "error_description": description });
    let mut response = Response::new(Body::new(http_body_util::Full::new(Bytes::from(
        body.to_string(),
    ))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Basic realm=\"actionsd\""),
        );
    }
    response
}

/// `client_id:secret` from HTTP Basic, each part form-url-decoded (the
/// SDK quotes the secret with `quote_plus`, RFC 6749 §2.3.1).
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    let unquote = |s: &str| -> String {
        form_urlencoded::parse(format!("v={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Some((unquote(id), unquote(secret)))
}

/// POST /oauth2/token: the client-credentials grant, the client
/// authenticated by HTTP Basic or by `client_id`/`client_secret` in the
/// form body.
async fn token_endpoint(state: &AuthState, request: Request<Body>) -> Response<Body> {
    if request.method() != Method::POST {
        return oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "use POST",
        );
    }
    let form_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form_type {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the body must be application/x-www-form-urlencoded",
        );
    }
    let basic = basic_credentials(request.headers());
    let body = match Limited::new(request.into_body(), MAX_TOKEN_REQUEST)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request body is unreadable or too large",
            )
        }
    };
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only grant_type=client_credentials is supported",
        );
    }
    let (client_id, secret) = match basic {
        Some(credentials) => credentials,
        None => match (form.get("client_id"), form.get("client_secret")) {
            (Some(id), Some(secret)) => (id.clone(), secret.clone()),
            _ => {
                return oauth_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    "client authentication is required (HTTP Basic or client_id/client_secret)",
                )
            }
        },
    };
    let issued = if client_id == TASK_CLIENT_ID {
        task_token(state, &secret).await
    } else {
        let Ok(Ok(_turn)) =
            tokio::time::timeout(SECRET_CHECK_WAIT, state.secret_checks.acquire()).await
        else {
            ::metrics::counter!(names::LIMITED, "limit" => "token_endpoint").increment(1);
            return oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "too many token requests at once; retry later",
            );
        };
        client_token(state, &client_id, secret).await
    };
    match issued {
        Some((principal, token, expires_in)) => {
            info!(target: "actionsd::audit", principal = %principal.name, rpc = TOKEN_PATH, result = "OK", "token issued");
            let body = serde_json::json!({
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": expires_in,
            });
            let mut response = Response::new(Body::new(http_body_util::Full::new(Bytes::from(
                body.to_string(),
            ))));
            let headers = response.headers_mut();
            headers.insert(
                CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            headers.insert(
                http::header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-store"),
            );
            response
        }
        None => {
            ::metrics::counter!(names::AUTH_DENIED, "reason" => "token_endpoint").increment(1);
            info!(target: "actionsd::audit", client_id = %client_id.chars().take(128).collect::<String>(), rpc = TOKEN_PATH, result = "invalid_client", "token refused");
            oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "unknown client or wrong secret (or a task credential whose attempt has ended)",
            )
        }
    }
}

async fn client_token(
    state: &AuthState,
    client_id: &str,
    secret: String,
) -> Option<(Principal, String, u64)> {
    let client = state.clients.get(client_id)?.clone();
    // Argon2 is deliberately slow: off the async threads.
    let hash = client.secret_hash.clone();
    let verified = tokio::task::spawn_blocking(move || {
        use argon2::PasswordVerifier;
        argon2::PasswordHash::new(&hash)
            .map(|parsed| {
                argon2::Argon2::default()
                    .verify_password(secret.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false);
    if !verified {
        return None;
    }
    let principal = Principal {
        name: client.client_id,
        role: client.role,
        scope: client.scope,
        run: None,
    };
    let (token, ttl) = state.issuer.access_token(&principal, None);
    Some((principal, token, ttl))
}

/// A task credential is good while its attempt is the action's current
/// one and the action has not finished.
async fn task_token(state: &AuthState, secret: &str) -> Option<(Principal, String, u64)> {
    let key = state.issuer.verify_task_key(secret)?;
    if !state.attempt_is_live(&key).await {
        return None;
    }
    let principal = tokens::task_principal(&key);
    let (token, ttl) = state.issuer.access_token(&principal, Some(key.expires_at));
    Some((principal, token, ttl))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_unquoted() {
        let mut headers = HeaderMap::new();
        let encoded = base64::engine::general_purpose::STANDARD.encode("ci:a%2Bb+c%3A");
        headers.insert(AUTHORIZATION, format!("Basic {encoded}").parse().unwrap());
        assert_eq!(
            basic_credentials(&headers),
            Some(("ci".to_owned(), "a+b c:".to_owned()))
        );
    }
}
