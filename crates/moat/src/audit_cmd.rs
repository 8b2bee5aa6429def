//! `moat audit tail` and `moat audit verify`: read moat's audit log (the
//! `moat-audit` format) and print its last records or check its chain.
//!
//! Must never write to the log or its head file: checking is read-only, and
//! a broken chain is reported, never repaired.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Print the last records, one JSON line each, oldest first.
    Tail {
        /// How many records.
        #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = 20)]
        lines: usize,
        /// The audit log (default: <data dir>/audit/audit.jsonl).
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
    },
    /// Re-compute every record's hash and link and check the head file; exit 1
    /// naming the first line that is wrong.
    Verify {
        /// The audit log (default: <data dir>/audit/audit.jsonl).
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
    },
}

/// `<data dir>/audit/audit.jsonl`, the log the egress door writes.
pub fn default_path() -> PathBuf {
    moat_sandbox::EngineConfig::from_env()
        .data_dir
        .join("audit")
        .join("audit.jsonl")
}

pub fn run(cmd: AuditCmd) -> ExitCode {
    match cmd {
        AuditCmd::Tail { lines, file } => {
            let path = file.unwrap_or_else(default_path);
            match moat_audit::tail(&path, lines) {
                Ok(records) => {
                    let mut out = std::io::stdout().lock();
                    for r in records {
                        if writeln!(out, "{r}").is_err() {
                            break; // a closed pipe (`| head`) is no error
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("moat: {e}");
                    ExitCode::from(1)
                }
            }
        }
        AuditCmd::Verify { file } => {
            let path = file.unwrap_or_else(default_path);
            match moat_audit::verify(&path) {
                Ok(r) => {
                    println!(
                        "ok: {} records, last seq {}, head hash {}",
                        r.records, r.last_seq, r.last_hash
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("moat: audit log check failed: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
