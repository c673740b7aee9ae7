//! Deadlines on the request path, from timers a worker reuses.
//!
//! A fresh tokio timer per upstream attempt costs an insertion into the runtime's timer wheel
//! when it is first polled and a removal when it is dropped (callgrind: ~450 instructions of a
//! ~26k-instruction keep-alive request). A worker instead keeps the timers of finished
//! requests and re-arms one for the next deadline. Deadlines of the same route only move later,
//! and moving a registered timer later is a store: the wheel re-files it only when its old
//! deadline comes round (Envoy and HAProxy likewise re-arm timers rather than make new ones).
//!
//! A spare timer stays filed under its last deadline, holding a waker that does nothing; if
//! that deadline passes while it waits for reuse, it fires once, waking no one, and is filed
//! afresh by its next use. Spares are kept only on worker threads, whose runtime lives as long
//! as the thread: a timer belongs to the runtime that made it, and a thread that runs several
//! runtimes one after another (tests) would otherwise hand one runtime's timer to another.
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Spare timers a worker keeps at most; more are dropped as usual. A hundred or so cover the
/// requests a worker has waiting on upstreams at once in the benchmarks; each spare is a small
/// allocation that stays, and spares made under a burst are spread over the heap, where they
/// keep pages from going back to the kernel after it (`tests/e2e_memory.rs`).
const MAX_SPARES: usize = 128;

thread_local! {
    static SPARES: RefCell<Vec<Pin<Box<Sleep>>>> = const { RefCell::new(Vec::new()) };
    static KEEPS_SPARES: Cell<bool> = const { Cell::new(false) };
}

/// Lets the calling thread keep spare timers: a worker thread, for as long as its runtime
/// runs (call [`drop_spares`] before the runtime goes).
pub fn keep_spares() {
    KEEPS_SPARES.with(|k| k.set(true));
}

/// Drops the calling thread's spare timers and keeps no more.
pub fn drop_spares() {
    KEEPS_SPARES.with(|k| k.set(false));
    let spares = SPARES.with(|s| std::mem::take(&mut *s.borrow_mut()));
    drop(spares);
}

/// The deadline passed before the future finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut;

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("deadline passed")
    }
}

impl std::error::Error for TimedOut {}

/// A timer armed for one deadline, a spare when there is one; back among the spares when
/// dropped.
pub struct Timer(Option<Pin<Box<Sleep>>>);

impl Timer {
    /// Armed for `deadline`.
    pub fn at(deadline: Instant) -> Timer {
        let spare = SPARES.try_with(|s| s.borrow_mut().pop()).ok().flatten();
        let sleep = match spare {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Timer(Some(sleep))
    }

    /// Ready once the deadline has passed.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.0 {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }

    /// Polls `inner`, then this timer: `inner`'s output, or [`TimedOut`] once the deadline
    /// has passed while `inner` still waits. For a future that is pinned where it lies, which
    /// [`Deadline`] would move once more.
    pub fn race<F: Future + ?Sized>(
        &mut self,
        inner: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<F::Output, TimedOut>> {
        if let Poll::Ready(v) = inner.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        self.poll(cx).map(|()| Err(TimedOut))
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let Some(mut sleep) = self.0.take() else {
            return;
        };
        if !KEEPS_SPARES.try_with(Cell::get).unwrap_or(false) {
            return;
        }
        // Polled once with a waker that does nothing, so that the timer lets go of the waker
        // of the task that used it: a finished connection's task (kilobytes) would otherwise
        // live on as long as its timer waits among the spares.
        let _ = sleep
            .as_mut()
            .poll(&mut Context::from_waker(std::task::Waker::noop()));
        // During thread teardown the list may be gone: the timer is then simply dropped.
        let _ = SPARES.try_with(|s| {
            let mut spares = s.borrow_mut();
            if spares.len() < MAX_SPARES {
                spares.push(sleep);
            }
        });
    }
}

pin_project_lite::pin_project! {
    /// `inner`, unless `deadline` passes first.
    pub struct Deadline<F> {
        #[pin]
        inner: F,
        timer: Timer,
    }
}

impl<F: Future> Future for Deadline<F> {
    type Output = Result<F::Output, TimedOut>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        this.timer.race(this.inner, cx)
    }
}

/// Runs `inner` until `deadline`.
pub fn until<F: Future>(deadline: Instant, inner: F) -> Deadline<F> {
    Deadline {
        inner,
        timer: Timer::at(deadline),
    }
}

/// Runs `inner` for at most `time` from now.
pub fn within<F: Future>(time: Duration, inner: F) -> Deadline<F> {
    until(Instant::now() + time, inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spares kept for the test, dropped however it ends: the harness may run the next test on
    /// this thread with another runtime.
    struct Spares;

    impl Spares {
        fn keep() -> Spares {
            keep_spares();
            Spares
        }
    }

    impl Drop for Spares {
        fn drop(&mut self) {
            drop_spares();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn answers_in_time_and_times_out_late() {
        let _spares = Spares::keep();
        let fast = within(Duration::from_millis(50), async { 7 }).await;
        assert_eq!(fast, Ok(7));
        let start = Instant::now();
        let slow = within(
            Duration::from_millis(50),
            tokio::time::sleep(Duration::from_secs(5)),
        )
        .await;
        assert_eq!(slow, Err(TimedOut));
        // (The wheel's resolution is a millisecond.)
        let took = start.elapsed();
        assert!((50..52).contains(&took.as_millis()), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reused_timer_keeps_each_deadline() {
        let spares = Spares::keep();
        // A long deadline first, then shorter ones on the same (reused) timer: each must fire
        // at its own time, earlier than the one the timer was filed under.
        let r = within(Duration::from_millis(1), async { 1 }).await;
        assert_eq!(r, Ok(1));
        let long = within(Duration::from_secs(60), async { 2 }).await;
        assert_eq!(long, Ok(2));
        assert_eq!(SPARES.with(|s| s.borrow().len()), 1);
        for wait in [10u64, 30, 5] {
            let start = Instant::now();
            let r = within(Duration::from_millis(wait), std::future::pending::<()>()).await;
            assert_eq!(r, Err(TimedOut));
            let took = start.elapsed().as_millis();
            assert!((wait..wait + 2).contains(&(took as u64)), "{wait}: {took}");
            assert_eq!(
                SPARES.with(|s| s.borrow().len()),
                1,
                "one timer serves them all"
            );
        }
        drop(spares);
        assert_eq!(SPARES.with(|s| s.borrow().len()), 0);
    }
}
