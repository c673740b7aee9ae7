//! Owns the running state built from a [`crate::config::Model`]: binds listeners, swaps in new
//! runtimes on reload, serves the admin API, and drains on shutdown.
mod file_watch;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Semaphore, watch};

use crate::admin::view::ReloadEvent;
use crate::admin::{
    self, ClusterView, Control, ControlError, EndpointView, ReloadReport, StatusView,
};
use crate::config::{self, Model};
use crate::discovery::Discovery;
pub use crate::l7::runtime::Runtime;
use crate::l7::server::{self, ConnTracker, ListenerCtx};
use crate::l7::workers::Workers;
use crate::sdnotify;
use crate::telemetry::metrics as m;

/// Why `lbd run` could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener socket could not be bound.
    #[error("listener {name:?}: cannot bind {addr}: {source}")]
    Bind {
        /// Listener name.
        name: String,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The admin listener could not start.
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    /// The XDP program could not be loaded or attached (no object, no permission, unknown
    /// interface).
    #[error("L4 (XDP): {0}")]
    L4(#[from] crate::l4::L4Error),
    /// Signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    /// The data-plane worker threads could not be started.
    #[error("starting {count} worker(s): {source}")]
    Workers {
        /// Workers asked for.
        count: usize,
        /// Cause.
        source: std::io::Error,
    },
}

struct ListenerHandle {
    shutdown: watch::Sender<bool>,
    /// The accept loop of each worker; each drops (closes) its listening socket when it ends.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The running daemon.
pub struct Supervisor {
    path: PathBuf,
    state: Arc<ArcSwap<Runtime>>,
    started: Instant,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    listeners: Mutex<HashMap<SocketAddr, ListenerHandle>>,
    tracker: Arc<ConnTracker>,
    reload_lock: tokio::sync::Mutex<()>,
    /// Held while a new runtime is built and swapped in, and while an operator drains an
    /// endpoint, so a drain is never applied to a runtime that is about to be replaced.
    swap_lock: Mutex<()>,
    /// The XDP data path, when the config has VIPs; dropping it detaches the program.
    l4: Mutex<Option<crate::l4::L4Service>>,
    /// The start and the last reloads, oldest first (bounded by [`RELOAD_HISTORY`]).
    reload_history: Mutex<std::collections::VecDeque<ReloadEvent>>,
    /// The latest rejected reload.
    last_reload_error: Mutex<Option<ReloadEvent>>,
    /// DNS and file endpoint sources of the active config.
    discovery: Arc<Discovery>,
    /// The data-plane workers' runtimes (listeners are served there).
    workers: Vec<tokio::runtime::Handle>,
}

/// Reloads kept for the status page.
const RELOAD_HISTORY: usize = 20;

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    /// Builds the runtime for `model` and binds its listeners (nothing is served yet).
    /// `discovery` (already primed with `model`'s sources) fills in dynamic endpoints, and
    /// `changes` names the clusters whose sources changed since.
    pub fn start(
        path: &Path,
        mut model: Model,
        discovery: Arc<Discovery>,
        changes: tokio::sync::mpsc::UnboundedReceiver<String>,
        workers: &Workers,
    ) -> Result<Arc<Self>, StartError> {
        discovery.fill(&mut model);
        let model = Arc::new(model);
        let sup = Arc::new(Supervisor {
            path: path.to_path_buf(),
            state: Arc::new(ArcSwap::from_pointee(Runtime::build(
                Arc::clone(&model),
                None,
            ))),
            started: Instant::now(),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            listeners: Mutex::new(HashMap::new()),
            tracker: Arc::new(ConnTracker::default()),
            reload_lock: tokio::sync::Mutex::new(()),
            swap_lock: Mutex::new(()),
            l4: Mutex::new(None),
            reload_history: Mutex::new(std::collections::VecDeque::new()),
            last_reload_error: Mutex::new(None),
            discovery,
            workers: workers.handles().cloned().collect(),
        });
        sup.record_load("start", true, &model.source.hash, Vec::new());
        let bound = bind_new(&model, &HashMap::<SocketAddr, ()>::new(), workers.len())?;
        // L4 before the listeners serve: a VIP that cannot be attached fails the start, while
        // the operator is watching, instead of leaving a half-working daemon.
        let l4 =
            crate::l4::L4Service::start(sup.l4_inputs(), crate::l4::ServiceOptions::default())?;
        if let Ok(mut slot) = sup.l4.lock() {
            *slot = l4;
        }
        sup.spawn_listeners(&model, bound);
        set_config_info(&model);
        tokio::spawn(follow_discovery(Arc::downgrade(&sup), changes));
        Ok(sup)
    }

    /// Swaps in a runtime whose clusters in `names` have their sources' current endpoints.
    /// Only those clusters are rebuilt (they inherit health, drains and ejections by address);
    /// requests in flight keep the runtime they started with, so removed endpoints drain.
    fn apply_discovery(&self, names: &std::collections::HashSet<String>) {
        let changed = {
            let _swap = self.swap_lock.lock();
            let current = self.state.load_full();
            let mut model = (*current.model).clone();
            let mut changed = false;
            for ci in 0..model.clusters.len() {
                let c = &model.clusters[ci];
                if c.sources.is_empty() || !names.contains(&c.name) {
                    continue;
                }
                let endpoints = self.discovery.compose(&model, ci);
                if endpoints == model.clusters[ci].endpoints {
                    continue;
                }
                let (before, after) = (model.clusters[ci].endpoints.len(), endpoints.len());
                tracing::info!(cluster = %model.clusters[ci].name, before, after, "cluster endpoints changed by discovery");
                model.clusters[ci].endpoints = endpoints;
                changed = true;
            }
            if changed {
                self.state.store(Arc::new(Runtime::build_keeping_listeners(
                    Arc::new(model),
                    &current,
                )));
            }
            changed
        };
        if changed {
            self.update_l4();
        }
    }

    fn spawn_listeners(&self, model: &Model, bound: Vec<(usize, Vec<std::net::TcpListener>)>) {
        let Ok(mut handles) = self.listeners.lock() else {
            return;
        };
        for (i, sockets) in bound {
            let l = &model.listeners[i];
            let (tx, rx) = watch::channel(false);
            let ctx = ListenerCtx {
                bind: l.bind,
                name: Arc::from(l.name.as_str()),
                state: Arc::clone(&self.state),
                shutdown: rx,
                tracker: Arc::clone(&self.tracker),
                metrics: Arc::new(server::ConnMetrics::new(&l.name)),
            };
            let permits = Arc::new(Semaphore::new(l.limits.max_connections.max(1)));
            tracing::info!(listener = %l.name, bind = %l.bind, workers = sockets.len(), "listening");
            let tasks = sockets
                .into_iter()
                .zip(&self.workers)
                .map(|(socket, worker)| {
                    worker.spawn(server::serve(socket, Arc::clone(&permits), ctx.clone()))
                })
                .collect();
            handles.insert(
                l.bind,
                ListenerHandle {
                    shutdown: tx,
                    tasks,
                },
            );
        }
    }

    fn l4_inputs(&self) -> crate::l4::Inputs {
        let rt = self.runtime();
        crate::l4::Inputs {
            model: Arc::clone(&rt.model),
            health: rt.health(),
        }
    }

    /// Hands the new config and its health to the L4 service, starting it when the first VIP
    /// appears; a failure there is logged and leaves L7 running on the new config.
    fn update_l4(&self) {
        let Ok(mut slot) = self.l4.lock() else {
            return;
        };
        let inputs = self.l4_inputs();
        match &*slot {
            Some(svc) => svc.update(inputs),
            None if !inputs.model.vips.is_empty() => {
                match crate::l4::L4Service::start(inputs, crate::l4::ServiceOptions::default()) {
                    Ok(svc) => *slot = svc,
                    Err(e) => {
                        tracing::error!(error = %e, "L4 (XDP) could not start after reload; VIPs are not served")
                    }
                }
            }
            None => {}
        }
    }

    /// Parts of the L4 config that cannot be served now (unknown next-hop MACs, full tables).
    pub fn l4_problems(&self) -> Vec<String> {
        self.l4
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|s| s.problems()))
            .unwrap_or_default()
    }

    fn record_load(&self, kind: &'static str, ok: bool, hash: &str, errors: Vec<String>) {
        let event = ReloadEvent {
            at_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            kind,
            ok,
            config_hash: hash.to_owned(),
            errors,
        };
        if !ok && let Ok(mut last) = self.last_reload_error.lock() {
            *last = Some(event.clone());
        }
        if let Ok(mut h) = self.reload_history.lock() {
            if h.len() >= RELOAD_HISTORY {
                h.pop_front();
            }
            h.push_back(event);
        }
    }

    /// The active runtime.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.state.load_full()
    }

    /// Re-reads the config file and applies it; an invalid file changes nothing.
    pub async fn reload(&self) -> ReloadReport {
        let _serial = self.reload_lock.lock().await;
        let _ = sdnotify::notify(sdnotify::State::Reloading);
        let (report, removed) = self.reload_locked();
        // A removed listener's socket is closed only when its accept loop ends; wait for that,
        // so that once the reload is reported done the old address refuses new connections.
        for task in removed {
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        let _ = sdnotify::notify(sdnotify::State::Ready);
        report
    }

    /// Applies the file; returns the accept loops of removed listeners (told to stop).
    fn reload_locked(&self) -> (ReloadReport, Vec<tokio::task::JoinHandle<()>>) {
        let old = self.state.load_full();
        let mut model = match config::load(&self.path) {
            Ok(m) => m,
            Err(errors) => {
                for e in &errors.0 {
                    tracing::error!(error = %e, "reload rejected: invalid config");
                }
                let errors = errors.0.iter().map(|e| e.to_string()).collect();
                return (self.reload_failed(&old, errors), Vec::new());
            }
        };
        if model.global.workers != old.model.global.workers {
            tracing::warn!("global.workers changed; the worker count changes at the next restart");
        }
        let keep: HashMap<SocketAddr, ()> = match self.listeners.lock() {
            Ok(h) => h.keys().map(|a| (*a, ())).collect(),
            Err(_) => HashMap::new(),
        };
        let bound = match bind_new(&model, &keep, self.workers.len()) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "reload rejected");
                return (self.reload_failed(&old, vec![e.to_string()]), Vec::new());
            }
        };
        let model = {
            // Drains carried over by Runtime::build must include one made a moment ago, and
            // the dynamic endpoints must be those discovery applied last.
            let _swap = self.swap_lock.lock();
            self.discovery.fill(&mut model);
            let model = Arc::new(model);
            let current = self.state.load_full();
            self.state
                .store(Arc::new(Runtime::build(Arc::clone(&model), Some(&current))));
            model
        };
        self.update_l4();
        self.spawn_listeners(&model, bound);
        let mut removed = Vec::new();
        if let Ok(mut handles) = self.listeners.lock() {
            let gone: Vec<SocketAddr> = handles
                .keys()
                .filter(|addr| !model.listeners.iter().any(|l| l.bind == **addr))
                .copied()
                .collect();
            for addr in gone {
                if let Some(h) = handles.remove(&addr) {
                    tracing::info!(bind = %addr, "listener removed by reload; draining its connections");
                    let _ = h.shutdown.send(true);
                    removed.extend(h.tasks);
                }
            }
        }
        self.reloads_ok.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::RELOADS, "result" => "success").increment(1);
        metrics::gauge!(m::CONFIG_INFO, "hash" => old.model.source.hash.clone()).set(0.0);
        set_config_info(&model);
        tracing::info!(hash = %model.source.hash, "config reloaded");
        self.record_load("reload", true, &model.source.hash, Vec::new());
        let report = ReloadReport {
            ok: true,
            config_hash: model.source.hash.clone(),
            errors: Vec::new(),
        };
        (report, removed)
    }

    fn reload_failed(&self, old: &Runtime, errors: Vec<String>) -> ReloadReport {
        self.reloads_failed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::RELOADS, "result" => "failure").increment(1);
        self.record_load("reload", false, &old.model.source.hash, errors.clone());
        ReloadReport {
            ok: false,
            config_hash: old.model.source.hash.clone(),
            errors,
        }
    }

    /// Stops accepting, lets in-flight requests finish for up to `deadline`, and returns the
    /// number of connections still open when it gave up.
    pub async fn drain(&self, deadline: Duration) -> usize {
        let _ = sdnotify::notify(sdnotify::State::Stopping);
        if let Ok(handles) = self.listeners.lock() {
            for h in handles.values() {
                let _ = h.shutdown.send(true);
            }
        }
        let _ = tokio::time::timeout(deadline, self.tracker.wait_idle()).await;
        self.tracker.open()
    }
}

/// Binds every listener of `model` whose address is not in `keep`, or none if any fails.
fn bind_new<V>(
    model: &Model,
    keep: &HashMap<SocketAddr, V>,
    workers: usize,
) -> Result<Vec<(usize, Vec<std::net::TcpListener>)>, StartError> {
    let mut out = Vec::new();
    for (i, l) in model.listeners.iter().enumerate() {
        if keep.contains_key(&l.bind) {
            continue;
        }
        let socket = server::bind(l.bind, workers).map_err(|source| StartError::Bind {
            name: l.name.clone(),
            addr: l.bind,
            source,
        })?;
        out.push((i, socket));
    }
    Ok(out)
}

fn set_config_info(model: &Model) {
    metrics::gauge!(m::CONFIG_INFO, "hash" => model.source.hash.clone()).set(1.0);
}

impl Control for Supervisor {
    fn status(&self) -> StatusView {
        let mut view = admin::view::status(
            &self.runtime().model,
            self.started,
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed),
        );
        view.l4_problems = self.l4_problems();
        if let Ok(h) = self.reload_history.lock() {
            view.reload_history = h.iter().cloned().collect();
        }
        view.last_reload_error = self.last_reload_error.lock().ok().and_then(|e| e.clone());
        let model = Arc::clone(&self.runtime().model);
        view.l4 = self
            .l4
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|s| s.stats(&model)));
        view
    }

    fn stats(&self, since: Option<u64>) -> crate::telemetry::live::StatsView {
        crate::telemetry::live::global().view(since)
    }

    fn clusters(&self) -> Vec<ClusterView> {
        let rt = self.runtime();
        let mut views = admin::view::clusters(&rt.model, &rt.health());
        for (view, sources) in views.iter_mut().zip(self.discovery.views(&rt.model)) {
            view.sources = sources;
        }
        views
    }

    fn set_drained(
        &self,
        cluster: &str,
        endpoint: &str,
        drained: bool,
    ) -> Result<EndpointView, ControlError> {
        let _swap = self.swap_lock.lock();
        let rt = self.runtime();
        let not_found = || ControlError::NotFound {
            cluster: cluster.to_owned(),
            endpoint: endpoint.to_owned(),
        };
        let (ci, ei) =
            admin::view::find_endpoint(&rt.model, cluster, endpoint).ok_or_else(not_found)?;
        let ep = rt.clusters[ci]
            .health
            .endpoints
            .get(ei)
            .ok_or_else(not_found)?;
        ep.set_drained(drained);
        // Rebuild now rather than via the watcher, so once the admin API answers, no new
        // request can be picked from a snapshot that still has the endpoint.
        rt.clusters[ci].balancer.rebuild();
        tracing::info!(cluster, endpoint = %rt.model.clusters[ci].endpoints[ei].address, drained, "endpoint drain changed by admin");
        admin::view::clusters(&rt.model, &rt.health())
            .into_iter()
            .nth(ci)
            .and_then(|c| c.endpoints.into_iter().nth(ei))
            .ok_or_else(not_found)
    }

    fn reload(&self) -> Pin<Box<dyn Future<Output = ReloadReport> + Send + '_>> {
        Box::pin(Supervisor::reload(self))
    }

    fn effective_config(&self) -> serde_json::Value {
        admin::view::effective_config(&self.runtime().model)
    }

    fn refresh_metrics(&self) {
        self.runtime().refresh_tls_gauges();
        crate::l7::tls::stats::publish();
    }
}

/// How long `lbd run` waits for the first answer of every DNS / file source.
const DISCOVERY_START_WAIT: Duration = Duration::from_secs(5);

/// Applies discovery changes as they come, several at once when they arrive together.
async fn follow_discovery(
    sup: std::sync::Weak<Supervisor>,
    mut changes: tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    while let Some(first) = changes.recv().await {
        let mut names = std::collections::HashSet::from([first]);
        while let Ok(more) = changes.try_recv() {
            names.insert(more);
        }
        let Some(sup) = sup.upgrade() else { return };
        sup.apply_discovery(&names);
    }
}

/// `lbd run`: serves `model` until SIGTERM/SIGINT, reloading on SIGHUP.
pub async fn run(path: &Path, model: Model) -> Result<(), StartError> {
    let prometheus = match m::install() {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed; /metrics disabled");
            None
        }
    };
    crate::telemetry::live::spawn_sampler();
    if let Some(h) = prometheus.clone() {
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(5));
            loop {
                t.tick().await;
                h.run_upkeep();
            }
        });
    }
    let mut hup = signal(SignalKind::hangup()).map_err(StartError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartError::Signals)?;

    let admin_cfg = model.global.admin.clone();
    let drain_timeout = model.global.drain_timeout;
    let (discovery, changes) = Discovery::new();
    // Envoy's STRICT_DNS waits for the first resolution before a cluster serves; lbd waits for
    // every source's first attempt (bounded), then starts with what resolved and retries the
    // rest in the background.
    discovery.prime(&model, DISCOVERY_START_WAIT).await;
    let count = crate::l7::workers::count(model.global.workers);
    let workers = Workers::start(count).map_err(|source| StartError::Workers { count, source })?;
    let sup = Supervisor::start(path, model, discovery, changes, &workers)?;
    let (admin_tx, admin_rx) = watch::channel(false);
    if let Some(a) = admin_cfg {
        let socket = admin::bind(&a).await?;
        tracing::info!(bind = %a.bind, "admin API listening");
        let control: Arc<dyn Control> = Arc::clone(&sup) as Arc<dyn Control>;
        tokio::spawn(admin::serve(
            socket,
            a.token.clone(),
            control,
            prometheus,
            admin_rx,
        ));
    }
    tokio::spawn(file_watch::run(Arc::clone(&sup)));
    match sdnotify::notify(sdnotify::State::Ready) {
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "sd_notify READY failed"),
    }
    tracing::info!(config = %path.display(), hash = %sup.runtime().model.source.hash, workers = count, "lbd ready");
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let r = sup.reload().await;
                if !r.ok {
                    tracing::warn!(errors = r.errors.len(), "SIGHUP reload rejected; old config still active");
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!(deadline = ?drain_timeout, "shutting down: draining connections");
    let left = sup.drain(drain_timeout).await;
    let _ = admin_tx.send(true);
    if left > 0 {
        tracing::warn!(
            connections = left,
            "drain deadline passed; closing remaining connections"
        );
    } else {
        tracing::info!("drained; exiting");
    }
    if let Some(tracer) = sup.runtime().tracer.clone() {
        tracer.flush().await;
    }
    // Joining the worker threads blocks; not on this runtime's thread.
    let _ = tokio::task::spawn_blocking(move || drop(workers)).await;
    Ok(())
}
