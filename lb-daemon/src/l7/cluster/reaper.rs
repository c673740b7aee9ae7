//! Periodic closing of idle upstream connections, shared by the HTTP/1.1 and HTTP/2 pools.
use std::sync::Arc;
use std::time::Duration;

/// Calls `reap(pool)` every half `idle_timeout` (50 ms to 30 s) while `pool` is alive. Needs a
/// tokio runtime; without one, nothing is spawned and idle connections go on use only.
pub fn spawn<P: Send + Sync + 'static>(pool: &Arc<P>, idle_timeout: Duration, reap: fn(&P)) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let period = (idle_timeout / 2).clamp(Duration::from_millis(50), Duration::from_secs(30));
    let weak = Arc::downgrade(pool);
    rt.spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(pool) = weak.upgrade() else { return };
            reap(&pool);
        }
    });
}
