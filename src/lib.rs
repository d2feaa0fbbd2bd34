//! actionsd: Flyte v2's ActionsService over a Postgres action store.

pub mod app;
pub mod config;
pub mod ctl;
pub mod domain;
pub mod executor;
pub mod pipeline;
pub mod proto;
pub mod rpc;
pub mod schema;
pub mod server;
pub mod store;
pub mod telemetry;
