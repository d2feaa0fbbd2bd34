//! The one table of who may call what. Every RPC of every service actionsd
//! serves, and its HTTP routes, map to a [`Rule`] here; the auth layer and
//! [`super::authorize`] read it and nothing else decides.
//!
//! Columns of a rule:
//! - `access`: `Public` (no credential needed), or the roles allowed;
//!   `admin` is allowed everywhere a role is named.
//! - `task`: whether a run-scoped task credential may call it (always
//!   confined to its own run by the scope check).
//! - `check`: `Target` when the method applies the caller's scope to what
//!   the request names (project/domain, run, action or queue) by calling
//!   [`super::authorize`] once the request is decoded, on every protocol.
//!   `None`: the role suffices.
//! - `write`: counts against the per-principal write rate.
//! - `stream`: a server stream, counted against the per-principal stream
//!   limit while open.
//!
//! A path not in the table needs an authenticated caller of any role (then
//! gets whatever the daemon answers: UNIMPLEMENTED or 404).

use super::Role;

/// Who may call a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No credential needed.
    Public,
    /// Any authenticated principal.
    Authenticated,
    /// These roles (and admin).
    Roles(&'static [Role]),
}

/// Whether the method applies the principal's scope to the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    None,
    Target,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub access: Access,
    pub task: bool,
    pub check: Check,
    pub write: bool,
    pub stream: bool,
}

use Role::{Executor, Reader, User};

const READ: &[Role] = &[Reader, User];
const WRITE: &[Role] = &[User];
const EXECUTE: &[Role] = &[Executor];
const ADMIN: &[Role] = &[];

const fn rule(access: Access, task: bool, check: Check, write: bool, stream: bool) -> Rule {
    Rule {
        access,
        task,
        check,
        write,
        stream,
    }
}

const fn read(task: bool) -> Rule {
    rule(Access::Roles(READ), task, Check::Target, false, false)
}
const fn watch(task: bool) -> Rule {
    rule(Access::Roles(READ), task, Check::Target, false, true)
}
const fn write(task: bool) -> Rule {
    rule(Access::Roles(WRITE), task, Check::Target, true, false)
}
const fn execute(check: Check, write: bool, stream: bool) -> Rule {
    rule(Access::Roles(EXECUTE), false, check, write, stream)
}
const PUBLIC: Rule = rule(Access::Public, true, Check::None, false, false);

/// The table: path → rule.
pub const TABLE: &[(&str, Rule)] = &[
    // flyteidl2.actions.ActionsService
    ("/flyteidl2.actions.ActionsService/Enqueue", write(true)),
    ("/flyteidl2.actions.ActionsService/Abort", write(true)),
    ("/flyteidl2.actions.ActionsService/Signal", write(false)),
    (
        "/flyteidl2.actions.ActionsService/WatchForUpdates",
        watch(true),
    ),
    // Update reports an action's status: the executor of its queue.
    (
        "/flyteidl2.actions.ActionsService/Update",
        execute(Check::Target, true, false),
    ),
    // actionsd.executor.v1.ExecutorService: Lease checks the queue it
    // names; Finish and AppendLogs the queue of the action; Heartbeat
    // extends only the caller's executor id's leases and needs the role.
    (
        "/actionsd.executor.v1.ExecutorService/Lease",
        execute(Check::Target, false, true),
    ),
    (
        "/actionsd.executor.v1.ExecutorService/Heartbeat",
        execute(Check::None, false, false),
    ),
    (
        "/actionsd.executor.v1.ExecutorService/Finish",
        execute(Check::Target, true, false),
    ),
    (
        "/actionsd.executor.v1.ExecutorService/AppendLogs",
        execute(Check::Target, true, false),
    ),
    // actionsd.read.v1.ReadService
    ("/actionsd.read.v1.ReadService/GetAction", read(false)),
    ("/actionsd.read.v1.ReadService/ListActions", read(false)),
    ("/actionsd.read.v1.ReadService/ListRuns", read(false)),
    ("/actionsd.read.v1.ReadService/GetHistory", read(false)),
    ("/actionsd.read.v1.ReadService/WatchRun", watch(false)),
    (
        "/actionsd.read.v1.ReadService/DeleteRun",
        rule(Access::Roles(ADMIN), false, Check::None, true, false),
    ),
    // flyteidl2.workflow.RunService
    ("/flyteidl2.workflow.RunService/CreateRun", write(false)),
    ("/flyteidl2.workflow.RunService/AbortRun", write(false)),
    ("/flyteidl2.workflow.RunService/GetRunDetails", read(false)),
    (
        "/flyteidl2.workflow.RunService/GetActionDetails",
        read(false),
    ),
    (
        "/flyteidl2.workflow.RunService/WatchActionDetails",
        watch(false),
    ),
    ("/flyteidl2.workflow.RunService/ListRuns", read(false)),
    // flyteidl2.dataproxy.DataProxyService: uploads are writes into a
    // project; a task uploads its children's inputs into its own run.
    (
        "/flyteidl2.dataproxy.DataProxyService/CreateUploadLocation",
        write(false),
    ),
    (
        "/flyteidl2.dataproxy.DataProxyService/UploadInputs",
        write(false),
    ),
    (
        "/flyteidl2.dataproxy.DataProxyService/CreateDownloadLink",
        read(false),
    ),
    (
        "/flyteidl2.dataproxy.DataProxyService/GetActionData",
        read(false),
    ),
    (
        "/flyteidl2.dataproxy.DataProxyService/TailLogs",
        watch(false),
    ),
    // flyteidl2.cluster.ClusterService: its answer is always empty ("this
    // daemon"), so it reveals nothing; public because the SDK asks it
    // before its first authenticated call, on a client that does not
    // retry with a token.
    ("/flyteidl2.cluster.ClusterService/SelectCluster", PUBLIC),
    // flyteidl2.auth.AuthMetadataService: how to get a credential.
    (
        "/flyteidl2.auth.AuthMetadataService/GetOAuth2Metadata",
        PUBLIC,
    ),
    (
        "/flyteidl2.auth.AuthMetadataService/GetPublicClientConfig",
        PUBLIC,
    ),
    // Health, for load balancers and orchestrators.
    ("/grpc.health.v1.Health/Check", PUBLIC),
    (
        "/grpc.health.v1.Health/Watch",
        rule(Access::Public, true, Check::None, false, true),
    ),
    // Reflection describes the schema only.
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        rule(Access::Authenticated, false, Check::None, false, true),
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        rule(Access::Authenticated, false, Check::None, false, true),
    ),
    // HTTP routes. The token endpoint authenticates its clients itself.
    (super::tokens::TOKEN_PATH, PUBLIC),
    // Signed blob URLs: authorized by their HMAC signature and expiry,
    // which only CreateUploadLocation / CreateDownloadLink (above) hand
    // out; the URL is the credential, as with S3 presigned URLs.
    (crate::rpc::flyte::UPLOAD_PATH, PUBLIC),
    (crate::rpc::flyte::DOWNLOAD_PATH, PUBLIC),
    // Metrics on the API port (an admin listener, `metrics.listen`, is
    // not authenticated: bind it to a private address).
    (
        "/metrics",
        rule(Access::Roles(READ), false, Check::None, false, false),
    ),
];

/// The rule for unknown paths.
pub const UNKNOWN: Rule = rule(Access::Authenticated, false, Check::None, false, false);

/// The rule of `path` and the path as the table spells it.
pub fn rule_of(path: &str) -> (&'static str, &'static Rule) {
    TABLE
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(p, r)| (*p, r))
        .unwrap_or(("(unknown path)", &UNKNOWN))
}

/// Whether `principal` passes the role column of `rule` (its scope is
/// checked later, for `Check::Target`).
pub fn role_allows(rule: &Rule, principal: &super::Principal) -> bool {
    if principal.run.is_some() {
        return rule.task;
    }
    match rule.access {
        Access::Public | Access::Authenticated => true,
        Access::Roles(roles) => principal.role == Role::Admin || roles.contains(&principal.role),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every RPC of every service actionsd serves has a row.
    #[test]
    fn every_served_method_is_in_the_table() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
            .expect("valid descriptors");
        let mut missing = Vec::new();
        for file in set.file {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    if !TABLE.iter().any(|(p, _)| *p == path) {
                        missing.push(path);
                    }
                }
            }
        }
        assert!(missing.is_empty(), "not in the role table: {missing:?}");
    }

    #[test]
    fn streams_and_writes_are_marked() {
        let (_, rule) = rule_of("/flyteidl2.actions.ActionsService/WatchForUpdates");
        assert!(rule.stream && !rule.write);
        let (_, rule) = rule_of("/flyteidl2.actions.ActionsService/Enqueue");
        assert!(rule.write && rule.task);
        let (path, rule) = rule_of("/nope/Nope");
        assert_eq!((path, rule), ("(unknown path)", &UNKNOWN));
    }
}
