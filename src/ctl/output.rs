//! Printing: tables for people, the proto3 JSON mapping (and YAML made from
//! it) for scripts.

use std::io::Write;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, SecondsFormat, Utc};
use prost::Message;

use super::error::{Failure, Result};
use crate::proto::actionsd::read::v1::ActionKind;
use crate::proto::flyteidl2::common::ActionPhase;
use crate::proto::flyteidl2::core;

/// `--output`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// The proto3 JSON mapping of the response, pretty-printed.
    Json,
    /// The same document as YAML.
    Yaml,
}

/// A message in the proto3 JSON mapping, decoded under the official
/// flyteidl2 schema so that opaque payloads (TaskSpec, RunSpec, …) appear as
/// objects. `full_name` is the message's protobuf name.
pub fn to_json<M: Message>(full_name: &str, message: &M) -> Result<serde_json::Value> {
    let json = crate::schema::binary_to_json(full_name, &message.encode_to_vec())
        .map_err(|e| Failure::other(format!("cannot render {full_name} as JSON: {e}")))?;
    serde_json::from_slice(&json)
        .map_err(|e| Failure::other(format!("cannot render {full_name} as JSON: {e}")))
}

/// Renders a JSON document as `format` (json or yaml).
pub fn render_document(format: Format, value: &serde_json::Value) -> Result<String> {
    match format {
        Format::Yaml => serde_yaml_ng::to_string(value)
            .map_err(|e| Failure::other(format!("cannot render YAML: {e}"))),
        Format::Json | Format::Table => serde_json::to_string_pretty(value)
            .map(|mut s| {
                s.push('\n');
                s
            })
            .map_err(|e| Failure::other(format!("cannot render JSON: {e}"))),
    }
}

/// Prints a message as JSON or YAML.
pub fn print_message<M: Message>(format: Format, full_name: &str, message: &M) -> Result<()> {
    let value = to_json(full_name, message)?;
    write_out(&render_document(format, &value)?)
}

/// Writes to stdout; a closed pipe (`actionsctl ls | head`) is not an error
/// worth a message, but it still ends the command.
pub fn write_out(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        // The reader went away (`| head`): stop quietly, as a program killed
        // by SIGPIPE would, rather than report an error nobody reads.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(Failure::other(format!("cannot write to stdout: {e}"))),
    }
}

/// Aligned columns separated by two spaces, like `kubectl get`. Written by
/// hand: a table crate would add borders and width logic this output does
/// not want, and the whole job is a dozen lines.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Key/value lines with the keys aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs {
        out.push_str(&format!("{:width$}  {value}\n", format!("{key}:")));
    }
    out
}

/// `SUCCEEDED` for ACTION_PHASE_SUCCEEDED.
pub fn phase_name(phase: i32) -> String {
    match ActionPhase::try_from(phase) {
        Ok(p) => p
            .as_str_name()
            .trim_start_matches("ACTION_PHASE_")
            .to_owned(),
        Err(_) => format!("PHASE_{phase}"),
    }
}

pub fn kind_name(kind: i32) -> &'static str {
    match ActionKind::try_from(kind) {
        Ok(ActionKind::Task) => "task",
        Ok(ActionKind::Trace) => "trace",
        Ok(ActionKind::Condition) => "condition",
        _ => "-",
    }
}

pub fn is_terminal(phase: i32) -> bool {
    matches!(
        ActionPhase::try_from(phase),
        Ok(ActionPhase::Succeeded
            | ActionPhase::Failed
            | ActionPhase::Aborted
            | ActionPhase::TimedOut
            | ActionPhase::Recovered)
    )
}

pub fn system_time(ts: &prost_types::Timestamp) -> Option<SystemTime> {
    SystemTime::try_from(*ts).ok()
}

/// RFC 3339 in UTC, to the second.
pub fn time(ts: Option<&prost_types::Timestamp>) -> String {
    ts.and_then(|ts| DateTime::<Utc>::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?))
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_else(|| "-".to_owned())
}

/// A short duration: `850ms`, `12.3s`, `4m05s`, `2h03m`.
pub fn duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 1 {
        format!("{}ms", d.as_millis())
    } else if secs < 60 {
        format!("{:.1}s", d.as_secs_f64())
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60)
    }
}

/// How long an action ran (or has been running) from its timestamps.
pub fn elapsed(
    start: Option<&prost_types::Timestamp>,
    end: Option<&prost_types::Timestamp>,
) -> Option<Duration> {
    let start = system_time(start?)?;
    let end = match end {
        Some(end) => system_time(end)?,
        None => SystemTime::now(),
    };
    Some(end.duration_since(start).unwrap_or_default())
}

/// `ExitCode3: boom (USER)`.
pub fn error_text(error: &core::ExecutionError) -> String {
    let kind = core::execution_error::ErrorKind::try_from(error.kind)
        .map(|k| k.as_str_name())
        .unwrap_or("UNKNOWN");
    let message = error.message.trim().replace(['\n', '\r'], " ");
    format!("{}: {} ({kind})", error.code, message)
}

/// The value of a primitive literal, as typed at a terminal.
pub fn literal_text(literal: &core::Literal) -> String {
    use core::{literal, primitive, scalar};
    let primitive = match &literal.value {
        Some(literal::Value::Scalar(core::Scalar {
            value: Some(scalar::Value::Primitive(p)),
        })) => p.value.as_ref(),
        _ => None,
    };
    match primitive {
        Some(primitive::Value::Integer(v)) => v.to_string(),
        Some(primitive::Value::FloatValue(v)) => v.to_string(),
        Some(primitive::Value::StringValue(v)) => format!("{v:?}"),
        Some(primitive::Value::Boolean(v)) => v.to_string(),
        Some(_) | None => "(a non-primitive literal)".to_owned(),
    }
}

pub fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_trim_line_ends() {
        let out = table(
            &["RUN", "PHASE", "NOTE"],
            &[
                vec!["r1".into(), "SUCCEEDED".into(), String::new()],
                vec!["run-two".into(), "QUEUED".into(), "x".into()],
            ],
        );
        assert_eq!(
            out,
            "RUN      PHASE      NOTE\nr1       SUCCEEDED\nrun-two  QUEUED     x\n"
        );
    }

    #[test]
    fn fields_align_values_after_the_longest_key() {
        let out = fields(&[("Phase", "QUEUED".into()), ("Output base", "s3://b".into())]);
        assert_eq!(out, "Phase:        QUEUED\nOutput base:  s3://b\n");
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(duration(Duration::from_millis(850)), "850ms");
        assert_eq!(duration(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(duration(Duration::from_secs(245)), "4m05s");
        assert_eq!(duration(Duration::from_secs(7380)), "2h03m");
    }

    #[test]
    fn phases_are_named_without_prefix() {
        assert_eq!(phase_name(5), "SUCCEEDED");
        assert_eq!(phase_name(2), "WAITING_FOR_RESOURCES");
        assert_eq!(phase_name(77), "PHASE_77");
        assert!(is_terminal(8));
        assert!(!is_terminal(9));
    }
}
