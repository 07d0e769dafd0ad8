//! Tidemark: a PostgreSQL-wire SQL gateway for usage data.
//!
//! See ARCHITECTURE.md for the bird's-eye view and the code map.

pub mod autoscale;
pub mod balancer;
pub mod catalog;
pub mod clock;
pub mod config;
pub mod copy_in;
pub mod datagen;

pub mod equilibrium;
pub mod error;
pub mod export;
pub mod frontend;

#[cfg(test)]
pub(crate) mod fixture;
pub mod forecast;
pub mod forecaster;
pub mod fsutil;
pub mod hot_shards;
pub mod ingest;
pub mod interrupt;
pub mod limits;
pub mod memory;
pub mod node;
pub mod patterns;
pub mod pg_datetime;
pub mod pg_numeric;
pub mod pg_functions;
pub mod pipeline;
pub mod param_udf;
pub mod planner;
pub mod query_log;
pub mod raft;
pub mod replay;
pub mod router;
pub mod scaler;
pub mod session;
pub mod shard_key;
pub mod shard_map;
pub mod sim;
pub mod storage;
pub mod system;
pub mod write_token;

pub use error::{Error, Result};
