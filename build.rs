//! Generates the flyteidl2 message and service code from `proto/`.
//!
//! Protos are compiled with protox (a pure-Rust protobuf compiler), so
//! building actionsd needs no `protoc` on the machine.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "flyteidl2/actions/actions_service.proto",
    "actionsd/executor/v1/executor.proto",
    "actionsd/read/v1/read.proto",
    "flyteidl2/cluster/service.proto",
    "flyteidl2/dataproxy/dataproxy_service.proto",
    "flyteidl2/workflow/run_service.proto",
    "flyteidl2/auth/auth_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // Migrations are embedded by sqlx::migrate!; a new file must rebuild.
    println!("cargo:rerun-if-changed=migrations");
    // The Postgres variants of the test suite run when DATABASE_URL names a
    // server; without it they are reported as ignored, never as passed.
    println!("cargo:rustc-check-cfg=cfg(actionsd_postgres)");
    println!("cargo:rerun-if-env-changed=DATABASE_URL");
    if env::var_os("DATABASE_URL").is_some_and(|v| !v.is_empty()) {
        println!("cargo:rustc-cfg=actionsd_postgres");
    }
    // Embedded by src/schema.rs.
    println!("cargo:rerun-if-changed=proto/official/flyteidl2.binpb");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let fds = protox::compile(PROTOS, ["proto"])?;
    let descriptors = prost::Message::encode_to_vec(&fds);
    // The descriptor set is kept for gRPC server reflection.
    std::fs::write(out_dir.join("actionsd_descriptor.bin"), &descriptors)?;

    tonic_prost_build::configure()
        // Deterministic encoding: the stored encoding of an enqueued action
        // is compared byte for byte on idempotent re-enqueue.
        .btree_map(".")
        .bytes(".")
        // Undecodable messages are INVALID_ARGUMENT, like Connect's (see
        // rpc::codec).
        .codec_path("crate::rpc::codec::Codec")
        .compile_fds(fds)?;
    Ok(())
}
