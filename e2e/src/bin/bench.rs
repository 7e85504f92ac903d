//! `make bench`: etcd-syncer and `etcdctl make-mirror` side by side on the
//! same data, on loopback and across a 30 ms round trip (the link proxy),
//! reported as ratios and written to `docs/benchmarks.md`.
//!
//! Both tools are timed from process start until the destination holds the
//! expected number of keys: make-mirror by polling a key count every 20 ms,
//! etcd-syncer by its "Full sync finished." log line (then the count is
//! checked once), so the bench does not load the destination it measures.
//! The full sync is also measured against the destination's batched-writer
//! ceiling in the same run (`BENCH_FULL_SYNC_ONLY=1` runs only that).

use std::fmt::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use e2e::load::Load;
use e2e::proxy::LinkProxy;
use e2e::{mirror_args, put_many, EtcdCluster, Role, Syncer};
use etcd_client::{GetOptions, Txn, TxnOp};

const PREFIX: &str = "/bench/";
const ONE_WAY: Duration = Duration::from_millis(15);

struct Row {
    scenario: String,
    syncer: String,
    make_mirror: String,
    ratio: String,
    target: String,
}

#[derive(Clone, Copy)]
struct Sizes {
    full_sync_keys: usize,
    rtt_full_sync_keys: usize,
    make_mirror_rtt_window: Duration,
    incremental_revisions: usize,
    memory_large_keys: usize,
    make_mirror_cap: Duration,
    lease_count: usize,
    leased_keys: usize,
    lease_window: Duration,
}

impl Sizes {
    fn from_env() -> Self {
        if std::env::var("BENCH_QUICK").is_ok() {
            Self {
                full_sync_keys: 20_000,
                rtt_full_sync_keys: 5_000,
                make_mirror_rtt_window: Duration::from_secs(5),
                incremental_revisions: 4_000,
                memory_large_keys: 100_000,
                make_mirror_cap: Duration::from_secs(10),
                lease_count: 1_000,
                leased_keys: 10_000,
                lease_window: Duration::from_secs(60),
            }
        } else {
            Self {
                full_sync_keys: 100_000,
                rtt_full_sync_keys: 20_000,
                make_mirror_rtt_window: Duration::from_secs(20),
                incremental_revisions: 20_000,
                memory_large_keys: 1_000_000,
                make_mirror_cap: Duration::from_secs(30),
                lease_count: 10_000,
                leased_keys: 100_000,
                lease_window: Duration::from_secs(120),
            }
        }
    }
}

/// Time until `dest` holds `expected` keys under the prefix, or the count
/// reached when `cap` runs out.
async fn wait_for_count(
    dest: &EtcdCluster,
    expected: i64,
    started: Instant,
    cap: Duration,
) -> Result<(Duration, i64)> {
    let mut client = dest.client().await?;
    loop {
        let reached = client
            .get(
                PREFIX,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await?
            .count();
        if reached >= expected || started.elapsed() >= cap {
            return Ok((started.elapsed(), reached));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn spawn_make_mirror(source: &EtcdCluster, dest_endpoint: &str) -> Result<Child> {
    // Endpoints are always explicit: etcdctl's default is 127.0.0.1:2379,
    // which may be someone else's server.
    let mut command = Command::new(e2e::etcd::etcdctl_binary());
    command
        .arg(format!("--endpoints={}", source.endpoints_arg()))
        .arg("make-mirror")
        .arg(format!("--prefix={PREFIX}"))
        .arg(dest_endpoint)
        .env("ETCDCTL_API", "3")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command.spawn().context("spawn etcdctl make-mirror")
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("VmHWM")?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse()?;
    Ok(kib / 1024.0)
}

async fn start_syncer(
    source: &EtcdCluster,
    dest: &EtcdCluster,
    dest_endpoint: Option<&str>,
    name: &str,
) -> Result<Syncer> {
    let mut args = mirror_args(source, dest, PREFIX);
    if let Some(endpoint) = dest_endpoint {
        let at = args
            .iter()
            .position(|a| a == "--dst-endpoints")
            .context("dst flag")?
            + 1;
        args[at] = endpoint.to_string();
    }
    args.extend(["--job-name".to_string(), "bench".to_string()]);
    args.extend(extra_syncer_args());
    Syncer::start(name, &args).await
}

async fn wait_watching(syncer: &Syncer) -> Result<()> {
    e2e::eventually(Duration::from_secs(120), "syncer watching", || async {
        Ok(syncer
            .metric(
                "etcd_syncer_job_state",
                &[("job", "bench"), ("state", "watching")],
            )
            .await?
            == 1.0)
    })
    .await
}

/// The bench's key set: `keys` keys of 100 B under PREFIX, in key order.
/// The source is loaded with it and the ceiling writes it, so both
/// measure the same keys and values by construction.
fn bench_key(i: usize) -> String {
    format!("{PREFIX}key-{i:07}")
}

fn bench_value() -> String {
    // put_many's shape: a tag, then filler up to 100 B.
    format!("v1:{}", "v".repeat(97))
}

/// etcd's default `--max-txn-ops`: the most puts one txn may hold.
const CEILING_TXN_OPS: usize = 128;
/// The ceiling's writer counts; the best one is the reference.
const CEILING_WRITERS: [usize; 4] = [1, 2, 4, 8];

/// Puts the bench key set into `cluster` with `writers` concurrent
/// writers, each taking the next 128 keys in key order (as a full sync
/// sends them); returns the wall time from the first txn to the last commit.
async fn batched_write(cluster: &EtcdCluster, keys: usize, writers: usize) -> Result<Duration> {
    let client = cluster.client().await?;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let value = bench_value();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..writers {
        let mut client = client.clone();
        let next = next.clone();
        let value = value.clone();
        tasks.spawn(async move {
            loop {
                let start = next.fetch_add(CEILING_TXN_OPS, std::sync::atomic::Ordering::Relaxed);
                if start >= keys {
                    return anyhow::Ok(());
                }
                let ops: Vec<TxnOp> = (start..(start + CEILING_TXN_OPS).min(keys))
                    .map(|i| TxnOp::put(bench_key(i), value.clone(), None))
                    .collect();
                client.txn(Txn::new().and_then(ops)).await?;
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(started.elapsed())
}

/// A source etcd holding the bench key set.
async fn loaded_source(keys: usize) -> Result<EtcdCluster> {
    let source = EtcdCluster::start_source().await?;
    batched_write(&source, keys, 4).await?;
    Ok(source)
}

/// One writer count's run of the ceiling.
struct CeilingRun {
    writers: usize,
    rate: f64,
    /// The destination etcd's CPU seconds per 100k keys.
    dest_cpu_per_100k: f64,
}

/// The destination's batched-writer ceiling: the bench key set in 128-op
/// txns into a fresh, empty etcd, for each of 1/2/4/8 writers; the best
/// rate is the reference the full sync is measured against.
async fn batched_writer_ceiling(keys: usize) -> Result<Vec<CeilingRun>> {
    let mut runs = Vec::new();
    for writers in CEILING_WRITERS {
        let dest = EtcdCluster::start_dest().await?;
        let cpu_before = etcd_cpu_seconds(&dest).await?;
        let elapsed = batched_write(&dest, keys, writers).await?;
        let cpu = etcd_cpu_seconds(&dest).await? - cpu_before;
        runs.push(CeilingRun {
            writers,
            rate: rate(keys as f64, elapsed),
            dest_cpu_per_100k: cpu * 100_000.0 / keys as f64,
        });
    }
    Ok(runs)
}

fn best_ceiling(runs: &[CeilingRun]) -> &CeilingRun {
    runs.iter()
        .max_by(|a, b| a.rate.total_cmp(&b.rate))
        .expect("at least one writer count")
}

/// An etcd server's own CPU seconds so far (its `process_cpu_seconds_total`).
async fn etcd_cpu_seconds(cluster: &EtcdCluster) -> Result<f64> {
    Ok(e2e::metric_value(
        &cluster.server_metrics().await?,
        "process_cpu_seconds_total",
        &[],
    ))
}

/// A process's CPU seconds so far (user + system, from /proc).
fn process_cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which ends at the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // CLK_TCK is 100 on Linux.
    Ok(ticks / 100.0)
}

/// Extra flags for the syncer under test (`BENCH_SYNCER_ARGS="--page-size
/// 5000"`), to tune defaults by measurement without a rebuild.
fn extra_syncer_args() -> Vec<String> {
    std::env::var("BENCH_SYNCER_ARGS")
        .map(|a| a.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Full syncs the ceiling rows take the best of: the ceiling is the best
/// of four runs (its writer counts), so on a noisy machine one full sync
/// against it would be compared with a lucky draw.
const FULL_SYNC_RUNS: usize = 3;

/// The best rate of `first` (a run already made) and FULL_SYNC_RUNS - 1
/// more full syncs of `source`, each into a fresh destination.
async fn best_full_sync(source: &EtcdCluster, keys: usize, first: f64) -> Result<f64> {
    let mut best = first;
    for _ in 1..FULL_SYNC_RUNS {
        best = best.max(traced_full_sync(source, keys).await?.rate);
    }
    Ok(best)
}

/// One full sync of the bench key set, with its trace.
struct TracedFullSync {
    /// From process start until the destination holds every key.
    rate: f64,
    /// The syncer's own full-sync duration (its "Full sync finished." line).
    in_process: Duration,
    peak_rss_mib: f64,
    syncer_cpu: f64,
    source_cpu: f64,
    dest_cpu: f64,
    /// The "Full sync finished." fields that say where the time went.
    trace: Vec<(&'static str, String)>,
}

const TRACE_FIELDS: [&str; 15] = [
    "merge_ms",
    "merge_work_ms",
    "source_wait_ms",
    "dest_wait_ms",
    "write_slot_wait_ms",
    "source_pages",
    "source_read_ms",
    "source_bytes",
    "dest_pages",
    "dest_read_ms",
    "dest_bytes",
    "txns",
    "txn_latency_mean_ms",
    "txns_in_flight_mean",
    "put",
];

async fn traced_full_sync(source: &EtcdCluster, keys: usize) -> Result<TracedFullSync> {
    let dest = EtcdCluster::start_dest().await?;
    let source_before = etcd_cpu_seconds(source).await?;
    let dest_before = etcd_cpu_seconds(&dest).await?;
    let full = syncer_full_sync(source, &dest, None, keys).await?;
    let source_cpu = etcd_cpu_seconds(source).await? - source_before;
    let dest_cpu = etcd_cpu_seconds(&dest).await? - dest_before;
    let pid = full.syncer.pid().context("pid")?.as_raw() as u32;
    let syncer_cpu = process_cpu_seconds(pid)?;
    let finished = "Full sync finished.";
    let in_process = full
        .syncer
        .find_log_field(finished, "duration")
        .context("full sync duration")?;
    let in_process = humantime::parse_duration(&in_process)?;
    let trace = TRACE_FIELDS
        .iter()
        .map(|f| {
            (
                *f,
                full.syncer.find_log_field(finished, f).unwrap_or_default(),
            )
        })
        .collect();
    full.syncer.finish().await?;
    Ok(TracedFullSync {
        rate: full.rate,
        in_process,
        peak_rss_mib: full.peak_rss_mib,
        syncer_cpu,
        source_cpu,
        dest_cpu,
        trace,
    })
}

/// `BENCH_SLOW_PATH_ONLY=1`: the slow path after a compaction, 1% of
/// `BENCH_KEYS` (default 1,000,000) changed (a third new keys, a third
/// updated, a third deleted), next to the full copy of the same keys into
/// an empty destination in the same run. Prints, writes nothing.
async fn slow_path_vs_full_copy() -> Result<()> {
    let keys: usize = std::env::var("BENCH_KEYS")
        .ok()
        .map(|k| k.replace('_', "").parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let third = keys / 300;
    println!(
        "{}; {} keys of 100 B, {} changed",
        machine()?,
        group(keys as u64),
        group(3 * third as u64)
    );
    let source = loaded_source(keys).await?;
    let dest = EtcdCluster::start_dest().await?;
    let copy = syncer_full_sync(&source, &dest, None, keys).await?;
    let mut first = copy.syncer;
    first.stop().await?;
    // Changes the replicator never sees: it is stopped, then the history
    // is compacted past its checkpoint, so the restart must take the slow path.
    let mut client = source.client().await?;
    let updated = format!("v2:{}", "v".repeat(97));
    let mut ops: Vec<TxnOp> = Vec::new();
    for i in 0..third {
        ops.push(TxnOp::put(bench_key(keys + i), bench_value(), None));
        ops.push(TxnOp::put(bench_key(3 * i), updated.clone(), None));
        ops.push(TxnOp::delete(bench_key(3 * i + 1), None));
        if ops.len() >= 96 {
            client
                .txn(Txn::new().and_then(std::mem::take(&mut ops)))
                .await?;
        }
    }
    if !ops.is_empty() {
        client.txn(Txn::new().and_then(ops)).await?;
    }
    source.compact().await?;
    let slow = syncer_full_sync(&source, &dest, None, keys).await?;
    let finished = "Full sync finished.";
    let field = |name: &str| {
        slow.syncer
            .find_log_field(finished, name)
            .unwrap_or_default()
    };
    println!(
        "full copy into an empty destination: {:.2} s ({}); slow path after compaction: {:.2} s ({} put, {} deleted, {} unchanged; source read {} B, destination read {} B; source wait {} ms, destination wait {} ms, write-slot wait {} ms, merge work {} ms): {:.0}% of the full copy's wall time; peak RSS {:.1} MiB",
        keys as f64 / copy.rate,
        fmt_rate(copy.rate, "keys/s"),
        keys as f64 / slow.rate,
        field("put"),
        field("deleted"),
        field("unchanged"),
        field("source_bytes"),
        field("dest_bytes"),
        field("source_wait_ms"),
        field("dest_wait_ms"),
        field("write_slot_wait_ms"),
        field("merge_work_ms"),
        100.0 * copy.rate / slow.rate,
        slow.peak_rss_mib,
    );
    slow.syncer.finish().await?;
    Ok(())
}

/// `BENCH_FULL_SYNC_ONLY=1`: the full sync next to the batched-writer
/// ceiling, `BENCH_ROUNDS` times interleaved (default 2), best of each; the
/// key count from `BENCH_KEYS` (default 100,000). With
/// `BENCH_BASELINE_BIN=<etcd-syncer binary>` each round also runs that
/// binary's full sync (a before/after in the same run). Prints, writes nothing.
async fn full_sync_vs_ceiling() -> Result<()> {
    let keys: usize = std::env::var("BENCH_KEYS")
        .ok()
        .map(|k| k.replace('_', "").parse())
        .transpose()?
        .unwrap_or(100_000);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(2);
    println!(
        "{}; {} keys of 100 B, {rounds} rounds, syncer args {:?}",
        machine()?,
        group(keys as u64),
        extra_syncer_args()
    );
    let source = loaded_source(keys).await?;
    let mut best_sync: Option<TracedFullSync> = None;
    let mut best_ceiling_rate = 0.0f64;
    let baseline = std::env::var("BENCH_BASELINE_BIN").ok();
    let under_test = e2e::syncer::binary();
    let mut best_baseline = 0.0f64;
    for round in 1..=rounds {
        if let Some(baseline) = &baseline {
            // The fixture reads the binary from the environment at each start.
            std::env::set_var("ETCD_SYNCER_BIN", baseline);
            let before = traced_full_sync(&source, keys).await?;
            std::env::set_var("ETCD_SYNCER_BIN", &under_test);
            println!(
                "round {round}: baseline full sync {} ({:.2} s from process start; CPU s: syncer {:.2}, source etcd {:.2}, dest etcd {:.2}; peak RSS {:.1} MiB)",
                fmt_rate(before.rate, "keys/s"),
                keys as f64 / before.rate,
                before.syncer_cpu,
                before.source_cpu,
                before.dest_cpu,
                before.peak_rss_mib,
            );
            best_baseline = best_baseline.max(before.rate);
        }
        let sync = traced_full_sync(&source, keys).await?;
        let ceiling = batched_writer_ceiling(keys).await?;
        let best = best_ceiling(&ceiling);
        println!(
            "round {round}: full sync {} ({:.2} s from process start, {:.2} s in process; CPU s: syncer {:.2}, source etcd {:.2}, dest etcd {:.2}; peak RSS {:.1} MiB) | ceiling {} ({} writers) = {:.0}%",
            fmt_rate(sync.rate, "keys/s"),
            keys as f64 / sync.rate,
            sync.in_process.as_secs_f64(),
            sync.syncer_cpu,
            sync.source_cpu,
            sync.dest_cpu,
            sync.peak_rss_mib,
            fmt_rate(best.rate, "keys/s"),
            best.writers,
            100.0 * sync.rate / best.rate,
        );
        println!(
            "  ceiling by writers: {}",
            ceiling
                .iter()
                .map(|c| format!(
                    "{}w {} (dest CPU {:.2} s/100k)",
                    c.writers,
                    fmt_rate(c.rate, "keys/s"),
                    c.dest_cpu_per_100k
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "  trace: {}",
            sync.trace
                .iter()
                .map(|(f, v)| format!("{f}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        best_ceiling_rate = best_ceiling_rate.max(best.rate);
        if best_sync.as_ref().is_none_or(|b| sync.rate > b.rate) {
            best_sync = Some(sync);
        }
    }
    let sync = best_sync.context("at least one round")?;
    println!(
        "best: full sync {} vs ceiling {}: {:.0}% of the ceiling",
        fmt_rate(sync.rate, "keys/s"),
        fmt_rate(best_ceiling_rate, "keys/s"),
        100.0 * sync.rate / best_ceiling_rate
    );
    if baseline.is_some() {
        println!(
            "best baseline: {}: {:.0}% of the ceiling",
            fmt_rate(best_baseline, "keys/s"),
            100.0 * best_baseline / best_ceiling_rate
        );
    }
    Ok(())
}

/// Runs `etcd-syncer check` as a child, sampling its peak RSS until it exits.
async fn timed_check(source: &EtcdCluster, dest: &EtcdCluster) -> Result<(Duration, f64, bool)> {
    let started = Instant::now();
    let mut child = Command::new(e2e::syncer::binary())
        .args([
            "check",
            "--src-endpoints",
            &source.endpoints_arg(),
            "--dst-endpoints",
            &dest.endpoints_arg(),
            "--job-name",
            "bench",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut peak = 0.0f64;
    loop {
        if let Ok(rss) = peak_rss_mib(child.id()) {
            peak = peak.max(rss);
        }
        if let Some(status) = child.try_wait()? {
            return Ok((started.elapsed(), peak, status.code() == Some(0)));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn rate(n: f64, d: Duration) -> f64 {
    n / d.as_secs_f64().max(1e-9)
}

fn fmt_rate(r: f64, unit: &str) -> String {
    format!("{} {unit}", group(r.round() as u64))
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ratio(a: f64, b: f64) -> String {
    if b <= 0.0 {
        "n/a".to_string()
    } else {
        format!("{:.0}×", a / b)
    }
}

struct FullSyncResult {
    rate: f64,
    peak_rss_mib: f64,
    syncer: Syncer,
}

async fn syncer_full_sync(
    source: &EtcdCluster,
    dest: &EtcdCluster,
    dest_endpoint: Option<&str>,
    keys: usize,
) -> Result<FullSyncResult> {
    let started = Instant::now();
    let syncer = start_syncer(source, dest, dest_endpoint, "syncer").await?;
    // Done when the syncer logs the committed checkpoint, watched from its
    // own log: polling a count over the whole destination prefix every
    // 20 ms would cost the destination a walk of its index each time, CPU
    // the batched-writer ceiling it is compared with never pays.
    let elapsed = loop {
        if syncer.count_log_messages("Full sync finished.") > 0 {
            break started.elapsed();
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(900),
            "no full sync within 900 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (_, reached) = wait_for_count(dest, keys as i64, Instant::now(), Duration::ZERO).await?;
    anyhow::ensure!(reached == keys as i64, "syncer copied {reached} of {keys}");
    wait_watching(&syncer).await?;
    let pid = syncer.pid().context("pid")?.as_raw() as u32;
    Ok(FullSyncResult {
        rate: rate(keys as f64, elapsed),
        peak_rss_mib: peak_rss_mib(pid)?,
        syncer,
    })
}

async fn make_mirror_full_sync(
    source: &EtcdCluster,
    dest: &EtcdCluster,
    dest_endpoint: &str,
    keys: usize,
    cap: Duration,
) -> Result<f64> {
    let started = Instant::now();
    let child = spawn_make_mirror(source, dest_endpoint)?;
    let (elapsed, reached) = wait_for_count(dest, keys as i64, started, cap).await?;
    stop(child);
    Ok(rate(reached as f64, elapsed))
}

struct IncrementalResult {
    rate: f64,
    lag: String,
}

/// Runs the load against the source while `tool` mirrors it, then waits for
/// the destination to catch up (or for `cap` after the load ended).
async fn incremental(
    source: &EtcdCluster,
    dest: &EtcdCluster,
    load: &Load,
    cap: Duration,
) -> Result<IncrementalResult> {
    let clients = vec![
        source.client().await?,
        source.client().await?,
        source.client().await?,
        source.client().await?,
    ];
    let expected = (load.writers * load.ops_per_writer * load.keys_per_txn) as i64;
    let report = load.run(&clients).await?;
    let load_done = Instant::now();
    // `lag` is how long after the last source write the destination had it all.
    let (lag, reached) = wait_for_count(dest, expected, load_done, cap).await?;
    let total = report.elapsed + lag;
    let revisions = report.operations as f64 * reached as f64 / expected as f64;
    let lag = if reached >= expected {
        format!("{:.2} s", lag.as_secs_f64())
    } else {
        format!(
            "> {:.0} s, {} revisions behind",
            cap.as_secs_f64(),
            group(((expected - reached) as f64 / load.keys_per_txn as f64) as u64)
        )
    };
    Ok(IncrementalResult {
        rate: rate(revisions, total),
        lag,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let sizes = Sizes::from_env();
    if std::env::var("BENCH_SLOW_PATH_ONLY").is_ok() {
        return slow_path_vs_full_copy().await;
    }
    if std::env::var("BENCH_FULL_SYNC_ONLY").is_ok() {
        return full_sync_vs_ceiling().await;
    }
    if std::env::var("BENCH_LEASES_ONLY").is_ok() {
        // `make bench-leases`: only the lease scenario, spliced into the
        // existing docs/benchmarks.md.
        println!("[1/1] lease mirroring");
        let section = lease_section(&sizes).await?;
        println!("\n{section}");
        if std::env::var("BENCH_QUICK").is_err() {
            let path =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md");
            let existing = std::fs::read_to_string(&path).unwrap_or_default();
            let spliced = splice_lease_section(&existing, &section);
            std::fs::write(&path, keep_written_sections(&spliced, &existing))?;
            println!("written to {}", path.display());
        }
        return Ok(());
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut notes: Vec<String> = Vec::new();

    // 1. Full sync, loopback.
    println!(
        "[1/9] full sync of {} keys on loopback",
        sizes.full_sync_keys
    );
    let source = loaded_source(sizes.full_sync_keys).await?;
    let dest = EtcdCluster::start_dest().await?;
    let full = syncer_full_sync(&source, &dest, None, sizes.full_sync_keys).await?;
    let mm_dest = EtcdCluster::start_dest().await?;
    let mm_rate = make_mirror_full_sync(
        &source,
        &mm_dest,
        &mm_dest.endpoints()[0],
        sizes.full_sync_keys,
        Duration::from_secs(300),
    )
    .await?;
    let best_full = best_full_sync(&source, sizes.full_sync_keys, full.rate).await?;
    let ceiling_runs = batched_writer_ceiling(sizes.full_sync_keys).await?;
    let ceiling = best_ceiling(&ceiling_runs);
    rows.push(Row {
        scenario: format!(
            "Full sync, {} keys of 100 B, loopback, best of {FULL_SYNC_RUNS} runs, vs the destination's batched-writer ceiling ({CEILING_TXN_OPS}-op txns, best of 1/2/4/8 writers, same keys, empty etcd)",
            group(sizes.full_sync_keys as u64)
        ),
        syncer: fmt_rate(best_full, "keys/s"),
        make_mirror: format!(
            "ceiling {} ({} writers)",
            fmt_rate(ceiling.rate, "keys/s"),
            ceiling.writers
        ),
        ratio: format!("{:.0}% of the ceiling", 100.0 * best_full / ceiling.rate),
        target: "≥ 80% of the ceiling".into(),
    });
    rows.push(Row {
        scenario: format!(
            "Full sync, {} keys of 100 B, loopback",
            group(sizes.full_sync_keys as u64)
        ),
        syncer: fmt_rate(full.rate, "keys/s"),
        make_mirror: fmt_rate(mm_rate, "keys/s"),
        ratio: ratio(full.rate, mm_rate),
        target: "≥ 25,000 keys/s".into(),
    });
    let rss_small = full.peak_rss_mib;

    // 7. The exact consistency check over everything just mirrored.
    println!("[2/9] exact check over {} keys", sizes.full_sync_keys);
    let (check_time, check_rss, consistent) = timed_check(&source, &dest).await?;
    anyhow::ensure!(consistent, "the check must find the mirror consistent");
    rows.push(Row {
        scenario: format!(
            "Exact consistency check, {} keys",
            group(sizes.full_sync_keys as u64)
        ),
        syncer: format!(
            "{:.2} s, peak RSS {check_rss:.1} MiB ({} keys/s)",
            check_time.as_secs_f64(),
            fmt_rate(sizes.full_sync_keys as f64 / check_time.as_secs_f64(), "").trim()
        ),
        make_mirror: "no checker".into(),
        ratio: "n/a".into(),
        target: "exact, memory flat".into(),
    });

    // 5. Restart with everything mirrored and no changes.
    println!("[3/9] restart with {} keys mirrored", sizes.full_sync_keys);
    let mut first = full.syncer;
    first.stop().await?;
    let dest_revision_before = dest.revision().await?;
    let started = Instant::now();
    let second = start_syncer(&source, &dest, None, "restarted").await?;
    e2e::eventually(Duration::from_secs(60), "watching log line", || async {
        Ok(second.count_log_messages("Watching source.") > 0)
    })
    .await?;
    let to_watching = started.elapsed();
    let rewritten = second
        .metric("etcd_syncer_full_sync_keys_total", &[("job", "bench")])
        .await?
        + second
            .metric("etcd_syncer_events_applied_total", &[("job", "bench")])
            .await?;
    let dest_revision_after = dest.revision().await?;
    second.finish().await?;
    rows.push(Row {
        scenario: format!("Restart, {} keys mirrored, no changes", group(sizes.full_sync_keys as u64)),
        syncer: format!(
            "watching after {:.0} ms, {rewritten} keys re-written (destination revision {dest_revision_before} → {dest_revision_after}: {} write, the new replica's lock key)",
            to_watching.as_secs_f64() * 1000.0,
            dest_revision_after - dest_revision_before
        ),
        make_mirror: format!("re-copies all {} keys (~{:.0} s at its full-sync rate)", group(sizes.full_sync_keys as u64), sizes.full_sync_keys as f64 / mm_rate),
        ratio: format!("{:.0}×", (sizes.full_sync_keys as f64 / mm_rate) / to_watching.as_secs_f64()),
        target: "< 1 s, zero keys re-written".into(),
    });
    drop((source, dest, mm_dest));

    // 2. Full sync across a 30 ms round trip to the destination.
    println!(
        "[4/9] full sync of {} keys across 30 ms RTT",
        sizes.rtt_full_sync_keys
    );
    let source = EtcdCluster::start_source().await?;
    put_many(
        &mut source.client().await?,
        PREFIX,
        sizes.rtt_full_sync_keys,
        100,
        "v1",
    )
    .await?;
    let dest = EtcdCluster::start_dest().await?;
    let (proxy, proxied) = LinkProxy::in_front_of(&dest.endpoints()[0]).await?;
    proxy.set_delay(ONE_WAY);
    let rtt_full =
        syncer_full_sync(&source, &dest, Some(&proxied), sizes.rtt_full_sync_keys).await?;
    rtt_full.syncer.finish().await?;
    let mm_dest = EtcdCluster::start_dest().await?;
    let (mm_proxy, mm_proxied) = LinkProxy::in_front_of(&mm_dest.endpoints()[0]).await?;
    mm_proxy.set_delay(ONE_WAY);
    let mm_rtt_rate = make_mirror_full_sync(
        &source,
        &mm_dest,
        &mm_proxied,
        sizes.rtt_full_sync_keys,
        sizes.make_mirror_rtt_window,
    )
    .await?;
    rows.push(Row {
        scenario: format!(
            "Full sync, {} keys, 30 ms RTT",
            group(sizes.rtt_full_sync_keys as u64)
        ),
        syncer: fmt_rate(rtt_full.rate, "keys/s"),
        make_mirror: format!(
            "{} (first {:.0} s)",
            fmt_rate(mm_rtt_rate, "keys/s"),
            sizes.make_mirror_rtt_window.as_secs_f64()
        ),
        ratio: ratio(rtt_full.rate, mm_rtt_rate),
        target: "≥ 3,000 keys/s".into(),
    });
    drop((proxy, mm_proxy, source, dest, mm_dest));

    // 3 and 4. Incremental: 16 writers at full speed; single-key revisions
    // on loopback and across 30 ms, then 10-key txns across 30 ms.
    let cases = [
        ("Incremental, single-key revisions, loopback", 1usize, false),
        ("Incremental, single-key revisions, 30 ms RTT", 1, true),
        ("Incremental, 10-key txns, 30 ms RTT", 10, true),
    ];
    for (index, (label, keys_per_txn, delayed)) in cases.into_iter().enumerate() {
        let index = index + 1;
        println!("[{}/9] {label}", 4 + index);
        let revisions = if keys_per_txn > 1 {
            sizes.incremental_revisions / 5
        } else {
            sizes.incremental_revisions
        };
        let mut load = Load::new(PREFIX, 16, revisions / 16);
        load.keys_per_txn = keys_per_txn;
        load.value_size = 100;
        let mut results = Vec::new();
        for tool in ["syncer", "make-mirror"] {
            let source = EtcdCluster::start_source().await?;
            let dest = EtcdCluster::start_dest().await?;
            let (proxy, proxied) = LinkProxy::in_front_of(&dest.endpoints()[0]).await?;
            if delayed {
                proxy.set_delay(ONE_WAY);
            }
            let mut syncer = None;
            let mut child = None;
            if tool == "syncer" {
                let running = start_syncer(&source, &dest, Some(&proxied), "syncer").await?;
                wait_watching(&running).await?;
                syncer = Some(running);
            } else {
                child = Some(spawn_make_mirror(&source, &proxied)?);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let result = incremental(&source, &dest, &load, sizes.make_mirror_cap).await?;
            if let Some(syncer) = syncer {
                let reorders = syncer
                    .metric("etcd_syncer_txn_reorders_total", &[("job", "bench")])
                    .await?;
                let txns = syncer
                    .metric("etcd_syncer_txns_total", &[("job", "bench")])
                    .await?;
                notes.push(format!("{label}: etcd-syncer used {txns} txns ({:.1} revisions per txn), {reorders} re-sent after reordering.", load.writers as f64 * load.ops_per_writer as f64 / txns.max(1.0)));
                syncer.finish().await?;
            }
            if let Some(child) = child {
                stop(child);
            }
            results.push(result);
        }
        rows.push(Row {
            scenario: format!(
                "{label}, {} revisions from 16 writers",
                group(revisions as u64)
            ),
            syncer: format!(
                "{} (lag at end {})",
                fmt_rate(results[0].rate, "rev/s"),
                results[0].lag
            ),
            make_mirror: format!(
                "{} (lag at end {})",
                fmt_rate(results[1].rate, "rev/s"),
                results[1].lag
            ),
            ratio: ratio(results[0].rate, results[1].rate),
            target: match (delayed, keys_per_txn) {
                (true, 1) => "≥ 3,000 rev/s, lag < 1 s".into(),
                (true, _) => "keeps up (lag < 1 s)".into(),
                (false, _) => "keeps up".into(),
            },
        });
    }

    // 6. Memory: peak RSS for a large full sync, next to the small one.
    println!(
        "[8/9] memory during a full sync of {} keys",
        sizes.memory_large_keys
    );
    let source = loaded_source(sizes.memory_large_keys).await?;
    let dest = EtcdCluster::start_dest().await?;
    let large = syncer_full_sync(&source, &dest, None, sizes.memory_large_keys).await?;
    large.syncer.finish().await?;
    let best_large = best_full_sync(&source, sizes.memory_large_keys, large.rate).await?;
    drop((source, dest));
    let large_ceiling_runs = batched_writer_ceiling(sizes.memory_large_keys).await?;
    let large_ceiling = best_ceiling(&large_ceiling_runs);
    rows.push(Row {
        scenario: format!(
            "Full sync, {} keys of 100 B, loopback, best of {FULL_SYNC_RUNS} runs, vs the ceiling at {} keys",
            group(sizes.memory_large_keys as u64),
            group(sizes.memory_large_keys as u64)
        ),
        syncer: fmt_rate(best_large, "keys/s"),
        make_mirror: format!(
            "ceiling {} ({} writers)",
            fmt_rate(large_ceiling.rate, "keys/s"),
            large_ceiling.writers
        ),
        ratio: format!(
            "{:.0}% of the ceiling",
            100.0 * best_large / large_ceiling.rate
        ),
        target: "≥ 80% of the ceiling, peak RSS < 64 MiB".into(),
    });
    rows.push(Row {
        scenario: format!(
            "Peak RSS during full sync ({} vs {} keys)",
            group(sizes.full_sync_keys as u64),
            group(sizes.memory_large_keys as u64)
        ),
        syncer: format!(
            "{rss_small:.1} MiB vs {:.1} MiB ({} keys/s)",
            large.peak_rss_mib,
            fmt_rate(large.rate, "").trim()
        ),
        make_mirror: "n/a".into(),
        ratio: format!(
            "{:.2}× for {}× the keys",
            large.peak_rss_mib / rss_small,
            sizes.memory_large_keys / sizes.full_sync_keys
        ),
        target: "< 64 MiB, flat in key count".into(),
    });

    println!("[9/9] lease mirroring");
    let leases = lease_section(&sizes).await?;
    let report = splice_lease_section(&render(&rows, &notes)?, &leases);
    println!("\n{report}");
    if std::env::var("BENCH_QUICK").is_err() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md");
        let existing = std::fs::read_to_string(&path).unwrap_or_default();
        let report = keep_written_sections(&report, &existing);
        std::fs::write(&path, report)?;
        println!("written to {}", path.display());
    }
    Ok(())
}

fn render(rows: &[Row], notes: &[String]) -> Result<String> {
    let mut out = String::new();
    writeln!(out, "# Benchmarks: etcd-syncer vs etcdctl make-mirror\n")?;
    writeln!(
        out,
        "Produced by `make bench` on {} (UTC).\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    )?;
    writeln!(out, "Machine: {}\n", machine()?)?;
    writeln!(
        out,
        "Both tools run against fresh etcd servers on loopback, on identical data. \
         The 30 ms RTT cases put the link proxy (15 ms each way) between the tool and the \
         destination, where make-mirror's one-put-per-request and one-txn-per-revision cost a round trip each. \
         Rates are measured from process start until the destination holds every key: for make-mirror by polling a key count every 20 ms, for etcd-syncer until it logs the full sync's committed checkpoint (the count is checked once then; polling it would load the destination the syncer is writing to). \
         Incremental rates are bounded by how fast 16 writers can load the source on this machine (both etcd \
         servers, the writers and the tool share two cores): a lag near zero at the end means the tool kept up.\n"
    )?;
    writeln!(
        out,
        "| scenario | etcd-syncer | make-mirror | ratio | target |"
    )?;
    writeln!(out, "|---|---|---|---|---|")?;
    for row in rows {
        writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            row.scenario, row.syncer, row.make_mirror, row.ratio, row.target
        )?;
    }
    if !notes.is_empty() {
        writeln!(out, "\nNotes:\n")?;
        for note in notes {
            writeln!(out, "- {note}")?;
        }
    }
    Ok(out)
}

fn machine() -> Result<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU");
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    // The servers' versions (E2E_ETCD_BIN, or per side for a mixed pair).
    let version = |role| {
        let binary = e2e::etcd::etcd_binary(role);
        e2e::etcd::etcd_version(&binary).unwrap_or_else(|_| "unknown".to_string())
    };
    let (source, dest) = (version(Role::Source), version(Role::Dest));
    let etcd = if source == dest {
        format!("etcd {source}")
    } else {
        format!("etcd {source} (source), {dest} (destination)")
    };
    Ok(format!(
        "{model}, {cores} cores, {mem_gib:.0} GiB RAM; {etcd}"
    ))
}

/// Source lease TTL and the destination's grace in the lease scenario.
const LEASE_TTL: i64 = 60;
const LEASE_GRACE: i64 = 30;
const LEASES_HEADING: &str = "## Lease mirroring";

struct LeaseRun {
    full_sync: Duration,
    window: Duration,
    keepalives: f64,
    failures: f64,
    mirrored: f64,
    peak_rss_mib: f64,
    test_renewals_per_s: f64,
}

/// One run of the lease scenario: `keys` keys spread evenly over `leases`
/// source leases (TTL 60 s, kept alive by the bench itself over keepalive
/// streams), mirrored with `--leases <mode>`; full sync, then `window` of
/// steady state in which nothing changes on the source.
async fn lease_run(mode: &str, leases: usize, keys: usize, window: Duration) -> Result<LeaseRun> {
    use e2e::leases::{grant_leases, put_leased, LeaseRenewer};
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    let ids = grant_leases(&source.client().await?, leases, LEASE_TTL).await?;
    // A third of the TTL, like any etcd client.
    let renewer = LeaseRenewer::start(
        source.client().await?,
        &ids,
        Duration::from_secs(LEASE_TTL as u64 / 3),
    );
    let per_lease = keys.div_ceil(leases);
    let value = "v".repeat(100);
    let entries: Vec<(String, String, i64)> = (0..keys)
        .map(|i| {
            (
                format!("{PREFIX}l{:05}/k{:03}", i / per_lease, i % per_lease),
                value.clone(),
                ids[i / per_lease],
            )
        })
        .collect();
    put_leased(&mut source.client().await?, &entries).await?;
    drop(entries);

    let mut args = mirror_args(&source, &dest, PREFIX);
    args.extend(e2e::args(&[
        "--job-name",
        "bench",
        "--leases",
        mode,
        "--lease-grace",
        &format!("{LEASE_GRACE}s"),
    ]));
    let started = Instant::now();
    let syncer = Syncer::start(mode, &args).await?;
    let (full_sync, reached) =
        wait_for_count(&dest, keys as i64, started, Duration::from_secs(900)).await?;
    anyhow::ensure!(reached == keys as i64, "mirrored {reached} of {keys} keys");
    wait_watching(&syncer).await?;
    let mirrored = syncer
        .metric("etcd_syncer_leases_mirrored", &[("job", "bench")])
        .await?;

    // Steady state: only keepalives, on both sides.
    let keepalives_before = syncer
        .metric("etcd_syncer_lease_keepalives_total", &[("job", "bench")])
        .await?;
    let renewals_before = renewer.renewals();
    let window_start = Instant::now();
    tokio::time::sleep(window).await;
    let keepalives = syncer
        .metric("etcd_syncer_lease_keepalives_total", &[("job", "bench")])
        .await?
        - keepalives_before;
    let window = window_start.elapsed();
    let test_renewals_per_s = rate((renewer.renewals() - renewals_before) as f64, window);
    let failures = syncer
        .metric(
            "etcd_syncer_lease_keepalive_failures_total",
            &[("job", "bench")],
        )
        .await?;
    let peak_rss_mib = peak_rss_mib(syncer.pid().context("pid")?.as_raw() as u32)?;
    let (_, still) = wait_for_count(&dest, keys as i64, Instant::now(), Duration::ZERO).await?;
    anyhow::ensure!(
        still == keys as i64,
        "the destination lost keys in steady state: {still} of {keys}"
    );
    syncer.finish().await?;
    renewer.stop();
    Ok(LeaseRun {
        full_sync,
        window,
        keepalives,
        failures,
        mirrored,
        peak_rss_mib,
        test_renewals_per_s,
    })
}

/// The lease scenario, faithful and strip, as a markdown section.
async fn lease_section(sizes: &Sizes) -> Result<String> {
    let (leases, keys) = (sizes.lease_count, sizes.leased_keys);
    let faithful = lease_run("faithful", leases, keys, sizes.lease_window).await?;
    let strip = lease_run("strip", leases, keys, Duration::from_secs(60)).await?;
    let dest_ttl = LEASE_TTL + LEASE_GRACE;
    let expected = leases as f64 / (dest_ttl as f64 / 3.0);
    let mut out = String::new();
    writeln!(out, "{LEASES_HEADING}\n")?;
    writeln!(
        out,
        "Produced by `make bench-leases` (also the last step of `make bench`) on {} (UTC); {}.\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        machine()?
    )?;
    writeln!(
        out,
        "{} keys of 100 B on {} source leases ({} keys each, TTL {LEASE_TTL} s, kept alive by the \
         bench over one keepalive stream per lease, renewed every {} s), `--lease-grace {LEASE_GRACE}s`: \
         each destination lease has a {dest_ttl} s TTL and is renewed every third of it, so the \
         expected rate is {} / {} s = {expected:.0} keepalives/s. Full sync from process start \
         until the destination holds every key; then a steady state with no source writes, over \
         which `etcd_syncer_lease_keepalives_total` is read at both ends. Peak RSS is the \
         syncer's `VmHWM` at the end of the run.\n",
        group(keys as u64),
        group(leases as u64),
        keys.div_ceil(leases),
        LEASE_TTL / 3,
        group(leases as u64),
        dest_ttl / 3,
    )?;
    writeln!(
        out,
        "| `--leases` | full sync | destination leases | keepalives/s (steady state) | keepalive failures | peak RSS |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|")?;
    for (mode, run) in [("faithful", &faithful), ("strip (reference)", &strip)] {
        writeln!(
            out,
            "| {mode} | {:.1} s ({}) | {} | {:.0} ({} in {:.0} s) | {} | {:.1} MiB |",
            run.full_sync.as_secs_f64(),
            fmt_rate(rate(keys as f64, run.full_sync), "keys/s"),
            group(run.mirrored as u64),
            rate(run.keepalives, run.window),
            group(run.keepalives as u64),
            run.window.as_secs_f64(),
            run.failures,
            run.peak_rss_mib,
        )?;
    }
    writeln!(
        out,
        "\nThe bench's own renewals of the source leases ran at {:.0}/s during the faithful run. \
         Renewals are due in bursts (every lease was granted during the full sync), so a window \
         catches whole bursts only: the rate over a window is within one burst of the expected one.",
        faithful.test_renewals_per_s
    )?;
    Ok(out)
}

/// `report` with its lease section (from the heading to the end) replaced
/// by `section`, or `section` appended.
fn splice_lease_section(report: &str, section: &str) -> String {
    let kept = match report.find(LEASES_HEADING) {
        Some(at) => &report[..at],
        None => report,
    };
    format!("{}\n\n{section}", kept.trim_end())
}

/// `report` followed by every `## ` section of `existing` it does not
/// already have (by heading): the sections written by hand or by other
/// targets (failback, issue 15) survive a new bench run.
fn keep_written_sections(report: &str, existing: &str) -> String {
    let headings: Vec<&str> = report.lines().filter(|l| l.starts_with("## ")).collect();
    let mut out = report.trim_end().to_string();
    let starts: Vec<usize> = existing
        .match_indices("\n## ")
        .map(|(at, _)| at + 1)
        .collect();
    for (n, &start) in starts.iter().enumerate() {
        let end = starts.get(n + 1).copied().unwrap_or(existing.len());
        let section = &existing[start..end];
        let heading = section.lines().next().unwrap_or_default();
        if !headings.contains(&heading) {
            out.push_str("\n\n");
            out.push_str(section.trim_end());
        }
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new report keeps the sections only the old file had, in order,
    /// and replaces the ones it writes itself.
    #[test]
    fn a_new_report_keeps_the_sections_it_does_not_write() {
        let existing = "# B\n\nold table\n\n## Lease mirroring\n\nold leases\n\n## Failback\n\nby hand\n\n## Issue 15\n\nalso by hand\n";
        let report = "# B\n\nnew table\n\n## Lease mirroring\n\nnew leases\n";
        assert_eq!(
            keep_written_sections(report, existing),
            "# B\n\nnew table\n\n## Lease mirroring\n\nnew leases\n\n## Failback\n\nby hand\n\n## Issue 15\n\nalso by hand\n"
        );
    }
}
