//! The `[auth]` section of the config file.

use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use super::{Role, Scope};

/// `[auth]` as written in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileAuth {
    /// HS256 key of the tokens actionsd issues (at least 32 bytes).
    signing_key: Option<SecretString>,
    issuer: Option<String>,
    #[serde(default, with = "humantime_serde")]
    token_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    task_credential_ttl: Option<Duration>,
    /// The URL clients reach this daemon at, for the token endpoint the
    /// SDK is told about; else the request's Host.
    public_url: Option<String>,
    #[serde(default)]
    tokens: Vec<FileToken>,
    #[serde(default)]
    clients: Vec<FileClient>,
    oidc: Option<FileOidc>,
    #[serde(default)]
    limits: FileLimits,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToken {
    name: String,
    /// Hex SHA-256 of the token (`actionsd hash-secret --sha256`).
    sha256: String,
    role: Role,
    #[serde(default)]
    projects: Vec<String>,
    #[serde(default)]
    domains: Vec<String>,
    #[serde(default)]
    queues: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileClient {
    client_id: String,
    /// Argon2 PHC string of the secret (`actionsd hash-secret`).
    secret_hash: String,
    role: Role,
    #[serde(default)]
    projects: Vec<String>,
    #[serde(default)]
    domains: Vec<String>,
    #[serde(default)]
    queues: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOidc {
    issuer: String,
    jwks_url: String,
    audience: String,
    /// The claim naming the role; without it `default_role` applies.
    role_claim: Option<String>,
    default_role: Option<Role>,
    #[serde(default, with = "humantime_serde")]
    fetch_timeout: Option<Duration>,
    #[serde(default)]
    projects: Vec<String>,
    #[serde(default)]
    domains: Vec<String>,
    #[serde(default)]
    queues: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    writes_per_second: Option<u32>,
    write_burst: Option<u32>,
    max_streams_per_principal: Option<usize>,
    max_lease_capacity: Option<u32>,
}

/// A static bearer token.
#[derive(Debug, Clone)]
pub struct TokenEntry {
    pub name: String,
    pub sha256: [u8; 32],
    pub role: Role,
    pub scope: Scope,
}

/// A client of the token endpoint.
#[derive(Debug, Clone)]
pub struct ClientEntry {
    pub client_id: String,
    pub secret_hash: String,
    pub role: Role,
    pub scope: Scope,
}

/// An external OpenID Connect issuer whose tokens are accepted.
#[derive(Debug, Clone)]
pub struct OidcSettings {
    pub issuer: String,
    pub jwks_url: String,
    pub audience: String,
    pub role_claim: Option<String>,
    pub default_role: Option<Role>,
    pub fetch_timeout: Duration,
    pub scope: Scope,
}

/// Abuse limits, per authenticated principal.
#[derive(Debug, Clone)]
pub struct Limits {
    pub writes_per_second: u32,
    pub write_burst: u32,
    pub max_streams_per_principal: usize,
    pub max_lease_capacity: u32,
}

/// The validated `[auth]` section.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// `None`: a random key for this process (tokens it issued are
    /// refused by other daemons and after a restart).
    pub signing_key: Option<SecretString>,
    pub issuer: String,
    pub token_ttl: Duration,
    pub task_credential_ttl: Duration,
    pub public_url: Option<String>,
    pub tokens: Vec<TokenEntry>,
    pub clients: Vec<ClientEntry>,
    pub oidc: Option<OidcSettings>,
    pub limits: Limits,
}

fn scope(projects: Vec<String>, domains: Vec<String>, queues: Vec<String>) -> Scope {
    Scope {
        projects,
        domains,
        queues,
    }
}

impl FileAuth {
    /// Validates the section; the error names the setting.
    pub(crate) fn validate(self) -> Result<AuthSettings, (&'static str, String)> {
        use secrecy::ExposeSecret;
        if let Some(key) = &self.signing_key {
            if key.expose_secret().len() < 32 {
                return Err(("auth.signing_key", "must be at least 32 bytes".to_owned()));
            }
        }
        let mut tokens = Vec::new();
        for token in self.tokens {
            let bytes = hex::decode(token.sha256.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or((
                    "auth.tokens.sha256",
                    format!(
                        "token {:?}: expected 64 hex digits (actionsd hash-secret --sha256)",
                        token.name
                    ),
                ))?;
            if token.name.is_empty() {
                return Err(("auth.tokens.name", "must not be empty".to_owned()));
            }
            tokens.push(TokenEntry {
                name: token.name,
                sha256: bytes,
                role: token.role,
                scope: scope(token.projects, token.domains, token.queues),
            });
        }
        let mut clients = Vec::new();
        for client in self.clients {
            if client.client_id.is_empty() || client.client_id == super::tokens::TASK_CLIENT_ID {
                return Err((
                    "auth.clients.client_id",
                    format!(
                        "{:?} is empty or reserved for task credentials",
                        client.client_id
                    ),
                ));
            }
            if argon2::PasswordHash::new(&client.secret_hash).is_err() {
                return Err((
                    "auth.clients.secret_hash",
                    format!(
                        "client {:?}: not a PHC hash string (actionsd hash-secret)",
                        client.client_id
                    ),
                ));
            }
            clients.push(ClientEntry {
                client_id: client.client_id,
                secret_hash: client.secret_hash,
                role: client.role,
                scope: scope(client.projects, client.domains, client.queues),
            });
        }
        let oidc = self.oidc.map(|o| OidcSettings {
            issuer: o.issuer,
            jwks_url: o.jwks_url,
            audience: o.audience,
            role_claim: o.role_claim,
            default_role: o.default_role,
            fetch_timeout: o.fetch_timeout.unwrap_or(Duration::from_secs(5)),
            scope: scope(o.projects, o.domains, o.queues),
        });
        let limits = Limits {
            writes_per_second: self.limits.writes_per_second.unwrap_or(100),
            write_burst: self.limits.write_burst.unwrap_or(200),
            max_streams_per_principal: self.limits.max_streams_per_principal.unwrap_or(256),
            max_lease_capacity: self.limits.max_lease_capacity.unwrap_or(256),
        };
        if limits.writes_per_second == 0 || limits.write_burst == 0 {
            return Err((
                "auth.limits.writes_per_second",
                "writes_per_second and write_burst must be greater than 0".to_owned(),
            ));
        }
        Ok(AuthSettings {
            signing_key: self.signing_key,
            issuer: self.issuer.unwrap_or_else(|| "actionsd".to_owned()),
            token_ttl: self.token_ttl.unwrap_or(Duration::from_secs(600)),
            task_credential_ttl: self
                .task_credential_ttl
                .unwrap_or(Duration::from_secs(24 * 3600)),
            public_url: self.public_url.map(|u| u.trim_end_matches('/').to_owned()),
            tokens,
            clients,
            oidc,
            limits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AuthSettings, (&'static str, String)> {
        toml::from_str::<FileAuth>(text)
            .map_err(|e| ("toml", e.to_string()))?
            .validate()
    }

    #[test]
    fn bad_settings_name_the_setting() {
        assert_eq!(
            parse(r#"signing_key = "short""#).unwrap_err().0,
            "auth.signing_key"
        );
        let token = "[[tokens]]\nname = \"t\"\nsha256 = \"abc\"\nrole = \"admin\"\n";
        assert_eq!(parse(token).unwrap_err().0, "auth.tokens.sha256");
        let reserved =
            "[[clients]]\nclient_id = \"actionsd-task\"\nsecret_hash = \"x\"\nrole = \"user\"\n";
        assert_eq!(parse(reserved).unwrap_err().0, "auth.clients.client_id");
        let hash = "[[clients]]\nclient_id = \"ci\"\nsecret_hash = \"plain\"\nrole = \"user\"\n";
        assert_eq!(parse(hash).unwrap_err().0, "auth.clients.secret_hash");
        // Unknown keys and roles are refused by the parser.
        assert!(parse("nope = 1").is_err());
        let role = format!(
            "[[tokens]]\nname = \"t\"\nsha256 = \"{}\"\nrole = \"root\"\n",
            "0".repeat(64)
        );
        assert!(parse(&role).is_err());
    }

    #[test]
    fn a_full_section_parses_with_scopes_and_limits() {
        let hash = crate::auth::hash_secret("s3cret", false).unwrap();
        let text = format!(
            "token_ttl = \"5m\"\n[[tokens]]\nname = \"gpu\"\nsha256 = \"{}\"\nrole = \"executor\"\nqueues = [\"gpu\"]\n\
             [[clients]]\nclient_id = \"ci\"\nsecret_hash = \"{hash}\"\nrole = \"user\"\nprojects = [\"ml\"]\n\
             [limits]\nwrites_per_second = 5\n",
            "ab".repeat(32)
        );
        let settings = parse(&text).unwrap();
        assert_eq!(settings.token_ttl, Duration::from_secs(300));
        assert_eq!(settings.tokens[0].scope.queues, ["gpu"]);
        assert_eq!(settings.clients[0].scope.projects, ["ml"]);
        assert_eq!(settings.limits.writes_per_second, 5);
        assert_eq!(settings.limits.write_burst, 200);
    }
}
