//! The segment store on an S3 API: a real S3-compatible server (moto's, from PyPI, on
//! loopback), `object_store_url = s3://bucket/prefix`, ingestion from an `s3://` URL,
//! queries that match DuckDB, segments found as objects in the bucket and not on the
//! local disk, and the same answers after a kill -9 and a restart.
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{duckdb_rows, free_port, try_rows, wait_ready, NodeProcess};
use tidemark::datagen::{GenSpec, Generator};

const BUCKET: &str = "tidemark-it";
/// 2026-01-20 00:00:00 UTC.
const END_US: i64 = 1_768_867_200_000_000;

fn aws_env(cmd: &mut Command, endpoint: &str) {
    cmd.env("AWS_ENDPOINT", endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        // Path-style requests: the bucket is not a host name on loopback.
        .env("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false");
}

/// Runs a boto3 snippet against the server; `args` are passed as sys.argv[1:].
fn boto(endpoint: &str, code: &str, args: &[&str]) -> String {
    let script = format!(
        "import sys, boto3\ns3 = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1', aws_access_key_id='test', aws_secret_access_key='test')\n{code}"
    );
    let out = Command::new("python3").arg("-c").arg(script).arg(endpoint).args(args).output().expect("python3");
    assert!(out.status.success(), "boto3: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn start_s3(port: u16) -> NodeProcess {
    let probe = Command::new("python3").args(["-c", "import moto.server, boto3"]).output().expect("python3");
    assert!(
        probe.status.success(),
        "this test needs an S3 API server: python3 -m pip install 'moto[server]' (see .ci/run)"
    );
    let child = Command::new("python3")
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto server");
    let proc = NodeProcess::new(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "S3 server did not start within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    proc
}

fn start_node(dir: &Path, port: u16, endpoint: &str) -> NodeProcess {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidemark"));
    cmd.args(["serve", "--data-dir"])
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--object-store-url", &format!("s3://{BUCKET}/segments")])
        .env("TIDEMARK_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    aws_env(&mut cmd, endpoint);
    NodeProcess::new(cmd.spawn().expect("start tidemark"))
}

fn queries() -> Vec<String> {
    let e = tidemark::datagen::entity_id(3);
    vec![
        "SELECT count(*), count(DISTINCT entity_id), min(event_time), max(event_time) FROM usage".into(),
        "SELECT service, date_trunc('day', event_time) AS day, sum(quantity), count(*) FROM usage GROUP BY 1, 2 ORDER BY 1, 2".into(),
        format!("SELECT service, operation, sum(quantity) FROM usage WHERE entity_id = '{e}' GROUP BY 1, 2 ORDER BY 1, 2"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_on_an_s3_api_server() {
    let dir = tempfile::tempdir().unwrap();
    let s3_port = free_port();
    let endpoint = format!("http://127.0.0.1:{s3_port}");
    let _s3 = start_s3(s3_port);
    boto(&endpoint, "s3.create_bucket(Bucket=sys.argv[2])", &[BUCKET]);

    // The input file is itself an object in the bucket.
    let catalog = tidemark::catalog::Catalog::load_or_init(dir.path()).unwrap();
    let table = catalog.get("usage").cloned().unwrap();
    let gen = Generator::new(GenSpec { rows: 30_000, entities: 200, days: 10, seed: 5, end_us: END_US }, Arc::clone(&table.schema));
    let parquet = dir.path().join("input.parquet");
    let written = tidemark::datagen::write_parquet(&gen, &parquet, |_| {}).unwrap();
    boto(&endpoint, "s3.upload_file(sys.argv[2], sys.argv[3], 'in/usage.parquet')", &[parquet.to_str().unwrap(), BUCKET]);

    let data = dir.path().join("node");
    let port = free_port();
    let mut node = start_node(&data, port, &endpoint);
    let c = wait_ready(port).await;
    let copy = format!("COPY usage FROM 's3://{BUCKET}/in/usage.parquet' WITH (FORMAT parquet)");
    assert_eq!(c.execute(copy.as_str(), &[]).await.unwrap(), written);
    // The same object again stores nothing.
    assert_eq!(c.execute(copy.as_str(), &[]).await.unwrap(), 0);

    let qs = queries();
    let expected = duckdb_rows(&parquet, &qs);
    for (q, want) in qs.iter().zip(&expected) {
        assert_eq!(&try_rows(&c, q).await.unwrap_or_else(|e| panic!("{q}: {e}")), want, "{q}");
    }

    // Segments are objects under the prefix, and none is on the local disk.
    let listed = boto(
        &endpoint,
        "p = s3.get_paginator('list_objects_v2')\nfor page in p.paginate(Bucket=sys.argv[2], Prefix='segments/'):\n    for o in page.get('Contents', []):\n        print(o['Key'])",
        &[BUCKET],
    );
    let objects: Vec<&str> = listed.lines().filter(|k| k.ends_with(".parquet")).collect();
    let stored: i64 = try_rows(&c, "SELECT count(*) FROM system.segments").await.unwrap()[0][0].parse().unwrap();
    assert!(stored > 0);
    assert_eq!(objects.len() as i64, stored, "one object per segment: {listed}");
    let local_parquet = walkdir(&data).into_iter().filter(|p| p.ends_with(".parquet") && p.contains("segments")).count();
    assert_eq!(local_parquet, 0, "segments must not be written to the data directory");

    // kill -9 and restart: the manifest names objects that are still there.
    drop(c);
    node.kill_9();
    let _node = start_node(&data, port, &endpoint);
    let c = wait_ready(port).await;
    for (q, want) in qs.iter().zip(&expected) {
        assert_eq!(&try_rows(&c, q).await.unwrap_or_else(|e| panic!("{q}: {e}")), want, "after restart: {q}");
    }
}

fn walkdir(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}
