//! `moat history CONVERSATION [--json]`: one conversation's messages and
//! answers as the store keeps them, as Markdown (texts quoted) or JSON.
//! Asks the running gateway through its control socket (the SQLite store
//! has one user at a time), or opens the store itself when none runs.
//!
//! Must never: print a store key or the database password, or another
//! conversation than the one named.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use moat_gateway::history::{self, History};
use moat_gateway::incident::{self, ControlRequest};
use moat_policy::store::StoreConfig;
use moat_store::{PgOptions, Store, StoreKey, KEY_VAR, PASSWORD_VAR};

#[derive(clap::Args)]
pub struct HistoryArgs {
    /// The conversation's id (as in the audit log's `conversation_id`).
    pub conversation: i64,
    /// JSON instead of Markdown.
    #[arg(long)]
    pub json: bool,
    /// Gateway configuration (TOML), as given to `moat up`; default: the
    /// embedded one.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Secrets file (KEY=VALUE lines), for MOAT_STORE_KEY and the database
    /// password when no gateway runs (default: $MOAT_SECRETS_FILE).
    #[arg(long, value_name = "FILE")]
    pub secrets: Option<PathBuf>,
}

fn by() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "operator".into())
}

pub fn run(args: HistoryArgs) -> anyhow::Result<()> {
    let cfg = crate::up::load_config(args.config.as_deref())?;
    let data_dir = crate::up::engine_config(&cfg).data_dir;
    let req = ControlRequest {
        op: "history".into(),
        by: by(),
        conversation: Some(args.conversation),
    };
    let h: History = match incident::send(&data_dir, &req, Duration::from_secs(60))? {
        Some(answer) => serde_json::from_value(answer["history"].clone())
            .context("the gateway's answer is not a history")?,
        None => from_store(&args, &cfg.store, &data_dir)?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&h)?);
    } else {
        print!("{}", history::to_markdown(&h));
    }
    Ok(())
}

/// The history read from the store directly (no gateway runs).
fn from_store(
    args: &HistoryArgs,
    store: &StoreConfig,
    data_dir: &std::path::Path,
) -> anyhow::Result<History> {
    let store = open_store(args.secrets.as_deref(), store, data_dir)?;
    history::read(&store, args.conversation)?
        .with_context(|| format!("no conversation {} in the store", args.conversation))
}

/// The store, opened by a command while no gateway runs (SQLite allows one
/// process at a time): with MOAT_STORE_KEY and, for PostgreSQL,
/// MOAT_STORE_PASSWORD from moat's environment or the secrets file.
pub fn open_store(
    secrets: Option<&std::path::Path>,
    store: &StoreConfig,
    data_dir: &std::path::Path,
) -> anyhow::Result<Store> {
    let secrets = moat_creds::secrets::Lookup::from_flag_or_env(secrets)?;
    let key = secrets
        .get(KEY_VAR)
        .map(|t| StoreKey::parse(KEY_VAR, &t))
        .transpose()?;
    Ok(match store {
        StoreConfig::Sqlite => {
            let db = data_dir.join("moat.db");
            if !db.exists() {
                anyhow::bail!("no store at {}: moat has stored nothing yet", db.display());
            }
            Store::open_with_key(&db, moat_store::Durability::default(), key)
                .with_context(|| format!("opening the message store {}", db.display()))?
        }
        StoreConfig::Postgres { url, .. } => {
            let opts = PgOptions {
                url: url.clone(),
                password: secrets.get(PASSWORD_VAR).map(zeroize::Zeroizing::new),
                pool_size: 1,
            };
            Store::open_postgres(&opts, key).context("opening the PostgreSQL store")?
        }
    })
}
