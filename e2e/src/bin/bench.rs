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
use etcd_client::{Client, GetOptions, Txn, TxnOp};

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
        let mut sizes = Self::preset();
        // For iterating on the lease path: a shorter steady-state window.
        if let Some(window) = std::env::var("BENCH_LEASE_WINDOW")
            .ok()
            .and_then(|w| humantime::parse_duration(&w).ok())
        {
            sizes.lease_window = window;
        }
        sizes
    }

    fn preset() -> Self {
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
    batched_write_with(cluster.client().await?, keys, writers).await
}

/// [`batched_write`] over `client` (connected directly or through the link proxy).
async fn batched_write_with(client: Client, keys: usize, writers: usize) -> Result<Duration> {
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
    batched_writer_ceiling_via(keys, None).await
}

/// The ceiling with every writer's txns through a link proxy that delays
/// each direction by `one_way` (`None`: loopback, no proxy).
async fn batched_writer_ceiling_via(
    keys: usize,
    one_way: Option<Duration>,
) -> Result<Vec<CeilingRun>> {
    let mut runs = Vec::new();
    for writers in CEILING_WRITERS {
        let dest = EtcdCluster::start_dest().await?;
        let cpu_before = etcd_cpu_seconds(&dest).await?;
        let elapsed = match one_way {
            None => batched_write(&dest, keys, writers).await?,
            Some(one_way) => {
                let (proxy, proxied) = LinkProxy::in_front_of(&dest.endpoints()[0]).await?;
                proxy.set_delay(one_way);
                let client = Client::connect([proxied], None).await?;
                batched_write_with(client, keys, writers).await?
            }
        };
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

/// A full sync's rate, measured two ways: from process start until the
/// destination holds every key (the figure an operator waits for), and
/// over the syncer's own full-sync duration (its "Full sync finished."
/// line), which leaves out process start, connects and the lock, as the
/// batched-writer ceiling leaves out its own connect.
#[derive(Clone, Copy)]
struct SyncRates {
    from_start: f64,
    in_process: f64,
}

impl SyncRates {
    fn of(full: &FullSyncResult, keys: usize) -> Result<Self> {
        Ok(Self {
            from_start: full.rate,
            in_process: rate(keys as f64, full.in_process()?),
        })
    }

    fn best(self, other: Self) -> Self {
        Self {
            from_start: self.from_start.max(other.from_start),
            in_process: self.in_process.max(other.in_process),
        }
    }
}

/// The best rates of `first` (a run already made) and FULL_SYNC_RUNS - 1
/// more full syncs of `source`, each into a fresh destination, through a
/// link proxy delaying each direction by `one_way` if given.
async fn best_full_sync(
    source: &EtcdCluster,
    keys: usize,
    first: SyncRates,
    one_way: Option<Duration>,
) -> Result<SyncRates> {
    let mut best = first;
    for _ in 1..FULL_SYNC_RUNS {
        let dest = EtcdCluster::start_dest().await?;
        // The proxy outlives the syncer: it keeps watching until finished.
        let mut link = None;
        if let Some(one_way) = one_way {
            let (proxy, proxied) = LinkProxy::in_front_of(&dest.endpoints()[0]).await?;
            proxy.set_delay(one_way);
            link = Some((proxy, proxied));
        }
        let proxied = link.as_ref().map(|(_, endpoint)| endpoint.as_str());
        let full = syncer_full_sync(source, &dest, proxied, keys).await?;
        best = best.best(SyncRates::of(&full, keys)?);
        full.syncer.finish().await?;
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
    let before = servers_cpu(source, &dest).await?;
    let full = syncer_full_sync(source, &dest, None, keys).await?;
    let (source_cpu, dest_cpu, syncer_cpu) = full.cpu_since(before, source, &dest).await?;
    let in_process = full.in_process()?;
    let trace = full.finished_fields(&TRACE_FIELDS);
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

/// The slow path after a compaction, measured.
struct SlowPath {
    wall: Duration,
    peak_rss_mib: f64,
    /// CPU seconds over the slow path: source etcd, destination etcd, syncer.
    cpu: (f64, f64, f64),
    /// "Full sync finished." fields, by name.
    fields: Vec<(&'static str, String)>,
}

impl SlowPath {
    fn field(&self, name: &str) -> &str {
        self.fields
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, v)| v.as_str())
    }

    fn summary(&self) -> String {
        format!(
            "{} put, {} deleted, {} unchanged; read: source {} B in {} pages ({} ms of requests), destination {} B in {} pages ({} ms); full sync {} in process, of which the merge {} ms; merge waits: source pages {} ms, destination pages {} ms, write slots {} ms; merge work {} ms; CPU s: source etcd {:.2}, destination etcd {:.2}, syncer {:.2} (the two cores give {:.2})",
            self.field("put"),
            self.field("deleted"),
            self.field("unchanged"),
            self.field("source_bytes"),
            self.field("source_pages"),
            self.field("source_read_ms"),
            self.field("dest_bytes"),
            self.field("dest_pages"),
            self.field("dest_read_ms"),
            self.field("duration"),
            self.field("merge_ms"),
            self.field("source_wait_ms"),
            self.field("dest_wait_ms"),
            self.field("write_slot_wait_ms"),
            self.field("merge_work_ms"),
            self.cpu.0,
            self.cpu.1,
            self.cpu.2,
            2.0 * self.wall.as_secs_f64(),
        )
    }
}

const SLOW_PATH_FIELDS: [&str; 15] = [
    "duration",
    "merge_ms",
    "source_pages",
    "source_read_ms",
    "dest_pages",
    "dest_read_ms",
    "put",
    "deleted",
    "unchanged",
    "source_bytes",
    "dest_bytes",
    "source_wait_ms",
    "dest_wait_ms",
    "write_slot_wait_ms",
    "merge_work_ms",
];

/// Changes 1% of the `keys` bench keys on `source` (a third new keys, a
/// third updated, a third deleted) while no replicator runs, compacts the
/// source past the checkpoint of job "bench" on `dest` (which mirrors
/// every key), then times the restart's slow path until its checkpoint.
async fn slow_path_after_compaction(
    source: &EtcdCluster,
    dest: &EtcdCluster,
    keys: usize,
) -> Result<SlowPath> {
    let third = keys / 300;
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
    let before = servers_cpu(source, dest).await?;
    let slow = syncer_full_sync(source, dest, None, keys).await?;
    let cpu = slow.cpu_since(before, source, dest).await?;
    let fields = slow.finished_fields(&SLOW_PATH_FIELDS);
    anyhow::ensure!(
        slow.syncer.count_log_messages(FINISHED) == 1,
        "one full sync"
    );
    let result = SlowPath {
        wall: Duration::from_secs_f64(keys as f64 / slow.rate),
        peak_rss_mib: slow.peak_rss_mib,
        cpu,
        fields,
    };
    let expected = [("put", 2 * third), ("deleted", third)];
    for (name, count) in expected {
        anyhow::ensure!(
            result.field(name) == count.to_string(),
            "the slow path must write exactly the differences: {name}={} (expected {count})",
            result.field(name)
        );
    }
    slow.syncer.finish().await?;
    Ok(result)
}

/// `BENCH_SLOW_PATH_ONLY=1`: the slow path after a compaction, 1% of
/// `BENCH_KEYS` (default 1,000,000) changed, next to the full copy of the
/// same keys into an empty destination in the same run. Prints, writes nothing.
async fn slow_path_vs_full_copy() -> Result<()> {
    let keys: usize = std::env::var("BENCH_KEYS")
        .ok()
        .map(|k| k.replace('_', "").parse())
        .transpose()?
        .unwrap_or(1_000_000);
    println!(
        "{}; {} keys of 100 B, {} changed",
        machine()?,
        group(keys as u64),
        group(3 * (keys / 300) as u64)
    );
    let source = loaded_source(keys).await?;
    let dest = EtcdCluster::start_dest().await?;
    let copy = syncer_full_sync(&source, &dest, None, keys).await?;
    copy.syncer.finish().await?;
    let slow = slow_path_after_compaction(&source, &dest, keys).await?;
    println!(
        "full copy into an empty destination: {:.2} s ({}); slow path after compaction: {:.2} s ({}): {:.0}% of the full copy's wall time; peak RSS {:.1} MiB",
        keys as f64 / copy.rate,
        fmt_rate(copy.rate, "keys/s"),
        slow.wall.as_secs_f64(),
        slow.summary(),
        100.0 * slow.wall.as_secs_f64() * copy.rate / keys as f64,
        slow.peak_rss_mib,
    );
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

/// One `etcd-syncer check` run.
struct CheckRun {
    elapsed: Duration,
    peak_rss_mib: f64,
    consistent: bool,
    exact: bool,
    source_bytes: u64,
    dest_bytes: u64,
}

/// Runs `etcd-syncer check --output json` as a child, sampling its peak RSS
/// until it exits, and reads the bytes it read from each side.
async fn timed_check(source: &EtcdCluster, dest: &EtcdCluster) -> Result<CheckRun> {
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
            "--output",
            "json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut peak = 0.0f64;
    let status = loop {
        if let Ok(rss) = peak_rss_mib(child.id()) {
            peak = peak.max(rss);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let elapsed = started.elapsed();
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().context("stdout")?, &mut stdout)?;
    let report: serde_json::Value =
        serde_json::from_str(&stdout).with_context(|| format!("check output: {stdout}"))?;
    let number = |field: &str| report.get(field).and_then(|v| v.as_u64()).unwrap_or(0);
    Ok(CheckRun {
        elapsed,
        peak_rss_mib: peak,
        consistent: status.code() == Some(0),
        exact: report.get("exact").and_then(|v| v.as_bool()) == Some(true),
        source_bytes: number("source_bytes_read"),
        dest_bytes: number("dest_bytes_read"),
    })
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

/// The syncer's log line that ends a full sync, with its trace fields.
const FINISHED: &str = "Full sync finished.";

impl FullSyncResult {
    /// The syncer's own full-sync duration (its "Full sync finished." line).
    fn in_process(&self) -> Result<Duration> {
        let duration = self
            .syncer
            .find_log_field(FINISHED, "duration")
            .context("full sync duration")?;
        Ok(humantime::parse_duration(&duration)?)
    }

    /// The named fields of the "Full sync finished." line ("" if absent).
    fn finished_fields(&self, names: &[&'static str]) -> Vec<(&'static str, String)> {
        names
            .iter()
            .map(|name| {
                (
                    *name,
                    self.syncer
                        .find_log_field(FINISHED, name)
                        .unwrap_or_default(),
                )
            })
            .collect()
    }

    /// CPU seconds since `before` (from [`servers_cpu`]): the source etcd,
    /// the destination etcd, and the syncer (its whole life).
    async fn cpu_since(
        &self,
        before: (f64, f64),
        source: &EtcdCluster,
        dest: &EtcdCluster,
    ) -> Result<(f64, f64, f64)> {
        let pid = self.syncer.pid().context("pid")?.as_raw() as u32;
        Ok((
            etcd_cpu_seconds(source).await? - before.0,
            etcd_cpu_seconds(dest).await? - before.1,
            process_cpu_seconds(pid)?,
        ))
    }
}

/// Both etcd servers' CPU seconds so far, for [`FullSyncResult::cpu_since`].
async fn servers_cpu(source: &EtcdCluster, dest: &EtcdCluster) -> Result<(f64, f64)> {
    Ok((
        etcd_cpu_seconds(source).await?,
        etcd_cpu_seconds(dest).await?,
    ))
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
        if syncer.count_log_messages(FINISHED) > 0 {
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
    /// Revisions mirrored per second, from the first write to the last one applied.
    rate: f64,
    /// The writers' own rate with the tool running.
    load_rate: f64,
    lag: String,
    /// How long after the last write the destination held it all; None
    /// when it had not within the cap.
    caught_up_after: Option<Duration>,
}

impl IncrementalResult {
    fn caught_up_within(&self, limit: Duration) -> bool {
        self.caught_up_after.is_some_and(|lag| lag < limit)
    }
}

/// Runs the load against the source while `tool` mirrors it, then waits for
/// the destination to catch up (or for `cap` after the load ended).
async fn incremental(
    source: &EtcdCluster,
    dest: &EtcdCluster,
    load: &Load,
    cap: Duration,
) -> Result<IncrementalResult> {
    let clients = load_clients(source).await?;
    let expected = (load.writers * load.ops_per_writer * load.keys_per_txn) as i64;
    let report = load.run(&clients).await?;
    let load_done = Instant::now();
    // `lag` is how long after the last source write the destination had it all.
    let (lag, reached) = wait_for_count(dest, expected, load_done, cap).await?;
    let total = report.elapsed + lag;
    let revisions = report.operations as f64 * reached as f64 / expected as f64;
    let caught_up_after = (reached >= expected).then_some(lag);
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
        load_rate: rate(report.operations as f64, report.elapsed),
        lag,
        caught_up_after,
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
    if std::env::var("BENCH_KEEPER_ONLY").is_ok() {
        // `make bench-keeper`: the lease keeper's source traffic against
        // listing every lease, spliced into docs/benchmarks.md.
        println!("[1/1] lease keeper traffic");
        let (section, _) = keeper_traffic_section().await?;
        println!("\n{section}");
        return write_section(KEEPER_HEADING, &section);
    }
    if std::env::var("BENCH_WAN_ONLY").is_ok() {
        // `make bench-wan`: bytes across the source link per byte of source
        // change, spliced into docs/benchmarks.md.
        println!("[1/1] bytes across the source link");
        let (section, _) = wan_bytes_section().await?;
        println!("\n{section}");
        return write_section(WAN_HEADING, &section);
    }
    if std::env::var("BENCH_EXACT_ONLY").is_ok() {
        // `make bench-exact`: revision-exact replay next to the prefix
        // mirror and the source alone, spliced into docs/benchmarks.md.
        println!("[1/1] revision-exact replay");
        let (section, _) = exact_replay_section(&sizes).await?;
        println!("\n{section}");
        return write_section(EXACT_HEADING, &section);
    }
    if std::env::var("BENCH_JOBS_ONLY").is_ok() {
        // `make bench-jobs`: many jobs on three replicas, spliced into
        // docs/benchmarks.md.
        println!("[1/1] many jobs on three replicas");
        let (section, _) = many_jobs_section().await?;
        println!("\n{section}");
        return write_section(JOBS_HEADING, &section);
    }
    if std::env::var("BENCH_ZK_ONLY").is_ok() {
        // `make bench-zk`: zk2etcd's full sync, memory and lag, spliced
        // into docs/benchmarks.md.
        println!("[1/1] zk2etcd");
        let section = zk_section().await?;
        println!("\n{section}");
        return write_section(ZK_HEADING, &section);
    }
    if std::env::var("BENCH_LEASES_ONLY").is_ok() {
        // `make bench-leases`: only the lease scenario, spliced into the
        // existing docs/benchmarks.md.
        println!("[1/1] lease mirroring");
        let (section, _) = lease_section(&sizes).await?;
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
    let mut targets: Vec<Target> = Vec::new();
    const STEPS: usize = 15;

    // 1. Full sync, loopback.
    println!(
        "[1/{STEPS}] full sync of {} keys on loopback",
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
    let best_full = best_full_sync(
        &source,
        sizes.full_sync_keys,
        SyncRates::of(&full, sizes.full_sync_keys)?,
        None,
    )
    .await?;
    let ceiling_runs = batched_writer_ceiling(sizes.full_sync_keys).await?;
    let ceiling = best_ceiling(&ceiling_runs);
    let compared = AgainstCeiling {
        scenario: format!(
            "Full sync, {} keys of 100 B, loopback, best of {FULL_SYNC_RUNS} runs, vs the destination's batched-writer ceiling ({CEILING_TXN_OPS}-op txns, best of 1/2/4/8 writers, same keys, empty etcd)",
            group(sizes.full_sync_keys as u64)
        ),
        measure: format!(
            "full sync, {} keys of 100 B, loopback",
            group(sizes.full_sync_keys as u64)
        ),
        rates: best_full,
        ceiling,
        reference: "the batched-writer ceiling",
        share: 0.80,
        rss_mib: None,
    };
    rows.push(compared.row());
    targets.push(compared.target());
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

    // 2. The exact consistency check over everything just mirrored.
    println!("[2/{STEPS}] exact check over {} keys", sizes.full_sync_keys);
    let check = timed_check(&source, &dest).await?;
    anyhow::ensure!(
        check.consistent && check.exact,
        "the check must find the mirror exactly consistent"
    );
    rows.push(Row {
        scenario: format!(
            "Exact consistency check, {} keys",
            group(sizes.full_sync_keys as u64)
        ),
        syncer: format!(
            "{:.2} s, peak RSS {:.1} MiB ({} keys/s); read {} B from the source, {} B from the destination",
            check.elapsed.as_secs_f64(),
            check.peak_rss_mib,
            fmt_rate(sizes.full_sync_keys as f64 / check.elapsed.as_secs_f64(), "").trim(),
            group(check.source_bytes),
            group(check.dest_bytes),
        ),
        make_mirror: "no checker".into(),
        ratio: "n/a".into(),
        target: "exact, memory flat".into(),
    });

    // 3. Restart with everything mirrored and no changes.
    println!(
        "[3/{STEPS}] restart with {} keys mirrored",
        sizes.full_sync_keys
    );
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
    drop((dest, mm_dest));

    // 4. The same keys across a 30 ms round trip to the destination, next
    // to the ceiling through the same link proxy.
    println!(
        "[4/{STEPS}] full sync of {} keys across 30 ms RTT vs the ceiling through the proxy",
        sizes.full_sync_keys
    );
    let rtt_best = {
        let dest = EtcdCluster::start_dest().await?;
        let (proxy, proxied) = LinkProxy::in_front_of(&dest.endpoints()[0]).await?;
        proxy.set_delay(ONE_WAY);
        let first = syncer_full_sync(&source, &dest, Some(&proxied), sizes.full_sync_keys).await?;
        let rates = SyncRates::of(&first, sizes.full_sync_keys)?;
        first.syncer.finish().await?;
        best_full_sync(&source, sizes.full_sync_keys, rates, Some(ONE_WAY)).await?
    };
    let rtt_ceiling_runs = batched_writer_ceiling_via(sizes.full_sync_keys, Some(ONE_WAY)).await?;
    let rtt_ceiling = best_ceiling(&rtt_ceiling_runs);
    notes.push(format!(
        "Ceiling through the 30 ms link proxy, {} keys, by writers: {}.",
        group(sizes.full_sync_keys as u64),
        rtt_ceiling_runs
            .iter()
            .map(|c| format!("{} {}", c.writers, fmt_rate(c.rate, "keys/s")))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let compared = AgainstCeiling {
        scenario: format!(
            "Full sync, {} keys of 100 B, 30 ms RTT, best of {FULL_SYNC_RUNS} runs, vs the batched-writer ceiling through the same link proxy",
            group(sizes.full_sync_keys as u64)
        ),
        measure: format!(
            "full sync, {} keys, 30 ms RTT",
            group(sizes.full_sync_keys as u64)
        ),
        rates: rtt_best,
        ceiling: rtt_ceiling,
        reference: "the ceiling through the same link proxy",
        share: 0.70,
        rss_mib: None,
    };
    rows.push(compared.row());
    targets.push(compared.target());
    drop(source);

    // 5. Full sync across a 30 ms round trip, next to make-mirror.
    println!(
        "[5/{STEPS}] full sync of {} keys across 30 ms RTT vs make-mirror",
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

    // 6 to 9. Incremental: 16 writers at full speed, single-key revisions
    // and 10-key txns, on loopback and across 30 ms; the reference is the
    // same load against the source alone (no tool running).
    let cases = [
        ("Incremental, single-key revisions, loopback", 1usize, false),
        ("Incremental, 10-key txns, loopback", 10, false),
        ("Incremental, single-key revisions, 30 ms RTT", 1, true),
        ("Incremental, 10-key txns, 30 ms RTT", 10, true),
    ];
    for (index, (label, keys_per_txn, delayed)) in cases.into_iter().enumerate() {
        println!("[{}/{STEPS}] {label}", 6 + index);
        let revisions = if keys_per_txn > 1 {
            sizes.incremental_revisions / 5
        } else {
            sizes.incremental_revisions
        };
        let mut load = Load::new(PREFIX, 16, revisions / 16);
        load.keys_per_txn = keys_per_txn;
        load.value_size = 100;
        let alone = source_alone_rate(&load).await?;
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
                notes.push(format!("{label}: etcd-syncer used {txns} txns ({:.1} revisions per txn), {reorders} re-sent after reordering; the writers reached {} with it running, {} against the source alone.", load.writers as f64 * load.ops_per_writer as f64 / txns.max(1.0), fmt_rate(result.load_rate, "rev/s"), fmt_rate(alone, "rev/s")));
                syncer.finish().await?;
            }
            if let Some(child) = child {
                stop(child);
            }
            results.push(result);
        }
        let syncer = &results[0];
        rows.push(Row {
            scenario: format!(
                "{label}, {} revisions from 16 writers",
                group(revisions as u64)
            ),
            syncer: format!(
                "{} (lag at end {})",
                fmt_rate(syncer.rate, "rev/s"),
                syncer.lag
            ),
            make_mirror: format!(
                "{} (lag at end {})",
                fmt_rate(results[1].rate, "rev/s"),
                results[1].lag
            ),
            ratio: ratio(syncer.rate, results[1].rate),
            target: match (delayed, keys_per_txn) {
                (true, 1) => "≥ 3,000 rev/s, lag < 1 s".into(),
                _ => "keeps up (lag < 1 s)".into(),
            },
        });
        targets.push(Target {
            measure: format!("incremental, {}", label.trim_start_matches("Incremental, ")),
            reference: format!(
                "16 writers against the source alone: {}",
                fmt_rate(alone, "rev/s")
            ),
            target: "keeps up (lag < 1 s at the end)".into(),
            result: format!(
                "{} mirrored, lag at end {}; the writers reached {} ({:.0}% of alone) with the syncer, destination etcd and writers sharing the cores",
                fmt_rate(syncer.rate, "rev/s"),
                syncer.lag,
                fmt_rate(syncer.load_rate, "rev/s"),
                100.0 * syncer.load_rate / alone
            ),
            met: syncer.caught_up_within(Duration::from_secs(1)),
        });
    }

    // 10. A million keys: the full sync and its memory, the exact check,
    // the ceiling, then the slow path after a compaction.
    println!(
        "[10/{STEPS}] full sync, exact check and slow path at {} keys",
        sizes.memory_large_keys
    );
    let source = loaded_source(sizes.memory_large_keys).await?;
    let dest = EtcdCluster::start_dest().await?;
    let large = syncer_full_sync(&source, &dest, None, sizes.memory_large_keys).await?;
    let large_rates = SyncRates::of(&large, sizes.memory_large_keys)?;
    large.syncer.finish().await?;
    let large_check = timed_check(&source, &dest).await?;
    anyhow::ensure!(
        large_check.consistent && large_check.exact,
        "the check must find the mirror exactly consistent"
    );
    let best_large = best_full_sync(&source, sizes.memory_large_keys, large_rates, None).await?;
    let large_ceiling_runs = batched_writer_ceiling(sizes.memory_large_keys).await?;
    let large_ceiling = best_ceiling(&large_ceiling_runs);
    let slow = slow_path_after_compaction(&source, &dest, sizes.memory_large_keys).await?;
    drop((source, dest));
    let compared = AgainstCeiling {
        scenario: format!(
            "Full sync, {} keys of 100 B, loopback, best of {FULL_SYNC_RUNS} runs, vs the ceiling at {} keys",
            group(sizes.memory_large_keys as u64),
            group(sizes.memory_large_keys as u64)
        ),
        measure: format!(
            "full sync, {} keys of 100 B, loopback",
            group(sizes.memory_large_keys as u64)
        ),
        rates: best_large,
        ceiling: large_ceiling,
        reference: "the batched-writer ceiling at the same key count",
        share: 0.80,
        rss_mib: Some(large.peak_rss_mib),
    };
    rows.push(compared.row());
    targets.push(compared.target());
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
    let copy_wall = sizes.memory_large_keys as f64 / best_large.from_start;
    let slow_share = slow.wall.as_secs_f64() / copy_wall;
    rows.push(Row {
        scenario: format!(
            "Slow path after a compaction, {} keys of which 1% changed, vs the fastest full copy of them into an empty destination",
            group(sizes.memory_large_keys as u64)
        ),
        syncer: format!(
            "{:.2} s ({}); peak RSS {:.1} MiB",
            slow.wall.as_secs_f64(),
            slow.summary(),
            slow.peak_rss_mib
        ),
        make_mirror: format!("full copy {copy_wall:.2} s"),
        ratio: format!("{:.0}% of the full copy", 100.0 * slow_share),
        target: "only the differences; ≤ 20% of the full copy".into(),
    });
    targets.push(Target {
        measure: format!(
            "slow path after compaction, {} keys, 1% changed",
            group(sizes.memory_large_keys as u64)
        ),
        reference: format!(
            "the fastest full copy of the same keys into an empty destination: {copy_wall:.2} s"
        ),
        target: "writes only the differences; wall time ≤ 20% of the full copy".into(),
        result: format!(
            "{:.2} s = {:.0}% of the full copy; wrote {} puts and {} deletes (exactly the differences, asserted); read each side once ({} B source, {} B destination)",
            slow.wall.as_secs_f64(),
            100.0 * slow_share,
            slow.field("put"),
            slow.field("deleted"),
            slow.field("source_bytes"),
            slow.field("dest_bytes"),
        ),
        met: slow_share <= 0.20,
    });
    rows.push(Row {
        scenario: format!(
            "Exact consistency check, {} keys",
            group(sizes.memory_large_keys as u64)
        ),
        syncer: format!(
            "{:.2} s, peak RSS {:.1} MiB; read {} B from the source, {} B from the destination",
            large_check.elapsed.as_secs_f64(),
            large_check.peak_rss_mib,
            group(large_check.source_bytes),
            group(large_check.dest_bytes),
        ),
        make_mirror: "no checker".into(),
        ratio: "n/a".into(),
        target: "< 10 s, < 64 MiB".into(),
    });
    targets.push(Target {
        measure: format!(
            "exact check, {} keys",
            group(sizes.memory_large_keys as u64)
        ),
        reference: "—".into(),
        target: "< 10 s, < 64 MiB; bytes read from each side".into(),
        result: format!(
            "{:.2} s, peak RSS {:.1} MiB; read {} B from the source and {} B from the destination (keys and values, each side once)",
            large_check.elapsed.as_secs_f64(),
            large_check.peak_rss_mib,
            group(large_check.source_bytes),
            group(large_check.dest_bytes),
        ),
        met: large_check.elapsed < Duration::from_secs(10) && large_check.peak_rss_mib < 64.0,
    });

    println!("[11/{STEPS}] lease mirroring");
    let (leases, lease_figures) = lease_section(&sizes).await?;
    targets.push(Target {
        measure: format!(
            "mirrored leases: {} keys on {} leases",
            group(sizes.leased_keys as u64),
            group(sizes.lease_count as u64)
        ),
        reference: format!(
            "`--leases strip` on the same keys: peak RSS {:.1} MiB",
            lease_figures.strip_rss_mib
        ),
        target: "keepalive traffic and RSS reported; RSS < 64 MiB".into(),
        result: format!(
            "peak RSS {:.1} MiB; {:.0} keepalives/s in steady state ({} failures)",
            lease_figures.faithful_rss_mib, lease_figures.keepalives_per_s, lease_figures.failures
        ),
        met: lease_figures.faithful_rss_mib < 64.0,
    });
    targets.push(lease_rate_target(&sizes, &lease_figures));
    targets.push(keepalive_target(&sizes, &lease_figures));
    println!("[12/{STEPS}] revision-exact replay");
    let (exact, exact_target) = exact_replay_section(&sizes).await?;
    targets.push(exact_target);
    println!("[13/{STEPS}] lease keeper traffic");
    let (keeper, keeper_target) = keeper_traffic_section().await?;
    targets.push(keeper_target);
    println!("[14/{STEPS}] bytes across the source link");
    let (wan, wan_target) = wan_bytes_section().await?;
    targets.push(wan_target);
    println!("[15/{STEPS}] many jobs on three replicas");
    let (jobs, jobs_targets) = many_jobs_section().await?;
    targets.extend(jobs_targets);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md");
    let existing = std::fs::read_to_string(&path).unwrap_or_default();
    targets.push(no_regression(&targets, &existing));
    let report = render(&rows, &notes)?;
    let report = format!("{}\n\n{}", report.trim_end(), render_targets(&targets)?);
    let report = splice_lease_section(&report, &leases);
    let report = splice_section(&report, EXACT_HEADING, &exact);
    let report = splice_section(&report, KEEPER_HEADING, &keeper);
    let report = splice_section(&report, WAN_HEADING, &wan);
    let report = splice_section(&report, JOBS_HEADING, &jobs);
    println!("\n{report}");
    if std::env::var("BENCH_QUICK").is_err() {
        let report = keep_written_sections(&report, &existing);
        std::fs::write(&path, report)?;
        println!("written to {}", path.display());
    }
    Ok(())
}

/// A full sync's best rates next to a ceiling measured in the same run,
/// as a row of the main table and of the targets table. Judged on the
/// in-process rate: the ceiling, too, is timed from its first txn with
/// its client already connected.
struct AgainstCeiling<'a> {
    scenario: String,
    measure: String,
    rates: SyncRates,
    ceiling: &'a CeilingRun,
    reference: &'a str,
    /// The target share of the ceiling.
    share: f64,
    /// Peak RSS, where the target bounds it.
    rss_mib: Option<f64>,
}

impl AgainstCeiling<'_> {
    fn target_text(&self) -> String {
        format!(
            "≥ {:.0}% of the ceiling{}",
            100.0 * self.share,
            if self.rss_mib.is_some() {
                ", peak RSS < 64 MiB"
            } else {
                ""
            }
        )
    }

    fn row(&self) -> Row {
        Row {
            scenario: self.scenario.clone(),
            syncer: format!(
                "{} in process ({} from process start)",
                fmt_rate(self.rates.in_process, "keys/s"),
                fmt_rate(self.rates.from_start, "keys/s")
            ),
            make_mirror: format!(
                "ceiling {} ({} writers)",
                fmt_rate(self.ceiling.rate, "keys/s"),
                self.ceiling.writers
            ),
            ratio: format!(
                "{:.0}% of the ceiling ({:.0}% from process start)",
                100.0 * self.rates.in_process / self.ceiling.rate,
                100.0 * self.rates.from_start / self.ceiling.rate
            ),
            target: self.target_text(),
        }
    }

    fn target(&self) -> Target {
        let in_process = self.rates.in_process / self.ceiling.rate;
        Target {
            measure: self.measure.clone(),
            reference: format!(
                "{}: {} ({} writers)",
                self.reference,
                fmt_rate(self.ceiling.rate, "keys/s"),
                self.ceiling.writers
            ),
            target: self.target_text(),
            result: format!(
                "{} in process = {:.0}%; from process start {} = {:.0}%{}",
                fmt_rate(self.rates.in_process, "keys/s"),
                100.0 * in_process,
                fmt_rate(self.rates.from_start, "keys/s"),
                100.0 * self.rates.from_start / self.ceiling.rate,
                self.rss_mib
                    .map_or(String::new(), |rss| format!("; peak RSS {rss:.1} MiB"))
            ),
            met: in_process >= self.share && self.rss_mib.is_none_or(|rss| rss < 64.0),
        }
    }
}

/// One row of the targets table.
struct Target {
    measure: String,
    reference: String,
    target: String,
    result: String,
    met: bool,
}

const TARGETS_HEADING: &str = "## The targets, from this run";
/// The table's heading before issue 28's rows joined it; read once, to
/// compare a new run with the last one.
const OLD_TARGETS_HEADING: &str = "## The issue 15 targets, from this run";

/// The `measure` and `met` columns of the targets table in `report` (the
/// last written docs/benchmarks.md), by measure.
fn previous_targets(report: &str) -> Vec<(String, bool)> {
    let Some(at) = report
        .find(TARGETS_HEADING)
        .or_else(|| report.find(OLD_TARGETS_HEADING))
    else {
        return Vec::new();
    };
    let section = &report[at..];
    let section = &section[..section[3..]
        .find("\n## ")
        .map_or(section.len(), |end| end + 3)];
    section
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| measure"))
        .filter_map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split(" | ").map(str::trim).collect();
            (cells.len() >= 5).then(|| (cells[0].to_string(), cells[cells.len() - 1] == "yes"))
        })
        .collect()
}

/// Issue 28's last target: every row the previous run met is met again.
fn no_regression(targets: &[Target], previous: &str) -> Target {
    let before = previous_targets(previous);
    let compared: Vec<&Target> = targets
        .iter()
        .filter(|t| before.iter().any(|(m, _)| *m == t.measure))
        .collect();
    let regressed: Vec<&str> = compared
        .iter()
        .filter(|t| !t.met && before.iter().any(|(m, met)| *m == t.measure && *met))
        .map(|t| t.measure.as_str())
        .collect();
    let improved = compared
        .iter()
        .filter(|t| t.met && before.iter().any(|(m, met)| *m == t.measure && !*met))
        .count();
    Target {
        measure: "no regression".into(),
        reference: format!(
            "the targets table docs/benchmarks.md held before this run ({} rows)",
            before.len()
        ),
        target: "every row met there is met again".into(),
        result: if regressed.is_empty() {
            format!(
                "{} rows compared: none regressed, {improved} newly met",
                compared.len()
            )
        } else {
            format!("regressed: {}", regressed.join("; "))
        },
        met: !before.is_empty() && regressed.is_empty(),
    }
}

fn render_targets(targets: &[Target]) -> Result<String> {
    let mut out = String::new();
    writeln!(out, "{TARGETS_HEADING}\n")?;
    writeln!(
        out,
        "Each figure next to its reference measured in the same `make bench` run, on the machine and etcd named above. \
         A full sync is judged on its in-process rate (from the start of the full sync to its committed checkpoint), \
         because the ceiling too is timed from its first txn with its client connected; the rate from process start \
         (connects, the lock, the meta reads) is shown next to it. The rows from \"mirrored leases\" on are issue 28's \
         (leases, the keeper, the WAN, many jobs, no regression); their sections below give the detail. Where a \
         target is not met, \"Performance at the destination's limit\" and \"Leased full sync: where the time goes\" \
         below name the bottleneck with its evidence.\n"
    )?;
    write_target_rows(&mut out, targets)?;
    Ok(out)
}

/// A table of targets, each next to its reference from the same run.
fn write_target_rows(out: &mut String, targets: &[Target]) -> Result<()> {
    writeln!(
        out,
        "| measure | reference in the same run | target | result | met |"
    )?;
    writeln!(out, "|---|---|---|---|---|")?;
    for t in targets {
        writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            t.measure,
            t.reference,
            t.target,
            t.result,
            if t.met { "yes" } else { "**no**" }
        )?;
    }
    Ok(())
}

/// The load's rate against a fresh source with nothing else running: the
/// highest rate this machine sustains for it, the incremental reference.
async fn source_alone_rate(load: &Load) -> Result<f64> {
    let source = EtcdCluster::start_source().await?;
    let report = load.run(&load_clients(&source).await?).await?;
    Ok(rate(report.operations as f64, report.elapsed))
}

/// The four connections the load's 16 writers share, whatever is measured.
async fn load_clients(source: &EtcdCluster) -> Result<Vec<Client>> {
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(source.client().await?);
    }
    Ok(clients)
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
    /// CPU seconds over the full sync: source etcd, destination etcd, syncer.
    cpu: (f64, f64, f64),
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
    let cpu_before = servers_cpu(&source, &dest).await?;
    let started = Instant::now();
    let syncer = Syncer::start(mode, &args).await?;
    // Done when the job watches (its full sync committed), read from the
    // syncer's metrics: a count of the destination's prefix every few
    // milliseconds walks its index, and would load the destination more
    // the longer the run (seconds of CPU over a slow one).
    while syncer
        .metric(
            "etcd_syncer_job_state",
            &[("job", "bench"), ("state", "watching")],
        )
        .await?
        != 1.0
    {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(900),
            "the {mode} full sync did not finish"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let full_sync = started.elapsed();
    let (_, reached) = wait_for_count(&dest, keys as i64, started, Duration::ZERO).await?;
    anyhow::ensure!(reached == keys as i64, "mirrored {reached} of {keys} keys");
    let cpu = (
        etcd_cpu_seconds(&source).await? - cpu_before.0,
        etcd_cpu_seconds(&dest).await? - cpu_before.1,
        process_cpu_seconds(syncer.pid().context("pid")?.as_raw() as u32)?,
    );
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
        cpu,
        window,
        keepalives,
        failures,
        mirrored,
        peak_rss_mib,
        test_renewals_per_s,
    })
}

/// The lease figures the targets table reads.
struct LeaseFigures {
    /// Keys per second of the full sync, faithful and strip.
    faithful_rate: f64,
    strip_rate: f64,
    /// CPU seconds over each full sync: source etcd, destination etcd, syncer.
    faithful_cpu: (f64, f64, f64),
    strip_cpu: (f64, f64, f64),
    faithful_rss_mib: f64,
    strip_rss_mib: f64,
    keepalives_per_s: f64,
    failures: f64,
}

/// The lease scenario, faithful and strip, as a markdown section.
async fn lease_section(sizes: &Sizes) -> Result<(String, LeaseFigures)> {
    let (leases, keys) = (sizes.lease_count, sizes.leased_keys);
    let faithful = lease_run("faithful", leases, keys, sizes.lease_window).await?;
    let strip = lease_run(
        "strip",
        leases,
        keys,
        sizes.lease_window.min(Duration::from_secs(60)),
    )
    .await?;
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
         until the job watches (its full sync committed: read from its metrics every 10 ms, then the destination's key count checked once); then a steady state with no source writes, over \
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
        "| `--leases` | full sync | CPU s over it: source etcd / destination etcd / syncer | destination leases | keepalives/s (steady state) | keepalive failures | peak RSS |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|")?;
    for (mode, run) in [("faithful", &faithful), ("strip (reference)", &strip)] {
        writeln!(
            out,
            "| {mode} | {:.1} s ({}) | {:.2} / {:.2} / {:.2} | {} | {:.0} ({} in {:.0} s) | {} | {:.1} MiB |",
            run.full_sync.as_secs_f64(),
            fmt_rate(rate(keys as f64, run.full_sync), "keys/s"),
            run.cpu.0,
            run.cpu.1,
            run.cpu.2,
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
    writeln!(
        out,
        "\nWhere the faithful run's extra time goes: each of the {} new leases is one \
         `LeaseTimeToLive` on the source (its TTL is readable no other way) and one \
         `LeaseGrant` (a raft proposal of its own) on the destination, granted ahead of the copy \
         by a keys-only look-ahead. Over the full sync the source etcd spent {:.2} CPU s more than \
         with strip ({:.0} µs per lease), the destination etcd {:.2} more ({:.0} µs per lease), \
         the syncer {:.2} more ({:.0} µs per lease); the three share the machine's cores.",
        group(leases as u64),
        faithful.cpu.0 - strip.cpu.0,
        (faithful.cpu.0 - strip.cpu.0) * 1e6 / leases as f64,
        faithful.cpu.1 - strip.cpu.1,
        (faithful.cpu.1 - strip.cpu.1) * 1e6 / leases as f64,
        faithful.cpu.2 - strip.cpu.2,
        (faithful.cpu.2 - strip.cpu.2) * 1e6 / leases as f64,
    )?;
    let figures = LeaseFigures {
        faithful_rate: rate(keys as f64, faithful.full_sync),
        strip_rate: rate(keys as f64, strip.full_sync),
        faithful_cpu: faithful.cpu,
        strip_cpu: strip.cpu,
        faithful_rss_mib: faithful.peak_rss_mib,
        strip_rss_mib: strip.peak_rss_mib,
        keepalives_per_s: rate(faithful.keepalives, faithful.window),
        failures: faithful.failures,
    };
    Ok((out, figures))
}

/// The leased full sync's rate against `--leases strip` on the same keys
/// (issue 28's first target), with the CPU each process spent.
fn lease_rate_target(sizes: &Sizes, figures: &LeaseFigures) -> Target {
    let share = figures.faithful_rate / figures.strip_rate.max(1.0);
    let cpu = |(source, dest, syncer): (f64, f64, f64)| {
        format!("source etcd {source:.2}, destination etcd {dest:.2}, syncer {syncer:.2} CPU s")
    };
    Target {
        measure: format!(
            "leased full sync, {} keys on {} leases (`--leases faithful`)",
            group(sizes.leased_keys as u64),
            group(sizes.lease_count as u64)
        ),
        reference: format!(
            "`--leases strip` on the same keys: {} ({})",
            fmt_rate(figures.strip_rate, "keys/s"),
            cpu(figures.strip_cpu)
        ),
        target: "≥ 70% of the strip rate".into(),
        result: format!(
            "{} = {:.0}% ({})",
            fmt_rate(figures.faithful_rate, "keys/s"),
            share * 100.0,
            cpu(figures.faithful_cpu)
        ),
        met: share >= 0.7,
    }
}

/// Issue 28's keepalive target: in steady state at most one renewal per
/// destination lease per third of its TTL.
fn keepalive_target(sizes: &Sizes, figures: &LeaseFigures) -> Target {
    let period = (LEASE_TTL + LEASE_GRACE) as f64 / 3.0;
    let ceiling = sizes.lease_count as f64 / period;
    // Renewals come in bursts (every lease was granted in the same full
    // sync): a window's two ends may cut one burst, so one more renewal
    // per lease than the window holds periods is still one per period.
    let window = sizes.lease_window.as_secs_f64();
    let per_lease = figures.keepalives_per_s * window / sizes.lease_count as f64;
    Target {
        measure: format!(
            "mirrored leases: steady-state keepalives, {} leases",
            group(sizes.lease_count as u64)
        ),
        reference: format!(
            "one renewal per lease per third of its {} s TTL: {ceiling:.0}/s",
            LEASE_TTL + LEASE_GRACE
        ),
        target: "at or below it (within one burst of renewals), no failures".into(),
        result: format!(
            "{:.0}/s: {per_lease:.1} renewals per lease in {window:.0} s ({:.1} periods); {} failures",
            figures.keepalives_per_s,
            window / period,
            figures.failures
        ),
        met: per_lease <= window / period + 1.0 && figures.failures == 0.0,
    }
}

/// `report` with its lease section (from the heading to the end) replaced
/// by `section`, or `section` appended.
fn splice_lease_section(report: &str, section: &str) -> String {
    splice_section(report, LEASES_HEADING, section)
}

/// `report` with its `heading` section (to the next `## ` or the end)
/// replaced by `section`, or `section` appended.
fn splice_section(report: &str, heading: &str, section: &str) -> String {
    let Some(at) = report.find(heading) else {
        return format!("{}\n\n{section}", report.trim_end());
    };
    let rest = &report[at + heading.len()..];
    let after = rest.find("\n## ").map(|end| &rest[end + 1..]).unwrap_or("");
    let mut out = format!("{}\n\n{}", report[..at].trim_end(), section.trim_end());
    if !after.is_empty() {
        out.push_str("\n\n");
        out.push_str(after);
    }
    out
}

/// Replaces (or appends) `heading`'s section of docs/benchmarks.md,
/// keeping every other section.
fn write_section(heading: &str, section: &str) -> Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md");
    let existing = std::fs::read_to_string(&path).unwrap_or_default();
    let spliced = splice_section(&existing, heading, section);
    std::fs::write(&path, keep_written_sections(&spliced, &existing))?;
    println!("written to {}", path.display());
    Ok(())
}

const JOBS_HEADING: &str = "## Many jobs on three replicas";
const EXACT_HEADING: &str = "## Revision-exact replay";

/// How long after `since` the destination's revision reached `target`
/// (`None`: not within `cap` of it).
async fn reach_revision(
    dest: &EtcdCluster,
    target: i64,
    since: Instant,
    cap: Duration,
) -> Result<Option<Duration>> {
    loop {
        if dest.revision().await? >= target {
            return Ok(Some(since.elapsed()));
        }
        if since.elapsed() > cap {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `--revision-exact` under the incremental load (16 writers, single-key
/// revisions, loopback), from an empty standby replaying from revision 1:
/// the rate it replays and the lag at the end, next to the prefix mirror
/// (the incremental mode) on the same load and the writers against the
/// source alone, all in this run.
async fn exact_replay_section(sizes: &Sizes) -> Result<(String, Target)> {
    use std::fmt::Write as _;
    let revisions = sizes.incremental_revisions;
    let mut load = Load::new(PREFIX, 16, revisions / 16);
    load.value_size = 100;
    let alone = source_alone_rate(&load).await?;
    let cap = sizes.make_mirror_cap;
    // Revision-exact: done when the standby's revision is the source's.
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    let mut args = mirror_args(&source, &dest, "");
    let at = args
        .iter()
        .position(|a| a == "--prefix")
        .context("--prefix")?;
    args.drain(at..at + 2);
    args.push("--revision-exact".into());
    args.extend(extra_syncer_args());
    let exact = Syncer::start("exact", &args).await?;
    e2e::eventually(
        Duration::from_secs(120),
        "exact replay watching",
        || async {
            Ok(exact
                .metric(
                    "etcd_syncer_job_state",
                    &[("job", "root"), ("state", "watching")],
                )
                .await?
                == 1.0)
        },
    )
    .await?;
    let report = load.run(&load_clients(&source).await?).await?;
    let load_done = Instant::now();
    let head = source.revision().await?;
    let caught_up = reach_revision(&dest, head, load_done, cap).await?;
    let behind = head - dest.revision().await?;
    let exact_txns = exact
        .metric("etcd_syncer_txns_total", &[("job", "root")])
        .await?;
    let exact_reorders = exact
        .metric("etcd_syncer_txn_reorders_total", &[("job", "root")])
        .await?;
    let exact_load_rate = rate(report.operations as f64, report.elapsed);
    let exact_rate = rate(
        (report.operations as i64 - behind.max(0)) as f64,
        report.elapsed + caught_up.unwrap_or(cap),
    );
    exact.finish().await?;
    // An outage past the source's compaction: the same load with the
    // syncer down, the source compacted at its head, then the syncer
    // started again: from its start to the standby at the source's
    // revision (`--exact-gap catch-up`).
    let from = dest.revision().await?;
    let mut outage = load.clone();
    outage.tag = "outage".into();
    outage.run(&load_clients(&source).await?).await?;
    let to = source.compact().await?;
    let restarted = Instant::now();
    let again = Syncer::start("exact-catch-up", &args).await?;
    let caught_up_gap = reach_revision(&dest, to, restarted, cap).await?;
    let gap_keys = again
        .metric(
            "etcd_syncer_full_sync_keys_total",
            &[("job", "root"), ("op", "put")],
        )
        .await?
        + again
            .metric(
                "etcd_syncer_full_sync_keys_total",
                &[("job", "root"), ("op", "delete")],
            )
            .await?;
    let catch_ups = again
        .metric("etcd_syncer_exact_catch_ups_total", &[("job", "root")])
        .await?;
    again.finish().await?;
    let gap = to - from;
    drop((source, dest));
    // The prefix mirror on the same load.
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    let mirror = start_syncer(&source, &dest, None, "incremental").await?;
    wait_watching(&mirror).await?;
    let incremental = incremental(&source, &dest, &load, cap).await?;
    mirror.finish().await?;
    let lag = |after: Option<Duration>| match after {
        Some(after) => format!("{:.2} s", after.as_secs_f64()),
        None => format!(
            "> {:.0} s, {} revisions behind",
            cap.as_secs_f64(),
            group(behind.max(0) as u64)
        ),
    };
    let mut out = String::new();
    writeln!(out, "{EXACT_HEADING}\n")?;
    writeln!(
        out,
        "`make bench-exact`: {} single-key revisions from 16 writers on loopback (100 B values); the revision-exact standby starts empty and replays from revision 1, one destination txn per source revision, in order. Measured in the same run:\n",
        group(revisions as u64)
    )?;
    writeln!(
        out,
        "| | replayed / mirrored | lag at the end | writers' rate meanwhile |"
    )?;
    writeln!(out, "|---|---|---|---|")?;
    writeln!(
        out,
        "| revision-exact (`--revision-exact`) | {} ({exact_txns} txns, one per revision; {exact_reorders} windows re-sent after the server reordered them) | {} | {} |",
        fmt_rate(exact_rate, "rev/s"),
        lag(caught_up),
        fmt_rate(exact_load_rate, "rev/s")
    )?;
    writeln!(
        out,
        "| prefix mirror (incremental mode, coalesced txns) | {} | {} | {} |",
        fmt_rate(incremental.rate, "rev/s"),
        incremental.lag,
        fmt_rate(incremental.load_rate, "rev/s")
    )?;
    writeln!(
        out,
        "| the writers against the source alone | | | {} |",
        fmt_rate(alone, "rev/s")
    )?;
    let met = caught_up.is_some_and(|d| d < Duration::from_secs(1));
    writeln!(
        out,
        "\nReplay is {:.0}% of the prefix mirror's rate and {:.0}% of what the writers reach alone; target: keeps up (lag < 1 s at the end): {}.",
        100.0 * exact_rate / incremental.rate,
        100.0 * exact_rate / alone,
        if met { "met" } else { "not met" }
    )?;
    let replaying_gap = gap as f64 / exact_rate.max(1e-9);
    writeln!(
        out,
        "\nCatch-up after an outage past the source's compaction (the same load again with the syncer down, the source compacted at its head): {} revisions, {} keys changed, written as exactly {} standby revisions in {} catch-up(s); from the syncer's start to the standby at the source's revision: {}, against {:.1} s to replay as many revisions at the rate above (were they still there).",
        group(gap as u64),
        group(gap_keys as u64),
        group(gap as u64),
        catch_ups,
        caught_up_gap.map_or_else(|| format!("> {:.0} s", cap.as_secs_f64()), |d| format!("{:.2} s", d.as_secs_f64())),
        replaying_gap
    )?;
    let target = Target {
        measure: "revision-exact replay, single-key revisions, loopback".into(),
        reference: format!(
            "the prefix mirror on the same load: {}; the writers alone: {}",
            fmt_rate(incremental.rate, "rev/s"),
            fmt_rate(alone, "rev/s")
        ),
        target: "keeps up (lag < 1 s at the end)".into(),
        result: format!(
            "{} replayed, lag at end {}",
            fmt_rate(exact_rate, "rev/s"),
            lag(caught_up)
        ),
        met,
    };
    Ok((out, target))
}
const KEEPER_HEADING: &str = "## Lease keeper traffic";
const WAN_HEADING: &str = "## Bytes across the source link";

/// Job `bench` mirroring `prefix`, the source reached at `proxied` (a link
/// proxy that counts bytes), with the default intervals as deployed (the
/// test harness shortens them) and no periodic check.
fn deployed_via(
    source: &EtcdCluster,
    dest: &EtcdCluster,
    prefix: &str,
    proxied: &str,
) -> Result<Vec<String>> {
    let mut args = e2e::replace_flag(
        mirror_args(source, dest, prefix),
        "--src-endpoints",
        proxied,
    )?;
    args = e2e::replace_flag(args, "--progress-interval", "5s")?;
    args = e2e::replace_flag(args, "--watch-idle-timeout", "20s")?;
    args.extend(e2e::args(&[
        "--job-name",
        "bench",
        "--check-interval",
        "0s",
    ]));
    Ok(args)
}

/// The syncer reaches the source through a link proxy that counts bytes
/// both ways: what a full sync, an incremental load, an idle minute and
/// one `check` cost on the (metered) link between regions, per byte of
/// source change (keys plus values written).
async fn wan_bytes_section() -> Result<(String, Target)> {
    const KEYS: usize = 100_000;
    const WRITERS: usize = 16;
    const PUTS_PER_WRITER: usize = 1_250;
    const VALUE: usize = 100;
    const IDLE: Duration = Duration::from_secs(30);
    let source = loaded_source(KEYS).await?;
    let dest = EtcdCluster::start_dest().await?;
    let (proxy, proxied) = LinkProxy::in_front_of(&source.endpoints()[0]).await?;
    let bytes = || (proxy.forwarded_to_server(), proxy.forwarded_to_client());
    let since = |before: (u64, u64)| {
        let now = bytes();
        (now.0 - before.0, now.1 - before.1)
    };
    let args = deployed_via(&source, &dest, PREFIX, &proxied)?;

    // Full sync: from the process start (connects, member list, reads).
    let full_change = (KEYS * (bench_key(0).len() + bench_value().len())) as f64;
    let before = bytes();
    let syncer = Syncer::start("wan", &args).await?;
    wait_watching(&syncer).await?;
    let full = since(before);

    // Idle: nothing changes on the source.
    let before = bytes();
    tokio::time::sleep(IDLE).await;
    let idle = since(before);
    let idle_per_minute = (idle.0 + idle.1) as f64 * 60.0 / IDLE.as_secs_f64();

    // Incremental: single-key puts from 16 writers, written directly to the
    // source (not through the proxy), until the syncer applied them all.
    let mut load = Load::new(PREFIX, WRITERS, PUTS_PER_WRITER);
    load.value_size = VALUE;
    load.tag = "wan".into();
    let key_bytes = PREFIX.len() + "w00/0000000-00".len();
    let incremental_change = (WRITERS * PUTS_PER_WRITER * (key_bytes + VALUE)) as f64;
    let clients = load_clients(&source).await?;
    let before = bytes();
    let report = load.run(&clients).await?;
    let applied_from = Instant::now();
    while (syncer
        .metric("etcd_syncer_last_synced_revision", &[("job", "bench")])
        .await? as i64)
        < report.last_revision
    {
        anyhow::ensure!(
            applied_from.elapsed() < Duration::from_secs(300),
            "the syncer did not apply the load"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let incremental = since(before);
    syncer.finish().await?;

    // One `check` of the whole prefix, the source through the proxy.
    let before = bytes();
    let status = Command::new(e2e::syncer::binary())
        .args([
            "check",
            "--src-endpoints",
            &proxied,
            "--dst-endpoints",
            &dest.endpoints_arg(),
            "--job-name",
            "bench",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "check after the load: {status}");
    let check = since(before);
    let check_keys = KEYS + WRITERS * PUTS_PER_WRITER;

    let mut out = String::new();
    writeln!(out, "{WAN_HEADING}\n")?;
    writeln!(
        out,
        "Produced by `make bench-wan` on {}; {}. The syncer reaches the source through a link \
         proxy that counts bytes both ways (to the source / from the source); the destination is \
         direct. Source change: the bytes of keys plus values written. Default intervals \
         (`--progress-interval 5s`), no periodic check in the mirror.\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        machine()?,
    )?;
    writeln!(
        out,
        "| case | source change | bytes to / from the source | per byte of change |\n|---|---|---|---|"
    )?;
    let row = |case: String, change: Option<f64>, (up, down): (u64, u64)| {
        format!(
            "| {case} | {} | {} / {} | {} |",
            change.map_or("none".to_string(), |c| format!("{} B", group(c as u64))),
            group(up),
            group(down),
            change.map_or("—".to_string(), |c| format!(
                "{:.2}",
                (up + down) as f64 / c
            )),
        )
    };
    writeln!(
        out,
        "{}",
        row(
            format!(
                "full sync of {} keys of 100 B, from process start",
                group(KEYS as u64)
            ),
            Some(full_change),
            full
        )
    )?;
    writeln!(
        out,
        "{}",
        row(
            format!(
                "incremental: {} single-key puts of {VALUE} B from {WRITERS} writers",
                group((WRITERS * PUTS_PER_WRITER) as u64)
            ),
            Some(incremental_change),
            incremental
        )
    )?;
    writeln!(
        out,
        "{}",
        row(
            format!("idle, per minute ({} s measured)", IDLE.as_secs()),
            None,
            (
                (idle.0 as f64 * 60.0 / IDLE.as_secs_f64()) as u64,
                (idle.1 as f64 * 60.0 / IDLE.as_secs_f64()) as u64
            )
        )
    )?;
    writeln!(
        out,
        "{}",
        row(
            format!(
                "one `check` of the prefix ({} keys)",
                group(check_keys as u64)
            ),
            None,
            check
        )
    )?;
    writeln!(
        out,
        "\nIdle traffic is {} B per minute (watch progress notifications and keepalives of the \
         gRPC connection). These rows ran on the etcd named above with the default \
         `--src-compression auto`: gzip only if every source member runs etcd 3.5 or later \
         (3.4 refuses gzip-compressed requests).",
        group(idle_per_minute as u64)
    )?;
    let compression = match etcd35_binary() {
        Some(binary) => Some(compression_section(&binary, &mut out).await?),
        None => {
            writeln!(
                out,
                "\nNo etcd 3.5 binary (`make deps` installs one): compression not measured."
            )?;
            None
        }
    };
    let per_byte = |(up, down): (u64, u64), change: f64| (up + down) as f64 / change;
    let target = Target {
        measure: "bytes across the source link per byte of source change".into(),
        reference: "the bytes of keys plus values written on the source".into(),
        target: "reported for a full sync, an incremental load and one check; compression measured on and off".into(),
        result: format!(
            "full sync {:.2}, incremental {:.2} per byte of change; one check of {} keys {} B; idle {} B per minute{}",
            per_byte(full, full_change),
            per_byte(incremental, incremental_change),
            group(check_keys as u64),
            group(check.0 + check.1),
            group(idle_per_minute as u64),
            compression.as_deref().unwrap_or("; compression not measured"),
        ),
        met: compression.is_some(),
    };
    Ok((out, target))
}

/// 100,000 leases on the source, 1,000 of them under the job's prefix: the
/// syncer's whole source traffic per minute in steady state (keeper probes
/// and head reads, and the watch's progress requests), through a link
/// proxy, against listing every source lease (`LeaseLeases`) once per
/// keeper tick, what a keeper that listed the source's leases would send.
async fn keeper_traffic_section() -> Result<(String, Target)> {
    use std::fmt::Write as _;
    const ALL: usize = 100_000;
    const USED: usize = 1_000;
    const TTL: i64 = 60;
    const PREFIX: &str = "/keeper/";
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    let client = source.client().await?;
    // The used leases are renewed; the others outlive the run on their own.
    let used = e2e::leases::grant_leases(&client, USED, TTL).await?;
    e2e::leases::grant_leases(&client, ALL - USED, 3_600).await?;
    let renewer = e2e::leases::LeaseRenewer::start(
        source.client().await?,
        &used,
        Duration::from_secs(TTL as u64 / 3),
    );
    let entries: Vec<(String, String, i64)> = used
        .iter()
        .enumerate()
        .map(|(i, lease)| (format!("{PREFIX}k{i:04}"), "v".repeat(100), *lease))
        .collect();
    e2e::leases::put_leased(&mut source.client().await?, &entries).await?;

    let endpoint = source.endpoints()[0].clone();
    let (proxy, proxied) = e2e::proxy::LinkProxy::in_front_of(&endpoint).await?;
    let args = deployed_via(&source, &dest, PREFIX, &proxied)?;
    let syncer = Syncer::start("keeper", &args).await?;
    wait_watching(&syncer).await?;
    let mirrored = syncer
        .metric("etcd_syncer_leases_mirrored", &[("job", "bench")])
        .await?;
    // Past the first renewals of the leases the full sync granted.
    tokio::time::sleep(Duration::from_secs(TTL as u64)).await;
    let bytes = || proxy.forwarded_to_server() + proxy.forwarded_to_client();
    let (before, probes_before) = (
        bytes(),
        syncer
            .metric("etcd_syncer_lease_keepalives_total", &[("job", "bench")])
            .await?,
    );
    let window = Duration::from_secs(60);
    tokio::time::sleep(window).await;
    let per_minute = (bytes() - before) as f64;
    let renewals = syncer
        .metric("etcd_syncer_lease_keepalives_total", &[("job", "bench")])
        .await?
        - probes_before;
    syncer.finish().await?;
    renewer.stop();

    // One listing of every lease, through a proxy of its own.
    let (list_proxy, list_endpoint) = e2e::proxy::LinkProxy::in_front_of(&endpoint).await?;
    let mut lister = etcd_client::Client::connect([list_endpoint], None).await?;
    lister.status().await?;
    let listed_before = list_proxy.forwarded_to_server() + list_proxy.forwarded_to_client();
    let listed = lister.leases().await?.leases().len();
    let listing = (list_proxy.forwarded_to_server() + list_proxy.forwarded_to_client()
        - listed_before) as f64;
    // The keeper ticks every sixth of the shortest destination TTL (TTL +
    // 30 s grace), at least every second.
    let ticks_per_minute = 60.0 / ((TTL as f64 + 30.0) / 6.0).ceil().max(1.0);
    let listing_per_minute = listing * ticks_per_minute;

    let mut out = String::new();
    writeln!(out, "{KEEPER_HEADING}\n")?;
    writeln!(
        out,
        "Produced by `make bench-keeper` on {}; {}. The source holds {} leases; {} of them (TTL {TTL} s, renewed by the bench) carry the job's {} keys, the rest have no key under the prefix. The syncer reaches the source through a link proxy that counts bytes both ways; `--progress-interval 5s`, no periodic check. Steady state, one minute, after the first renewals.\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        machine()?,
        group(listed as u64),
        group(USED as u64),
        group(USED as u64),
    )?;
    writeln!(out, "| measure | bytes | |\n|---|---|---|")?;
    writeln!(
        out,
        "| the syncer's source traffic per minute (keeper probes and head reads, watch progress) | {} | {mirrored:.0} leases mirrored, {renewals:.0} destination renewals in the minute |",
        group(per_minute as u64)
    )?;
    writeln!(
        out,
        "| one listing of every source lease (`LeaseLeases`) | {} | |",
        group(listing as u64)
    )?;
    writeln!(
        out,
        "| listing every lease each keeper tick ({ticks_per_minute:.0} per minute) | {} | the reference |",
        group(listing_per_minute as u64)
    )?;
    let share = per_minute / listing_per_minute;
    writeln!(
        out,
        "| **ratio** | **{:.1}%** | target ≤ 10% |",
        100.0 * share
    )?;
    let target = Target {
        measure: format!(
            "lease keeper: {} source leases, {USED} of them the job's",
            group(listed as u64)
        ),
        reference: format!(
            "listing every source lease each keeper tick: {} B per minute",
            group(listing_per_minute as u64)
        ),
        target: "the syncer's source traffic per minute ≤ 10% of it".into(),
        result: format!(
            "{} B per minute = {:.1}% ({mirrored:.0} leases mirrored, {renewals:.0} renewals in the minute)",
            group(per_minute as u64),
            100.0 * share
        ),
        met: share <= 0.10,
    };
    Ok((out, target))
}

/// Every replica's led-job count, and how many of the jobs are watching.
async fn led_and_watching(replicas: &[Option<Syncer>]) -> (Vec<f64>, f64) {
    let mut led = Vec::new();
    let mut watching = 0.0;
    for replica in replicas {
        let Some(replica) = replica else {
            led.push(0.0);
            continue;
        };
        led.push(
            replica
                .metric("etcd_syncer_is_leader", &[])
                .await
                .unwrap_or(0.0),
        );
        watching += replica
            .metric("etcd_syncer_job_state", &[("state", "watching")])
            .await
            .unwrap_or(0.0);
    }
    (led, watching)
}

/// Each live replica leads its share of `jobs` within 10%, and every job
/// has a leader.
fn fair(led: &[f64], live: usize, jobs: usize) -> bool {
    let share = jobs as f64 / live as f64;
    let total: f64 = led.iter().sum();
    total as usize == jobs
        && led.iter().filter(|n| **n > 0.0).count() == live
        && led
            .iter()
            .filter(|n| **n > 0.0)
            .all(|n| (n - share).abs() <= share * 0.10)
}

/// Each replica's slow paths (full syncs) so far; 0 for one not running.
async fn slow_paths(replicas: &[Option<Syncer>]) -> Vec<f64> {
    let mut counts = Vec::new();
    for replica in replicas {
        counts.push(match replica {
            Some(replica) => replica
                .metric("etcd_syncer_slow_path_total", &[])
                .await
                .unwrap_or(0.0),
            None => 0.0,
        });
    }
    counts
}

/// Established TCP connections the server listening on `endpoint`'s port
/// holds (its side of each socket), from /proc/net/tcp and tcp6.
fn server_connections(endpoint: &str) -> Result<usize> {
    let port: u16 = endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .context("endpoint port")?;
    let mut count = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is ADDR:PORT in hex; state 01 is ESTABLISHED.
            let local_port = fields
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && fields.get(3) == Some(&"01") {
                count += 1;
            }
        }
    }
    Ok(count)
}

/// Per job, how many replicas report it watching (one scrape each).
async fn watching_by_job(replicas: &[Option<Syncer>]) -> std::collections::HashMap<String, usize> {
    let mut by_job = std::collections::HashMap::new();
    for replica in replicas.iter().flatten() {
        let Ok(text) = replica.scrape().await else {
            continue;
        };
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("etcd_syncer_job_state{") else {
                continue;
            };
            let Some((labels, value)) = rest.split_once('}') else {
                continue;
            };
            if !labels.split(',').any(|l| l == "state=\"watching\"")
                || value.trim().parse::<f64>().unwrap_or(0.0) != 1.0
            {
                continue;
            }
            if let Some(job) = labels
                .split(',')
                .find_map(|l| l.strip_prefix("job=\""))
                .map(|j| j.trim_end_matches('"').to_string())
            {
                *by_job.entry(job).or_insert(0) += 1;
            }
        }
    }
    by_job
}

/// What one phase of the jobs bench saw, timed from its event (start,
/// kill, join, leave).
struct Phase {
    /// Every job had a leader again.
    all_led: Option<Duration>,
    /// Every job was watching on some replica.
    all_watching: Option<Duration>,
    /// Each live replica led its share within 10%.
    fair: Option<Duration>,
    /// The longest stretch any job had no replica watching it: from the
    /// last sample that saw it watched to the next one that did, less one
    /// sample period (so within one period of the real gap).
    longest_gap: Duration,
    gap_job: String,
    samples: Vec<(Duration, Vec<f64>)>,
}

/// How often the jobs bench samples every replica.
const JOBS_SAMPLE: Duration = Duration::from_secs(1);

/// Marks the jobs watched now; returns the longest gap closed by this
/// sample (with its job) and how many jobs no replica watches.
fn note_watched(
    by_job: &std::collections::HashMap<String, usize>,
    jobs: &[String],
    watched: &mut std::collections::HashMap<String, Instant>,
    now: Instant,
) -> (Duration, String, usize) {
    let (mut longest, mut which, mut unwatched) = (Duration::ZERO, String::new(), 0);
    for job in jobs {
        if by_job.get(job).copied().unwrap_or(0) == 0 {
            unwatched += 1;
            continue;
        }
        // A job never watched before (the first start) closes no gap.
        if let Some(last) = watched.insert(job.clone(), now) {
            let gap = (now - last).saturating_sub(JOBS_SAMPLE);
            if gap > longest {
                (longest, which) = (gap, job.clone());
            }
        }
    }
    (longest, which, unwatched)
}

/// One sample right before an event, so gaps are timed from it.
async fn mark_watched(
    replicas: &[Option<Syncer>],
    jobs: &[String],
    watched: &mut std::collections::HashMap<String, Instant>,
) {
    let by_job = watching_by_job(replicas).await;
    note_watched(&by_job, jobs, watched, Instant::now());
}

/// Samples every replica each [`JOBS_SAMPLE`] until every job is led and
/// watched and the split over the live replicas is fair (or 180 s).
async fn observe_phase(
    replicas: &[Option<Syncer>],
    jobs: &[String],
    watched: &mut std::collections::HashMap<String, Instant>,
) -> Phase {
    let live = replicas.iter().flatten().count();
    let started = Instant::now();
    let mut phase = Phase {
        all_led: None,
        all_watching: None,
        fair: None,
        longest_gap: Duration::ZERO,
        gap_job: String::new(),
        samples: Vec::new(),
    };
    while started.elapsed() < Duration::from_secs(180) {
        tokio::time::sleep(JOBS_SAMPLE).await;
        let (led, _) = led_and_watching(replicas).await;
        let by_job = watching_by_job(replicas).await;
        let at = started.elapsed();
        let (gap, job, unwatched) = note_watched(&by_job, jobs, watched, Instant::now());
        if gap > phase.longest_gap {
            (phase.longest_gap, phase.gap_job) = (gap, job);
        }
        let total: f64 = led.iter().sum();
        if phase.all_led.is_none() && total as usize == jobs.len() {
            phase.all_led = Some(at);
        }
        if phase.all_watching.is_none() && unwatched == 0 {
            phase.all_watching = Some(at);
        }
        if phase.fair.is_none() && fair(&led, live, jobs.len()) {
            phase.fair = Some(at);
        }
        phase.samples.push((at, led));
        if phase.all_led.is_some() && phase.all_watching.is_some() && phase.fair.is_some() {
            break;
        }
    }
    phase
}

/// Full syncs the live replicas ran since `before` (the same replica
/// indices; one gone since counts none, one new counts all of its own).
fn full_syncs_since(before: &[f64], after: &[f64]) -> f64 {
    after
        .iter()
        .enumerate()
        .map(|(i, n)| (n - before.get(i).copied().unwrap_or(0.0)).max(0.0))
        .sum()
}

/// Puts `puts` keys of 100 B spread over every job's prefix from 16
/// writers, as fast as they go; returns the wall time.
async fn spread_load(
    source: &EtcdCluster,
    jobs: usize,
    puts: usize,
    tag: &str,
) -> Result<Duration> {
    const WRITERS: usize = 16;
    let clients = load_clients(source).await?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..WRITERS {
        let mut client = clients[writer % clients.len()].clone();
        let tag = tag.to_string();
        tasks.spawn(async move {
            for i in (writer..puts).step_by(WRITERS) {
                client
                    .put(
                        format!("/jobs/j{:03}/{tag}-{i:06}", i % jobs),
                        "l".repeat(100),
                        None,
                    )
                    .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(started.elapsed())
}

/// Keys under `prefix` on `cluster` (a count-only range).
async fn count_under(cluster: &EtcdCluster, prefix: &str) -> Result<i64> {
    Ok(cluster
        .client()
        .await?
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?
        .count())
}

fn show_within(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.0} s", d.as_secs_f64()))
        .unwrap_or_else(|| "not within 180 s".to_string())
}

/// 500 jobs (one prefix of 100 keys each, every tenth on leases) on three
/// replicas started at once; then kill -9 of the replica leading most, a
/// new replica joining, a load spread over every job, and a replica
/// leaving by SIGTERM. The source's CPU, connections and watch streams are
/// measured against the same load with no syncer running.
async fn many_jobs_section() -> Result<(String, Vec<Target>)> {
    use std::fmt::Write as _;
    const JOBS: usize = 500;
    const KEYS: usize = 100;
    const LEASED_EVERY: usize = 10;
    const LOAD_PUTS: usize = 20_000;
    const LOCK_TTL: Duration = Duration::from_secs(5);
    const IDLE: Duration = Duration::from_secs(20);
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    let mut client = source.client().await?;
    let leased_jobs = JOBS.div_ceil(LEASED_EVERY);
    let leases = e2e::leases::grant_leases(&client, leased_jobs, 60).await?;
    let renewer =
        e2e::leases::LeaseRenewer::start(source.client().await?, &leases, Duration::from_secs(20));
    for job in 0..JOBS {
        let prefix = format!("/jobs/j{job:03}/");
        if job % LEASED_EVERY == 0 {
            let entries: Vec<(String, String, i64)> = (0..KEYS)
                .map(|k| {
                    (
                        format!("{prefix}k{k:03}"),
                        "v".repeat(100),
                        leases[job / LEASED_EVERY],
                    )
                })
                .collect();
            e2e::leases::put_leased(&mut client, &entries).await?;
        } else {
            e2e::put_many(&mut client, &prefix, KEYS, 100, "v").await?;
        }
    }

    // The source with no syncer: connections, idle CPU and the load's CPU.
    let source_endpoint = source.endpoints()[0].clone();
    let connections_alone = server_connections(&source_endpoint)?;
    let cpu = etcd_cpu_seconds(&source).await?;
    tokio::time::sleep(IDLE).await;
    let idle_cpu_alone = etcd_cpu_seconds(&source).await? - cpu;
    let cpu = etcd_cpu_seconds(&source).await?;
    let load_alone = spread_load(&source, JOBS, LOAD_PUTS, "alone").await?;
    let load_cpu_alone = etcd_cpu_seconds(&source).await? - cpu;

    let dir = tempfile::tempdir()?;
    let mut config = format!(
        "[source]\nendpoints = {:?}\n[destination]\nendpoints = {:?}\n",
        source.endpoints(),
        dest.endpoints()
    );
    for job in 0..JOBS {
        writeln!(
            config,
            "[[jobs]]\nname = \"j{job:03}\"\nprefix = \"/jobs/j{job:03}/\""
        )?;
    }
    let path = dir.path().join("jobs.toml");
    std::fs::write(&path, config)?;
    let args = |n: usize| {
        e2e::args(&[
            "mirror-plus",
            "--config",
            path.to_str().expect("utf-8 path"),
            "--instance-id",
            &format!("r{n}"),
            "--lock-ttl",
            &format!("{}s", LOCK_TTL.as_secs()),
        ])
    };
    let jobs: Vec<String> = (0..JOBS).map(|j| format!("j{j:03}")).collect();
    let mut watched = std::collections::HashMap::new();
    let mut rss = Vec::new();
    let mut note_rss = |replicas: &[Option<Syncer>]| {
        for replica in replicas.iter().flatten() {
            if let Some(pid) = replica.pid() {
                rss.push(peak_rss_mib(pid.as_raw() as u32).unwrap_or(0.0));
            }
        }
    };

    // 1. Three replicas started at once.
    let (args0, args1, args2) = (args(0), args(1), args(2));
    let (a, b, c) = futures::join!(
        Syncer::start("r0", &args0),
        Syncer::start("r1", &args1),
        Syncer::start("r2", &args2)
    );
    let mut replicas = vec![Some(a?), Some(b?), Some(c?)];
    let start = observe_phase(&replicas, &jobs, &mut watched).await;
    let full_syncs_start: f64 = slow_paths(&replicas).await.iter().sum();
    let connections_three = server_connections(&source_endpoint)?.saturating_sub(connections_alone);
    let source_metrics = source.server_metrics().await?;
    let watch_streams = e2e::metric_value(
        &source_metrics,
        "etcd_debugging_mvcc_watch_stream_total",
        &[],
    );
    let watchers = e2e::metric_value(&source_metrics, "etcd_debugging_mvcc_watcher_total", &[]);
    let cpu = etcd_cpu_seconds(&source).await?;
    tokio::time::sleep(IDLE).await;
    let idle_cpu_three = etcd_cpu_seconds(&source).await? - cpu;
    note_rss(&replicas);

    // 2. kill -9 of the replica leading most.
    let (led_before, _) = led_and_watching(&replicas).await;
    let victim = led_before
        .iter()
        .enumerate()
        .max_by(|x, y| x.1.total_cmp(y.1))
        .map(|(i, _)| i)
        .expect("three replicas");
    let victim_jobs = led_before[victim];
    let before = slow_paths(&replicas).await;
    mark_watched(&replicas, &jobs, &mut watched).await;
    replicas[victim].as_mut().expect("alive").kill9()?;
    replicas[victim] = None;
    let killed = observe_phase(&replicas, &jobs, &mut watched).await;
    let full_syncs_kill = full_syncs_since(&before, &slow_paths(&replicas).await);

    // 3. A new replica joins.
    let before = slow_paths(&replicas).await;
    mark_watched(&replicas, &jobs, &mut watched).await;
    replicas.push(Some(Syncer::start("r3", &args(3)).await?));
    let joined = observe_phase(&replicas, &jobs, &mut watched).await;
    let full_syncs_join = full_syncs_since(&before, &slow_paths(&replicas).await);

    // 4. A load spread over every job, with three replicas running.
    let cpu = etcd_cpu_seconds(&source).await?;
    let dest_cpu = etcd_cpu_seconds(&dest).await?;
    let replicas_cpu = |replicas: &[Option<Syncer>]| -> f64 {
        replicas
            .iter()
            .flatten()
            .filter_map(|r| r.pid())
            .map(|pid| process_cpu_seconds(pid.as_raw() as u32).unwrap_or(0.0))
            .sum()
    };
    let syncers_cpu = replicas_cpu(&replicas);
    let mut txns = 0.0;
    for replica in replicas.iter().flatten() {
        txns -= replica.metric("etcd_syncer_txns_total", &[]).await?;
    }
    let load_with = spread_load(&source, JOBS, LOAD_PUTS, "with").await?;
    let load_done = Instant::now();
    let expected = count_under(&source, "/jobs/").await?;
    let mut dest_client = dest.client().await?;
    let lag = loop {
        let reached = dest_client
            .get(
                "/jobs/",
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await?
            .count();
        if reached >= expected {
            break Some(load_done.elapsed());
        }
        if load_done.elapsed() > Duration::from_secs(60) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let load_cpu_with = etcd_cpu_seconds(&source).await? - cpu;
    let load_dest_cpu = etcd_cpu_seconds(&dest).await? - dest_cpu;
    let load_syncers_cpu = replicas_cpu(&replicas) - syncers_cpu;
    for replica in replicas.iter().flatten() {
        txns += replica.metric("etcd_syncer_txns_total", &[]).await?;
    }
    note_rss(&replicas);

    // 5. A replica leaves by SIGTERM, as in a rolling update.
    let before = slow_paths(&replicas).await;
    mark_watched(&replicas, &jobs, &mut watched).await;
    let leaver = replicas
        .iter()
        .position(Option::is_some)
        .expect("a live replica");
    // Sampled while it shuts down: its jobs are unwatched from their
    // step-down until a survivor watches them; the others never are.
    let leaving = replicas[leaver].take().expect("alive");
    let sigterm = Instant::now();
    let exited = tokio::spawn(async move {
        let finished = leaving.finish().await;
        (finished, sigterm.elapsed())
    });
    let left = observe_phase(&replicas, &jobs, &mut watched).await;
    let (finished, leaver_exit) = exited.await?;
    finished?;
    let full_syncs_leave = full_syncs_since(&before, &slow_paths(&replicas).await);
    note_rss(&replicas);
    let peak_rss = rss.iter().copied().fold(0.0, f64::max);
    for replica in replicas.into_iter().flatten() {
        replica.finish().await?;
    }
    renewer.stop();

    let secs = |d: Duration| format!("{:.0} s", d.as_secs_f64());
    let gap = |p: &Phase| format!("longest unwatched: {} ({})", secs(p.longest_gap), p.gap_job);
    let within = |d: Option<Duration>, cap: Duration| d.is_some_and(|d| d <= cap);
    let two_minutes = Duration::from_secs(120);
    let mut targets = vec![
        Target {
            measure: format!("{JOBS} jobs on 3 replicas started at once: every job watching"),
            reference: "—".into(),
            target: "within 60 s".into(),
            result: show_within(start.all_watching),
            met: within(start.all_watching, Duration::from_secs(60)),
        },
        Target {
            measure: format!("{JOBS} jobs on 3 replicas started at once: fair split (each within 10% of its share)"),
            reference: format!("lock TTL {}", secs(LOCK_TTL)),
            target: "within 120 s; no job unwatched longer than the lock TTL once watching".into(),
            result: format!(
                "{}; {}; {full_syncs_start:.0} full syncs ({JOBS} jobs' first, and those restarted by a new leader after a hand-over mid-sync)",
                show_within(start.fair),
                gap(&start)
            ),
            met: within(start.fair, two_minutes) && start.longest_gap <= LOCK_TTL,
        },
        Target {
            measure: format!("kill -9 of the replica leading most ({victim_jobs:.0} jobs)"),
            reference: format!("2 × lock TTL = {}", secs(2 * LOCK_TTL)),
            target: "its jobs led again within 2 × lock TTL, no full sync; fair again within 120 s".into(),
            result: format!(
                "led again after {}; {}; fair after {}; +{full_syncs_kill:.0} full syncs",
                show_within(killed.all_led),
                gap(&killed),
                show_within(killed.fair)
            ),
            met: within(killed.all_led, 2 * LOCK_TTL)
                && within(killed.fair, two_minutes)
                && full_syncs_kill == 0.0,
        },
    ];
    for (event, phase, full_syncs) in [
        ("a fourth replica joins the two", &joined, full_syncs_join),
        (
            "a replica leaves by SIGTERM (of three)",
            &left,
            full_syncs_leave,
        ),
    ] {
        targets.push(Target {
            measure: format!("{JOBS} jobs: {event}"),
            reference: format!("lock TTL {}", secs(LOCK_TTL)),
            target: "fair within 120 s, no full sync, no job unwatched longer than the lock TTL"
                .into(),
            result: format!(
                "fair after {}; {}; +{full_syncs:.0} full syncs{}",
                show_within(phase.fair),
                gap(phase),
                if std::ptr::eq(phase, &left) {
                    format!(
                        "; the leaver exited {:.1} s after SIGTERM",
                        leaver_exit.as_secs_f64()
                    )
                } else {
                    String::new()
                }
            ),
            met: within(phase.fair, two_minutes)
                && full_syncs == 0.0
                && phase.longest_gap <= LOCK_TTL,
        });
    }
    targets.push(Target {
        measure: format!("{JOBS} jobs: {} puts spread over every job, 16 writers", group(LOAD_PUTS as u64)),
        reference: format!("the same load with no syncer: {}", fmt_rate(rate(LOAD_PUTS as f64, load_alone), "puts/s")),
        target: "lag < 1 s at the end".into(),
        result: format!(
            "{} with three replicas; every job's keys on the destination {} after the last put; {txns:.0} destination txns; CPU s from the load's start to the end of the lag: source etcd {load_cpu_with:.2}, destination etcd {load_dest_cpu:.2}, the replicas {load_syncers_cpu:.2} (the two cores give {:.2})",
            fmt_rate(rate(LOAD_PUTS as f64, load_with), "puts/s"),
            lag.map_or("not within 60 s".to_string(), |l| format!("{:.2} s", l.as_secs_f64())),
            2.0 * (load_with + lag.unwrap_or(Duration::from_secs(60))).as_secs_f64(),
        ),
        met: lag.is_some_and(|l| l < Duration::from_secs(1)),
    });
    targets.push(Target {
        measure: format!("{JOBS} jobs: peak RSS per replica"),
        reference: "—".into(),
        target: "< 256 MiB".into(),
        result: format!(
            "{peak_rss:.0} MiB (the largest of every replica, sampled after each phase)"
        ),
        met: peak_rss < 256.0,
    });
    targets.push(Target {
        measure: format!("{JOBS} jobs: the source's cost"),
        reference: format!(
            "no syncer: idle {:.2} CPU s per minute; the load {:.2} CPU s",
            idle_cpu_alone * 60.0 / IDLE.as_secs_f64(),
            load_cpu_alone
        ),
        target: "reported".into(),
        result: format!(
            "three replicas: idle {:.2} CPU s per minute; the load {:.2} CPU s; {connections_three} connections, {watch_streams:.0} watch streams, {watchers:.0} watchers",
            idle_cpu_three * 60.0 / IDLE.as_secs_f64(),
            load_cpu_with
        ),
        met: true,
    });

    let mut out = String::new();
    writeln!(out, "{JOBS_HEADING}\n")?;
    writeln!(
        out,
        "Produced by `make bench-jobs` (also a step of `make bench`) on {}; {}. {JOBS} jobs (one prefix of {KEYS} keys of 100 B each, {} keys in all; every {LEASED_EVERY}th job's keys on a lease of its own, TTL 60 s, renewed by the bench) in one config file; three replicas started at once (`--lock-ttl {}s`, `--rebalance-interval 30s`); then kill -9 of the replica leading most, a fourth replica joining, a load spread over every job, and one replica leaving by SIGTERM. Every replica is sampled every {} s (`etcd_syncer_is_leader`, and `etcd_syncer_job_state` per job: a job is unwatched while no replica reports it watching). Fair: every live replica within 10% of its share.\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        machine()?,
        group((JOBS * KEYS) as u64),
        LOCK_TTL.as_secs(),
        JOBS_SAMPLE.as_secs(),
    )?;
    write_target_rows(&mut out, &targets)?;
    writeln!(
        out,
        "\nThe source without the syncer held {connections_alone} connections (the bench's own clients); the three replicas added {connections_three}. Jobs led per replica after the start (r0, r1, r2):\n"
    )?;
    for (at, led) in start.samples.iter().take(24) {
        writeln!(
            out,
            "- {:>3.0} s: {}",
            at.as_secs_f64(),
            led.iter()
                .map(|n| format!("{n:.0}"))
                .collect::<Vec<_>>()
                .join(" / ")
        )?;
    }
    Ok((out, targets))
}

const ZK_HEADING: &str = "## zk2etcd: a ZooKeeper tree into etcd";

/// Creates `nodes` persistent znodes of 100 B under `root`, 1,000 to a
/// parent (`<root>/s0042/n000123`), 64 creates in flight.
async fn zk_tree(client: &zookeeper_client::Client, root: &str, nodes: usize) -> Result<()> {
    let persistent =
        zookeeper_client::CreateMode::Persistent.with_acls(zookeeper_client::Acls::anyone_all());
    client.create(root, b"", &persistent).await?;
    for parent in 0..nodes.div_ceil(1_000) {
        client
            .create(&format!("{root}/s{parent:04}"), b"", &persistent)
            .await?;
    }
    let value = bench_value();
    on_every_node(nodes, 64, |i| {
        let (persistent, value) = (&persistent, &value);
        async move {
            client
                .create(&zk_node(root, i), value.as_bytes(), persistent)
                .await?;
            anyhow::Ok(())
        }
    })
    .await
}

/// Node `i` of [`zk_tree`]'s tree under `root`.
fn zk_node(root: &str, i: usize) -> String {
    format!("{root}/s{:04}/n{i:06}", i / 1_000)
}

/// `op` for nodes `0..count`, `in_flight` at a time; the first error.
async fn on_every_node<F, Fut>(count: usize, in_flight: usize, op: F) -> Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    use futures::StreamExt;
    let results: Vec<Result<()>> = futures::stream::iter(0..count)
        .map(op)
        .buffer_unordered(in_flight)
        .collect()
        .await;
    results.into_iter().collect()
}

/// One zk2etcd run over `root` into a fresh destination, timed from process
/// start to the end of its first diff (every key written by then): the
/// rate, CPU seconds of the syncer and the destination, peak RSS; the
/// syncer is left running for the churn.
async fn zk2etcd_full_sync(
    server: &e2e::zk::ZkServer,
    root: &str,
    nodes: usize,
) -> Result<(Syncer, EtcdCluster, f64, f64, f64, f64)> {
    let dest = EtcdCluster::start_dest().await?;
    let dest_cpu = etcd_cpu_seconds(&dest).await?;
    let args: Vec<String> = [
        "zk2etcd",
        "--zk-servers",
        &server.connect_string(),
        "--dst-endpoints",
        &dest.endpoints_arg(),
        "--zk-prefix",
        root,
        "--metrics-addr",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let started = Instant::now();
    let syncer = Syncer::start("zk2etcd", &args).await?;
    e2e::eventually(Duration::from_secs(600), "zk2etcd's first diff", || async {
        Ok(syncer
            .log_text()
            .contains("Diffed the ZooKeeper tree against the destination."))
    })
    .await?;
    let elapsed = started.elapsed();
    let written = count_under(&dest, root).await?;
    // The root node is a key too.
    anyhow::ensure!(
        written as usize == nodes + nodes.div_ceil(1_000) + 1,
        "zk2etcd wrote {written} keys for {nodes} nodes"
    );
    let pid = syncer.pid().context("pid")?.as_raw() as u32;
    let (cpu, rss) = (process_cpu_seconds(pid)?, peak_rss_mib(pid)?);
    let dest_cpu = etcd_cpu_seconds(&dest).await? - dest_cpu;
    Ok((
        syncer,
        dest,
        rate(written as f64, elapsed),
        cpu,
        dest_cpu,
        rss,
    ))
}

/// `make bench-zk`: zk2etcd's full sync of a 100,000-znode tree next to
/// the destination's batched-write ceiling in the same run, its peak RSS
/// against a 10,000-node tree, and the lag of a burst of data changes.
async fn zk_section() -> Result<String> {
    let nodes: usize = std::env::var("BENCH_ZK_NODES")
        .ok()
        .map(|n| n.replace('_', "").parse())
        .transpose()?
        .unwrap_or(100_000);
    let small = nodes / 10;
    let server = e2e::zk::ZkServer::start().await?;
    let admin = server.client().await?;
    let loading = Instant::now();
    zk_tree(&admin, "/small", small).await?;
    zk_tree(&admin, "/large", nodes).await?;
    println!(
        "  {} + {} znodes created in {:.1} s",
        group(small as u64),
        group(nodes as u64),
        loading.elapsed().as_secs_f64()
    );
    let (small_syncer, _small_dest, small_rate, _, _, small_rss) =
        zk2etcd_full_sync(&server, "/small", small).await?;
    small_syncer.finish().await?;
    let (syncer, dest, large_rate, cpu, dest_cpu, large_rss) =
        zk2etcd_full_sync(&server, "/large", nodes).await?;
    let ceiling = batched_writer_ceiling(nodes).await?;
    let best = best_ceiling(&ceiling);

    // A burst of data changes while it watches: each node's new value
    // must reach etcd; the lag is from the last change to the last write.
    let burst = 5_000.min(nodes);
    let changed = Instant::now();
    let value = format!("v2:{}", "w".repeat(97));
    on_every_node(burst, 32, |i| {
        let (admin, value) = (&admin, &value);
        async move {
            admin
                .set_data(&zk_node("/large", i), value.as_bytes(), None)
                .await?;
            anyhow::Ok(())
        }
    })
    .await?;
    let set_done = changed.elapsed();
    let mut client = dest.client().await?;
    let last_key = zk_node("/large", burst - 1);
    e2e::eventually(Duration::from_secs(120), "the burst mirrored", || async {
        let mut client = client.clone();
        let value = client.get(last_key.as_str(), None).await?;
        Ok(value
            .kvs()
            .first()
            .is_some_and(|kv| kv.value().starts_with(b"v2:")))
    })
    .await?;
    // Every changed node, not only the last one.
    let mut behind = 0;
    for i in 0..burst {
        let key = zk_node("/large", i);
        let kv = client.get(key.as_str(), None).await?;
        if !kv
            .kvs()
            .first()
            .is_some_and(|kv| kv.value().starts_with(b"v2:"))
        {
            behind += 1;
        }
    }
    let mirrored = changed.elapsed();
    let lag = syncer
        .metric("etcd_syncer_lag_seconds", &[("job", "zk2etcd")])
        .await?;
    syncer.finish().await?;

    let mut out = String::new();
    writeln!(out, "{ZK_HEADING}\n")?;
    writeln!(
        out,
        "`make bench-zk` ({}): ZooKeeper 3.8 standalone and a fresh etcd destination on loopback. zk2etcd writes two keys per node (the key and its ownership record, in one txn), so its keys per second are nodes per second; the ceiling writes the same number of 100 B keys in 128-put txns (1, 2, 4 and 8 writers, the best).\n",
        machine()?
    )?;
    writeln!(out, "| measure | zk2etcd | reference (same run) | ratio |")?;
    writeln!(out, "|---|---|---|---|")?;
    writeln!(
        out,
        "| full sync of {} znodes (from process start to the end of the first diff) | {} | ceiling {} ({} writers) | {:.0}% |",
        group(nodes as u64),
        fmt_rate(large_rate, "nodes/s"),
        fmt_rate(best.rate, "keys/s"),
        best.writers,
        100.0 * large_rate / best.rate
    )?;
    writeln!(
        out,
        "| CPU over that full sync | syncer {cpu:.2} s, destination etcd {dest_cpu:.2} s | ceiling's destination {:.2} s per 100,000 keys | |",
        best.dest_cpu_per_100k
    )?;
    writeln!(
        out,
        "| peak RSS, {} znodes | {large_rss:.1} MiB | {} znodes: {small_rss:.1} MiB ({}) | {:.2}× |",
        group(nodes as u64),
        group(small as u64),
        fmt_rate(small_rate, "nodes/s"),
        large_rss / small_rss
    )?;
    writeln!(
        out,
        "| burst of {} data changes (32 in flight) | every one on etcd {:.2} s after the first, {:.2} s after the last change; {behind} behind when checked | the changes themselves took {:.2} s | |",
        group(burst as u64),
        mirrored.as_secs_f64(),
        (mirrored - set_done).as_secs_f64(),
        set_done.as_secs_f64()
    )?;
    writeln!(
        out,
        "| `etcd_syncer_lag_seconds` after the burst | {lag:.2} s | | |"
    )?;
    drop(admin);
    Ok(out)
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
        // The targets table's old heading: the new table replaces it.
        if !headings.contains(&heading) && heading != OLD_TARGETS_HEADING {
            out.push_str("\n\n");
            out.push_str(section.trim_end());
        }
    }
    out.push('\n');
    out
}

/// A registry record of about 100 B, as a service registers itself: JSON
/// whose fields vary per key (so gzip finds what it would in production,
/// not the bench's repeated filler).
fn registry_value(i: usize) -> String {
    format!(
        "{{\"host\":\"10.{}.{}.{}\",\"port\":{},\"weight\":{},\"zone\":\"cn-east-{}\",\"v\":\"2.7.{}\",\"ts\":{}}}",
        i % 7,
        i / 7 % 250,
        i % 251,
        20_000 + i % 997,
        i % 100,
        i % 3,
        i % 10,
        1_733_550_000_000u64 + i as u64 * 7_919
    )
}

/// `count` registry records under `prefix`, from 16 writers, one put each
/// (`batch` 1) or 128 to a txn.
async fn put_registry(
    source: &EtcdCluster,
    prefix: &str,
    range: std::ops::Range<usize>,
    batch: usize,
) -> Result<u64> {
    const WRITERS: usize = 16;
    let clients = load_clients(source).await?;
    let bytes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let chunks: Vec<Vec<usize>> = range
        .collect::<Vec<_>>()
        .chunks(batch)
        .map(<[usize]>::to_vec)
        .collect();
    for writer in 0..WRITERS {
        let mut client = clients[writer % clients.len()].clone();
        let mine: Vec<Vec<usize>> = chunks
            .iter()
            .skip(writer)
            .step_by(WRITERS)
            .cloned()
            .collect();
        let prefix = prefix.to_string();
        let bytes = bytes.clone();
        tasks.spawn(async move {
            for chunk in mine {
                let ops: Vec<TxnOp> = chunk
                    .iter()
                    .map(|&i| {
                        let (key, value) = (format!("{prefix}svc-{i:07}"), registry_value(i));
                        bytes.fetch_add(
                            (key.len() + value.len()) as u64,
                            std::sync::atomic::Ordering::Relaxed,
                        );
                        TxnOp::put(key, value, None)
                    })
                    .collect();
                client.txn(Txn::new().and_then(ops)).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(bytes.load(std::sync::atomic::Ordering::Relaxed))
}

/// One `--src-compression` mode on etcd `binary`: bytes across the
/// source link for a full sync of `keys` registry records and for
/// `puts` single-key puts after it, the full sync's wall time and the
/// CPU the syncer and the source spent over it.
struct CompressionRun {
    full: (u64, u64),
    full_change: u64,
    full_sync: Duration,
    cpu: (f64, f64),
    incremental: (u64, u64),
    incremental_change: u64,
}

async fn compression_run(
    binary: &str,
    mode: &str,
    keys: usize,
    puts: usize,
) -> Result<CompressionRun> {
    let options = |role| e2e::EtcdOptions {
        role,
        binary: Some(binary.to_string()),
        ..Default::default()
    };
    let source = EtcdCluster::start_with(options(Role::Source)).await?;
    let dest = EtcdCluster::start_with(options(Role::Dest)).await?;
    let full_change = put_registry(&source, PREFIX, 0..keys, CEILING_TXN_OPS).await?;
    let (proxy, proxied) = LinkProxy::in_front_of(&source.endpoints()[0]).await?;
    let bytes = || (proxy.forwarded_to_server(), proxy.forwarded_to_client());
    let mut args = deployed_via(&source, &dest, PREFIX, &proxied)?;
    args.extend(e2e::args(&["--src-compression", mode]));
    let source_cpu = etcd_cpu_seconds(&source).await?;
    let before = bytes();
    let started = Instant::now();
    let syncer = Syncer::start(&format!("gzip-{mode}"), &args).await?;
    wait_watching(&syncer).await?;
    let full_sync = started.elapsed();
    let after = bytes();
    let cpu = (
        process_cpu_seconds(syncer.pid().context("pid")?.as_raw() as u32)?,
        etcd_cpu_seconds(&source).await? - source_cpu,
    );
    let incremental_change = put_registry(&source, PREFIX, keys..keys + puts, 1).await?;
    let head = source.revision().await?;
    let applied_from = Instant::now();
    while (syncer
        .metric("etcd_syncer_last_synced_revision", &[("job", "bench")])
        .await? as i64)
        < head
    {
        anyhow::ensure!(
            applied_from.elapsed() < Duration::from_secs(300),
            "the syncer did not apply the puts"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done = bytes();
    syncer.finish().await?;
    Ok(CompressionRun {
        full: (after.0 - before.0, after.1 - before.1),
        full_change,
        full_sync,
        cpu,
        incremental: (done.0 - after.0, done.1 - after.1),
        incremental_change,
    })
}

/// Compression on and off against etcd 3.5 (`binary`), as a table
/// appended to `out`; returns the targets table's summary of it.
async fn compression_section(binary: &str, out: &mut String) -> Result<String> {
    const KEYS: usize = 100_000;
    const PUTS: usize = 20_000;
    let version = e2e::etcd::etcd_version(binary)?;
    let off = compression_run(binary, "off", KEYS, PUTS).await?;
    let gzip = compression_run(binary, "gzip", KEYS, PUTS).await?;
    writeln!(
        out,
        "\nCompression on and off, etcd {version} on both sides, {} registry records (JSON of about 100 B whose fields vary per key) then {} single-key puts of the same kind from 16 writers; `--src-compression off` and `gzip` on the same data:\n",
        group(KEYS as u64),
        group(PUTS as u64)
    )?;
    writeln!(
        out,
        "| `--src-compression` | full sync: bytes to / from the source (per byte of change) | full sync from process start | CPU s over it: syncer / source etcd | incremental: bytes to / from the source (per byte of change) |\n|---|---|---|---|---|"
    )?;
    let per_byte = |(up, down): (u64, u64), change: u64| (up + down) as f64 / change as f64;
    for (mode, run) in [("off", &off), ("gzip", &gzip)] {
        writeln!(
            out,
            "| {mode} | {} / {} ({:.2}) | {:.2} s ({}) | {:.2} / {:.2} | {} / {} ({:.2}) |",
            group(run.full.0),
            group(run.full.1),
            per_byte(run.full, run.full_change),
            run.full_sync.as_secs_f64(),
            fmt_rate(rate(KEYS as f64, run.full_sync), "keys/s"),
            run.cpu.0,
            run.cpu.1,
            group(run.incremental.0),
            group(run.incremental.1),
            per_byte(run.incremental, run.incremental_change),
        )?;
    }
    let share = |on: (u64, u64), plain: (u64, u64)| {
        100.0 * (on.0 + on.1) as f64 / (plain.0 + plain.1) as f64
    };
    Ok(format!(
        "; gzip on etcd {version}: the full sync's link bytes {:.0}% of uncompressed, the incremental's {:.0}%, the full sync {:.0}% of the uncompressed one's wall time",
        share(gzip.full, off.full),
        share(gzip.incremental, off.incremental),
        100.0 * gzip.full_sync.as_secs_f64() / off.full_sync.as_secs_f64()
    ))
}

/// The etcd 3.5 binary for the compression rows: `BENCH_ETCD35_BIN`, else
/// the one `make deps` installs, if present.
fn etcd35_binary() -> Option<String> {
    std::env::var("BENCH_ETCD35_BIN")
        .ok()
        .filter(|b| !b.is_empty())
        .or_else(|| {
            let installed =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/etcd-3.5/etcd");
            installed.exists().then(|| installed.display().to_string())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A section is replaced where it stands (the ones after it kept), or
    /// appended when the report lacks it.
    #[test]
    fn a_section_is_replaced_in_place_or_appended() {
        let report = "# B\n\n## Many jobs on three replicas\n\nold\n\n## Failback\n\nby hand\n";
        assert_eq!(
            splice_section(
                report,
                JOBS_HEADING,
                "## Many jobs on three replicas\n\nnew\n"
            ),
            "# B\n\n## Many jobs on three replicas\n\nnew\n\n## Failback\n\nby hand\n"
        );
        assert_eq!(
            splice_section("# B\n", KEEPER_HEADING, "## Lease keeper traffic\n\nx\n"),
            "# B\n\n## Lease keeper traffic\n\nx\n"
        );
    }

    /// A run is compared with the table the file held, under its old
    /// heading too: a row met before and missed now is a regression.
    #[test]
    fn a_row_met_before_and_missed_now_regresses() {
        let previous = "# B\n\n## The issue 15 targets, from this run\n\ntext\n\n| measure | reference in the same run | target | result | met |\n|---|---|---|---|---|\n| a | r | t | x | yes |\n| b | r | t | x | **no** |\n\n## Lease mirroring\n\n| a | r | t | x | **no** |\n";
        assert_eq!(
            previous_targets(previous),
            vec![("a".to_string(), true), ("b".to_string(), false)]
        );
        let row = |measure: &str, met| Target {
            measure: measure.into(),
            reference: String::new(),
            target: String::new(),
            result: String::new(),
            met,
        };
        let kept = no_regression(&[row("a", true), row("b", true), row("c", false)], previous);
        assert!(kept.met);
        assert_eq!(kept.result, "2 rows compared: none regressed, 1 newly met");
        let lost = no_regression(&[row("a", false), row("b", false)], previous);
        assert!(!lost.met);
        assert_eq!(lost.result, "regressed: a");
        assert!(!no_regression(&[row("a", true)], "# B\n").met);
    }

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
