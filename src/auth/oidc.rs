//! Tokens from an external OpenID Connect issuer, checked against its JWKS
//! (RS256 or ES256). The key set is fetched with a timeout, kept, and
//! fetched again when a token names a key id it does not hold (at most
//! once per [`MIN_REFRESH`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tokio::sync::{Mutex, RwLock};

use super::config::OidcSettings;
use super::{Principal, Role};

/// Unknown key ids trigger at most one fetch this often.
const MIN_REFRESH: Duration = Duration::from_secs(10);
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 256 * 1024;

pub struct Oidc {
    settings: OidcSettings,
    client: reqwest::Client,
    keys: RwLock<HashMap<String, DecodingKey>>,
    last_fetch: Mutex<Option<Instant>>,
}

impl Oidc {
    pub fn new(settings: OidcSettings) -> Self {
        let client = reqwest::Client::builder()
            .timeout(settings.fetch_timeout)
            .connect_timeout(settings.fetch_timeout)
            .build()
            .expect("an HTTP client with default TLS settings builds");
        Self {
            settings,
            client,
            keys: RwLock::new(HashMap::new()),
            last_fetch: Mutex::new(None),
        }
    }

    async fn key(&self, kid: &str) -> Option<DecodingKey> {
        if let Some(key) = self.keys.read().await.get(kid) {
            return Some(key.clone());
        }
        let mut last = self.last_fetch.lock().await;
        // Another caller may have fetched while this one waited.
        if let Some(key) = self.keys.read().await.get(kid) {
            return Some(key.clone());
        }
        if last.is_some_and(|at| at.elapsed() < MIN_REFRESH) {
            return None;
        }
        *last = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                let found = keys.get(kid).cloned();
                *self.keys.write().await = keys;
                found
            }
            Err(err) => {
                tracing::warn!(url = %self.settings.jwks_url, error = %err, "cannot fetch the OIDC key set");
                None
            }
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, DecodingKey>, String> {
        let response = self
            .client
            .get(&self.settings.jwks_url)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .error_for_status()
            .map_err(|e| e.to_string())?;
        let body = response.bytes().await.map_err(|e| e.to_string())?;
        if body.len() > MAX_JWKS_BYTES {
            return Err(format!("the key set is larger than {MAX_JWKS_BYTES} bytes"));
        }
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        Ok(set
            .keys
            .iter()
            .filter_map(|jwk| {
                let kid = jwk.common.key_id.clone()?;
                DecodingKey::from_jwk(jwk).ok().map(|key| (kid, key))
            })
            .collect())
    }

    /// The principal of a valid token of this issuer.
    pub async fn verify(&self, token: &str) -> Option<Principal> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return None;
        }
        let key = self.key(header.kid.as_deref()?).await?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        validation.leeway = 5;
        let claims = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
            .ok()?
            .claims;
        let subject = claims.get("sub")?.as_str()?.to_owned();
        let role = self
            .settings
            .role_claim
            .as_deref()
            .and_then(|claim| claims.get(claim))
            .and_then(|v| serde_json::from_value::<Role>(v.clone()).ok())
            .or(self.settings.default_role)?;
        Some(Principal {
            name: format!("oidc:{subject}"),
            role,
            scope: self.settings.scope.clone(),
            run: None,
        })
    }
}
