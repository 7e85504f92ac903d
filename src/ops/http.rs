//! `/metrics`, `/healthz` and `/readyz` on `--metrics-addr`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::model::Side;
use crate::telemetry::health::Health;
use crate::telemetry::metrics::{JobMetrics, Metrics};

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Arc<Health>,
    status: Arc<StatusView>,
}

/// What `/status` reports: the destination's view of each job (as the
/// `status` command prints it) next to this instance's own numbers.
pub struct StatusView {
    /// Set once the destination is connected.
    pub dest: std::sync::OnceLock<crate::etcd::client::Cluster>,
    pub meta_prefix: String,
    pub instance_id: String,
    /// The jobs running now (a reload changes them).
    pub jobs: std::sync::RwLock<Vec<JobMetrics>>,
}

#[derive(serde::Serialize)]
struct InstanceJobView {
    job: String,
    instance: String,
    is_leader: bool,
    state: &'static str,
    last_synced_revision: i64,
    source_revision: i64,
    lag_revisions: i64,
    lag_seconds: f64,
    full_sync_in_progress: bool,
    last_check: Option<LastCheck>,
    /// The destination's meta keys for this job (leader, checkpoint, markers).
    destination: Option<crate::ops::admin::JobStatus>,
    destination_error: Option<String>,
}

#[derive(serde::Serialize)]
struct LastCheck {
    at_unix_seconds: f64,
    exact: bool,
    dst_miss: i64,
    src_miss: i64,
    mismatch: i64,
    duration_seconds: f64,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen on --metrics-addr {addr}: {source} (pick a free address, or port 0 for any)"
)]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds now, so a taken port is a start-up error, and serves until `cancel`.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    health: Arc<Health>,
    status: Arc<StatusView>,
    cancel: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), BindError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| BindError { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status_handler))
        .with_state(AppState {
            metrics,
            health,
            status,
        });
    let task = tokio::spawn(async move {
        let shutdown = async move { cancel.cancelled().await };
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(%error, "Metrics server failed.");
        }
    });
    Ok((local, task))
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let wedged = state.health.wedged_jobs();
    if wedged.is_empty() {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("wedged jobs: {}\n", wedged.join(", ")),
        )
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let source = state.health.reachable(Side::Source);
    let dest = state.health.reachable(Side::Destination);
    let body = format!(
        "source: {}\ndestination: {}\n",
        if source { "reachable" } else { "unreachable" },
        if dest { "reachable" } else { "unreachable" }
    );
    let status = if source && dest {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

async fn status_handler(State(state): State<AppState>) -> impl IntoResponse {
    let view = &state.status;
    let (destination, error) = match view.dest.get() {
        Some(dest) => {
            match crate::ops::admin::collect_status(dest, &view.meta_prefix, None).await {
                Ok(statuses) => (statuses, None),
                Err(error) => (Vec::new(), Some(error.to_string())),
            }
        }
        None => (
            Vec::new(),
            Some("destination not connected yet".to_string()),
        ),
    };
    let running = view
        .jobs
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    let jobs: Vec<InstanceJobView> = running
        .iter()
        .map(|metrics| {
            let checked_at = metrics.check_last_success_timestamp_seconds.get();
            InstanceJobView {
                job: metrics.job_name().to_string(),
                instance: view.instance_id.clone(),
                is_leader: metrics.is_leader.get() == 1,
                state: metrics.state(),
                last_synced_revision: metrics.last_synced_revision.get(),
                source_revision: metrics.source_revision.get(),
                lag_revisions: metrics.lag_revisions.get(),
                lag_seconds: metrics.lag_seconds.get(),
                full_sync_in_progress: metrics.full_sync_in_progress.get() == 1,
                last_check: (checked_at > 0.0).then(|| LastCheck {
                    at_unix_seconds: checked_at,
                    exact: metrics.check_exact.get() == 1,
                    dst_miss: metrics.dst_miss_keys.get(),
                    src_miss: metrics.src_miss_keys.get(),
                    mismatch: metrics.mismatch_keys.get(),
                    duration_seconds: metrics.check_duration_seconds.get(),
                }),
                destination: destination
                    .iter()
                    .find(|s| s.job == metrics.job_name())
                    .cloned(),
                destination_error: error.clone(),
            }
        })
        .collect();
    axum::Json(jobs)
}
