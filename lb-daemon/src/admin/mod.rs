//! The admin listener: JSON API, Prometheus `/metrics` and the HTML status page.
//!
//! Bound to loopback by default. A non-loopback bind requires a bearer token (an admin API that
//! can drain endpoints and reload config must not be open to the network by accident).
pub mod view;

mod api;
mod session;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::model::Admin;
pub use view::{ClusterView, EndpointView, StatusView};

/// What the admin API can ask of the running daemon; implemented by the supervisor.
pub trait Control: Send + Sync + 'static {
    /// Version, uptime, active config.
    fn status(&self) -> StatusView;
    /// Clusters with per-endpoint health and load.
    fn clusters(&self) -> Vec<ClusterView>;
    /// Live request rates, error ratios and latencies per listener, route and cluster; only
    /// points after `since` (Unix ms) when given.
    fn stats(&self, since: Option<u64>) -> crate::telemetry::live::StatsView;
    /// Drains (`true`) or re-enables (`false`) an endpoint given by address or index.
    fn set_drained(
        &self,
        cluster: &str,
        endpoint: &str,
        drained: bool,
    ) -> Result<EndpointView, ControlError>;
    /// Re-reads and applies the config file; an invalid file leaves the running config as is.
    fn reload(&self) -> Pin<Box<dyn Future<Output = ReloadReport> + Send + '_>>;
    /// The effective config as JSON.
    fn effective_config(&self) -> serde_json::Value;
    /// Brings time-dependent gauges (certificate expiry) up to date before `/metrics` renders.
    fn refresh_metrics(&self) {}
}

/// Why an admin action was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No such cluster or endpoint.
    #[error("no endpoint {endpoint:?} in cluster {cluster:?}")]
    NotFound {
        /// Requested cluster.
        cluster: String,
        /// Requested endpoint.
        endpoint: String,
    },
}

/// Outcome of a reload.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadReport {
    /// Whether the new config is now active.
    pub ok: bool,
    /// Hash of the config now active (the old one when the reload failed).
    pub config_hash: String,
    /// Every problem found, `file:line:col: key: message`.
    pub errors: Vec<String>,
}

/// Why the admin listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Non-loopback bind without a token.
    #[error(
        "admin.bind {0} is not a loopback address and admin.token is not set; set a token, bind to 127.0.0.1, or set admin.allow_insecure_non_loopback = true"
    )]
    OpenWithoutToken(SocketAddr),
    /// The socket could not be bound.
    #[error("binding admin listener {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// Binds the admin listener, refusing an unauthenticated non-loopback address.
pub async fn bind(admin: &Admin) -> Result<TcpListener, AdminError> {
    if !admin.bind.ip().is_loopback() && admin.token.is_none() {
        if !admin.allow_insecure_non_loopback {
            return Err(AdminError::OpenWithoutToken(admin.bind));
        }
        tracing::warn!(bind = %admin.bind, "admin API open to the network without a token (admin.allow_insecure_non_loopback = true)");
    }
    TcpListener::bind(admin.bind)
        .await
        .map_err(|source| AdminError::Bind {
            addr: admin.bind,
            source,
        })
}

/// Serves the admin API on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    token: Option<String>,
    control: Arc<dyn Control>,
    metrics: Option<PrometheusHandle>,
    mut shutdown: watch::Receiver<bool>,
) {
    let ctx = Arc::new(api::Ctx {
        token,
        control,
        metrics,
        sessions: session::Sessions::default(),
    });
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                continue;
            }
        };
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let ctx = Arc::clone(&ctx);
                async move { Ok::<_, std::convert::Infallible>(api::handle(&ctx, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
