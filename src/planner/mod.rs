//! Planning helpers that sit between DataFusion's plans and Tidemark's pipelines:
//! fragmenting, generic plans of prepared statements, prepared statements shared by a
//! node's connections, yield points. (What a query's
//! predicates say about shard keys and time is `crate::shard_key`, below storage.)

pub mod fragment;
pub mod generic;
pub mod shared;
pub mod yield_points;
