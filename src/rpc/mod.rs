//! RPC adapters: convert and validate generated types into domain
//! commands, call the store and pipeline, convert results back.

pub mod actions;
pub mod connect;
pub mod convert;
pub mod executor;
pub mod status;

pub use actions::ActionsApi;
