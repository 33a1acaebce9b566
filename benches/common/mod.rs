//! What the end-to-end benches share: the quantile they report and the wait on a
//! condition with a deadline.

use std::time::Duration;

use tokio::time::Instant;

/// The `q`-quantile (nearest rank) of `values`, in seconds.
pub fn quantile(values: &[Duration], q: f64) -> f64 {
    let mut sorted: Vec<f64> = values.iter().map(Duration::as_secs_f64).collect();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Waits until `check` holds, polling every `every`; panics after `limit` naming `what`.
pub async fn until(
    what: &str,
    limit: Duration,
    every: Duration,
    mut check: impl AsyncFnMut() -> bool,
) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(every).await;
    }
}
