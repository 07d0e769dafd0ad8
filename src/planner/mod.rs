//! Planning helpers that sit between DataFusion's logical plan and Tidemark's storage:
//! what a query's predicates say about shard keys and time.

pub mod shard_key;
pub mod fragment;
pub mod generic;
pub mod yield_points;
