//! Retries with exponential backoff for transient failures only: a wrong password
//! or a missing manifest fails at once (no retry storm against a registry that
//! said no).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{MAX_BACKOFF, TransferError, TransferOptions};

/// Retries one command may spend over all its requests (`retry-budget`).
#[derive(Debug, Clone)]
pub struct RetryBudget {
    limit: u32,
    spent: Arc<AtomicU32>,
}

impl RetryBudget {
    pub fn new(limit: u32) -> RetryBudget {
        RetryBudget {
            limit,
            spent: Arc::default(),
        }
    }

    /// Takes one retry; false when none is left.
    pub fn take(&self) -> bool {
        self.spent
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |spent| {
                (spent < self.limit).then_some(spent + 1)
            })
            .is_ok()
    }

    /// `error`, marked as the last straw when the budget is why it is final.
    pub(crate) fn give_up(&self, error: TransferError) -> TransferError {
        if error.is_transient() {
            TransferError::RetryBudgetSpent {
                limit: self.limit,
                last: Box::new(error),
            }
        } else {
            error
        }
    }
}

/// Runs `attempt` until it succeeds, fails for good, or the retries are used up.
/// `attempt` gets the attempt number (0 first). Returns the result and how many
/// retries it took.
pub(crate) async fn retrying<T, F, Fut>(
    options: &TransferOptions,
    what: &str,
    mut attempt: F,
) -> (Result<T, TransferError>, usize)
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, TransferError>>,
{
    let mut n = 0u32;
    loop {
        match attempt(n).await {
            Ok(v) => return (Ok(v), n as usize),
            Err(e) if e.is_transient() && n < options.retries => {
                if !options.retry_budget.take() {
                    return (Err(options.retry_budget.give_up(e)), n as usize);
                }
                let wait = e.retry_after().unwrap_or_else(|| backoff(options, n));
                tracing::warn!(
                    "{what}: {e}; retrying in {:.1}s ({}/{})",
                    wait.as_secs_f64(),
                    n + 1,
                    options.retries
                );
                tokio::time::sleep(wait.min(MAX_BACKOFF)).await;
                n += 1;
            }
            Err(e) => return (Err(e), n as usize),
        }
    }
}

/// `backoff * 2^n`, capped, with up to 25% jitter so parallel clients spread out.
pub(crate) fn backoff(options: &TransferOptions, n: u32) -> Duration {
    let base = options
        .backoff
        .saturating_mul(1u32 << n.min(16))
        .min(MAX_BACKOFF);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let jitter = base.mul_f64(f64::from(nanos % 1000) / 4000.0);
    base + jitter
}

#[cfg(test)]
mod tests {
    use super::*;
    use sarde_api::TransportError;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn options(retries: u32) -> TransferOptions {
        TransferOptions {
            concurrency: 1,
            retries,
            backoff: Duration::from_millis(1),
            retry_budget: RetryBudget::new(100),
        }
    }

    fn transient() -> TransferError {
        TransferError::Transport(TransportError::Transient {
            location: "r".into(),
            message: "503".into(),
            retry_after: None,
        })
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let (result, retries) = retrying(&options(5), "x", |n| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { if n < 2 { Err(transient()) } else { Ok(n) } }
        })
        .await;
        assert_eq!(result.unwrap(), 2);
        assert_eq!(retries, 2);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn refusals_are_not_retried() {
        let calls = AtomicU32::new(0);
        let (result, _) = retrying(&options(5), "x", |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                Err::<(), _>(TransferError::Transport(TransportError::Unauthorized {
                    location: "r".into(),
                    object: "o".into(),
                }))
            }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "a 401 is asked once");
    }

    #[tokio::test]
    async fn retries_are_bounded() {
        let calls = AtomicU32::new(0);
        let (result, retries) = retrying(&options(3), "x", |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(transient()) }
        })
        .await;
        assert!(result.unwrap_err().is_transient());
        assert_eq!(retries, 3);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let o = TransferOptions {
            backoff: Duration::from_millis(100),
            ..TransferOptions::default()
        };
        let b0 = backoff(&o, 0);
        let b3 = backoff(&o, 3);
        assert!(b0 >= Duration::from_millis(100) && b0 <= Duration::from_millis(125));
        assert!(b3 >= Duration::from_millis(800) && b3 <= Duration::from_millis(1000));
        assert!(backoff(&o, 30) <= MAX_BACKOFF + MAX_BACKOFF / 4);
    }

    #[tokio::test]
    async fn the_budget_ends_retries_across_requests() {
        let mut o = options(5);
        o.retry_budget = RetryBudget::new(3);
        let calls = AtomicU32::new(0);
        for _ in 0..2 {
            let (result, _) = retrying(&o, "x", |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>(transient()) }
            })
            .await;
            let e = result.unwrap_err();
            assert!(
                e.to_string()
                    .contains("the 3 retries of `retry-budget` are spent"),
                "{e}"
            );
            assert!(!e.is_transient(), "a spent budget is final");
        }
        // 3 retries in all: 1 + 3 attempts, then 1 attempt for the second request.
        assert_eq!(calls.load(Ordering::SeqCst), 5);
    }
}
