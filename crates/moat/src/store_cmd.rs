//! `moat store rekey`: seals every sensitive field of the message store
//! under a new key, in one transaction, audited; and the store-encryption
//! line of `moat doctor`.
//!
//! Must never: print, log or audit a key (only key ids, 8 hex digits of a
//! hash); change the store while `moat up` holds it (the store's lock
//! refuses); leave the store half re-keyed.

use std::path::PathBuf;

use anyhow::Context;
use moat_policy::gateway::GatewayConfig;
use moat_store::{Durability, Encryption, Store, StoreKey, KEY_VAR};

#[derive(clap::Subcommand)]
pub enum StoreCmd {
    /// Re-encrypt every sensitive field of the store under a new key (also
    /// encrypts a store that had none). Stop `moat up` first. The current key
    /// is MOAT_STORE_KEY (unset: the store is plaintext today); the new one
    /// is read from the variable --new-key-env names. Afterwards give moat
    /// the new key as MOAT_STORE_KEY.
    Rekey(RekeyArgs),
}

#[derive(clap::Args)]
pub struct RekeyArgs {
    /// The environment variable (or secrets file entry) holding the new key:
    /// 32 bytes in base64 or hex, e.g. from `openssl rand -base64 32`.
    #[arg(long, value_name = "VAR")]
    pub new_key_env: String,
    /// Gateway configuration (TOML), for its data directory; MOAT_DATA_DIR
    /// wins, as for `moat up`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Secrets file (KEY=VALUE lines, mode 600) read after moat's environment
    /// (default: $MOAT_SECRETS_FILE).
    #[arg(long, value_name = "FILE")]
    pub secrets: Option<PathBuf>,
}

pub fn run(cmd: StoreCmd) -> anyhow::Result<()> {
    match cmd {
        StoreCmd::Rekey(args) => rekey(args),
    }
}

/// The data directory `moat up` would use with `config`.
fn data_dir(config: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
    if std::env::var_os("MOAT_DATA_DIR").is_some() {
        return Ok(moat_sandbox::EngineConfig::from_env().data_dir);
    }
    let cfg = match config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the configuration {}", path.display()))?;
            GatewayConfig::from_toml(&text)
                .with_context(|| format!("configuration {}", path.display()))?
        }
        None => GatewayConfig::embedded_default(),
    };
    Ok(cfg.data_dir)
}

fn rekey(args: RekeyArgs) -> anyhow::Result<()> {
    let secrets = moat_creds::secrets::Lookup::from_flag_or_env(args.secrets.as_deref())?;
    if args.new_key_env == KEY_VAR {
        anyhow::bail!(
            "--new-key-env must name another variable than {KEY_VAR} (which holds the current key), e.g. MOAT_STORE_NEW_KEY"
        );
    }
    let new_text = secrets.get(&args.new_key_env).with_context(|| {
        format!(
            "{} is not set in moat's environment or secrets file; put the new key there (generate one with `openssl rand -base64 32`)",
            args.new_key_env
        )
    })?;
    let new = StoreKey::parse(&args.new_key_env, &new_text)?;
    let old = secrets
        .get(KEY_VAR)
        .map(|t| StoreKey::parse(KEY_VAR, &t))
        .transpose()?;
    let dir = data_dir(args.config.as_deref())?;
    let db = dir.join("moat.db");
    if !db.exists() {
        anyhow::bail!(
            "no store at {}; nothing to re-key (moat up creates it, encrypted when {KEY_VAR} is set)",
            db.display()
        );
    }
    let mut store = Store::open_with_key(&db, Durability::PowerLoss, old)
        .with_context(|| format!("opening the message store {}", db.display()))?;
    let from = match store.encryption() {
        Encryption::Off => None,
        Encryption::On { key_id } => Some(key_id),
    };
    let to = new.id().to_string();
    let counts = store
        .rekey(new)
        .with_context(|| format!("re-keying {} (nothing was changed)", db.display()))?;
    drop(store);
    let audit_path = dir.join("audit").join("audit.jsonl");
    let fields: serde_json::Map<String, serde_json::Value> = counts
        .iter()
        .map(|c| {
            (
                c.field.to_string(),
                serde_json::json!({"were_sealed": c.were_sealed, "were_plain": c.were_plain}),
            )
        })
        .collect();
    let audited = moat_audit::AuditLog::open(&audit_path).and_then(|log| {
        log.append(
            "store_rekey",
            serde_json::json!({"from_key_id": from, "to_key_id": to, "fields": fields}),
        )
    });
    println!(
        "moat: re-keyed {} from {} to key id {to}:",
        db.display(),
        from.as_deref()
            .map(|k| format!("key id {k}"))
            .unwrap_or_else(|| "plaintext".into())
    );
    for c in &counts {
        println!(
            "  {:<28} {} re-encrypted, {} encrypted for the first time",
            c.field, c.were_sealed, c.were_plain
        );
    }
    println!(
        "moat: set {KEY_VAR} to the new key (the value of {}) before the next `moat up`; the old key no longer opens the store",
        args.new_key_env
    );
    if let Err(e) = audited {
        anyhow::bail!(
            "the store is re-keyed, but recording it in the audit log {} failed: {e}",
            audit_path.display()
        );
    }
    Ok(())
}

/// `moat doctor`'s line about encryption at rest: whether MOAT_STORE_KEY is
/// set (environment or $MOAT_SECRETS_FILE) and well formed.
pub fn doctor_check() -> moat_sandbox::doctor::Check {
    let fix = Some(format!(
        "generate a key with `openssl rand -base64 32`, put it in moat's secrets file as {KEY_VAR}=..., and run `moat store rekey` once to encrypt what is stored (docs/store.md)"
    ));
    let (ok, detail) = match moat_creds::secrets::Lookup::from_flag_or_env(None) {
        Err(e) => (false, format!("cannot read the secrets file: {e}")),
        Ok(s) => match s.get(KEY_VAR).map(|t| StoreKey::parse(KEY_VAR, &t)) {
            None => (
                false,
                format!("{KEY_VAR} is not set: messages are stored in the clear"),
            ),
            Some(Err(e)) => (false, e.to_string()),
            Some(Ok(k)) => (
                true,
                format!(
                    "{KEY_VAR} is set (key id {}): new messages are encrypted",
                    k.id()
                ),
            ),
        },
    };
    moat_sandbox::doctor::Check {
        name: "message store encryption at rest",
        ok,
        detail,
        fix,
        required: false,
    }
}
