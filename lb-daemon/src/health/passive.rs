//! Passive health: the end of an ejection must be announced, or pickers built while the
//! endpoint was out would keep ignoring it after its `fail_timeout`.
use std::sync::Arc;
use std::time::Instant;

use super::EndpointHealth;

/// Re-admits `ep` at `until` (the deadline `report_failure` returned), which bumps the
/// cluster's generation so the balancer rebuilds with the endpoint back in.
pub fn schedule_expiry(ep: Arc<EndpointHealth>, until: Instant) {
    tokio::spawn(async move {
        tokio::time::sleep_until(until.into()).await;
        // A later failure may have extended the ejection; expire_ejection checks the deadline.
        while !ep.expire_ejection(Instant::now()) {
            match ep.ejected_until() {
                Some(later) if later > Instant::now() => {
                    tokio::time::sleep_until(later.into()).await;
                }
                _ => break,
            }
        }
    });
}
