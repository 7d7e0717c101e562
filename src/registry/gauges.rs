//! The registry's metrics, set after each published snapshot: endpoints
//! by state, panic mode, claim conflicts, source connections. A leaf.

use crate::model::{ServiceKey, Snapshot};

/// Sets `beacon_source_connected{source}`: 1 while connected.
pub fn publish_source_gauges(snap: &Snapshot) {
    for (id, status) in &snap.sources {
        metrics::gauge!(crate::telemetry::SOURCE_CONNECTED, "source" => id.to_string())
            .set(if status.connected { 1.0 } else { 0.0 });
    }
}

/// Sets `beacon_claim_conflicts{kind}`: the claims refused right now.
pub fn publish_conflict_gauges(snap: &Snapshot) {
    for kind in ["listen", "vip", "hostname", "spec"] {
        let n = snap.conflicts.iter().filter(|c| c.kind == kind).count();
        metrics::gauge!(crate::telemetry::CLAIM_CONFLICTS, "kind" => kind).set(n as f64);
    }
}

/// Updates `beacon_endpoints{service,state}` and the panic-mode metrics
/// (`beacon_panic_mode{service}` 1 while `fail_open` serves every endpoint,
/// `beacon_panic_mode_total{service}` counting entries into panic mode) for
/// the services that changed.
pub fn publish_endpoint_gauges(previous: &Snapshot, snap: &Snapshot, changed: &[ServiceKey]) {
    for key in changed {
        let svc = snap.services.get(key);
        let (healthy, total) = svc.map_or((0, 0), |svc| {
            let healthy = svc.endpoints.iter().filter(|e| e.healthy).count();
            (healthy, svc.endpoints.len())
        });
        let service = key.to_string();
        metrics::gauge!(crate::telemetry::ENDPOINTS, "service" => service.clone(), "state" => "healthy")
            .set(healthy as f64);
        metrics::gauge!(crate::telemetry::ENDPOINTS, "service" => service.clone(), "state" => "unhealthy")
            .set((total - healthy) as f64);
        let panic = svc.is_some_and(|s| s.panic);
        let was_panic = previous.services.get(key).is_some_and(|s| s.panic);
        if svc.is_some() && previous.services.get(key).is_none() {
            // A new service's series exist from the start (rates, alerts).
            metrics::counter!(crate::telemetry::ENDPOINT_EJECTIONS, "service" => service.clone())
                .increment(0);
        }
        if panic != was_panic || previous.services.get(key).is_none() {
            metrics::gauge!(crate::telemetry::PANIC_MODE, "service" => service.clone())
                .set(if panic { 1.0 } else { 0.0 });
        }
        if panic && !was_panic {
            tracing::warn!(service = %key, "no endpoint is healthy: fail_open serves them all");
            metrics::counter!(crate::telemetry::PANIC_MODE_ENTRIES, "service" => service)
                .increment(1);
        }
    }
}
