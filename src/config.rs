//! Node configuration: defaults, then a TOML file, then `TIDEMARK_*` environment
//! variables, then command-line flags (flags win).
//!
//! Owns: the names, units and defaults of every limit and knob.
//! Must never: read the environment or files after start-up; everything else gets a
//! `Config` value.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory for the manifest, catalog, query log and (by default) segments.
    pub data_dir: PathBuf,
    /// pgwire listen address.
    pub listen: SocketAddr,
    /// Where segments live: `None` = `<data_dir>/segments` on the local disk, or a URL
    /// such as `file:///path` or `s3://bucket/prefix` (credentials from the usual
    /// `AWS_*` environment variables).
    pub object_store_url: Option<String>,
    /// Number of shards a table is split into (fixed when the table is created).
    pub shard_count: u32,
    /// Width of a segment's time window, in seconds.
    pub segment_window_secs: u64,
    /// Rows of a segment's Parquet row group.
    pub segment_row_group_rows: usize,
    /// Connections served at once; more are refused with SQLSTATE 53300.
    pub connections_max: usize,
    /// Statements that run longer are cancelled with 57014 (0 = no limit).
    pub statement_timeout_ms: u64,
    /// How fragments are routed among a shard's replicas: `least_in_flight` (default),
    /// `predictive`, `power_of_two` or `round_robin`; a session may choose another
    /// with `SET tidemark.routing_policy`.
    pub routing_policy: String,
    /// Pipelines sized ahead of the load: `off` (default), `predictive` (from the
    /// forecast's upper bound) or `reactive` (from the measured rate); see `autoscale`.
    pub autoscale: String,
    /// How often the autoscaler decides, in milliseconds.
    pub autoscale_interval_ms: u64,
    /// In-process pipelines the autoscaler keeps at least / at most (0 = twice
    /// `pipelines`, or the core count).
    pub autoscale_pipelines_min: u32,
    pub autoscale_pipelines_max: u32,
    /// The fleet's utilization the autoscaler sizes for.
    pub autoscale_target_utilization: f64,
    /// Extra replicas for hot shards: `off` (default), `predictive` (ahead of the
    /// forecast's upper bound per shard, never below the measured rate) or `reactive`
    /// (from the rate measured per shard); decided every `autoscale_interval_ms` for
    /// the `autoscale_target_utilization`; see `hot_shards`.
    pub hot_shards: String,
    /// On a node with peers, the commands run (with `sh -c`, the target in
    /// `TIDEMARK_SCALE_TARGET` and the current count in `TIDEMARK_SCALE_CURRENT`) to add
    /// or remove capacity, for example to start or stop a container.
    pub scale_up_command: Option<String>,
    pub scale_down_command: Option<String>,
    /// A fault for routing experiments: the in-process pipeline with this id (`n1.p1`)
    /// holds each fragment's slot `fault_slow_ms` longer, starting
    /// `fault_slow_after_secs` after start (instead of `fault_fragment_ms`). Off when
    /// unset.
    pub fault_slow_pipeline: Option<String>,
    pub fault_slow_ms: u64,
    pub fault_slow_after_secs: u64,
    /// A workload knob for experiments: every fragment on every in-process pipeline
    /// (those the autoscaler starts too) holds its slot this many milliseconds longer,
    /// as heavier queries would; 0 = off.
    pub fault_fragment_ms: u64,
    /// Largest COPY FROM payload (STDIN or a server-side file) accepted in one statement.
    pub copy_bytes_max: u64,
    /// Directories that `COPY ... FROM 'path'` and `COPY ... TO 'path'` may read and
    /// write (relative paths are taken from the data directory); empty = the data
    /// directory's `import/` and `export/`. Nothing outside them, no `..` escape, no
    /// symbolic link out of them.
    pub copy_dirs: Vec<PathBuf>,
    /// `COPY ... TO 'path'` may replace an existing file (otherwise 58P02).
    pub copy_overwrite: bool,
    /// A connection that has not finished its start-up (authentication) this long
    /// after it was accepted is closed.
    pub startup_timeout_ms: u64,
    /// Connections still in start-up at once; when full, the oldest one is closed to
    /// make room, so idle sockets cannot keep real clients out.
    pub startup_pending_max: usize,
    /// Connections from one source address at once (53300 beyond).
    pub connections_per_address_max: usize,
    /// Of `connections_max`, connections kept for clients on a loopback address (local
    /// administration) once the others are taken.
    pub reserved_connections: usize,
    /// Named prepared statements and portals one connection may hold (53400 beyond).
    pub prepared_statements_max: usize,
    /// Bytes of a statement's text kept in the query log (longer text is cut, with a
    /// marker).
    pub query_log_text_bytes_max: usize,
    /// Deepest expression or query nesting a statement may have (54001 beyond), so
    /// that no statement can overflow a planner's stack.
    pub expression_depth_max: usize,
    /// Parameters (`$n`) a statement may have (54000 beyond; the protocol's limit is
    /// 65,535).
    pub statement_params_max: usize,
    /// Memory one query's operators may hold (sorts, joins, aggregates); beyond it
    /// they spill where DataFusion can, else the query fails with 53200. 0 = no
    /// per-query limit.
    pub query_memory_bytes_max: u64,
    /// Memory all queries of the node may hold together (0 = no limit).
    pub node_memory_bytes_max: u64,
    /// Query-log entries kept in memory before the oldest unflushed ones are dropped.
    pub query_log_memory_rows_max: usize,
    /// How often the query log is written to disk.
    pub query_log_flush_interval_ms: u64,
    /// Bytes of persisted query log kept on disk; the oldest files go first.
    pub query_log_disk_bytes_max: u64,
    /// How often the background compactor looks for small segments to merge.
    pub compaction_interval_ms: u64,
    /// A (shard, window) with at least this many segments is compacted into one.
    pub compaction_segments_min: usize,
    /// Rows held in the write buffer (durable in its write-ahead log) before they are
    /// flushed into segments; 0 turns the buffer off (every statement writes segments).
    pub write_buffer_rows_max: usize,
    /// Statements with more rows than this bypass the buffer and write segments.
    pub write_buffer_statement_rows_max: usize,
    /// Buffered rows are flushed at the latest this long after the first arrived.
    pub write_buffer_flush_interval_ms: u64,
    /// Bytes of segment files kept in memory on this node (least recently used
    /// evicted), split evenly among its pipelines; 0 = off.
    pub segment_cache_bytes_max: u64,
    /// Bytes of decoded segment columns ("hot segments") kept in memory on this node
    /// (least recently used evicted), split evenly among its pipelines; 0 = off.
    pub hot_cache_bytes_max: u64,
    /// This node's id in the cluster (pipelines are named `n<node_id>.p<index>`).
    pub node_id: u64,
    /// Address of the internal Arrow Flight service that other nodes send fragments
    /// to; `None` = no service (a one-node cluster needs none).
    pub internal_addr: Option<SocketAddr>,
    /// The other nodes, as `node_id=host:port` of their internal addresses.
    pub peers: Vec<String>,
    /// Copies of each shard, one per node (capped by the node count): 1 = this node
    /// alone holds its shards (peers only run fragments, reading a shared store);
    /// more = each shard's Raft group spans every node (a replication factor below
    /// the node count is not supported yet).
    pub replication_factor: u32,
    /// Read-your-writes: how long a read waits for this node's replica to apply the
    /// session's writes (its write token) before it fails with 57P03.
    pub read_wait_ms_max: u64,
    /// In-process pipelines on this node; unset = one per core; 0 = a pure gateway
    /// that runs every fragment on its peers.
    pub pipelines: Option<u32>,
    /// Pipelines each peer runs (until the metadata group tells, every node is
    /// assumed to run this many; 0 = one per core of this machine).
    pub peer_pipelines: u32,
    /// Fragments a pipeline runs at once.
    pub pipeline_slots: u32,
    /// Fragments that may wait for a slot; more are refused with 53000.
    pub pipeline_queue_max: u32,
    /// Pipelines holding each shard (routing candidates).
    pub shard_replicas: u32,
    /// A remote fragment that sends nothing for this long is abandoned (and retried
    /// on another replica if it had sent no rows).
    pub fragment_timeout_ms: u64,
    /// Routing decisions kept for `system.routing_decisions`.
    pub routing_log_rows_max: usize,
    /// This node only reads the segment store (it neither writes, compacts nor
    /// removes files there): for nodes that share another node's store until
    /// shards are replicated with Raft.
    pub segment_store_read_only: bool,
    /// Width of a query-pattern / forecast bucket, in seconds (clock time).
    pub forecast_bucket_secs: u64,
    /// History the forecasts are fitted on, in days.
    pub forecast_history_days: u64,
    /// How far ahead forecasts go, in hours.
    pub forecast_horizon_hours: u64,
    /// (entity, service, operation) patterns forecast individually (the busiest).
    pub forecast_patterns_max: usize,
    /// Series refitted per forecast cycle at most (total, shards, then patterns).
    pub forecast_series_per_cycle_max: usize,
    /// Distinct patterns counted per bucket; further ones are aggregated as `*other*`.
    pub pattern_keys_per_bucket_max: usize,
    /// How often forecasts are refitted, in seconds of clock time; 0 = never.
    pub forecast_interval_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("tidemark-data"),
            listen: "127.0.0.1:5433".parse().expect("static address"),
            object_store_url: None,
            shard_count: 8,
            segment_window_secs: 86_400,
            segment_row_group_rows: 64 * 1024,
            connections_max: 256,
            statement_timeout_ms: 0,
            routing_policy: "least_in_flight".into(),
            autoscale: "off".into(),
            autoscale_interval_ms: 10_000,
            autoscale_pipelines_min: 1,
            autoscale_pipelines_max: 0,
            autoscale_target_utilization: 0.7,
            hot_shards: "off".into(),
            scale_up_command: None,
            scale_down_command: None,
            fault_slow_pipeline: None,
            fault_slow_ms: 0,
            fault_slow_after_secs: 0,
            fault_fragment_ms: 0,
            copy_bytes_max: 1 << 30,
            copy_dirs: Vec::new(),
            copy_overwrite: false,
            startup_timeout_ms: 10_000,
            startup_pending_max: 64,
            connections_per_address_max: 128,
            reserved_connections: 3,
            prepared_statements_max: 1_000,
            query_log_text_bytes_max: 4_096,
            expression_depth_max: 4_000,
            statement_params_max: 65_535,
            query_memory_bytes_max: 1 << 30,
            node_memory_bytes_max: 4 << 30,
            query_log_memory_rows_max: 100_000,
            query_log_flush_interval_ms: 1_000,
            query_log_disk_bytes_max: 1 << 30,
            compaction_interval_ms: 5_000,
            compaction_segments_min: 4,
            write_buffer_rows_max: 50_000,
            write_buffer_statement_rows_max: 10_000,
            write_buffer_flush_interval_ms: 2_000,
            segment_cache_bytes_max: 512 << 20,
            hot_cache_bytes_max: 1 << 30,
            node_id: 1,
            internal_addr: None,
            peers: Vec::new(),
            replication_factor: 3,
            read_wait_ms_max: 5_000,
            pipelines: None,
            peer_pipelines: 0,
            pipeline_slots: 2,
            pipeline_queue_max: 256,
            shard_replicas: 2,
            fragment_timeout_ms: 30_000,
            routing_log_rows_max: 10_000,
            segment_store_read_only: false,
            forecast_bucket_secs: 300,
            forecast_history_days: 28,
            forecast_horizon_hours: 24,
            forecast_patterns_max: 20,
            forecast_series_per_cycle_max: 64,
            pattern_keys_per_bucket_max: 1000,
            forecast_interval_secs: 300,
        }
    }
}

/// The environment variables read by [`Config::load`], with the field each one sets.
pub const ENV_VARS: &[&str] = &[
    "TIDEMARK_DATA_DIR",
    "TIDEMARK_LISTEN",
    "TIDEMARK_OBJECT_STORE_URL",
    "TIDEMARK_SHARD_COUNT",
    "TIDEMARK_SEGMENT_WINDOW_SECS",
    "TIDEMARK_CONNECTIONS_MAX",
    "TIDEMARK_STATEMENT_TIMEOUT_MS",
    "TIDEMARK_ROUTING_POLICY",
    "TIDEMARK_AUTOSCALE",
    "TIDEMARK_HOT_SHARDS",
    "TIDEMARK_AUTOSCALE_INTERVAL_MS",
    "TIDEMARK_FAULT_SLOW_PIPELINE",
    "TIDEMARK_FAULT_SLOW_MS",
    "TIDEMARK_FAULT_SLOW_AFTER_SECS",
    "TIDEMARK_FAULT_FRAGMENT_MS",
    "TIDEMARK_QUERY_LOG_MEMORY_ROWS_MAX",
    "TIDEMARK_COMPACTION_INTERVAL_MS",
    "TIDEMARK_WRITE_BUFFER_ROWS_MAX",
    "TIDEMARK_NODE_ID",
    "TIDEMARK_INTERNAL_ADDR",
    "TIDEMARK_PEERS",
    "TIDEMARK_PIPELINES",
    "TIDEMARK_PIPELINE_SLOTS",
];

impl Config {
    /// Defaults, overlaid by `file` (TOML) if given, then by `env` (name, value) pairs.
    /// Flags are applied by the caller afterwards.
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config> {
        let mut cfg = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
                toml::from_str::<Config>(&text)
                    .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
            }
            None => Config::default(),
        };
        for (key, value) in env {
            cfg.apply_env(&key, &value)?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn apply_env(&mut self, key: &str, value: &str) -> Result<()> {
        fn num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T> {
            v.parse().map_err(|_| Error::Config(format!("{key}: cannot parse {v:?} as a number")))
        }
        match key {
            "TIDEMARK_DATA_DIR" => self.data_dir = PathBuf::from(value),
            "TIDEMARK_LISTEN" => {
                self.listen = value
                    .parse()
                    .map_err(|_| Error::Config(format!("{key}: not a socket address: {value:?}")))?
            }
            "TIDEMARK_OBJECT_STORE_URL" => self.object_store_url = Some(value.to_string()),
            "TIDEMARK_SHARD_COUNT" => self.shard_count = num(key, value)?,
            "TIDEMARK_HOT_CACHE_BYTES_MAX" => self.hot_cache_bytes_max = num(key, value)?,
            "TIDEMARK_SEGMENT_WINDOW_SECS" => self.segment_window_secs = num(key, value)?,
            "TIDEMARK_CONNECTIONS_MAX" => self.connections_max = num(key, value)?,
            "TIDEMARK_STATEMENT_TIMEOUT_MS" => self.statement_timeout_ms = num(key, value)?,
            "TIDEMARK_ROUTING_POLICY" => self.routing_policy = value.to_string(),
            "TIDEMARK_AUTOSCALE" => self.autoscale = value.to_string(),
            "TIDEMARK_HOT_SHARDS" => self.hot_shards = value.to_string(),
            "TIDEMARK_AUTOSCALE_INTERVAL_MS" => self.autoscale_interval_ms = num(key, value)?,
            "TIDEMARK_FAULT_SLOW_PIPELINE" => self.fault_slow_pipeline = Some(value.to_string()),
            "TIDEMARK_FAULT_SLOW_MS" => self.fault_slow_ms = num(key, value)?,
            "TIDEMARK_FAULT_SLOW_AFTER_SECS" => self.fault_slow_after_secs = num(key, value)?,
            "TIDEMARK_FAULT_FRAGMENT_MS" => self.fault_fragment_ms = num(key, value)?,
            "TIDEMARK_QUERY_LOG_MEMORY_ROWS_MAX" => self.query_log_memory_rows_max = num(key, value)?,
            "TIDEMARK_COMPACTION_INTERVAL_MS" => self.compaction_interval_ms = num(key, value)?,
            "TIDEMARK_WRITE_BUFFER_ROWS_MAX" => self.write_buffer_rows_max = num(key, value)?,
            "TIDEMARK_NODE_ID" => self.node_id = num(key, value)?,
            "TIDEMARK_INTERNAL_ADDR" => {
                self.internal_addr = Some(
                    value.parse().map_err(|_| Error::Config(format!("{key}: not a socket address: {value:?}")))?,
                )
            }
            "TIDEMARK_PEERS" => {
                self.peers = value.split(',').map(str::trim).filter(|p| !p.is_empty()).map(String::from).collect()
            }
            "TIDEMARK_PIPELINES" => self.pipelines = Some(num(key, value)?),
            "TIDEMARK_REPLICATION_FACTOR" => self.replication_factor = num(key, value)?,
            "TIDEMARK_READ_WAIT_MS_MAX" => self.read_wait_ms_max = num(key, value)?,
            "TIDEMARK_PIPELINE_SLOTS" => self.pipeline_slots = num(key, value)?,
            _ => {}
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<()> {
        if !matches!(self.autoscale.as_str(), "off" | "predictive" | "reactive") {
            return Err(Error::Config(format!("autoscale must be off, predictive or reactive; got {:?}", self.autoscale)));
        }
        if !matches!(self.hot_shards.as_str(), "off" | "predictive" | "reactive") {
            return Err(Error::Config(format!("hot_shards must be off, predictive or reactive; got {:?}", self.hot_shards)));
        }
        if !(self.autoscale_target_utilization > 0.0 && self.autoscale_target_utilization <= 1.0) {
            return Err(Error::Config("autoscale_target_utilization must be in (0, 1]".into()));
        }
        if crate::router::Policy::parse(&self.routing_policy).is_none() {
            return Err(Error::Config(format!(
                "routing_policy must be one of round_robin, least_in_flight, power_of_two, predictive; got {:?}",
                self.routing_policy
            )));
        }
        if self.shard_count == 0 || self.shard_count > 65_536 {
            return Err(Error::Config(format!("shard_count must be in 1..=65536, got {}", self.shard_count)));
        }
        if self.segment_window_secs == 0 {
            return Err(Error::Config("segment_window_secs must be positive".into()));
        }
        if self.segment_row_group_rows == 0 {
            return Err(Error::Config("segment_row_group_rows must be positive".into()));
        }
        if self.query_log_memory_rows_max == 0 {
            return Err(Error::Config("query_log_memory_rows_max must be positive".into()));
        }
        if self.connections_max == 0 {
            return Err(Error::Config("connections_max must be positive".into()));
        }
        if self.reserved_connections >= self.connections_max {
            return Err(Error::Config("reserved_connections must be below connections_max".into()));
        }
        if self.startup_pending_max == 0 || self.connections_per_address_max == 0 {
            return Err(Error::Config("startup_pending_max and connections_per_address_max must be positive".into()));
        }
        if self.expression_depth_max == 0 || self.statement_params_max > 65_535 {
            return Err(Error::Config("expression_depth_max must be positive and statement_params_max at most 65535".into()));
        }
        if self.pipeline_slots == 0 {
            return Err(Error::Config("pipeline_slots must be positive".into()));
        }
        if self.shard_replicas == 0 {
            return Err(Error::Config("shard_replicas must be positive".into()));
        }
        if self.forecast_bucket_secs == 0 || self.forecast_bucket_secs > 86_400 {
            return Err(Error::Config(format!("forecast_bucket_secs must be in 1..=86400, got {}", self.forecast_bucket_secs)));
        }
        if self.forecast_history_days == 0 || self.forecast_horizon_hours == 0 {
            return Err(Error::Config("forecast_history_days and forecast_horizon_hours must be positive".into()));
        }
        if self.routing_log_rows_max == 0 {
            return Err(Error::Config("routing_log_rows_max must be positive".into()));
        }
        let peers = self.parsed_peers()?;
        if peers.iter().any(|(id, _)| *id == self.node_id) {
            return Err(Error::Config(format!("peers name this node's own id {}", self.node_id)));
        }
        let nodes = peers.len() as u32 + 1;
        if self.replication_factor == 0 {
            return Err(Error::Config("replication_factor must be positive".into()));
        }
        if nodes > 1 && self.replication_factor > 1 && !self.segment_store_read_only {
            if self.replication_factor < nodes {
                return Err(Error::Config(format!(
                    "replication_factor {} below the node count {nodes} is not supported yet: use {nodes} (every node holds every shard) or 1",
                    self.replication_factor
                )));
            }
            if self.internal_addr.is_none() {
                return Err(Error::Config("a node whose shards replicate to peers needs internal_addr".into()));
            }
        }
        if self.local_pipelines() == 0 && self.replicas_span_nodes() {
            return Err(Error::Config(
                "pipelines = 0 with replicated shards: each node reads its own replica, so it needs pipelines of its own".into(),
            ));
        }
        if self.local_pipelines() == 0 && peers.is_empty() {
            return Err(Error::Config("pipelines = 0 needs peers to run queries on".into()));
        }
        Ok(())
    }

    /// The directories server-side COPY may use, absolute (see `copy_dirs`).
    pub fn copy_dirs(&self) -> Vec<PathBuf> {
        if self.copy_dirs.is_empty() {
            return vec![self.data_dir.join("import"), self.data_dir.join("export")];
        }
        self.copy_dirs.iter().map(|d| if d.is_absolute() { d.clone() } else { self.data_dir.join(d) }).collect()
    }

    /// `peers` as (node id, internal address), sorted by id.
    pub fn parsed_peers(&self) -> Result<Vec<(u64, SocketAddr)>> {
        let mut out = Vec::new();
        for p in &self.peers {
            let bad = || Error::Config(format!("peer {p:?}: expected node_id=host:port"));
            let (id, addr) = p.split_once('=').ok_or_else(bad)?;
            let id: u64 = id.trim().parse().map_err(|_| bad())?;
            let addr: SocketAddr = addr.trim().parse().map_err(|_| bad())?;
            if out.iter().any(|(i, _)| *i == id) {
                return Err(Error::Config(format!("peer id {id} appears twice")));
            }
            out.push((id, addr));
        }
        out.sort();
        Ok(out)
    }

    fn cores() -> u32 {
        std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(2)
    }

    /// In-process pipelines this node runs.
    pub fn local_pipelines(&self) -> u32 {
        self.pipelines.unwrap_or_else(Self::cores)
    }

    /// Whether each shard's Raft group spans the nodes (`replication_factor` above 1
    /// with peers): every node then holds its own replica of every shard.
    pub fn replicas_span_nodes(&self) -> bool {
        !self.peers.is_empty() && self.replication_factor > 1 && !self.segment_store_read_only
    }

    /// Pipelines each peer is assumed to run.
    pub fn peer_pipeline_count(&self) -> u32 {
        if self.peer_pipelines == 0 {
            Self::cores()
        } else {
            self.peer_pipelines
        }
    }

    /// Environment pairs relevant to Tidemark, read once at start-up.
    pub fn env_from_process() -> Vec<(String, String)> {
        std::env::vars().filter(|(k, _)| k.starts_with("TIDEMARK_")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.toml");
        std::fs::write(&file, "shard_count = 4\nlisten = \"127.0.0.1:6000\"\n").unwrap();
        let cfg = Config::load(
            Some(&file),
            vec![("TIDEMARK_LISTEN".to_string(), "127.0.0.1:7000".to_string())],
        )
        .unwrap();
        assert_eq!(cfg.shard_count, 4);
        assert_eq!(cfg.listen.port(), 7000);
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(Config::load(None, vec![("TIDEMARK_SHARD_COUNT".into(), "x".into())]).is_err());
        assert!(Config::load(None, vec![("TIDEMARK_SHARD_COUNT".into(), "0".into())]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.toml");
        std::fs::write(&file, "no_such_knob = 1\n").unwrap();
        assert!(Config::load(Some(&file), vec![]).is_err());
    }
}
