//! `actionsctl enqueue`: an EnqueueRequest from flags or from a file.

use std::io::Read;
use std::path::Path;

use bytes::Bytes;
use prost::Message;

use super::cli::{EnqueueArgs, Global, ValueType};
use super::error::{exit, Failure, Result};
use super::output::{self, Format};
use super::{action_id, action_path, connect, request};
use crate::proto::flyteidl2::actions::actions_service_client::ActionsServiceClient;
use crate::proto::flyteidl2::actions::{action, Action, EnqueueRequest};
use crate::proto::flyteidl2::{core, task, workflow};
use crate::schema;

const ENQUEUE_REQUEST: &str = "flyteidl2.actions.EnqueueRequest";

/// Files larger than this are refused before parsing (the daemon's default
/// message limit is 4 MiB).
const MAX_FILE: u64 = 16 * 1024 * 1024;

pub async fn run(global: &Global, args: EnqueueArgs) -> Result<u8> {
    let dry_run = args.dry_run;
    let request_message = match &args.file {
        Some(path) => from_file(path)?,
        None => from_flags(global, &args)?,
    };
    if dry_run {
        let value = output::to_json(ENQUEUE_REQUEST, &request_message)?;
        let format = match global.output {
            Format::Table => Format::Json,
            other => other,
        };
        output::write_out(&output::render_document(format, &value)?)?;
        return Ok(exit::OK);
    }
    let id = request_message
        .action
        .as_ref()
        .and_then(|a| a.action_id.clone())
        .map(|id| action_path(&id))
        .unwrap_or_default();
    let mut client = ActionsServiceClient::new(connect(global).await?);
    let response = client
        .enqueue(request(global, request_message))
        .await?
        .into_inner();
    match global.output {
        Format::Table => output::write_out(&format!("enqueued {id}\n"))?,
        format => output::print_message(format, "flyteidl2.actions.EnqueueResponse", &response)?,
    }
    Ok(exit::OK)
}

/// Reads an EnqueueRequest in the proto3 JSON mapping, written as JSON or
/// YAML (`-`: stdin), and transcodes it under the official schema.
fn from_file(path: &Path) -> Result<EnqueueRequest> {
    let name = path.display().to_string();
    let mut text = String::new();
    let read = if name == "-" {
        std::io::stdin()
            .lock()
            .take(MAX_FILE + 1)
            .read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(MAX_FILE + 1).read_to_string(&mut text))
    };
    read.map_err(|e| Failure::invalid(format!("cannot read {name}: {e}")))?;
    if text.len() as u64 > MAX_FILE {
        return Err(Failure::invalid(format!(
            "{name} is larger than {} MiB",
            MAX_FILE / 1024 / 1024
        )));
    }
    let value = parse_document(&name, &text)?;
    if !value.is_object() {
        return Err(Failure::invalid(format!(
            "{name}: expected an EnqueueRequest object, e.g. {{\"action\": {{...}}}}"
        )));
    }
    let json = serde_json::to_vec(&value).map_err(|e| Failure::invalid(format!("{name}: {e}")))?;
    let binary = schema::json_to_binary(ENQUEUE_REQUEST, &json)
        .map_err(|e| Failure::invalid(format!("{name}: not a valid {ENQUEUE_REQUEST}: {e}")))?;
    EnqueueRequest::decode(binary.as_slice())
        .map_err(|e| Failure::invalid(format!("{name}: not a valid {ENQUEUE_REQUEST}: {e}")))
}

/// JSON for `.json` files, YAML for `.yaml`/`.yml`; otherwise (stdin, other
/// names) JSON when it parses as JSON, else YAML. A document that parses as
/// neither is reported as invalid JSON when it starts with `{` (after
/// blanks; YAML's flow style is accepted too), else as invalid YAML.
fn parse_document(name: &str, text: &str) -> Result<serde_json::Value> {
    let lower = name.to_ascii_lowercase();
    let as_json = || {
        serde_json::from_str::<serde_json::Value>(text)
            .map_err(|e| Failure::invalid(format!("{name}: invalid JSON: {e}")))
    };
    let as_yaml = || {
        serde_yaml_ng::from_str::<serde_json::Value>(text)
            .map_err(|e| Failure::invalid(format!("{name}: invalid YAML: {e}")))
    };
    if lower.ends_with(".json") {
        as_json()
    } else if lower.ends_with(".yaml") || lower.ends_with(".yml") {
        as_yaml()
    } else {
        as_json().or_else(|json_error| {
            as_yaml().map_err(|yaml_error| {
                if text.trim_start().starts_with('{') {
                    json_error
                } else {
                    yaml_error
                }
            })
        })
    }
}

/// Encodes a message of the official schema given as proto3 JSON.
fn official(full_name: &str, json: serde_json::Value) -> Result<Bytes> {
    let text = json.to_string();
    schema::json_to_binary(full_name, text.as_bytes())
        .map(Bytes::from)
        .map_err(|e| Failure::other(format!("cannot encode {full_name}: {e}")))
}

fn from_flags(global: &Global, args: &EnqueueArgs) -> Result<EnqueueRequest> {
    // clap requires both without --file.
    let (Some(run), Some(name)) = (args.run.as_deref(), args.action.as_deref()) else {
        return Err(Failure::usage("give RUN and ACTION, or --file"));
    };
    let output_base = args.output_base.clone().unwrap_or_else(|| {
        format!(
            "file:///tmp/actionsd/{}/{}/{run}",
            global.project, global.domain
        )
    });
    let input_uri = args
        .input_uri
        .clone()
        .unwrap_or_else(|| format!("{}/{name}/inputs.pb", output_base.trim_end_matches('/')));
    let spec = if args.condition {
        let simple = match args.value_type {
            ValueType::Bool => core::SimpleType::Boolean,
            ValueType::Int => core::SimpleType::Integer,
            ValueType::Float => core::SimpleType::Float,
            ValueType::String => core::SimpleType::String,
        };
        action::Spec::Condition(workflow::ConditionAction {
            name: name.to_owned(),
            r#type: Some(core::LiteralType {
                r#type: Some(core::literal_type::Type::Simple(simple as i32)),
                ..Default::default()
            }),
            prompt: args.prompt.clone().unwrap_or_default(),
            description: args.description.clone().unwrap_or_default(),
            prompt_type: workflow::ConditionPromptType::Text as i32,
            timeout: args.condition_timeout.map(|t| prost_types::Duration {
                seconds: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(t.subsec_nanos()).unwrap_or(0),
            }),
            webhook: Bytes::new(),
        })
    } else {
        let task_name = args.task.clone().unwrap_or_else(|| name.to_owned());
        action::Spec::Task(workflow::TaskAction {
            id: Some(task::TaskIdentifier {
                org: global.org.clone(),
                project: global.project.clone(),
                domain: global.domain.clone(),
                name: task_name.clone(),
                version: args.task_version.clone(),
            }),
            spec: official(
                "flyteidl2.task.TaskSpec",
                serde_json::json!({ "shortName": task_name }),
            )?,
            cache_key: None,
            queue: args.queue.clone().unwrap_or_default(),
        })
    };
    let mut run_spec = serde_json::Map::new();
    if let Some(queue) = &args.run_queue {
        run_spec.insert("queue".into(), queue.clone().into());
    }
    if let Some(n) = args.max_concurrency {
        run_spec.insert("maxActionConcurrency".into(), n.into());
    }
    let run_spec = if run_spec.is_empty() {
        Bytes::new()
    } else {
        official("flyteidl2.task.RunSpec", run_spec.into())?
    };
    Ok(EnqueueRequest {
        action: Some(Action {
            action_id: Some(action_id(global, run, name)),
            parent_action_name: args.parent.clone(),
            input_uri,
            run_output_base: output_base,
            group: String::new(),
            subject: String::new(),
            spec: Some(spec),
            recovered_from: None,
        }),
        run_spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_and_json_documents_parse_to_the_same_value() {
        let json = parse_document("r.json", r#"{"action": {"inputUri": "s3://b/i"}}"#).unwrap();
        let yaml = parse_document("r.yaml", "action:\n  inputUri: s3://b/i\n").unwrap();
        assert_eq!(json, yaml);
        let sniffed = parse_document("-", "action:\n  inputUri: s3://b/i\n").unwrap();
        assert_eq!(sniffed, yaml);
        let err = parse_document("r.json", "{").unwrap_err();
        assert!(err.message.starts_with("r.json: invalid JSON"), "{err}");
        // From stdin, malformed JSON is reported as JSON, not as YAML.
        let err = parse_document("-", "  {\"action\": {\"inputUri\": }").unwrap_err();
        assert!(err.message.starts_with("-: invalid JSON: "), "{err}");
        let err = parse_document("-", "action: [unclosed").unwrap_err();
        assert!(err.message.starts_with("-: invalid YAML: "), "{err}");
        // YAML's flow style still parses.
        assert_eq!(
            parse_document("-", "{action: {inputUri: s3://b/i}}").unwrap(),
            yaml
        );
    }
}
