//! The `moat` command: argument parsing and wiring only. Logic lives in the
//! library crates.

#![forbid(unsafe_code)]
// Outside input never reaches an `unwrap`/`expect` (house style); tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

mod agent_run;
mod agents_cmd;
mod agents_install;
mod audit_cmd;
mod channels_cmd;
mod chat;
mod github;
mod history_cmd;
mod image_cmd;
mod incident_cmd;
mod ipc_bridge;
mod security_cmd;
mod store_cmd;
mod up;
mod usage_cmd;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use moat_policy::{Overrides, SandboxPolicy};
use moat_sandbox::{Engine, EngineConfig, RunSpec, StdinSource, Stream, WorkspaceSource};

#[derive(Parser)]
#[command(
    name = "moat",
    version,
    about = "Run AI coding agents from chat inside sandboxes"
)]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Run commands in sandboxes.
    Sandbox {
        #[command(subcommand)]
        command: SandboxCmd,
    },
    /// Check this host for what the sandbox backends need.
    Doctor(DoctorArgs),
    /// Incident response: revoke moat's GitHub tokens, destroy every sandbox,
    /// and take no message until `moat incident --lift` (docs/incident.md).
    Incident(incident_cmd::IncidentArgs),
    /// LLM token use per user or per channel, from the audit log.
    Usage(usage_cmd::UsageArgs),
    /// One conversation's messages and answers, as Markdown or JSON.
    History(history_cmd::HistoryArgs),
    /// The chats this gateway serves: its channels and the registered groups.
    Channels(channels_cmd::ChannelsArgs),
    /// Read and check the audit log.
    Audit {
        #[command(subcommand)]
        command: audit_cmd::AuditCmd,
    },
    /// Run the gateway: chat in, the work in sandboxes, answers out.
    Up(up::UpArgs),
    /// Talk to a running gateway from the terminal (its web chat API).
    Chat(chat::ChatArgs),
    /// The message store: `moat store rekey` (encryption at rest).
    Store {
        #[command(subcommand)]
        command: store_cmd::StoreCmd,
    },
    /// Agent CLIs for the sandboxes (Claude Code, Codex, Amp).
    Agents {
        #[command(subcommand)]
        command: agents_cmd::AgentsCmd,
    },
    /// Root filesystem images for sandboxes (docs/images.md).
    Image {
        #[command(subcommand)]
        command: image_cmd::ImageCmd,
    },
    /// The built-in agent, run by the gateway inside a sandbox: reads one
    /// turn (JSON) on standard input, writes events (JSON lines) to standard output.
    #[command(name = "agent-run", hide = true)]
    AgentRun(agent_run::AgentRunArgs),
    /// Inside a sandbox: moat's tools (MCP) on standard input and output,
    /// for agents that start MCP servers as processes (docs/ipc.md).
    #[command(name = "ipc-bridge")]
    IpcBridge(ipc_bridge::IpcBridgeArgs),
}

#[derive(Args)]
struct DoctorArgs {
    /// Audit a deployment's security instead (read-only): file modes,
    /// listeners, open channels, gVisor release, tuning. Exits 1 on a high finding.
    #[arg(long)]
    security: bool,
    /// Gateway configuration (TOML), as given to `moat up` (with --security).
    #[arg(long, value_name = "FILE", requires = "security")]
    config: Option<PathBuf>,
    /// Secrets file whose mode to check (default: $MOAT_SECRETS_FILE; with --security).
    #[arg(long, value_name = "FILE", requires = "security")]
    secrets: Option<PathBuf>,
}

#[derive(Subcommand)]
enum SandboxCmd {
    /// Run one command in a fresh sandbox and exit with its status.
    Run(Box<RunArgs>),
}

#[derive(Args)]
struct RunArgs {
    /// Isolation backend: bwrap, gvisor or local (no isolation; needs MOAT_ALLOW_UNSANDBOXED=1).
    #[arg(long, value_name = "bwrap|gvisor|local")]
    backend: Option<String>,
    /// Host directory bound read-write at /workspace (default: a fresh empty one, deleted afterwards).
    #[arg(long, value_name = "DIR")]
    workspace: Option<PathBuf>,
    /// Extra mount, read-only unless :rw; must lie under the policy's filesystem.allowed_roots.
    #[arg(long = "mount", value_name = "HOST:SANDBOX[:ro|:rw]")]
    mounts: Vec<String>,
    /// Environment variable inside the sandbox.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Memory limit, e.g. 256MiB.
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// Maximum number of processes.
    #[arg(long, value_name = "N")]
    pids: Option<i64>,
    /// CPU limit in CPUs, e.g. 0.5.
    #[arg(long, value_name = "N")]
    cpus: Option<f64>,
    /// Wall-clock limit, e.g. 30s or 5m.
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    /// Allow a destination through the sandbox's egress door: `host`, `*.domain`,
    /// `host:port` or an IP address; without a port only 80 and 443. Repeatable.
    #[arg(long = "allow-domain", value_name = "ENTRY")]
    allow_domains: Vec<String>,
    /// Pin a name to an address (exempt from the private-address guard). Repeatable.
    #[arg(long = "resolve", value_name = "HOST=IP")]
    resolve: Vec<String>,
    /// Serve an LLM API to the sandbox through the door (anthropic or openai;
    /// repeatable): the sandbox gets a base URL and a placeholder key, the real
    /// key (ANTHROPIC_API_KEY / OPENAI_API_KEY of moat's environment or the
    /// secrets file) stays here.
    #[arg(long = "llm", value_name = "anthropic|openai")]
    llm: Vec<String>,
    /// Only these models may be called through --llm (repeatable; default: any).
    #[arg(long = "llm-model", value_name = "MODEL")]
    llm_models: Vec<String>,
    /// Tokens (input, cache and output) the sandbox may use through --llm.
    #[arg(long = "llm-budget", value_name = "TOKENS")]
    llm_budget: Option<u64>,
    /// Tokens --user may use through --llm in total, over all runs (counted
    /// from the audit log).
    #[arg(long = "llm-user-budget", value_name = "TOKENS")]
    llm_user_budget: Option<u64>,
    /// Who this run is for, in accounting and audit (default: $USER, else the uid).
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
    /// Where this run comes from, in accounting and audit.
    #[arg(long, value_name = "NAME", default_value = "cli")]
    channel: String,
    /// Secrets file (KEY=VALUE lines, mode 600) read after moat's environment
    /// (default: $MOAT_SECRETS_FILE).
    #[arg(long, value_name = "FILE")]
    secrets: Option<PathBuf>,
    /// Give the sandbox GitHub access to OWNER/REPO (repeatable; one owner):
    /// the door adds a GitHub App installation token, down-scoped to these
    /// repositories, to requests for github.com and api.github.com; the
    /// sandbox only sees a placeholder GH_TOKEN.
    #[arg(long = "github", value_name = "OWNER/REPO")]
    github: Vec<String>,
    /// Token permission for --github, e.g. issues=write (repeatable;
    /// default: contents=write, pull_requests=write).
    #[arg(long = "github-permission", value_name = "NAME=LEVEL")]
    github_permissions: Vec<String>,
    /// Branch no push may update through --github (repeatable; default: main and master).
    #[arg(long = "protect-branch", value_name = "BRANCH")]
    protect_branches: Vec<String>,
    /// Policy file (TOML); flags override it.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Root filesystem image (`moat image list`) instead of the host's /usr.
    #[arg(long, value_name = "NAME")]
    image: Option<String>,
    /// With --image: run as uid 0 inside (the sandbox's unprivileged uid
    /// outside), system directories writable in a layer of the sandbox's own.
    #[arg(long, requires = "image")]
    root_inside: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MOAT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match cli.command {
        Top::Doctor(args) if args.security => {
            match security_cmd::run(args.config.as_deref(), args.secrets.as_deref()) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("moat: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Top::Doctor(_) => doctor(),
        Top::Incident(args) => match incident_cmd::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("moat: {e:#}");
                ExitCode::from(1)
            }
        },
        Top::Audit { command } => audit_cmd::run(command),
        Top::Usage(args) => usage_cmd::run(args),
        Top::Channels(args) => match channels_cmd::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("moat: {e:#}");
                ExitCode::from(1)
            }
        },
        Top::History(args) => match history_cmd::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("moat: {e:#}");
                ExitCode::from(1)
            }
        },
        Top::Chat(args) => match chat::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("moat: {e:#}");
                ExitCode::from(1)
            }
        },
        Top::Agents { command } => match agents_cmd::run(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("moat: {e:#}");
                ExitCode::from(1)
            }
        },
        Top::Image { command } => match image_cmd::run(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("moat: {e:#}");
                ExitCode::from(1)
            }
        },
        Top::AgentRun(args) => agent_run::run(args),
        Top::IpcBridge(args) => ipc_bridge::run(args),
        Top::Store { command } => match store_cmd::run(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("moat: {e:#}");
                ExitCode::from(1)
            }
        },
        Top::Up(args) => match up::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("moat: {e:#}");
                ExitCode::from(1)
            }
        },
        Top::Sandbox {
            command: SandboxCmd::Run(args),
        } => match sandbox_run(*args) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("moat: {e:#}");
                ExitCode::from(125)
            }
        },
    }
}

fn doctor() -> ExitCode {
    let mut checks = moat_sandbox::doctor::run_checks();
    // The egress door needs to create network namespaces.
    let netns = moat_egress::netns::with_new_netns(|| Ok(()));
    checks.push(moat_sandbox::doctor::Check {
        name: "network namespaces (egress door)",
        ok: netns.is_ok(),
        detail: match &netns {
            Ok(_) => "a namespace with loopback can be created".into(),
            Err(e) => e.to_string(),
        },
        fix: Some("run moat as root; sandboxes with --allow-domain need it".into()),
        required: false,
    });
    checks.push(store_cmd::doctor_check());
    let mut failed = false;
    for c in &checks {
        let mark = if c.ok {
            "ok  "
        } else if c.required {
            "FAIL"
        } else {
            "warn"
        };
        println!("[{mark}] {}: {}", c.name, c.detail);
        if !c.ok {
            if let Some(fix) = &c.fix {
                println!("       fix: {fix}");
            }
            failed |= c.required;
        }
    }
    if failed {
        println!("moat: this host cannot run sandboxes yet; fix the FAIL lines above");
        ExitCode::from(1)
    } else {
        println!("moat: this host can run sandboxes");
        ExitCode::SUCCESS
    }
}

fn load_policy(args: &RunArgs) -> anyhow::Result<SandboxPolicy> {
    let mut policy = match &args.policy {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read policy file {}", path.display()))?;
            SandboxPolicy::from_toml(&text)
                .with_context(|| format!("policy file {}", path.display()))?
        }
        None => SandboxPolicy::default(),
    };
    let overrides = Overrides {
        backend: args.backend.clone(),
        mounts: args.mounts.clone(),
        env: args.env.clone(),
        memory: args.memory.clone(),
        pids: args.pids,
        cpus: args.cpus,
        timeout: args.timeout.clone(),
        allow_domains: args.allow_domains.clone(),
        resolve: args.resolve.clone(),
    };
    overrides.apply(&mut policy)?;
    if let Some(name) = &args.image {
        moat_policy::images::check_name(name).map_err(anyhow::Error::msg)?;
        policy.image = Some(name.clone());
    }
    if args.root_inside {
        policy.root_inside = true;
    }
    Ok(policy)
}

/// Standard input for the sandbox: a pipe or file is passed as it is; a
/// terminal is never handed in (it would let the sandbox act on the host's
/// terminal), its bytes are copied through a pipe instead.
fn sandbox_stdin() -> anyhow::Result<StdinSource> {
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        std::thread::spawn(move || {
            let mut w = std::fs::File::from(w);
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut w);
        });
        return Ok(StdinSource::Fd(r));
    }
    // A duplicate (close-on-exec, above 2) of our own standard input.
    match std::os::fd::AsFd::as_fd(&std::io::stdin()).try_clone_to_owned() {
        Ok(fd) => Ok(StdinSource::Fd(fd)),
        Err(_) => Ok(StdinSource::Null),
    }
}

/// The policy file's `[llm]` and `[github]` settings under the flags: lists
/// add up, single values from a flag win.
fn merge_credentials(args: &mut RunArgs, policy: &SandboxPolicy) {
    args.llm.extend(policy.llm.providers.iter().cloned());
    if args.llm_models.is_empty() {
        args.llm_models = policy.llm.models.clone();
    }
    args.llm_budget = args.llm_budget.or(policy.llm.budget);
    args.llm_user_budget = args.llm_user_budget.or(policy.llm.user_budget);
    args.github
        .extend(policy.github.repositories.iter().cloned());
    if args.github_permissions.is_empty() {
        args.github_permissions = policy
            .github
            .permissions
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
    }
    if args.protect_branches.is_empty() {
        args.protect_branches = policy.github.protected_branches.clone().unwrap_or_default();
    }
}

/// Upstream URLs from the policy file win over moat's environment; every
/// other name is looked up in the environment, then the secrets file.
fn credential_setting(
    policy: &SandboxPolicy,
    secrets: &moat_creds::secrets::Lookup,
    key: &str,
) -> Option<String> {
    let from_policy = match key {
        "MOAT_ANTHROPIC_URL" => policy.llm.anthropic_url.clone(),
        "MOAT_OPENAI_URL" => policy.llm.openai_url.clone(),
        "MOAT_GITHUB_URL" => policy.github.url.clone(),
        "MOAT_GITHUB_API_URL" => policy.github.api_url.clone(),
        "MOAT_GITHUB_HOST" => policy.github.host.clone(),
        "MOAT_GITHUB_API_HOST" => policy.github.api_host.clone(),
        _ => None,
    };
    from_policy.or_else(|| secrets.get(key))
}

fn sandbox_run(mut args: RunArgs) -> anyhow::Result<u8> {
    let t0 = std::time::Instant::now();
    let policy = load_policy(&args)?;
    merge_credentials(&mut args, &policy);
    let engine_cfg = EngineConfig::from_env();
    if moat_gateway::incident::read_flag(&engine_cfg.data_dir)?.is_some() {
        anyhow::bail!(
            "moat is paused by its operator (incident mode); `moat incident --lift` ends it"
        );
    }
    let engine = Engine::new(engine_cfg, policy.backend)?;
    let t_engine = t0.elapsed();
    let workspace = match &args.workspace {
        Some(dir) => WorkspaceSource::Host(dir.clone()),
        None => WorkspaceSource::Fresh,
    };
    let secrets = moat_creds::secrets::Lookup::from_flag_or_env(args.secrets.as_deref())?;
    let audit_path = engine.config().data_dir.join("audit").join("audit.jsonl");
    let llm = if args.llm.is_empty() {
        None
    } else {
        let mut providers = Vec::new();
        for name in &args.llm {
            providers.push(moat_egress::llm::Provider::parse(name).with_context(|| {
                format!("--llm {name}: unknown provider; use anthropic or openai")
            })?);
        }
        let mut cfg = moat_egress::llm::LlmConfig::from_env(&providers, |k| {
            credential_setting(&policy, &secrets, k)
        })
        .map_err(anyhow::Error::msg)?;
        cfg.models = args.llm_models.clone();
        cfg.token_budget = args.llm_budget;
        cfg.user = Some(args.user.clone().unwrap_or_else(|| {
            std::env::var("USER")
                .ok()
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| format!("uid {}", nix::unistd::getuid()))
        }));
        cfg.channel = Some(args.channel.clone());
        cfg.user_budget = args.llm_user_budget;
        let ledger = moat_egress::llm::UsageLedger::from_audit_log(&audit_path)
            .with_context(|| format!("reading usage from {}", audit_path.display()))?;
        cfg.ledger = std::sync::Arc::new(ledger);
        Some(cfg)
    };
    // The lease behind its door (the one constructor the gateway uses too):
    // the door, when it needs one, lives in this process on its own small
    // runtime for as long as the sandbox runs.
    let github = if args.github.is_empty() {
        None
    } else {
        let flags = github::GithubFlags {
            repos: &args.github,
            permissions: &args.github_permissions,
            protect: &args.protect_branches,
        };
        let state_root = engine
            .config()
            .runtime_dir
            .join("doors")
            .join(format!("cli-{}", std::process::id()));
        Some(github::template(
            &flags,
            |k| credential_setting(&policy, &secrets, k),
            state_root,
        )?)
    };
    let extras = moat_gateway::runner::DoorExtras {
        llm,
        files: Vec::new(),
        github,
        amp: None,
        ..Default::default()
    };
    let door_runtime = if moat_gateway::runner::needs_door(&policy, &extras) {
        Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the egress door's runtime")?,
        )
    } else {
        None
    };
    let audit: std::sync::Arc<dyn moat_egress::Audit> = match &door_runtime {
        Some(_) => std::sync::Arc::new(
            moat_egress::JsonlAudit::open(&audit_path)
                .with_context(|| format!("opening the audit log {}", audit_path.display()))?,
        ),
        None => std::sync::Arc::new(moat_egress::MemoryAudit::default()),
    };
    let runner = moat_gateway::runner::open(moat_gateway::runner::RunnerSpec {
        engine: &engine,
        policy,
        door_name: "cli",
        lease_name: None,
        run_as: None,
        workspace,
        extras: &extras,
        runtime: door_runtime.as_ref().map(|rt| rt.handle()),
        audit,
    })
    .map_err(anyhow::Error::msg)?;
    let (mut lease, door) = (runner.lease, runner.door);
    let t_lease = t0.elapsed();
    let mut spec = RunSpec::new(args.command.clone());
    spec.stdin = sandbox_stdin()?;
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let outcome = lease.run(spec, &mut |stream, bytes| {
        let _ = match stream {
            Stream::Stdout => stdout
                .lock()
                .write_all(bytes)
                .and_then(|_| stdout.lock().flush()),
            Stream::Stderr => stderr.lock().write_all(bytes),
        };
    });
    let t_run = t0.elapsed();
    // Stop first so the hand-back (docs/threat-model.md F8) sees the workspace's final
    // state, then tell the user what it changed in their directories.
    lease.stop();
    for f in lease.take_findings() {
        eprintln!("moat: workspace: {f}");
    }
    let destroyed = lease.destroy();
    // The lease is over: its GitHub tokens end with it.
    if let (Some(d), Some(rt)) = (&door, &door_runtime) {
        let failed = rt.block_on(d.revoke_github());
        if failed > 0 {
            eprintln!("moat: warning: {failed} GitHub token(s) could not be revoked (see the log); they expire by themselves within an hour");
        }
    }
    let outcome = outcome?;
    destroyed.context("cleaning up the sandbox")?;
    drop(door);
    if let Some(rt) = door_runtime {
        rt.shutdown_background();
    }
    tracing::debug!(
        engine_us = t_engine.as_micros() as u64,
        lease_us = (t_lease - t_engine).as_micros() as u64,
        run_us = (t_run - t_lease).as_micros() as u64,
        destroy_us = (t0.elapsed() - t_run).as_micros() as u64,
        "sandbox run phases"
    );
    if let Some(reason) = outcome.reason() {
        eprintln!("{reason}");
    }
    Ok(outcome.exit_code().clamp(0, 255) as u8)
}
