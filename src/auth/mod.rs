//! Authentication and authorization.
//!
//! Every request passes [`layer::AuthLayer`] at the HTTP level, in front
//! of gRPC, gRPC-Web and Connect alike (all three carry the method in the
//! path and the credential in the `authorization` header). The layer
//! authenticates the caller, looks the path up in the one table of
//! [`roles`], refuses a role the table does not name, and hands the
//! principal to the services in the request's extensions. Methods whose
//! table entry says [`roles::Check::Target`] then call [`authorize`] with
//! what the request names (a run, an action, a project, a queue), which
//! applies the principal's scope. Nothing else decides who may do what.
//!
//! With no `[auth]` section the layer is absent, no principal is ever
//! attached and [`authorize`] allows everything: the daemon behaves as it
//! always did.

pub mod config;
pub mod layer;
pub mod oidc;
pub mod roles;
pub mod service;
pub mod tokens;

use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::domain::{ActionId, RunId};

pub use config::AuthSettings;

/// What a principal may do; see the table in [`roles`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads and watches.
    Reader,
    /// Reads; creates, aborts and signals runs.
    User,
    /// Leases, heartbeats, finishes and updates actions of its queues.
    Executor,
    /// Everything.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reader => "reader",
            Self::User => "user",
            Self::Executor => "executor",
            Self::Admin => "admin",
        }
    }
}

/// Where a principal may act. An empty list allows every value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Scope {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub projects: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<String>,
}

fn allows(list: &[String], value: Option<&str>) -> bool {
    list.is_empty() || value.is_some_and(|v| list.iter().any(|l| l == v))
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Token name, client id, OIDC subject, or `task:<action>` for a task
    /// credential.
    pub name: String,
    pub role: Role,
    pub scope: Scope,
    /// A task credential: the one run it may touch.
    pub run: Option<RunId>,
}

impl Principal {
    /// The identity recorded as `aborted_by` / `signalled_by`.
    pub fn identity(&self) -> crate::proto::flyteidl2::common::EnrichedIdentity {
        use crate::proto::flyteidl2::common;
        common::EnrichedIdentity {
            principal: Some(common::enriched_identity::Principal::User(common::User {
                id: Some(common::UserIdentifier {
                    subject: self.name.clone(),
                }),
                ..Default::default()
            })),
        }
    }
}

/// What the layer attaches to every request it lets through, when
/// authentication is on.
#[derive(Debug, Clone)]
pub struct Authorized {
    pub principal: std::sync::Arc<Principal>,
    /// The table's entry for the request's path.
    pub rule: &'static roles::Rule,
    pub path: &'static str,
    /// `auth.limits.max_lease_capacity`.
    pub max_lease_capacity: u32,
}

/// What a request names, for the scope check.
#[derive(Debug, Clone, Default)]
pub struct Target<'a> {
    pub project: Option<&'a str>,
    pub domain: Option<&'a str>,
    pub run: Option<&'a RunId>,
    pub queue: Option<&'a str>,
}

impl<'a> Target<'a> {
    pub fn run(run: &'a RunId) -> Self {
        Self {
            project: Some(&run.project),
            domain: Some(&run.domain),
            run: Some(run),
            queue: None,
        }
    }

    pub fn action(id: &'a ActionId) -> Self {
        Self::run(&id.run)
    }

    /// A project and domain (either may be absent from a listing).
    pub fn project(project: &'a str, domain: &'a str) -> Self {
        Self {
            project: Some(project).filter(|p| !p.is_empty()),
            domain: Some(domain).filter(|d| !d.is_empty()),
            run: None,
            queue: None,
        }
    }

    pub fn queue(queue: &'a str) -> Self {
        Self {
            queue: Some(queue),
            ..Self::default()
        }
    }

    pub fn with_queue(mut self, queue: Option<&'a str>) -> Self {
        self.queue = queue;
        self
    }
}

/// The principal of a request, when authentication is on.
pub fn principal(extensions: &http::Extensions) -> Option<&Principal> {
    extensions.get::<Authorized>().map(|a| a.principal.as_ref())
}

/// The lease holder an executor's `executor_id` stands for. With
/// authentication, an executor principal's ids are its own: they are
/// recorded as `<principal>/<executor_id>`, so that a Heartbeat (which names
/// only an executor id) extends only leases its caller took, and Finish and
/// AppendLogs match only them. Admins and unauthenticated daemons use the
/// id as given.
pub fn lease_holder(extensions: &http::Extensions, executor_id: &str) -> String {
    match principal(extensions) {
        Some(p) if p.role != Role::Admin => format!("{}/{executor_id}", p.name),
        _ => executor_id.to_owned(),
    }
}

/// Applies the caller's scope to what the request names, for the methods
/// whose table entry says [`roles::Check::Target`]. Without authentication
/// (no [`Authorized`] in the extensions) everything is allowed.
pub fn authorize(extensions: &http::Extensions, target: &Target<'_>) -> Result<(), Status> {
    let Some(authorized) = extensions.get::<Authorized>() else {
        return Ok(());
    };
    if authorized.rule.check != roles::Check::Target {
        return Ok(());
    }
    let principal = &authorized.principal;
    let allowed = within(principal, target);
    if allowed {
        Ok(())
    } else {
        let denied = denied(principal, authorized.path);
        ::metrics::counter!(crate::metrics::names::AUTH_DENIED, "reason" => "scope").increment(1);
        tracing::info!(
            target: "actionsd::audit",
            principal = %principal.name,
            rpc = authorized.path,
            result = "PERMISSION_DENIED",
            "outside the principal's scope"
        );
        Err(denied)
    }
}

/// Whether `target` lies within what `principal` may touch.
pub fn within(principal: &Principal, target: &Target<'_>) -> bool {
    if principal.role == Role::Admin && principal.run.is_none() {
        return true;
    }
    if let Some(run) = &principal.run {
        return target.run.is_some_and(|t| same_run(t, run)) && target.queue.is_none();
    }
    let scope = &principal.scope;
    allows(&scope.projects, target.project)
        && allows(&scope.domains, target.domain)
        && (target.queue.is_none() || allows(&scope.queues, target.queue))
}

/// Runs compare with the empty org and its alias taken as one.
fn same_run(a: &RunId, b: &RunId) -> bool {
    let org = |o: &str| {
        if o == crate::domain::EMPTY_ORG_ALIAS {
            String::new()
        } else {
            o.to_owned()
        }
    };
    org(&a.org) == org(&b.org) && a.project == b.project && a.domain == b.domain && a.name == b.name
}

/// PERMISSION_DENIED naming the principal and method, never a credential.
pub fn denied(principal: &Principal, path: &str) -> Status {
    let what = match &principal.run {
        Some(run) => format!("the task credential of run {run}"),
        None => format!("{} ({})", principal.name, principal.role.as_str()),
    };
    Status::permission_denied(format!("{what} may not call {path} on this target"))
}

/// The hash `actionsd hash-secret` prints: Argon2id (PHC string) for a
/// client secret, or hex SHA-256 for a static bearer token (tokens are
/// long random strings, so a fast hash suffices and keeps every request's
/// check cheap).
pub fn hash_secret(secret: &str, sha256: bool) -> anyhow::Result<String> {
    if sha256 {
        use sha2::Digest;
        return Ok(hex::encode(sha2::Sha256::digest(secret.as_bytes())));
    }
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| anyhow::anyhow!("cannot encode the salt: {e}"))?;
    argon2::Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| anyhow::anyhow!("cannot hash the secret: {e}"))
}

/// The audit line of a write, when authentication is on: who, which RPC,
/// which action, and how it ended. Never the request's payload or any
/// credential.
pub fn audit<T>(
    extensions: &http::Extensions,
    rpc: &'static str,
    action: &dyn std::fmt::Display,
    result: &Result<T, Status>,
) {
    let Some(principal) = principal(extensions) else {
        return;
    };
    match result {
        Ok(_) => tracing::info!(
            target: "actionsd::audit",
            principal = %principal.name,
            role = principal.role.as_str(),
            rpc,
            action = %action,
            result = "OK",
        ),
        Err(status) => tracing::info!(
            target: "actionsd::audit",
            principal = %principal.name,
            role = principal.role.as_str(),
            rpc,
            action = %action,
            result = ?status.code(),
        ),
    }
}

/// The encoded identity to record for a write by the request's principal;
/// `None` when authentication is off (the client's value is kept then).
pub fn recorded_identity(extensions: &http::Extensions) -> Option<bytes::Bytes> {
    use prost::Message;
    principal(extensions).map(|p| bytes::Bytes::from(p.identity().encode_to_vec()))
}
