//! actionsd: Flyte v2's ActionsService over a Postgres action store.

pub mod app;
pub mod blob;
pub mod config;
pub mod ctl;
pub mod dev;
pub mod domain;
pub mod executor;
pub mod logs;
pub mod pipeline;
pub mod proto;
pub mod rpc;
pub mod schema;
pub mod server;
pub mod store;
pub mod telemetry;
