//! `flyteidl2.auth.AuthMetadataService`: tells the Flyte SDK where the
//! token endpoint is and which header carries the token. Public: a client
//! asks it before it holds a credential.

use std::net::SocketAddr;

use tonic::{Request, Response, Status};

use super::tokens::{AUDIENCE, TOKEN_PATH};
use crate::proto::flyteidl2::auth::{
    self as pb, auth_metadata_service_server::AuthMetadataService,
};

#[derive(Clone)]
pub struct AuthMetadataApi {
    issuer: String,
    public_url: Option<String>,
    local_addr: SocketAddr,
    /// The listener serves TLS: the token endpoint is `https`.
    tls: bool,
}

impl AuthMetadataApi {
    pub fn new(
        issuer: String,
        public_url: Option<String>,
        local_addr: SocketAddr,
        tls: bool,
    ) -> Self {
        Self {
            issuer,
            public_url,
            local_addr,
            tls,
        }
    }

    /// `auth.public_url`, else the Host the request came to.
    fn base_url<T>(&self, request: &Request<T>) -> String {
        if let Some(url) = &self.public_url {
            return url.clone();
        }
        let host = request
            .metadata()
            .get("host")
            .and_then(|v| v.to_str().ok())
            .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
            .map(str::to_owned)
            .unwrap_or_else(|| self.local_addr.to_string());
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{host}")
    }
}

#[tonic::async_trait]
impl AuthMetadataService for AuthMetadataApi {
    async fn get_o_auth2_metadata(
        &self,
        request: Request<pb::GetOAuth2MetadataRequest>,
    ) -> Result<Response<pb::GetOAuth2MetadataResponse>, Status> {
        let base = self.base_url(&request);
        Ok(Response::new(pb::GetOAuth2MetadataResponse {
            issuer: self.issuer.clone(),
            token_endpoint: format!("{base}{TOKEN_PATH}"),
            grant_types_supported: vec!["client_credentials".to_owned()],
            token_endpoint_auth_methods_supported: vec![
                "client_secret_basic".to_owned(),
                "client_secret_post".to_owned(),
            ],
            response_types_supported: vec!["token".to_owned()],
            ..Default::default()
        }))
    }

    async fn get_public_client_config(
        &self,
        request: Request<pb::GetPublicClientConfigRequest>,
    ) -> Result<Response<pb::GetPublicClientConfigResponse>, Status> {
        Ok(Response::new(pb::GetPublicClientConfigResponse {
            authorization_metadata_key: "authorization".to_owned(),
            service_http_endpoint: self.base_url(&request),
            audience: AUDIENCE.to_owned(),
            ..Default::default()
        }))
    }
}
