//! The official flyteidl2 schema, embedded as a descriptor set
//! (`proto/official/flyteidl2.binpb`, written by `proto/official/extract.py`
//! from the flyteidl2 package).
//!
//! actionsd's own protos declare the payloads it does not interpret
//! (TaskSpec, RunSpec, …) as `bytes`. That is exact on the binary wire, but
//! the proto3 JSON mapping of those fields is an object, not base64, and
//! two encodings of one message may order map entries differently. So:
//! - the Connect JSON codec transcodes JSON ↔ binary under this schema;
//! - a repeated Enqueue compares content under this schema, not bytes.

use std::sync::LazyLock;

use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};

static OFFICIAL: &[u8] = include_bytes!("../proto/official/flyteidl2.binpb");

/// The official flyteidl2 schema, plus actionsd's own services (which
/// import only flyteidl2 messages that both schemas share).
static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    let mut pool =
        DescriptorPool::decode(OFFICIAL).expect("the embedded flyteidl2 descriptor set is valid");
    let ours = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
        .expect("the generated descriptor set is valid");
    for file in ours.file {
        // actionsd's own protos, and the auth service (which the embedded
        // set lacks).
        if file.name().starts_with("actionsd/") || file.name().starts_with("flyteidl2/auth/") {
            pool.add_file_descriptor_proto(file)
                .expect("actionsd's protos fit the flyteidl2 schema");
        }
    }
    pool
});

/// Full names of the messages actionsd transcodes or compares.
pub mod names {
    pub const ACTION: &str = "flyteidl2.actions.Action";
    pub const RUN_SPEC: &str = "flyteidl2.task.RunSpec";
}

fn descriptor(full_name: &str) -> Result<prost_reflect::MessageDescriptor, String> {
    POOL.get_message_by_name(full_name)
        .ok_or_else(|| format!("unknown message type {full_name}"))
}

/// Parses proto3 JSON of `full_name` and encodes it in binary. Unknown JSON
/// fields are ignored, so newer clients keep working.
pub fn json_to_binary(full_name: &str, json: &[u8]) -> Result<Vec<u8>, String> {
    let descriptor = descriptor(full_name)?;
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let message = DynamicMessage::deserialize_with_options(
        descriptor,
        &mut deserializer,
        &DeserializeOptions::new().deny_unknown_fields(false),
    )
    .map_err(|e| e.to_string())?;
    deserializer.end().map_err(|e| e.to_string())?;
    Ok(message.encode_to_vec())
}

/// The full names of the request and response messages of the method at
/// `path` (`/package.Service/Method`), for any service actionsd serves.
pub fn method_messages(path: &str) -> Option<(String, String)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let method = POOL
        .get_service_by_name(service)?
        .methods()
        .find(|m| m.name() == method)?;
    Some((
        method.input().full_name().to_owned(),
        method.output().full_name().to_owned(),
    ))
}

/// Decodes a binary `full_name` and writes its proto3 JSON form.
pub fn binary_to_json(full_name: &str, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let message =
        DynamicMessage::decode(descriptor(full_name)?, bytes).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::new(&mut out);
    message
        .serialize_with_options(&mut serializer, &SerializeOptions::new())
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// Whether two encodings of `full_name` carry the same content: equal
/// bytes, or equal messages once decoded (map entry order and field order
/// do not matter).
pub fn same_content(full_name: &str, a: &[u8], b: &[u8]) -> bool {
    if a == b {
        return true;
    }
    let Ok(descriptor) = descriptor(full_name) else {
        return false;
    };
    match (
        DynamicMessage::decode(descriptor.clone(), a),
        DynamicMessage::decode(descriptor, b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_objects_for_opaque_payloads_round_trip() {
        let json =
            br#"{"action":{"actionId":{"run":{"project":"p","domain":"d","name":"r"},"name":"a0"},
            "task":{"spec":{"taskTemplate":{"type":"python-task"}},"queue":"q"}},
            "runSpec":{"queue":"gpu"},"someFutureField":1}"#;
        let binary = json_to_binary("flyteidl2.actions.EnqueueRequest", json).unwrap();
        let back = binary_to_json("flyteidl2.actions.EnqueueRequest", &binary).unwrap();
        let back: serde_json::Value = serde_json::from_slice(&back).unwrap();
        assert_eq!(
            back["action"]["task"]["spec"]["taskTemplate"]["type"],
            "python-task"
        );
        assert_eq!(back["runSpec"]["queue"], "gpu");
        assert!(json_to_binary("flyteidl2.actions.EnqueueRequest", b"{\"action\": 3}").is_err());
    }

    #[test]
    fn method_paths_name_their_messages() {
        assert_eq!(
            method_messages("/flyteidl2.actions.ActionsService/Enqueue"),
            Some((
                "flyteidl2.actions.EnqueueRequest".to_owned(),
                "flyteidl2.actions.EnqueueResponse".to_owned()
            ))
        );
        assert_eq!(
            method_messages("/actionsd.read.v1.ReadService/WatchRun"),
            Some((
                "actionsd.read.v1.WatchRunRequest".to_owned(),
                "actionsd.read.v1.WatchRunResponse".to_owned()
            ))
        );
        assert_eq!(
            method_messages("/actionsd.executor.v1.ExecutorService/Lease").map(|t| t.0),
            Some("actionsd.executor.v1.LeaseRequest".to_owned())
        );
        for unknown in [
            "/flyteidl2.actions.ActionsService/Nope",
            "/no.Such/Enqueue",
            "flyteidl2.actions.ActionsService/Enqueue",
            "/",
        ] {
            assert_eq!(method_messages(unknown), None, "{unknown}");
        }
    }

    #[test]
    fn content_comparison_ignores_map_order() {
        // A Literal with metadata {a: 1, b: 2}, entries in either order.
        let entry = |k: &str, v: &str| {
            let mut e = vec![0x0a, k.len() as u8];
            e.extend_from_slice(k.as_bytes());
            e.extend_from_slice(&[0x12, v.len() as u8]);
            e.extend_from_slice(v.as_bytes());
            let mut field = vec![0x2a, e.len() as u8];
            field.extend(e);
            field
        };
        let ab = [entry("a", "1"), entry("b", "2")].concat();
        let ba = [entry("b", "2"), entry("a", "1")].concat();
        assert_ne!(ab, ba);
        assert!(same_content("flyteidl2.core.Literal", &ab, &ba));
        let other = [entry("a", "1"), entry("b", "3")].concat();
        assert!(!same_content("flyteidl2.core.Literal", &ab, &other));
    }
}
