//! The Flyte SDK's own entry points: `flyteidl2.workflow.RunService`,
//! `flyteidl2.dataproxy.DataProxyService` and
//! `flyteidl2.cluster.ClusterService`, as `flyte run`, `flyte get`,
//! `flyte abort` and `flyte.remote` call them.
//!
//! A run is its root action (`a0`) plus the RunSpec given when it was
//! created: CreateRun enqueues the root through the ActionsService path,
//! and every read is a read of the action store. Inputs, outputs, code
//! bundles and logs live in the blob store (`crate::blob`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use chrono::Utc;
use md5::Digest as _;
use prost::Message;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};
use tracing::{field, info_span, Instrument, Span};

use super::convert::{self, action_id_to_proto, decode_stored, timestamp_to_proto};
use super::watch::MessageStream;
use super::ActionsApi;
use crate::auth;
use crate::blob::{keys, Blobs, DownloadGrant, UploadGrant};
use crate::domain::{
    output_uri, ActionFilter, ActionId, ActionKind, ActionRecord, Error, PageRequest, Phase,
    RunFilter, RunId, RunPosition,
};
use crate::logs::LogStore;
use crate::pipeline::Registry;
use crate::proto::flyteidl2::actions::{
    self as actions_pb, action, actions_service_server::ActionsService,
};
use crate::proto::flyteidl2::cluster::{
    cluster_service_server::ClusterService, SelectClusterRequest, SelectClusterResponse,
};
use crate::proto::flyteidl2::common::{self, OffloadedInputData};
use crate::proto::flyteidl2::core::{execution_error, ExecutionError};
use crate::proto::flyteidl2::dataproxy::{self as dp, data_proxy_service_server::DataProxyService};
use crate::proto::flyteidl2::task::{OutputReferences, TaskIdentifier, TaskSpec};
use crate::proto::flyteidl2::workflow::{
    self as wf, action_details, action_metadata, run_service_server::RunService,
};
use crate::store::Store;

/// The name of a run's root action.
pub const ROOT: &str = "a0";
/// Path of signed uploads, served on the daemon's own port.
pub const UPLOAD_PATH: &str = "/blobs/v1/upload";
/// Path of signed downloads, served on the daemon's own port.
pub const DOWNLOAD_PATH: &str = "/blobs/v1/download";
/// The file a task's report is written to, in its attempt's output location.
const REPORT_FILE: &str = "report.html";
/// Page size of ListRuns when none is given, and the largest.
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 100;
/// How often a log tail looks for chunks written through other daemons.
const TAIL_POLL: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct FlyteApi {
    actions: ActionsApi,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    blobs: Blobs,
    logs: LogStore,
    /// Base of signed URLs when configured (`blobs.public_url`); otherwise
    /// the Host the request came to, or the bound address.
    public_url: Option<String>,
    local_addr: SocketAddr,
    /// The listener serves TLS: URLs made from the Host are `https`.
    tls: bool,
    max_message_size: usize,
    shutdown: CancellationToken,
}

pub struct FlyteSettings {
    pub public_url: Option<String>,
    pub local_addr: SocketAddr,
    pub tls: bool,
    pub max_message_size: usize,
}

impl FlyteApi {
    pub fn new(
        actions: ActionsApi,
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        blobs: Blobs,
        logs: LogStore,
        settings: FlyteSettings,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            actions,
            store,
            registry,
            blobs,
            logs,
            public_url: settings.public_url,
            local_addr: settings.local_addr,
            tls: settings.tls,
            max_message_size: settings.max_message_size,
            shutdown,
        }
    }

    fn base_url<T>(&self, request: &Request<T>) -> String {
        if let Some(url) = &self.public_url {
            return url.trim_end_matches('/').to_owned();
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

    /// The root action of `run`: `a0` for runs created here, else the
    /// action without a parent.
    async fn root(&self, run: &RunId) -> Result<ActionRecord, Error> {
        match self
            .store
            .get_action(&ActionId::new(run.clone(), ROOT))
            .await
        {
            Ok(record) if record.state.parent.is_none() => return Ok(record),
            Ok(_) | Err(Error::ActionNotFound(_)) => {}
            Err(err) => return Err(err),
        }
        // A run's root is created before any of its children, so it is
        // among the first actions of the run in creation order (a page
        // rather than one row, in case a child shares its timestamp).
        let filter = ActionFilter {
            run: Some(run.clone()),
            ..Default::default()
        };
        self.store
            .list_actions(
                &filter,
                &PageRequest {
                    limit: 16,
                    after: None,
                },
            )
            .await?
            .items
            .into_iter()
            .find(|r| r.state.parent.is_none())
            .ok_or_else(|| Error::RunNotFound(run.clone()))
    }

    async fn details(&self, record: &ActionRecord) -> Result<wf::ActionDetails, Error> {
        let attempt = record.state.attempt;
        let logs_available = attempt > 0 && self.logs.available(&record.state.id, attempt).await?;
        Ok(action_details(record, logs_available))
    }

    async fn offload_inputs(
        &self,
        (org, project, domain): (&str, &str, &str),
        inputs: Bytes,
    ) -> Result<OffloadedInputData, Error> {
        let digest = hex::encode(Sha256::digest(&inputs));
        let key = keys::inputs(org, project, domain, &digest);
        self.blobs.put(&key, inputs).await?;
        Ok(OffloadedInputData {
            uri: self.blobs.uri(&key),
            inputs_hash: digest,
        })
    }
}

fn span(method: &'static str) -> Span {
    info_span!("rpc", method, action = field::Empty)
}

fn project_scope(
    id: Option<&common::ProjectIdentifier>,
) -> Result<(String, String, String), Error> {
    let id = id.ok_or_else(|| Error::invalid("project_id", "is required"))?;
    if id.name.is_empty() {
        return Err(Error::invalid("project_id.name", "must not be empty"));
    }
    if id.domain.is_empty() {
        return Err(Error::invalid("project_id.domain", "must not be empty"));
    }
    Ok((id.organization.clone(), id.name.clone(), id.domain.clone()))
}

/// A fresh run name: `r` and 19 lowercase letters and digits, as Flyte
/// names runs.
fn run_name() -> String {
    use rand::Rng as _;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    std::iter::once('r')
        .chain((0..19).map(|_| CHARS[rng.random_range(0..CHARS.len())] as char))
        .collect()
}

fn phase_of(record: &ActionRecord) -> Phase {
    record.state.phase
}

fn error_info(error: &ExecutionError) -> wf::ErrorInfo {
    wf::ErrorInfo {
        message: error.message.clone(),
        kind: match execution_error::ErrorKind::try_from(error.kind) {
            Ok(execution_error::ErrorKind::User) => wf::error_info::Kind::User,
            Ok(execution_error::ErrorKind::System) => wf::error_info::Kind::System,
            _ => wf::error_info::Kind::Unspecified,
        } as i32,
        code: error.code.clone(),
    }
}

fn metadata(record: &ActionRecord, spec: Option<&actions_pb::Action>) -> wf::ActionMetadata {
    let mut metadata = wf::ActionMetadata {
        parent: record.state.parent.clone().unwrap_or_default(),
        group: spec.map(|a| a.group.clone()).unwrap_or_default(),
        action_type: match record.kind {
            ActionKind::Task => wf::ActionType::Task,
            ActionKind::Trace => wf::ActionType::Trace,
            ActionKind::Condition => wf::ActionType::Condition,
        } as i32,
        ..Default::default()
    };
    if let Some(action::Spec::Task(task)) = spec.and_then(|a| a.spec.as_ref()) {
        let view = TaskSpec::decode(task.spec.clone()).unwrap_or_default();
        let template = view.task_template.unwrap_or_default();
        metadata.funtion_name = view.short_name.clone();
        metadata.spec = Some(action_metadata::Spec::Task(wf::TaskActionMetadata {
            id: task.id.clone(),
            task_type: template.r#type,
            short_name: view.short_name,
            queue: record.state.queue.clone(),
        }));
    }
    metadata
}

fn status(record: &ActionRecord) -> wf::ActionStatus {
    let start = record.start_time.unwrap_or(record.created_at);
    let end = record.end_time.filter(|_| phase_of(record).is_terminal());
    wf::ActionStatus {
        phase: record.state.phase.to_wire(),
        start_time: Some(timestamp_to_proto(start)),
        end_time: end.map(timestamp_to_proto),
        attempts: record.state.attempt,
        cache_status: 0,
        duration_ms: end.and_then(|end| u64::try_from((end - start).num_milliseconds()).ok()),
    }
}

/// The ActionDetails of a stored action.
fn action_details(record: &ActionRecord, logs_available: bool) -> wf::ActionDetails {
    let id = &record.state.id;
    let spec = decode_stored::<actions_pb::Action>("spec", id, &record.spec);
    let error = record
        .state
        .error
        .as_ref()
        .and_then(|b| decode_stored::<ExecutionError>("error", id, b));
    let phase = phase_of(record);
    let result = match (phase, &error) {
        (Phase::Aborted, _) => Some(action_details::Result::AbortInfo(wf::AbortInfo {
            reason: record
                .abort_reason
                .clone()
                .or_else(|| error.as_ref().map(|e| e.message.clone()))
                .unwrap_or_default(),
            aborted_by: None,
        })),
        (_, Some(error)) => Some(action_details::Result::ErrorInfo(error_info(error))),
        _ => None,
    };
    let task_spec = match spec.as_ref().and_then(|a| a.spec.as_ref()) {
        Some(action::Spec::Task(task)) => Some(action_details::Spec::Task(task.spec.clone())),
        Some(action::Spec::Trace(trace)) => Some(action_details::Spec::Trace(trace.spec.clone())),
        Some(action::Spec::Condition(condition)) => Some(action_details::Spec::Condition(
            Bytes::from(condition.encode_to_vec()),
        )),
        None => None,
    };
    let status = status(record);
    // Earlier attempts ended by a lease expiry; only the current one is
    // described in full.
    let attempts = (1..=record.state.attempt)
        .map(|n| {
            let current = n == record.state.attempt;
            wf::ActionAttempt {
                phase: if current {
                    phase.to_wire()
                } else {
                    Phase::Failed.to_wire()
                },
                start_time: current.then_some(status.start_time).flatten(),
                end_time: current.then_some(status.end_time).flatten(),
                error_info: current.then(|| error.as_ref().map(error_info)).flatten(),
                attempt: n,
                outputs: current.then(|| OutputReferences {
                    output_uri: record.state.output_uri.clone(),
                    report_uri: String::new(),
                }),
                logs_available: current && logs_available,
                cache_status: 0,
                cluster: String::new(),
            }
        })
        .collect();
    wf::ActionDetails {
        id: Some(action_id_to_proto(id)),
        metadata: Some(metadata(record, spec.as_ref())),
        status: Some(status),
        result,
        spec: task_spec,
        attempts,
    }
}

fn run_of(details: &wf::ActionDetails) -> wf::Run {
    wf::Run {
        action: Some(wf::Action {
            id: details.id.clone(),
            metadata: details.metadata.clone(),
            status: details.status,
        }),
        labels: Default::default(),
    }
}

#[tonic::async_trait]
impl ClusterService for FlyteApi {
    async fn select_cluster(
        &self,
        _request: Request<SelectClusterRequest>,
    ) -> Result<Response<SelectClusterResponse>, Status> {
        // One endpoint serves everything: an empty answer means "here".
        Ok(Response::new(SelectClusterResponse::default()))
    }
}

type TailStream = MessageStream<dp::TailLogsResponse>;

#[tonic::async_trait]
impl DataProxyService for FlyteApi {
    type TailLogsStream = TailStream;

    async fn create_upload_location(
        &self,
        request: Request<dp::CreateUploadLocationRequest>,
    ) -> Result<Response<dp::CreateUploadLocationResponse>, Status> {
        let extensions = request.extensions().clone();
        let target = format!(
            "{}/{}/{}",
            request.get_ref().project,
            request.get_ref().domain,
            request.get_ref().filename
        );
        let result = async {
            let base = self.base_url(&request);
            auth::authorize(
                request.extensions(),
                &auth::Target::project(&request.get_ref().project, &request.get_ref().domain),
            )?;
            let r = request.into_inner();
            for (field, value) in [
                ("project", &r.project),
                ("domain", &r.domain),
                ("filename", &r.filename),
            ] {
                if value.is_empty() {
                    return Err(Error::invalid(field, "must not be empty").into());
                }
            }
            if r.filename.contains('/') {
                return Err(Error::invalid("filename", "must not contain '/'").into());
            }
            if r.content_md5.len() != 16 {
                return Err(Error::invalid(
                    "content_md5",
                    "must be the 16-byte MD5 of the content",
                )
                .into());
            }
            let limits = &self.blobs.limits;
            let max_bytes = match u64::try_from(r.content_length) {
                Ok(0) | Err(_) => limits.max_upload_bytes,
                Ok(n) if n <= limits.max_upload_bytes => n,
                Ok(n) => {
                    return Err(Error::ResourceExhausted(format!(
                        "content_length is {n} bytes; uploads are limited to {}",
                        limits.max_upload_bytes
                    ))
                    .into())
                }
            };
            let ttl = r
                .expires_in
                .and_then(|d| Duration::try_from(d).ok())
                .filter(|d| !d.is_zero())
                .map_or(limits.max_url_ttl, |d| d.min(limits.max_url_ttl));
            let root = if r.filename_root.is_empty() {
                hex::encode(&r.content_md5)
            } else {
                r.filename_root.clone()
            };
            let key = keys::upload(&r.org, &r.project, &r.domain, &root, &r.filename);
            let expires_at = Utc::now() + chrono::Duration::from_std(ttl).unwrap_or_default();
            let grant = UploadGrant {
                key: key.to_string(),
                expires: expires_at.timestamp(),
                content_md5: STANDARD.encode(&r.content_md5),
                max_bytes,
            };
            let signature = self.blobs.signer().sign(&grant);
            let signed_url = format!(
                "{base}{UPLOAD_PATH}?k={}&e={}&m={}&n={}&s={signature}",
                URL_SAFE_NO_PAD.encode(grant.key.as_bytes()),
                grant.expires,
                URL_SAFE_NO_PAD.encode(&r.content_md5),
                grant.max_bytes,
            );
            Ok(Response::new(dp::CreateUploadLocationResponse {
                signed_url,
                native_url: self.blobs.uri(&key),
                expires_at: Some(timestamp_to_proto(expires_at)),
                headers: Default::default(),
            }))
        }
        .instrument(span("CreateUploadLocation"))
        .await;
        auth::audit(&extensions, "CreateUploadLocation", &target, &result);
        result
    }

    async fn create_download_link(
        &self,
        request: Request<dp::CreateDownloadLinkRequest>,
    ) -> Result<Response<dp::CreateDownloadLinkResponse>, Status> {
        async {
            let base = self.base_url(&request);
            let extensions = request.extensions().clone();
            let r = request.into_inner();
            let artifact = dp::ArtifactType::try_from(r.artifact_type)
                .ok()
                .filter(|t| *t != dp::ArtifactType::Unspecified)
                .ok_or_else(|| Error::invalid("artifact_type", "must be REPORT or CODE_BUNDLE"))?;
            let attempt_id = match r.source {
                Some(dp::create_download_link_request::Source::ActionAttemptId(a)) => a,
                Some(dp::create_download_link_request::Source::TaskId(_)) => {
                    return Err(Error::invalid(
                        "task_id",
                        "links by task are not supported: actionsd keeps no task registry; \
                         name an action attempt",
                    )
                    .into())
                }
                None => return Err(Error::invalid("source", "name an action_attempt_id").into()),
            };
            let id =
                convert::action_id("action_attempt_id.action_id", attempt_id.action_id.as_ref())?;
            Span::current().record("action", field::display(&id));
            auth::authorize(&extensions, &auth::Target::action(&id))?;
            let record = self.store.get_action(&id).await?;
            let spec =
                decode_stored::<actions_pb::Action>("spec", &id, &record.spec).unwrap_or_default();
            let attempt = match attempt_id.attempt {
                0 => record.state.attempt,
                n => n,
            };
            if attempt > record.state.attempt {
                return Err(Error::invalid(
                    "action_attempt_id.attempt",
                    format!("action {id} has no attempt {attempt} yet"),
                )
                .into());
            }
            let uri = match artifact {
                dp::ArtifactType::Report => {
                    let dir =
                        if attempt == record.state.attempt && !record.state.output_uri.is_empty() {
                            record.state.output_uri.clone()
                        } else {
                            output_uri(
                                ActionKind::Task,
                                "",
                                &spec.run_output_base,
                                &id.name,
                                attempt,
                            )
                        };
                    Some(format!("{}/{REPORT_FILE}", dir.trim_end_matches('/')))
                }
                _ => crate::executor::flyte::code_bundle(&spec),
            };
            // No such object (or one outside this store): no link, as the
            // SDK expects when an action has no report.
            let key = match uri.as_deref().and_then(|u| self.blobs.key_of(u)) {
                Some(key) if self.blobs.exists(&key).await? => Some(key),
                _ => None,
            };
            let ttl = r
                .expires_in
                .and_then(|d| Duration::try_from(d).ok())
                .filter(|d| !d.is_zero())
                .map_or(self.blobs.limits.max_url_ttl, |d| {
                    d.min(self.blobs.limits.max_url_ttl)
                });
            let expires_at = Utc::now() + chrono::Duration::from_std(ttl).unwrap_or_default();
            let signed_url = key
                .map(|key| {
                    let grant = DownloadGrant {
                        key: key.to_string(),
                        expires: expires_at.timestamp(),
                    };
                    let signature = self.blobs.signer().sign_download(&grant);
                    format!(
                        "{base}{DOWNLOAD_PATH}?k={}&e={}&s={signature}",
                        URL_SAFE_NO_PAD.encode(grant.key.as_bytes()),
                        grant.expires,
                    )
                })
                .into_iter()
                .collect();
            Ok(Response::new(dp::CreateDownloadLinkResponse {
                pre_signed_urls: Some(dp::PreSignedUrLs {
                    signed_url,
                    expires_at: Some(timestamp_to_proto(expires_at)),
                }),
            }))
        }
        .instrument(span("CreateDownloadLink"))
        .await
    }

    async fn upload_inputs(
        &self,
        request: Request<dp::UploadInputsRequest>,
    ) -> Result<Response<dp::UploadInputsResponse>, Status> {
        let extensions = request.extensions().clone();
        let result = async {
            let r = request.into_inner();
            let (org, project, domain) = match &r.id {
                Some(dp::upload_inputs_request::Id::RunId(run)) => {
                    let run = convert::run_id("run_id", Some(run))?;
                    auth::authorize(&extensions, &auth::Target::run(&run))?;
                    (run.org, run.project, run.domain)
                }
                Some(dp::upload_inputs_request::Id::ProjectId(p)) => {
                    let (org, project, domain) = project_scope(Some(p))?;
                    auth::authorize(&extensions, &auth::Target::project(&project, &domain))?;
                    (org, project, domain)
                }
                None => return Err(Error::invalid("id", "run_id or project_id is required").into()),
            };
            let offloaded = self
                .offload_inputs((&org, &project, &domain), r.inputs)
                .await?;
            Ok(Response::new(dp::UploadInputsResponse {
                offloaded_input_data: Some(offloaded),
            }))
        }
        .instrument(span("UploadInputs"))
        .await;
        auth::audit(&extensions, "UploadInputs", &"inputs", &result);
        result
    }

    async fn get_action_data(
        &self,
        request: Request<dp::GetActionDataRequest>,
    ) -> Result<Response<dp::GetActionDataResponse>, Status> {
        async {
            let id = convert::action_id("action_id", request.get_ref().action_id.as_ref())?;
            Span::current().record("action", field::display(&id));
            auth::authorize(request.extensions(), &auth::Target::action(&id))?;
            let record = self.store.get_action(&id).await?;
            let spec = decode_stored::<actions_pb::Action>("spec", &id, &record.spec);
            let inputs_uri = spec.map(|a| a.input_uri).unwrap_or_default();
            // Both halves must fit in one response.
            let max = (self.max_message_size / 2) as u64;
            let inputs = match self.blobs.key_of(&inputs_uri) {
                Some(key) => self.blobs.get(&key, max).await?.unwrap_or_default(),
                None => Bytes::new(),
            };
            let (outputs_uri, outputs) =
                if record.state.phase == Phase::Succeeded && !record.state.output_uri.is_empty() {
                    let uri = format!(
                        "{}/outputs.pb",
                        record.state.output_uri.trim_end_matches('/')
                    );
                    let outputs = match self.blobs.key_of(&uri) {
                        Some(key) => self.blobs.get(&key, max).await?.unwrap_or_default(),
                        None => Bytes::new(),
                    };
                    (uri, outputs)
                } else {
                    (String::new(), Bytes::new())
                };
            Ok(Response::new(dp::GetActionDataResponse {
                inputs,
                outputs,
                inputs_uri,
                outputs_uri,
            }))
        }
        .instrument(span("GetActionData"))
        .await
    }

    async fn tail_logs(
        &self,
        request: Request<dp::TailLogsRequest>,
    ) -> Result<Response<Self::TailLogsStream>, Status> {
        let extensions = request.extensions().clone();
        let r = request.into_inner();
        let id = convert::action_id("action_id", r.action_id.as_ref())?;
        auth::authorize(&extensions, &auth::Target::action(&id))?;
        let record = self.store.get_action(&id).await?;
        let attempt = if r.attempt == 0 {
            record.state.attempt.max(1)
        } else {
            r.attempt
        };
        let (store, logs, shutdown) =
            (self.store.clone(), self.logs.clone(), self.shutdown.clone());
        tracing::debug!(action = %id, attempt, "tail logs");
        let stream = async_stream::stream! {
            let mut next = 0usize;
            loop {
                // Read the phase before the chunks: once the attempt is
                // over, one more read gets everything it wrote.
                let state = match store.get_action(&id).await {
                    Ok(record) => record.state,
                    Err(err) => { yield Err(Status::from(err)); break; }
                };
                let over = state.phase.is_terminal() || state.attempt > attempt;
                let notified = logs.notified();
                match logs.read_from(&id, attempt, next).await {
                    Ok(chunks) => {
                        next += chunks.len();
                        for chunk in chunks {
                            if !chunk.lines.is_empty() {
                                yield Ok(dp::TailLogsResponse { logs: vec![chunk] });
                            }
                        }
                    }
                    Err(err) => { yield Err(Status::from(err)); break; }
                }
                if over {
                    break;
                }
                tokio::select! {
                    () = notified => {}
                    () = tokio::time::sleep(TAIL_POLL) => {}
                    () = shutdown.cancelled() => {
                        yield Err(Status::unavailable("the daemon is shutting down"));
                        break;
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

type WatchDetailsStream = MessageStream<wf::WatchActionDetailsResponse>;

#[tonic::async_trait]
impl RunService for FlyteApi {
    type WatchActionDetailsStream = WatchDetailsStream;

    async fn create_run(
        &self,
        request: Request<wf::CreateRunRequest>,
    ) -> Result<Response<wf::CreateRunResponse>, Status> {
        let extensions = request.extensions().clone();
        let mut audited: Option<RunId> = None;
        let result = async {
            let r = request.into_inner();
            let run = match &r.id {
                Some(wf::create_run_request::Id::RunId(run)) => {
                    convert::run_id("run_id", Some(run))?
                }
                Some(wf::create_run_request::Id::ProjectId(p)) => {
                    let (org, project, domain) = project_scope(Some(p))?;
                    RunId {
                        org,
                        project,
                        domain,
                        name: run_name(),
                    }
                }
                None => return Err(Error::invalid("id", "run_id or project_id is required").into()),
            };
            Span::current().record("action", field::display(&run));
            auth::authorize(&extensions, &auth::Target::run(&run))?;
            audited = Some(run.clone());
            let task_spec = match r.task {
                Some(wf::create_run_request::Task::TaskSpec(spec)) => spec,
                Some(wf::create_run_request::Task::TaskId(_)) => {
                    return Err(Status::unimplemented(
                        "running a registered task (task_id) is not supported by actionsd: \
                         tasks are not deployed; run them from code (flyte run FILE TASK)",
                    ))
                }
                Some(wf::create_run_request::Task::TriggerName(_)) => {
                    return Err(Status::unimplemented(
                        "triggers are not supported by actionsd",
                    ))
                }
                None => return Err(Error::invalid("task_spec", "is required").into()),
            };
            let view = TaskSpec::decode(task_spec.clone()).map_err(|e| {
                Error::invalid("task_spec", format!("is not a valid TaskSpec: {e}"))
            })?;
            let template_id = view.task_template.and_then(|t| t.id).unwrap_or_default();
            let input_uri = match r.input_wrapper {
                Some(wf::create_run_request::InputWrapper::OffloadedInputData(data))
                    if !data.uri.is_empty() =>
                {
                    data.uri
                }
                Some(wf::create_run_request::InputWrapper::OffloadedInputData(_)) => {
                    return Err(
                        Error::invalid("offloaded_input_data.uri", "must not be empty").into(),
                    )
                }
                Some(wf::create_run_request::InputWrapper::Inputs(inputs)) => {
                    self.offload_inputs((&run.org, &run.project, &run.domain), inputs)
                        .await?
                        .uri
                }
                None => {
                    self.offload_inputs((&run.org, &run.project, &run.domain), Bytes::new())
                        .await?
                        .uri
                }
            };
            let root = ActionId::new(run.clone(), ROOT);
            let enqueue = actions_pb::EnqueueRequest {
                action: Some(actions_pb::Action {
                    action_id: Some(action_id_to_proto(&root)),
                    parent_action_name: None,
                    input_uri,
                    run_output_base: self.blobs.uri(&keys::run_base(&run)),
                    group: String::new(),
                    subject: String::new(),
                    spec: Some(action::Spec::Task(
                        crate::proto::flyteidl2::workflow::TaskAction {
                            id: Some(TaskIdentifier {
                                org: template_id.org,
                                project: template_id.project,
                                domain: template_id.domain,
                                name: template_id.name,
                                version: template_id.version,
                            }),
                            spec: task_spec,
                            cache_key: None,
                            queue: String::new(),
                        },
                    )),
                    recovered_from: None,
                }),
                run_spec: r.run_spec,
            };
            ActionsService::enqueue(
                &self.actions,
                Request::from_parts(Default::default(), extensions.clone(), enqueue),
            )
            .await?;
            let record = self.store.get_action(&root).await?;
            Ok(Response::new(wf::CreateRunResponse {
                run: Some(run_of(&action_details(&record, false))),
            }))
        }
        .instrument(span("CreateRun"))
        .await;
        if let Some(run) = &audited {
            auth::audit(&extensions, "CreateRun", run, &result);
        }
        result
    }

    async fn abort_run(
        &self,
        request: Request<wf::AbortRunRequest>,
    ) -> Result<Response<wf::AbortRunResponse>, Status> {
        async {
            let extensions = request.extensions().clone();
            let r = request.into_inner();
            let run = convert::run_id("run_id", r.run_id.as_ref())?;
            Span::current().record("action", field::display(&run));
            auth::authorize(&extensions, &auth::Target::run(&run))?;
            let root = self.root(&run).await?;
            let abort = actions_pb::AbortRequest {
                action_id: Some(action_id_to_proto(&root.state.id)),
                reason: Some(r.reason.unwrap_or_else(|| "aborted by the user".to_owned())),
                aborted_by: None,
            };
            ActionsService::abort(
                &self.actions,
                Request::from_parts(Default::default(), extensions, abort),
            )
            .await?;
            Ok(Response::new(wf::AbortRunResponse {}))
        }
        .instrument(span("AbortRun"))
        .await
    }

    async fn get_run_details(
        &self,
        request: Request<wf::GetRunDetailsRequest>,
    ) -> Result<Response<wf::GetRunDetailsResponse>, Status> {
        async {
            let run = convert::run_id("run_id", request.get_ref().run_id.as_ref())?;
            Span::current().record("action", field::display(&run));
            auth::authorize(request.extensions(), &auth::Target::run(&run))?;
            let root = self.root(&run).await?;
            let run_spec = self.store.run_spec(&run).await?;
            Ok(Response::new(wf::GetRunDetailsResponse {
                details: Some(wf::RunDetails {
                    run_spec,
                    action: Some(self.details(&root).await?),
                }),
            }))
        }
        .instrument(span("GetRunDetails"))
        .await
    }

    async fn get_action_details(
        &self,
        request: Request<wf::GetActionDetailsRequest>,
    ) -> Result<Response<wf::GetActionDetailsResponse>, Status> {
        async {
            let id = convert::action_id("action_id", request.get_ref().action_id.as_ref())?;
            Span::current().record("action", field::display(&id));
            auth::authorize(request.extensions(), &auth::Target::action(&id))?;
            let record = self.store.get_action(&id).await?;
            Ok(Response::new(wf::GetActionDetailsResponse {
                details: Some(self.details(&record).await?),
            }))
        }
        .instrument(span("GetActionDetails"))
        .await
    }

    async fn watch_action_details(
        &self,
        request: Request<wf::WatchActionDetailsRequest>,
    ) -> Result<Response<Self::WatchActionDetailsStream>, Status> {
        let id = convert::action_id("action_id", request.get_ref().action_id.as_ref())?;
        auth::authorize(request.extensions(), &auth::Target::action(&id))?;
        // Subscribe before the first read, so no change is missed.
        let subscription = self.registry.subscribe(id.clone());
        let first = self.store.get_action(&id).await?;
        let api = self.clone();
        tracing::debug!(action = %id, "watch action details");
        let stream = async_stream::stream! {
            let mut record = first;
            let mut sent: Option<(i64, bool)> = None;
            loop {
                let details = match api.details(&record).await {
                    Ok(details) => details,
                    Err(err) => { yield Err(Status::from(err)); break; }
                };
                let logs = details.attempts.last().is_some_and(|a| a.logs_available);
                // Send on a new version, or when logs became available.
                if sent != Some((record.state.version, logs)) {
                    sent = Some((record.state.version, logs));
                    yield Ok(wf::WatchActionDetailsResponse { details: Some(details) });
                }
                if record.state.phase.is_terminal() {
                    break;
                }
                // Changes of the action wake the stream; logs appearing
                // are noticed by polling.
                tokio::select! {
                    batch = subscription.next_batch() => {
                        if let Err(reason) = batch {
                            yield Err(Status::unavailable(reason));
                            break;
                        }
                    }
                    () = tokio::time::sleep(TAIL_POLL) => {}
                }
                record = match api.store.get_action(&id).await {
                    Ok(record) => record,
                    Err(err) => { yield Err(Status::from(err)); break; }
                };
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_runs(
        &self,
        request: Request<wf::ListRunsRequest>,
    ) -> Result<Response<wf::ListRunsResponse>, Status> {
        async {
            let extensions = request.extensions().clone();
            let r = request.into_inner();
            let list = r.request.unwrap_or_default();
            if !list.filters.is_empty() || !list.raw_filters.is_empty() {
                return Err(Error::invalid(
                    "request.filters",
                    "filters are not supported by actionsd",
                )
                .into());
            }
            let filter = match r.scope_by {
                Some(wf::list_runs_request::ScopeBy::Org(org)) => RunFilter {
                    org: Some(org),
                    ..Default::default()
                },
                Some(wf::list_runs_request::ScopeBy::ProjectId(p)) => {
                    let (org, project, domain) = project_scope(Some(&p))?;
                    RunFilter {
                        org: Some(org),
                        project: Some(project),
                        domain: Some(domain),
                    }
                }
                None => RunFilter::default(),
                Some(_) => {
                    return Err(Status::unimplemented(
                        "listing runs by trigger or task is not supported by actionsd",
                    ))
                }
            };
            auth::authorize(
                &extensions,
                &auth::Target::project(
                    filter.project.as_deref().unwrap_or_default(),
                    filter.domain.as_deref().unwrap_or_default(),
                ),
            )?;
            let limit = match list.limit as usize {
                0 => DEFAULT_LIMIT,
                n if n <= MAX_LIMIT => n,
                n => {
                    return Err(Error::invalid(
                        "request.limit",
                        format!("is {n}; the largest page is {MAX_LIMIT}"),
                    )
                    .into())
                }
            };
            let after = (!list.token.is_empty())
                .then(|| RunPosition::from_token(&list.token))
                .transpose()?;
            let page = self
                .store
                .list_runs(&filter, &PageRequest { limit, after })
                .await?;
            let mut runs = Vec::with_capacity(page.items.len());
            for run in &page.items {
                match self
                    .store
                    .get_action(&ActionId::new(run.id.clone(), run.root_name.clone()))
                    .await
                {
                    Ok(root) => runs.push(run_of(&action_details(&root, false))),
                    Err(Error::ActionNotFound(_)) => {}
                    Err(err) => return Err(err.into()),
                }
            }
            Ok(Response::new(wf::ListRunsResponse {
                runs,
                token: page.next.map(|p| p.to_token()).unwrap_or_default(),
            }))
        }
        .instrument(span("ListRuns"))
        .await
    }
}

/// Opens the configured blob store (by default the `blobs` directory next
/// to the SQLite file, or in the per-user data directory).
pub fn open_blobs(config: &crate::config::Config) -> anyhow::Result<Blobs> {
    use crate::blob::BlobLocation;
    use crate::config::StoreLocation;
    use anyhow::Context as _;
    let location = match &config.blobs.location {
        Some(location) => location.clone(),
        None => {
            let dir = match &config.store {
                StoreLocation::Sqlite(path) => path
                    .parent()
                    .map(|p| p.join("blobs"))
                    .unwrap_or_else(|| std::path::PathBuf::from("blobs")),
                StoreLocation::Postgres(_) => crate::store::sqlite::SqliteStore::default_path()
                    .and_then(|p| p.parent().map(|p| p.join("blobs")))
                    .context("no per-user data directory for the blob store; set blobs.url")?,
            };
            BlobLocation::Local(dir)
        }
    };
    let key = match (&config.blobs.signing_key, &location) {
        (Some(key), _) => key.clone(),
        (None, BlobLocation::Local(dir)) => {
            crate::blob::local_signing_key(dir).map_err(anyhow::Error::msg)?
        }
        (None, BlobLocation::S3(_)) => anyhow::bail!(
            "blobs.signing_key is required with an S3 blob store (every daemon sharing it needs the same key)"
        ),
    };
    let blobs = Blobs::open(&location, &key, config.blobs.limits.clone())
        .map_err(anyhow::Error::msg)
        .context("cannot open the blob store")?;
    tracing::info!(root = %blobs.uri(&object_store::path::Path::from("")), "blob store");
    Ok(blobs)
}

/// The Flyte services of one daemon, built together.
pub struct FlyteServices {
    pub api: FlyteApi,
    pub logs: LogStore,
    pub http: super::blob_http::BlobHttpLayer,
    max_message_size: usize,
}

impl FlyteServices {
    pub fn new(
        config: &crate::config::Config,
        local_addr: SocketAddr,
        actions: &ActionsApi,
        store: &Arc<dyn Store>,
        pipeline: &crate::pipeline::Pipeline,
        blobs: Blobs,
        shutdown: CancellationToken,
    ) -> Self {
        let logs = LogStore::new(blobs.clone());
        let max_message_size = config.server.max_message_size;
        let api = FlyteApi::new(
            actions.clone(),
            store.clone(),
            pipeline.registry(),
            blobs.clone(),
            logs.clone(),
            FlyteSettings {
                public_url: config.blobs.public_url.clone(),
                local_addr,
                tls: config.tls.is_some(),
                max_message_size,
            },
            shutdown,
        );
        Self {
            api,
            logs,
            http: super::blob_http::BlobHttpLayer::new(Some(blobs)),
            max_message_size,
        }
    }

    pub fn runs(
        &self,
    ) -> crate::proto::flyteidl2::workflow::run_service_server::RunServiceServer<FlyteApi> {
        crate::proto::flyteidl2::workflow::run_service_server::RunServiceServer::new(
            self.api.clone(),
        )
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(self.max_message_size)
        .max_encoding_message_size(self.max_message_size)
    }

    pub fn data(
        &self,
    ) -> crate::proto::flyteidl2::dataproxy::data_proxy_service_server::DataProxyServiceServer<
        FlyteApi,
    > {
        crate::proto::flyteidl2::dataproxy::data_proxy_service_server::DataProxyServiceServer::new(
            self.api.clone(),
        )
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(self.max_message_size)
        .max_encoding_message_size(self.max_message_size)
    }

    pub fn clusters(
        &self,
    ) -> crate::proto::flyteidl2::cluster::cluster_service_server::ClusterServiceServer<FlyteApi>
    {
        crate::proto::flyteidl2::cluster::cluster_service_server::ClusterServiceServer::new(
            self.api.clone(),
        )
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(self.max_message_size)
        .max_encoding_message_size(self.max_message_size)
    }
}
