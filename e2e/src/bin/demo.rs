//! `make demo`: a source and a destination etcd on free local ports, data
//! written to the source, mirrored by the real `etcd-syncer` binary, with
//! progress and a final comparison printed as it goes.

use std::time::{Duration, Instant};

use anyhow::Result;
use e2e::{compare, converge, eventually, mirror_args, put_many, EtcdCluster, Syncer, META_PREFIX};

const KEYS: usize = 50_000;
const PREFIX: &str = "/registry/services/";

fn step(text: &str) {
    println!("\n==> {text}");
}

#[tokio::main]
async fn main() -> Result<()> {
    step("Starting a source and a destination etcd on free loopback ports");
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    println!("    source:      {}", source.endpoints_arg());
    println!("    destination: {}", dest.endpoints_arg());

    step(&format!(
        "Writing {KEYS} keys of 100 bytes under {PREFIX} on the source"
    ));
    let mut src = source.client().await?;
    let started = Instant::now();
    for chunk in 0..10 {
        put_many(&mut src, &format!("{PREFIX}{chunk}/"), KEYS / 10, 100, "v1").await?;
        println!("    {:>6} keys written", (chunk + 1) * KEYS / 10);
    }
    println!("    done in {:.1}s", started.elapsed().as_secs_f64());

    step("Starting etcd-syncer mirror-plus (full sync, then watch)");
    let mut args = mirror_args(&source, &dest, PREFIX);
    args.extend(["--job-name".to_string(), "services".to_string()]);
    let syncer = Syncer::start("etcd-syncer", &args).await?;
    let started = Instant::now();
    loop {
        let text = syncer.scrape().await?;
        let put = e2e::metric_value(
            &text,
            "etcd_syncer_full_sync_keys_total",
            &[("job", "services"), ("op", "put")],
        );
        let watching = e2e::metric_value(
            &text,
            "etcd_syncer_job_state",
            &[("job", "services"), ("state", "watching")],
        );
        println!(
            "    full sync: {put:>6.0} keys copied ({:.1}s)",
            started.elapsed().as_secs_f64()
        );
        if watching == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "    full sync finished: {KEYS} keys in {elapsed:.1}s ({:.0} keys/s)",
        KEYS as f64 / elapsed
    );

    step("Live changes on the source reach the destination through the watch");
    src.put(format!("{PREFIX}new-service"), "10.0.0.42:8080", None)
        .await?;
    src.delete(format!("{PREFIX}0/key-000001"), None).await?;
    converge(&source, PREFIX, &dest, PREFIX, Duration::from_secs(30)).await?;
    let mut dst = dest.client().await?;
    let value = dst.get(format!("{PREFIX}new-service"), None).await?;
    println!(
        "    destination has {PREFIX}new-service = {}",
        value
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
            .unwrap_or_default()
    );

    step("Restarting the syncer: it resumes from its checkpoint, copying nothing");
    syncer.finish().await?;
    src.put(
        format!("{PREFIX}while-down"),
        "written while the syncer was stopped",
        None,
    )
    .await?;
    let restarted = Syncer::start("etcd-syncer", &args).await?;
    eventually(Duration::from_secs(30), "watching again", || async {
        Ok(restarted
            .metric(
                "etcd_syncer_job_state",
                &[("job", "services"), ("state", "watching")],
            )
            .await?
            == 1.0)
    })
    .await?;
    converge(&source, PREFIX, &dest, PREFIX, Duration::from_secs(30)).await?;
    let text = restarted.scrape().await?;
    println!(
        "    fast path taken: {}, full syncs: {}, keys re-copied: {}",
        e2e::metric_value(&text, "etcd_syncer_fast_path_total", &[("job", "services")]),
        e2e::metric_value(&text, "etcd_syncer_slow_path_total", &[("job", "services")]),
        e2e::metric_value(
            &text,
            "etcd_syncer_full_sync_keys_total",
            &[("job", "services")]
        ),
    );

    step("Result");
    let comparison = compare(&source, PREFIX, &dest, PREFIX).await?;
    let checkpoint = dst
        .get(format!("{META_PREFIX}services/checkpoint"), None)
        .await?;
    println!("    source keys:        {}", comparison.source_keys);
    println!(
        "    destination equal:  {} (missing {}, extra {}, differing {})",
        comparison.is_equal(),
        comparison.missing_at_dest.len(),
        comparison.extra_at_dest.len(),
        comparison.value_differs.len()
    );
    println!("    source revision:    {}", source.revision().await?);
    if let Some(kv) = checkpoint.kvs().first() {
        println!(
            "    checkpoint:         {}",
            String::from_utf8_lossy(kv.value())
        );
    }
    restarted.finish().await?;
    anyhow::ensure!(comparison.is_equal(), "destination differs from source");
    println!("\nDemo finished: the standby equals the primary.");
    Ok(())
}
