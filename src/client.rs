//! How actionsd's own clients (`actionsctl`, `actionsd executor`) connect:
//! `https://` with a CA certificate (or the system roots), an optional
//! client certificate for mTLS, and a bearer token sent as
//! `authorization: Bearer …` on every call.
//!
//! The token is a `SecretString`: it never appears in `Debug` output or
//! logs, and its header value is marked sensitive so that hyper and tonic
//! do not print it either.

use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A channel whose every call carries the bearer token, if any.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// Credentials and trust for connecting to a daemon.
#[derive(Debug, Clone, Default)]
pub struct ClientSecurity {
    /// Sent as `authorization: Bearer <token>` on every call.
    pub token: Option<SecretString>,
    /// PEM CA certificate(s) the server's certificate must chain to;
    /// without it, the system's roots.
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate and key, for a daemon that verifies clients.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// A connection setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ClientSetupError {
    #[error("cannot read {flag} {path}: {source}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl ClientSecurity {
    /// Configures TLS on `endpoint` for an `https://` `url`. With an
    /// `http://` URL, certificate options are an error (they would be
    /// silently unused).
    pub fn apply(&self, endpoint: Endpoint, url: &str) -> Result<Endpoint, ClientSetupError> {
        let https = url
            .split_once("://")
            .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("https"));
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(ClientSetupError::Invalid(
                "--client-cert and --client-key go together: give both".into(),
            ));
        }
        if !https {
            if self.ca_cert.is_some() || self.client_cert.is_some() {
                return Err(ClientSetupError::Invalid(format!(
                    "--ca-cert, --client-cert and --client-key need an https:// server URL, not {url:?}"
                )));
            }
            return Ok(endpoint);
        }
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca_cert {
            Some(path) => tls.ca_certificate(Certificate::from_pem(read("--ca-cert", path)?)),
            None => tls.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            tls = tls.identity(Identity::from_pem(
                read("--client-cert", cert)?,
                read("--client-key", key)?,
            ));
        }
        endpoint
            .tls_config(tls)
            .map_err(|e| ClientSetupError::Invalid(format!("invalid TLS settings: {e}")))
    }

    /// The interceptor that adds the token to every call.
    pub fn bearer(&self) -> Result<Bearer, ClientSetupError> {
        let Some(token) = &self.token else {
            return Ok(Bearer(None));
        };
        let token = token.expose_secret().trim();
        if token.is_empty() {
            return Ok(Bearer(None));
        }
        // The parse error would quote the value: say only what is wrong.
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}").parse().map_err(|_| {
            ClientSetupError::Invalid(
                "--token holds characters not allowed in an HTTP header".into(),
            )
        })?;
        value.set_sensitive(true);
        Ok(Bearer(Some(value)))
    }

    /// `channel` with the token added to every call.
    pub fn wrap(&self, channel: Channel) -> Result<AuthChannel, ClientSetupError> {
        Ok(InterceptedService::new(channel, self.bearer()?))
    }
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, ClientSetupError> {
    std::fs::read(path).map_err(|source| ClientSetupError::Read {
        flag,
        path: path.to_owned(),
        source,
    })
}

/// Adds `authorization: Bearer <token>` to each call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer([REDACTED])"
        } else {
            "Bearer(none)"
        })
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Parses a `--token` value (for clap) into a secret.
pub fn parse_token(text: &str) -> Result<SecretString, String> {
    Ok(SecretString::from(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_goes_in_every_call_and_never_in_debug_output() {
        let security = ClientSecurity {
            token: Some(SecretString::from("s3cr3t-token")),
            ..ClientSecurity::default()
        };
        let mut bearer = security.bearer().unwrap();
        let request = bearer.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer s3cr3t-token"
        );
        let shown = format!("{security:?} {bearer:?} {:?}", request.metadata());
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }

    #[test]
    fn certificate_options_need_https() {
        let security = ClientSecurity {
            ca_cert: Some("ca.pem".into()),
            ..ClientSecurity::default()
        };
        let endpoint = Endpoint::from_static("http://127.0.0.1:1");
        let err = security.apply(endpoint, "http://127.0.0.1:1").unwrap_err();
        assert!(err.to_string().contains("https://"), "{err}");
    }
}
