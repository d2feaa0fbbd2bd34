//! actionsd: Flyte v2's ActionsService over an action store: an embedded
//! SQLite file by default, or Postgres.

pub mod app;
pub mod blob;
pub mod client;
pub mod config;
pub mod ctl;
pub mod dev;
pub mod domain;
pub mod executor;
pub mod logs;
pub mod metrics;
pub mod pipeline;
pub mod proto;
pub mod retention;
pub mod rpc;
pub mod schema;
pub mod server;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tls;
