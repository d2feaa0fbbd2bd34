//! RPC adapters: convert and validate generated types into domain
//! commands, call the store and pipeline, convert results back.

pub mod actions;
pub mod codec;
pub mod connect;
pub mod convert;
pub mod edge;
pub mod executor;
pub mod read;
pub mod status;
pub mod watch;

pub use actions::ActionsApi;
pub use read::ReadApi;
pub mod blob_http;
pub mod flyte;
