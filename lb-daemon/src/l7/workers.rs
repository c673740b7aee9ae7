//! Data-plane workers: one thread per worker, each running its own single-threaded tokio
//! runtime, each accepting on its own `SO_REUSEPORT` socket of every listener (nginx's worker
//! processes with `reuseport`, HAProxy's threads with a listener per thread).
//!
//! Why not one multi-threaded runtime: its work stealing moves a connection's task between
//! threads, and every wake-up, spawn and timer goes through shared queues and atomics. Measured
//! with two workers, lbd's CPU per keep-alive request rose from 23.1 to 29.4 µs where nginx's
//! stayed flat. Here a connection lives and dies on the worker that accepted it: its timers,
//! its wake-ups and (for HTTP/1.1) its upstream connections stay on that thread. The kernel
//! spreads new connections over the workers' sockets by the hash of their addresses.
//!
//! The control plane (config reloads, health checks, discovery, the admin API, metrics upkeep)
//! runs on the main runtime, apart from the workers.
use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Workers started in this process (1 until [`Workers::start`] runs): the number of
/// per-worker slots pools keep.
static RUNNING: AtomicUsize = AtomicUsize::new(1);

/// The number of data-plane workers running (at least 1).
pub fn running() -> usize {
    RUNNING.load(Ordering::Relaxed)
}

thread_local! {
    /// Index of the worker this thread runs, 0 elsewhere (the main runtime, tests).
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the worker running the calling thread (0 outside workers): the key of
/// per-worker state such as the HTTP/1.1 idle connections.
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// One `T` per running worker, for state a worker keeps to itself (its pooled connections).
pub fn per_worker<T>(mut make: impl FnMut() -> T) -> Box<[T]> {
    (0..running()).map(|_| make()).collect()
}

/// Worker `worker`'s entry of per-worker state made by [`per_worker`]; the first entry for an
/// index it has none for (state made before the workers started, a thread outside them).
pub fn slot<T>(slots: &[T], worker: usize) -> Option<&T> {
    slots.get(worker).or_else(|| slots.first())
}

/// The number of workers `[global] workers` asks for: `None` (auto) is one per CPU this
/// process may run on (its affinity mask and cgroup quota, as `taskset` or systemd's
/// `CPUAffinity=` set them).
pub fn count(configured: Option<usize>) -> usize {
    configured
        .or_else(|| std::thread::available_parallelism().ok().map(Into::into))
        .unwrap_or(1)
        .max(1)
}

struct Worker {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// The running workers. Dropping them stops each worker's runtime (tasks still running are
/// dropped) and joins its thread.
pub struct Workers {
    workers: Vec<Worker>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("count", &self.workers.len())
            .finish()
    }
}

impl Workers {
    /// Starts `n` workers (at least one).
    pub fn start(n: usize) -> io::Result<Self> {
        RUNNING.store(n.max(1), Ordering::Relaxed);
        let mut workers = Vec::with_capacity(n.max(1));
        for index in 0..n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("lbd-worker-{index}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(index));
                    crate::l7::timer::keep_spares();
                    crate::thread_cache::keep_on_this_thread();
                    crate::thread_cache::spawn_flusher(&runtime);
                    // A current-thread runtime runs its spawned tasks only inside `block_on`.
                    let _ = runtime.block_on(stopped);
                    // The spare timers go while the runtime they belong to is still there;
                    // timers of the tasks dropped with it are then not kept.
                    crate::l7::timer::drop_spares();
                    drop(runtime);
                    crate::thread_cache::flush_this_thread(true);
                })?;
            workers.push(Worker {
                handle,
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Workers { workers })
    }

    /// How many workers run.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Never true: there is always at least one worker.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// The runtime of each worker, in index order.
    pub fn handles(&self) -> impl Iterator<Item = &Handle> {
        self.workers.iter().map(|w| &w.handle)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(stop) = w.stop.take() {
                let _ = stop.send(());
            }
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tasks spawned on a worker run on that worker's thread and see its index.
    #[test]
    fn tasks_run_on_their_worker() {
        let workers = Workers::start(3).expect("workers");
        assert_eq!(workers.len(), 3);
        let main = std::thread::current().id();
        for (i, h) in workers.handles().enumerate() {
            let (tx, rx) = std::sync::mpsc::channel();
            h.spawn(async move {
                let _ = tx.send((current(), std::thread::current().id()));
            });
            let (index, thread) = rx
                .recv_timeout(std::time::Duration::from_secs(5))
                .expect("task ran");
            assert_eq!(index, i);
            assert_ne!(thread, main);
        }
        assert_eq!(current(), 0);
        assert_eq!(count(Some(4)), 4);
        assert!(count(None) >= 1);
    }
}
