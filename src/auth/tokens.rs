//! The tokens actionsd issues: short-lived access tokens (HS256 JWTs,
//! from the token endpoint) and task keys (the client secret of a task
//! credential, also a JWT, naming one attempt of one action).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use super::{AuthSettings, Principal, Role, Scope};
use crate::domain::{ActionId, RunId};

/// The OAuth2 token endpoint (client-credentials grant).
pub const TOKEN_PATH: &str = "/oauth2/token";
/// The client id of every task credential; its secret is a task key.
pub const TASK_CLIENT_ID: &str = "actionsd-task";
/// The `aud` of the tokens actionsd issues.
pub const AUDIENCE: &str = "actionsd";
/// Clock skew tolerated on `exp`.
const LEEWAY: u64 = 5;

const ACCESS: &str = "access";
const TASK_KEY: &str = "task-key";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct RunClaim {
    org: String,
    project: String,
    domain: String,
    name: String,
}

impl From<&RunId> for RunClaim {
    fn from(run: &RunId) -> Self {
        Self {
            org: run.org.clone(),
            project: run.project.clone(),
            domain: run.domain.clone(),
            name: run.name.clone(),
        }
    }
}

impl From<RunClaim> for RunId {
    fn from(run: RunClaim) -> Self {
        Self {
            org: run.org,
            project: run.project,
            domain: run.domain,
            name: run.name,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: String,
    exp: u64,
    iat: u64,
    typ: String,
    role: Role,
    #[serde(default)]
    scope: Scope,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    run: Option<RunClaim>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    attempt: Option<u32>,
}

/// One attempt a task key was minted for.
#[derive(Debug, Clone)]
pub struct TaskKey {
    pub action: ActionId,
    pub attempt: u32,
    /// Unix seconds.
    pub expires_at: u64,
}

/// Signs and checks actionsd's own tokens.
pub struct Issuer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    issuer: String,
    token_ttl: Duration,
    task_ttl: Duration,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Issuer {
    pub fn new(settings: &AuthSettings) -> Self {
        let key: Vec<u8> = match &settings.signing_key {
            Some(key) => key.expose_secret().as_bytes().to_vec(),
            None => {
                let mut key = vec![0u8; 32];
                rand::Rng::fill(&mut rand::rng(), key.as_mut_slice());
                key
            }
        };
        Self {
            encoding: EncodingKey::from_secret(&key),
            decoding: DecodingKey::from_secret(&key),
            issuer: settings.issuer.clone(),
            token_ttl: settings.token_ttl,
            task_ttl: settings.task_credential_ttl,
        }
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    fn sign(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .expect("HS256 signing with an in-memory key does not fail")
    }

    fn verify(&self, token: &str, typ: &str) -> Option<Claims> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[AUDIENCE]);
        validation.leeway = LEEWAY;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .ok()?
            .claims;
        (claims.typ == typ).then_some(claims)
    }

    /// An access token for `principal`, expiring after the token TTL or at
    /// `not_after` (Unix seconds), whichever is first; and its lifetime in
    /// seconds.
    pub fn access_token(&self, principal: &Principal, not_after: Option<u64>) -> (String, u64) {
        let iat = now();
        let mut exp = iat + self.token_ttl.as_secs().max(1);
        if let Some(limit) = not_after {
            exp = exp.min(limit);
        }
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: principal.name.clone(),
            aud: AUDIENCE.to_owned(),
            exp,
            iat,
            typ: ACCESS.to_owned(),
            role: principal.role,
            scope: principal.scope.clone(),
            run: principal.run.as_ref().map(RunClaim::from),
            action: None,
            attempt: None,
        };
        (self.sign(&claims), exp.saturating_sub(iat))
    }

    /// The principal of a valid, unexpired access token.
    pub fn verify_access(&self, token: &str) -> Option<Principal> {
        let claims = self.verify(token, ACCESS)?;
        Some(Principal {
            name: claims.sub,
            role: claims.role,
            scope: claims.scope,
            run: claims.run.map(RunId::from),
        })
    }

    /// The secret of a task credential for `attempt` of `action`.
    pub fn task_key(&self, action: &ActionId, attempt: u32) -> String {
        let iat = now();
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: format!("task:{action}"),
            aud: AUDIENCE.to_owned(),
            exp: iat + self.task_ttl.as_secs().max(1),
            iat,
            typ: TASK_KEY.to_owned(),
            role: Role::User,
            scope: Scope::default(),
            run: Some(RunClaim::from(&action.run)),
            action: Some(action.name.clone()),
            attempt: Some(attempt),
        };
        self.sign(&claims)
    }

    pub fn verify_task_key(&self, secret: &str) -> Option<TaskKey> {
        let claims = self.verify(secret, TASK_KEY)?;
        Some(TaskKey {
            action: ActionId::new(RunId::from(claims.run?), claims.action?),
            attempt: claims.attempt?,
            expires_at: claims.exp,
        })
    }
}

/// The principal a task credential authenticates as.
pub fn task_principal(key: &TaskKey) -> Principal {
    Principal {
        name: format!("task:{}#{}", key.action, key.attempt),
        role: Role::User,
        scope: Scope::default(),
        run: Some(key.action.run.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AuthSettings {
        crate::auth::config::FileAuth::default()
            .validate()
            .expect("defaults are valid")
    }

    #[test]
    fn access_tokens_round_trip_and_other_keys_are_refused() {
        let issuer = Issuer::new(&settings());
        let principal = Principal {
            name: "ci".into(),
            role: Role::User,
            scope: Scope {
                projects: vec!["p".into()],
                ..Scope::default()
            },
            run: None,
        };
        let (token, ttl) = issuer.access_token(&principal, None);
        assert_eq!(ttl, 600);
        assert_eq!(issuer.verify_access(&token), Some(principal));
        // Another daemon's random key.
        assert_eq!(Issuer::new(&settings()).verify_access(&token), None);
        // A task key is not an access token.
        let key = issuer.task_key(&ActionId::in_test_run("a"), 1);
        assert_eq!(issuer.verify_access(&key), None);
        let key = issuer.verify_task_key(&key).expect("valid task key");
        assert_eq!((key.action.name.as_str(), key.attempt), ("a", 1));
    }
}
