//! `moat up [--config FILE]`: the gateway. Without a file it runs the
//! embedded default (a web chat on 127.0.0.1:8080, bwrap sandboxes, SQLite
//! under the data directory, the shell agent).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use moat_policy::gateway::GatewayConfig;

#[derive(clap::Args)]
pub struct UpArgs {
    /// Gateway configuration (TOML); default: the embedded local web chat.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Secrets file (KEY=VALUE lines, mode 600) read after moat's environment
    /// (default: $MOAT_SECRETS_FILE).
    #[arg(long, value_name = "FILE")]
    pub secrets: Option<PathBuf>,
}

/// The gateway configuration `--config` names, or the embedded default.
pub fn load_config(config: Option<&std::path::Path>) -> anyhow::Result<GatewayConfig> {
    Ok(match config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the configuration {}", path.display()))?;
            GatewayConfig::from_toml(&text)
                .with_context(|| format!("configuration {}", path.display()))?
        }
        None => GatewayConfig::embedded_default(),
    })
}

/// The engine settings of a gateway with `cfg`: MOAT_DATA_DIR (as for
/// `moat sandbox run`) wins over gateway.data_dir.
pub fn engine_config(cfg: &GatewayConfig) -> moat_sandbox::EngineConfig {
    let mut engine = moat_sandbox::EngineConfig::from_env();
    if std::env::var_os("MOAT_DATA_DIR").is_none() {
        engine.data_dir = cfg.data_dir.clone();
    }
    engine
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    let cfg = load_config(args.config.as_deref())?;
    for w in cfg.warnings() {
        eprintln!("moat: warning: {w}");
    }
    let secrets = moat_creds::secrets::Lookup::from_flag_or_env(args.secrets.as_deref())?;
    let engine = engine_config(&cfg);
    let data_dir = engine.data_dir.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the gateway's runtime")?;
    let secret: moat_gateway::server::SecretFn = Arc::new(move |k: &str| secrets.get(k));
    rt.block_on(async move {
        // The handlers are in place before anything listens: a SIGTERM that
        // comes right after "ready" stops moat cleanly instead of killing it.
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("a SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("a SIGINT handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        };
        moat_gateway::server::serve(
            moat_gateway::server::ServeOptions {
                cfg,
                data_dir,
                engine,
                secret,
            },
            |bound, _| {
                if let Some(web) = bound.web {
                    println!("moat: web chat on http://{web}/");
                }
                if let Some(slack) = bound.slack {
                    println!("moat: Slack events on http://{slack}/slack/events");
                }
                println!("moat: metrics on http://{}/metrics", bound.admin);
                use std::io::Write;
                let _ = std::io::stdout().flush();
            },
            shutdown,
        )
        .await?;
        Ok::<(), anyhow::Error>(())
    })?;
    println!("moat: stopped");
    Ok(())
}
