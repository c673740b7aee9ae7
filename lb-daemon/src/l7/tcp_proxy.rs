//! `mode = "tcp"` listeners: each connection's bytes are relayed to an endpoint of the
//! listener's cluster, chosen by its balancer (health, drain, passive ejection and
//! `max_connections` as for HTTP), with another endpoint tried when a connect fails.
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::watch;

use super::cluster::{ClusterRuntime, Picked};
use super::server::CloseReason;
use crate::balance::PickContext;

/// Relays `down` to an endpoint of `cluster` until either side closes (or the listener
/// drains).
pub(super) async fn serve(
    mut down: TcpStream,
    client: SocketAddr,
    cluster: Arc<ClusterRuntime>,
    shutdown: &mut watch::Receiver<bool>,
) -> CloseReason {
    let headers = http::HeaderMap::new();
    let ctx = PickContext {
        client_ip: client.ip(),
        headers: &headers,
    };
    let attempts = 1 + cluster.config.retry.attempts as usize;
    let mut tried = Vec::with_capacity(attempts);
    for _ in 0..attempts {
        let (idx, _in_flight) = match cluster.pick_within_limit(&ctx, &tried) {
            Picked::Endpoint(i, guard) => (i, guard),
            Picked::None | Picked::AllAtLimit => break,
        };
        tried.push(idx);
        let Some(ep) = cluster.config.endpoints.get(idx) else {
            break;
        };
        let connect = tokio::time::timeout(
            cluster.config.timeouts.connect,
            TcpStream::connect(ep.address),
        )
        .await;
        let mut up = match connect {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(cluster = %cluster.name, endpoint = %ep.address, error = %e, "tcp upstream connect failed");
                cluster.passive_failure(idx);
                continue;
            }
            Err(_) => {
                tracing::warn!(cluster = %cluster.name, endpoint = %ep.address, "tcp upstream connect timed out");
                cluster.passive_failure(idx);
                continue;
            }
        };
        let _ = up.set_nodelay(true);
        return tokio::select! {
            r = tokio::io::copy_bidirectional(&mut down, &mut up) => match r {
                Ok(_) => CloseReason::Client,
                Err(e) => {
                    tracing::debug!(cluster = %cluster.name, endpoint = %ep.address, error = %e, "tcp relay ended with an error");
                    CloseReason::Error
                }
            },
            _ = shutdown.wait_for(|s| *s) => CloseReason::Drain,
        };
    }
    tracing::warn!(cluster = %cluster.name, client = %client, "no endpoint took the tcp connection");
    CloseReason::Error
}
