//! The limits every request is checked against before it reaches a store,
//! the same for both backends. README's "Limits" section lists them; the
//! reasons are in docs/limits.md.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::Error;

/// Byte limits of the upstream schema (flyteidl2's `buf.validate` rules on
/// `RunIdentifier` and `ActionIdentifier`).
pub const MAX_ORG: usize = 63;
pub const MAX_PROJECT: usize = 63;
pub const MAX_DOMAIN: usize = 63;
pub const MAX_RUN_NAME: usize = 30;
pub const MAX_ACTION_NAME: usize = 30;

/// An abort reason is copied into every aborted descendant and its event.
pub const MAX_ABORT_REASON: usize = 1024;
/// An `ExecutionError`'s message, as an executor reports it.
pub const MAX_ERROR_MESSAGE: usize = 16 * 1024;
/// A condition's prompt and description.
pub const MAX_PROMPT: usize = 16 * 1024;
/// A signal's value (the encoded literal), kept on the condition and sent
/// with every update of it.
pub const MAX_SIGNAL_VALUE: usize = 16 * 1024;
/// A queue name (TaskAction.queue, RunSpec.queue, an executor's queue).
pub const MAX_QUEUE: usize = 256;
/// URIs: `input_uri`, `run_output_base`, an executor's `output_uri`, and
/// the strings of an `ActionAddress`.
pub const MAX_URI: usize = 2048;

/// The latest accepted time: the end of the protobuf `Timestamp` range
/// (9999-12-31T23:59:59.999999Z at microsecond precision, which both stores
/// keep).
pub fn max_time() -> DateTime<Utc> {
    DateTime::from_timestamp(253_402_300_799, 999_999_000).expect("a valid constant")
}

/// The earliest accepted time: the start of the protobuf `Timestamp` range,
/// 0001-01-01T00:00:00Z.
pub fn min_time() -> DateTime<Utc> {
    DateTime::from_timestamp(-62_135_596_800, 0).expect("a valid constant")
}

/// The longest accepted duration (condition timeouts): 100 years, so that
/// now + the duration stays inside the timestamp range for ~7,900 years.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600 + 25 * 24 * 3600);

/// Checks a client's time against the one accepted range.
pub fn check_time(field: &str, seconds: i64, nanos: i32) -> Result<DateTime<Utc>, Error> {
    let out_of_range = || {
        Error::invalid(
            field,
            "is outside the accepted range 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z",
        )
    };
    let nanos = u32::try_from(nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| Error::invalid(field, "nanos must be between 0 and 999,999,999"))?;
    let time = DateTime::from_timestamp(seconds, nanos).ok_or_else(out_of_range)?;
    if time < min_time() || time > max_time() {
        return Err(out_of_range());
    }
    Ok(time)
}

/// Checks a client's duration against the one accepted range: 0 to
/// [`MAX_DURATION`].
pub fn check_duration(field: &str, seconds: i64, nanos: i32) -> Result<Duration, Error> {
    let (Ok(secs), Ok(nanos)) = (u64::try_from(seconds), u32::try_from(nanos)) else {
        return Err(Error::invalid(field, "must not be negative"));
    };
    if nanos >= 1_000_000_000 {
        return Err(Error::invalid(
            field,
            "nanos must be between 0 and 999,999,999",
        ));
    }
    let duration = Duration::new(secs, nanos);
    if duration > MAX_DURATION {
        return Err(Error::invalid(
            field,
            format!(
                "is {secs} s; the limit is {} s (100 years)",
                MAX_DURATION.as_secs()
            ),
        ));
    }
    Ok(duration)
}

/// Checks a free-text field's length in bytes.
pub fn check_text(field: &str, value: &str, max: usize) -> Result<(), Error> {
    if value.len() > max {
        return Err(Error::invalid(
            field,
            format!("is {} bytes long; the limit is {max}", value.len()),
        ));
    }
    Ok(())
}

/// Checks one part of an identifier (org, project, domain, run or action
/// name, parent action name). The allowed set: at most `max` bytes of UTF-8,
/// with no control character (U+0000..U+001F, U+007F..U+009F) and no `/`,
/// which actionsd prints between the parts of an identifier.
pub fn check_id_part(field: &str, value: &str, max: usize, required: bool) -> Result<(), Error> {
    if required && value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    check_text(field, value, max)?;
    if let Some(bad) = value.chars().find(|c| c.is_control() || *c == '/') {
        return Err(Error::invalid(
            field,
            format!(
                "must not contain {}; identifiers exclude '/' and control characters",
                bad.escape_default()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_outside_the_protobuf_range_are_refused() {
        assert!(check_time("t", 253_402_300_799, 0).is_ok());
        assert!(check_time("t", -62_135_596_800, 0).is_ok());
        let err = check_time("status.end_time", 253_402_300_800, 0).unwrap_err();
        assert!(err.to_string().starts_with("status.end_time: is outside"));
        assert!(check_time("t", -62_135_596_801, 0).is_err());
        assert!(check_time("t", i64::MAX, 0).is_err());
        assert!(check_time("t", 0, -1).is_err());
        assert!(check_time("t", 0, 1_000_000_000).is_err());
    }

    #[test]
    fn durations_are_bounded() {
        assert_eq!(check_duration("d", 5, 0).unwrap(), Duration::from_secs(5));
        assert!(check_duration("d", MAX_DURATION.as_secs() as i64, 0).is_ok());
        let err = check_duration("action.condition.timeout", 9_000_000_000_000, 0).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("action.condition.timeout: is 9000000000000 s"));
        assert!(check_duration("d", -1, 0).is_err());
        assert!(check_duration("d", 0, -1).is_err());
        // The longest timeout from the latest plausible now stays in range.
        let year_2500 = DateTime::from_timestamp(16_725_225_600, 0).unwrap();
        assert!(year_2500 + MAX_DURATION < max_time());
    }

    #[test]
    fn identifiers_exclude_control_characters_and_slashes() {
        for bad in ["a\0b", "a\nb", "a\u{1b}[31m", "p/d", "\u{85}", "\u{7f}"] {
            let err = check_id_part("action_id.name", bad, 30, true).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("action_id.name: must not contain"),
                "{bad:?}: {err}"
            );
        }
        for good in ["a0", "my-run_1.x", "ünïcode", "a b", "x:y@z"] {
            assert!(check_id_part("f", good, 30, true).is_ok(), "{good:?}");
        }
        assert!(check_id_part("f", "", 30, false).is_ok());
        assert!(check_id_part("f", "", 30, true).is_err());
    }
}
