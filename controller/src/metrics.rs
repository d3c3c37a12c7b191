//! Prometheus metrics of the reconcile loop and the HTTP endpoints the
//! Deployment's probes and a scraper use: `/metrics`, `/healthz` (the
//! process serves) and `/readyz` (the controller's watches have synced).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    failures: Counter,
    duration: Histogram,
    /// Set once the controller's caches are filled.
    pub ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("podvisor_controller");
        let reconciles = Counter::default();
        let failures = Counter::default();
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        registry.register(
            "reconciles",
            "VirtualMachine reconciles run",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_failures",
            "VirtualMachine reconciles that failed and were retried",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            duration.clone(),
        );
        Metrics {
            registry,
            reconciles,
            failures,
            duration,
            ready: AtomicBool::new(false),
        }
    }
}

/// Observes a reconcile's duration when dropped.
#[derive(Debug)]
pub struct Timer<'a> {
    start: Instant,
    duration: &'a Histogram,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.duration.observe(self.start.elapsed().as_secs_f64());
    }
}

impl Metrics {
    pub fn reconcile_started(&self) -> Timer<'_> {
        self.reconciles.inc();
        Timer {
            start: Instant::now(),
            duration: &self.duration,
        }
    }

    pub fn reconcile_failed(&self) {
        self.failures.inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serves the endpoints on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}

async fn render(State(m): State<Arc<Metrics>>) -> ([(&'static str, &'static str); 1], String) {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
}

async fn ready(State(m): State<Arc<Metrics>>) -> (StatusCode, &'static str) {
    if m.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_reconciles_failures_and_durations() {
        let m = Metrics::default();
        drop(m.reconcile_started());
        drop(m.reconcile_started());
        m.reconcile_failed();
        let text = m.render();
        assert!(
            text.contains("podvisor_controller_reconciles_total 2"),
            "{text}"
        );
        assert!(
            text.contains("podvisor_controller_reconcile_failures_total 1"),
            "{text}"
        );
        assert!(
            text.contains("podvisor_controller_reconcile_duration_seconds_count 2"),
            "{text}"
        );
    }
}
