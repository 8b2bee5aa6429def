//! `moat up`: opens the store and the audit log, builds the gateway, queues
//! again what a crash left unanswered, warms the pools, and serves the web
//! chat and the admin address until told to stop.
//!
//! Must never: start with a configuration or secret it cannot honour (it
//! fails before listening, naming what is wrong), or stop without closing
//! the pools (leases are destroyed, nothing is left running).

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use moat_audit::AuditLog;
use moat_policy::gateway::{GatewayConfig, WebAuth};
use moat_sandbox::{Engine, EngineConfig};

use crate::pipeline::{Gateway, GatewayParts};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("opening the message store {path}: {source}")]
    Store {
        path: PathBuf,
        source: moat_store::StoreError,
    },
    #[error("opening the audit log {path}: {source}")]
    Audit {
        path: PathBuf,
        source: moat_audit::AuditError,
    },
    #[error("the sandbox engine: {0}")]
    Engine(String),
    #[error("{0}")]
    Config(String),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("recovering after a restart: {0}")]
    Recover(String),
}

/// Looks up a secret by name (moat's environment, then its secrets file).
pub type SecretFn = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// What `serve` needs.
pub struct ServeOptions {
    pub cfg: GatewayConfig,
    /// Store, audit log and leases live here.
    pub data_dir: PathBuf,
    pub engine: EngineConfig,
    /// Secrets by name (moat's environment, then its secrets file).
    pub secret: SecretFn,
}

/// The addresses actually bound (port 0 in the config picks a free one).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub web: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// `slack.listen`, when Slack's Events API has its own address.
    pub slack: Option<SocketAddr>,
}

fn events_router_or_none(
    slack: Option<&crate::slack_setup::Slack>,
    gw: &Gateway,
) -> Option<axum::Router> {
    slack.and_then(|s| s.events_router(gw))
}

/// Runs the gateway until `shutdown` completes; `ready` is called once the
/// listeners are bound and the pools are warm.
pub async fn serve(
    opts: ServeOptions,
    ready: impl FnOnce(Bound, &Gateway),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let cfg = opts.cfg;
    // Encryption at rest: the key is a secret like any other. A bad key is
    // named without its text; no key is allowed, with one warning, unless the
    // store is already encrypted (then the store refuses to open).
    let key = match (opts.secret)(moat_store::KEY_VAR) {
        Some(text) => Some(
            moat_store::StoreKey::parse(moat_store::KEY_VAR, &text)
                .map_err(|e| ServeError::Config(e.to_string()))?,
        ),
        None => None,
    };
    let (store, node_lease) =
        crate::store_setup::open(&cfg.store, &opts.data_dir, key, &opts.secret)?;
    match store.encryption() {
        moat_store::Encryption::Off => tracing::warn!(
            "the message store {} is not encrypted at rest: set {} (generate one with `openssl rand -base64 32`) in moat's environment or secrets file",
            store.path().display(),
            moat_store::KEY_VAR
        ),
        moat_store::Encryption::On { key_id } => {
            tracing::info!(key_id = %key_id, "the message store is encrypted at rest")
        }
    }
    let audit_path = opts.data_dir.join("audit").join("audit.jsonl");
    let audit = AuditLog::open(&audit_path).map_err(|source| ServeError::Audit {
        path: audit_path.clone(),
        source,
    })?;
    let tokens = match &cfg.web.auth {
        WebAuth::Token { env } => {
            let text = (opts.secret)(env).ok_or_else(|| {
                ServeError::Config(format!(
                    "web.auth = \"token\" needs the tokens in {env} (user:token pairs, comma-separated), in moat's environment or secrets file"
                ))
            })?;
            crate::web::parse_tokens(&text)
                .map_err(|e| ServeError::Config(format!("{env}: {e}")))?
        }
        _ => HashMap::new(),
    };
    // GitHub's webhook deliveries, beside the web chat.
    let hooks_verifier = if cfg.github.webhook {
        if !cfg.web.enabled {
            return Err(ServeError::Config(
                "github.webhook: POST /github/webhook is served beside the web chat, which is disabled; set web.enabled = true".into(),
            ));
        }
        let secret = (opts.secret)("GITHUB_WEBHOOK_SECRET")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                ServeError::Config(
                    "github.webhook needs GITHUB_WEBHOOK_SECRET (the App's webhook secret) in moat's environment or secrets file".into(),
                )
            })?;
        Some(Arc::new(moat_chat::github::WebhookVerifier::new(
            &moat_creds::Secret::new(secret),
        )))
    } else {
        None
    };
    // One engine for every backend the channels name: bwrap and gVisor
    // channels run side by side, each pool and per-thread lease on its own.
    let mut kinds: Vec<moat_policy::BackendKind> = Vec::new();
    for c in &cfg.channels {
        let k = c.sandbox_policy().backend;
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    if kinds.is_empty() {
        kinds.push(moat_policy::BackendKind::Bwrap);
    }
    let runtime_dir = opts.engine.runtime_dir.clone();
    let engine = Engine::with_backends(opts.engine, &kinds)
        .map_err(|e| ServeError::Engine(e.to_string()))?;
    // Each channel's image exists and sandbox uids can reach it (every
    // lease resolves it again, pinning the version current then).
    for c in &cfg.channels {
        if let Some(name) = &c.sandbox_policy().image {
            moat_sandbox::image::check_usable(&engine.config().data_dir, name)
                .map_err(|e| ServeError::Config(format!("channel[{}].image: {e}", c.index)))?;
        }
    }
    // The agents: which one answers per channel, the LLM API its doors serve
    // (with the real key, which stays in the door) and moat's own files its
    // sandboxes see. Fails before listening when a key or file is missing.
    let ledger = moat_egress::llm::UsageLedger::from_audit_log(&audit_path).map_err(|e| {
        ServeError::Config(format!(
            "reading LLM usage from {}: {e}",
            audit_path.display()
        ))
    })?;
    let moat_exe = std::env::var_os("MOAT_EXE").map(PathBuf::from).or_else(|| {
        std::env::current_exe()
            .ok()
            .filter(|p| p.file_name().is_some_and(|n| n == "moat"))
    });
    let secret_fn = opts.secret.clone();
    let ledger = Arc::new(ledger);
    let setups = crate::agents_setup::build(&crate::agents_setup::SetupInputs {
        cfg: &cfg,
        secret: &*secret_fn,
        moat_exe: moat_exe.as_deref(),
        runtime_dir: &runtime_dir,
        ledger: ledger.clone(),
    })
    .map_err(ServeError::Config)?;
    for c in &cfg.channels {
        if let Some(s) = setups.get(&c.index) {
            tracing::info!(channel = %c.describe(), agent = s.agent.name(), "agent");
        }
    }
    let web_cfg = cfg.web.clone();
    let admin_addr = cfg.admin.listen;
    let slack_cfg = cfg.slack.clone();
    let slack = crate::slack_setup::connect(&slack_cfg, &*opts.secret).await?;
    let mut platforms = crate::platform::Platforms::default();
    if let Some(s) = &slack {
        platforms.insert(moat_policy::gateway::Platform::Slack, s.replier.clone());
    }
    let telegram = crate::telegram::connect(&cfg.telegram, &*opts.secret).await?;
    if let Some(t) = &telegram {
        platforms.insert(moat_policy::gateway::Platform::Telegram, t.out.clone());
    }
    let whatsapp = crate::whatsapp::connect(&cfg.whatsapp, &*opts.secret)?;
    if let Some(w) = &whatsapp {
        platforms.insert(moat_policy::gateway::Platform::WhatsApp, w.out.clone());
    }
    let discord = crate::discord::connect(&cfg.discord, &*opts.secret).await?;
    if let Some(d) = &discord {
        platforms.insert(moat_policy::gateway::Platform::Discord, d.out.clone());
    }
    let groups = crate::groups::Groups::check(&cfg, &opts.data_dir, &runtime_dir)
        .map_err(|e| ServeError::Config(e.to_string()))?;
    let gw = Gateway::new(GatewayParts {
        groups: Arc::new(groups),
        cfg,
        store: Arc::new(store),
        audit: Arc::new(audit),
        engine: Arc::new(engine),
        platforms,
        setups,
    });
    gw.inner.metrics.set_ledger(ledger);
    // Incident mode survives a restart: a paused gateway starts no sandbox
    // and runs nothing until the lift (docs/incident.md).
    let paused = crate::incident::read_flag(&opts.data_dir)
        .map(|f| f.is_some())
        .unwrap_or(true);
    if paused {
        tracing::warn!(
            "starting paused: moat is in incident mode (lift with `moat incident --lift`)"
        );
        gw.start_paused();
    } else {
        let requeued = gw
            .recover()
            .await
            .map_err(|e| ServeError::Recover(e.to_string()))?;
        if requeued > 0 {
            tracing::info!(
                messages = requeued,
                "queued again the messages a restart left unanswered"
            );
        }
        if let Err(e) = gw.warm().await {
            return Err(ServeError::Engine(format!("warming the sandbox pool: {e}")));
        }
    }
    let control = crate::incident::bind_control(&opts.data_dir)
        .map_err(|e| ServeError::Config(e.to_string()))?;
    let admin = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(|source| ServeError::Listen {
            addr: admin_addr,
            source,
        })?;
    let web = if web_cfg.enabled {
        Some(
            tokio::net::TcpListener::bind(web_cfg.listen)
                .await
                .map_err(|source| ServeError::Listen {
                    addr: web_cfg.listen,
                    source,
                })?,
        )
    } else {
        None
    };
    // Slack's Events API: on its own address, or beside the web chat.
    let events = slack.as_ref().and_then(|s| s.events_router(&gw));
    let slack_listener = match (&events, slack_cfg.listen) {
        (Some(_), Some(addr)) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen { addr, source })?,
        ),
        _ => None,
    };
    // The bound addresses (a port 0 resolved): the Host checks need them.
    let local = |l: &tokio::net::TcpListener, addr: SocketAddr| {
        l.local_addr()
            .map_err(|source| ServeError::Listen { addr, source })
    };
    let bound = Bound {
        web: web.as_ref().map(|l| local(l, web_cfg.listen)).transpose()?,
        admin: local(&admin, admin_addr)?,
        slack: match (&slack_listener, slack_cfg.listen) {
            (Some(l), Some(addr)) => Some(local(l, addr)?),
            _ => None,
        },
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = Vec::new();
    // Every listener answers only to its own address and the allowed names
    // (docs/threat-model.md W1).
    let guard = |name: &'static str, at: SocketAddr| crate::web::guard::Guard::new(&gw, name, at);
    tasks.push(tokio::spawn(
        axum::serve(
            admin,
            guard("admin", bound.admin).wrap(crate::web::admin_router(gw.clone())),
        )
        .with_graceful_shutdown(stopped(stop_rx.clone()))
        .into_future(),
    ));
    let mut events_beside_web = None;
    if let (Some(r), Some(l), Some(at)) = (events, slack_listener, bound.slack) {
        tasks.push(tokio::spawn(
            axum::serve(l, guard("slack", at).wrap(r))
                .with_graceful_shutdown(stopped(stop_rx.clone()))
                .into_future(),
        ));
    } else {
        events_beside_web = events_router_or_none(slack.as_ref(), &gw);
    }
    if let Some(s) = slack.as_ref() {
        if let Some(task) = s.socket_mode(&gw, stopped(stop_rx.clone())) {
            tasks.push(tokio::spawn(async move {
                let _ = task.await;
                Ok(())
            }));
        }
    }
    if let Some(task) = telegram
        .as_ref()
        .and_then(|t| t.polling(&gw, stopped(stop_rx.clone())))
    {
        tasks.push(tokio::spawn(async move {
            let _ = task.await;
            Ok(())
        }));
    }
    if let Some(d) = &discord {
        let task = d.gateway(&gw, stopped(stop_rx.clone()));
        tasks.push(tokio::spawn(async move {
            let _ = task.await;
            Ok(())
        }));
    }
    if let (Some(l), Some(at)) = (web, bound.web) {
        let mut router = crate::web::router(gw.clone(), tokens);
        if let Some(r) = events_beside_web {
            router = router.merge(r);
        }
        if let Some(r) = telegram.as_ref().and_then(|t| t.router(&gw)) {
            router = router.merge(r);
        }
        if let Some(w) = &whatsapp {
            router = router.merge(w.router(&gw));
        }
        if let Some(v) = hooks_verifier.clone() {
            router = router.merge(crate::github_hooks::router(
                crate::github_hooks::Hooks::new(gw.clone(), v),
            ));
        }
        let router = guard("web", at).wrap(router);
        let app = router.into_make_service_with_connect_info::<SocketAddr>();
        tasks.push(tokio::spawn(
            axum::serve(l, app)
                .with_graceful_shutdown(stopped(stop_rx.clone()))
                .into_future(),
        ));
    }
    tasks.push(tokio::spawn({
        let gw = gw.clone();
        let stop = stopped(stop_rx.clone());
        async move {
            crate::incident::serve_control(gw, control, stop).await;
            Ok(())
        }
    }));
    // One node of several: renew the leases, take over stopped nodes'.
    if let Some(lease) = node_lease {
        let gw = gw.clone();
        let stop = stopped(stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            let store = gw.inner.store.clone();
            tokio::select! {
                () = crate::store_setup::heartbeat(gw, store, lease) => {}
                () = stop => {}
            }
            Ok(())
        }));
    }
    let watcher = {
        let gw = gw.clone();
        tokio::spawn(async move { gw.watch_flag().await })
    };
    let sweeper = {
        let gw = gw.clone();
        tokio::spawn(async move {
            // Retention: at start, then every hour (crate::retention).
            gw.purge_expired().await;
            let mut purged = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                if purged.elapsed() >= crate::retention::EVERY {
                    gw.purge_expired().await;
                    purged = tokio::time::Instant::now();
                }
                let n = gw.sweep_idle().await;
                if n > 0 {
                    tracing::info!(sandboxes = n, "deleted idle per-thread sandboxes");
                }
            }
        })
    };
    // Scheduled tasks (docs/tasks.md); not while incident mode holds.
    let scheduler = tokio::spawn(crate::tasks::run(gw.clone()));
    ready(bound, &gw);
    shutdown.await;
    scheduler.abort();
    tracing::info!("shutting down: no new messages; running turns may finish");
    let _ = stop_tx.send(true);
    sweeper.abort();
    watcher.abort();
    let _ = std::fs::remove_file(opts.data_dir.join(crate::incident::SOCKET_FILE));
    // Running turns get a moment to finish; whatever is cut off is queued
    // again at the next start (the store still says it is unanswered).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while gw.inner.running_turns() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Open event streams end now (after what was already sent).
    gw.inner.hub.close();
    gw.shutdown(Duration::from_secs(10)).await;
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}
