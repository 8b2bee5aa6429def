//! [`Door`]: starts one sandbox's door (its namespace, the listeners inside
//! it, the LLM, GitHub and Amp state, the lease CA) and hands the sandbox what it needs (the
//! namespace, variables, files); dropping it stops everything.
//!
//! Must never: bind a listener outside the sandbox's namespace, hand the
//! sandbox a real key or token, or keep serving once dropped.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moat_policy::network::{HostPattern, NetworkPolicy};

use crate::intercept::{Intercept, Service, CA_BUNDLE_PATH};
use crate::state::{NameTable, State};
use crate::{amp, conn, dns, github, llm, netns, DoorConfig};

/// The proxy's port on the sandbox's 127.0.0.1.
pub const PROXY_PORT: u16 = 3128;
/// The DNS stub's port on the sandbox's 127.0.0.1.
pub const DNS_PORT: u16 = 53;
/// Time allowed for a request head, a ClientHello, or an upstream connect.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Ports the transparent listeners serve: 80, 443 and every explicit entry port.
fn transparent_ports(policy: &NetworkPolicy) -> Vec<u16> {
    let mut ports = vec![80, 443];
    for e in &policy.allow {
        if let (Some(p), false) = (e.port, matches!(e.host, HostPattern::Ip(_))) {
            ports.push(p);
        }
    }
    ports.retain(|p| *p != PROXY_PORT && *p != DNS_PORT);
    ports.sort_unstable();
    ports.dedup();
    ports
}

struct Sockets {
    proxy: std::net::TcpListener,
    dns_udp: std::net::UdpSocket,
    dns_tcp: std::net::TcpListener,
    transparent: Vec<(u16, std::net::TcpListener)>,
    llm: Option<std::net::TcpListener>,
}

/// A running door. Dropping it stops every listener and connection; the
/// sandbox is then left with a loopback that leads nowhere (fail closed).
pub struct Door {
    netns: Arc<OwnedFd>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    llm_env: Vec<(String, String)>,
    state: Arc<State>,
    rt: tokio::runtime::Handle,
}

impl Door {
    /// Creates the namespace, binds the listeners inside it and starts serving
    /// on `rt`.
    pub fn start(rt: &tokio::runtime::Handle, cfg: DoorConfig) -> std::io::Result<Door> {
        let ports = transparent_ports(&cfg.policy);
        let with_llm = cfg.llm.as_ref().is_some_and(|l| !l.providers.is_empty());
        let (ns, socks) = netns::with_new_netns(move || {
            let proxy = std::net::TcpListener::bind(("127.0.0.1", PROXY_PORT))?;
            let dns_udp = std::net::UdpSocket::bind(("127.0.0.1", DNS_PORT))?;
            let dns_tcp = std::net::TcpListener::bind(("127.0.0.1", DNS_PORT))?;
            let mut transparent = Vec::new();
            for p in ports {
                transparent.push((p, std::net::TcpListener::bind(("0.0.0.0", p))?));
            }
            let llm = if with_llm {
                Some(std::net::TcpListener::bind(("127.0.0.1", llm::LLM_PORT))?)
            } else {
                None
            };
            Ok(Sockets {
                llm,
                proxy,
                dns_udp,
                dns_tcp,
                transparent,
            })
        })?;
        let llm_state = match cfg.llm.clone() {
            Some(l) if with_llm => Some(llm::LlmState::new(l)?),
            _ => None,
        };
        let llm_env = llm_state
            .as_ref()
            .map(|l| l.client_env())
            .unwrap_or_default();
        let github = match cfg.github.clone() {
            Some(g) => Some(github::GithubState::new(g)?),
            None => None,
        };
        let amp = match cfg.amp.clone() {
            Some(a) => Some(amp::AmpState::new(a)?),
            None => None,
        };
        // One lease CA for every intercepted host, whichever service's.
        let mut hosts: Vec<(String, Service)> = Vec::new();
        let mut dir = None;
        if let Some(g) = &cfg.github {
            hosts.extend(g.hosts.iter().map(|h| (h.name.clone(), Service::Github)));
            dir = Some(g.state_dir.clone());
        }
        if let Some(a) = &cfg.amp {
            if hosts.iter().any(|(n, _)| *n == a.host) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{} cannot be both a GitHub host and Amp's", a.host),
                ));
            }
            hosts.push((a.host.clone(), Service::Amp));
            dir.get_or_insert_with(|| a.state_dir.clone());
        }
        let intercept = match dir {
            Some(d) if !hosts.is_empty() => Some(Intercept::new(&cfg.lease, hosts, &d)?),
            _ => None,
        };
        let state = Arc::new(State {
            cfg,
            names: Mutex::new(NameTable::default()),
            llm: llm_state,
            github,
            amp,
            intercept,
        });
        let _enter = rt.enter();
        let mut tasks = Vec::new();
        let tcp = |l: std::net::TcpListener| -> std::io::Result<tokio::net::TcpListener> {
            l.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(l)
        };
        tasks.push(rt.spawn(conn::serve_proxy(state.clone(), tcp(socks.proxy)?)));
        socks.dns_udp.set_nonblocking(true)?;
        tasks.push(rt.spawn(dns::serve_udp(
            state.clone(),
            tokio::net::UdpSocket::from_std(socks.dns_udp)?,
        )));
        tasks.push(rt.spawn(dns::serve_tcp(state.clone(), tcp(socks.dns_tcp)?)));
        for (port, l) in socks.transparent {
            tasks.push(rt.spawn(conn::serve_transparent(state.clone(), tcp(l)?, port)));
        }
        if let Some(l) = socks.llm {
            tasks.push(rt.spawn(llm::serve(state.clone(), tcp(l)?)));
        }
        Ok(Door {
            netns: Arc::new(ns),
            tasks,
            llm_env,
            state,
            rt: rt.clone(),
        })
    }

    /// The namespace a sandbox must join to use this door.
    pub fn netns(&self) -> Arc<OwnedFd> {
        self.netns.clone()
    }

    /// Starts the LLM token count of this door's lease again: a pooled lease
    /// is reset for its next holder, and its token budget is per holder.
    pub fn reset_llm_usage(&self) {
        if let Some(l) = &self.state.llm {
            l.reset_usage();
        }
    }

    /// Sets whose calls the LLM proxy serves from now on (the turn's user,
    /// for accounting, audit records and `budget_user`); a pooled lease
    /// serves one user after another.
    pub fn set_llm_user(&self, user: Option<&str>) {
        if let Some(l) = &self.state.llm {
            l.set_turn_user(user);
        }
    }

    /// Variables for the LLM proxy: base URLs and this lease's placeholder
    /// keys (never a real key). Empty without an LLM config.
    pub fn llm_env(&self) -> Vec<(String, String)> {
        self.llm_env.clone()
    }

    /// Variables for the intercepted services: the CA bundle variables, and
    /// the placeholders `GH_TOKEN`/`GITHUB_TOKEN` (GitHub) and
    /// `AMP_API_KEY` with `AMP_URL` (Amp); never a real token or key. Empty
    /// when nothing is intercepted.
    pub fn intercept_env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if let Some(i) = &self.state.intercept {
            env.extend(i.client_env());
        }
        if let Some(g) = &self.state.github {
            env.extend(g.client_env());
        }
        if let Some(a) = &self.state.amp {
            env.extend(a.client_env());
        }
        env
    }

    /// Files the sandbox must see read-only: (host path, sandbox path). Today
    /// the CA bundle with the lease CA, when a host is intercepted.
    pub fn files(&self) -> Vec<(std::path::PathBuf, std::path::PathBuf)> {
        self.state
            .intercept
            .as_ref()
            .map(|i| {
                vec![(
                    i.bundle_path().to_path_buf(),
                    std::path::PathBuf::from(CA_BUNDLE_PATH),
                )]
            })
            .unwrap_or_default()
    }

    /// Revokes the GitHub tokens this lease used (call when the lease ends);
    /// returns how many could not be revoked (each is logged).
    pub async fn revoke_github(&self) -> usize {
        match self.state.github.as_ref() {
            Some(g) => g.revoke_all().await,
            None => 0,
        }
    }

    /// What this door saw reach GitHub since the last call (pushes, pull
    /// requests opened), oldest first.
    pub fn take_github_activity(&self) -> Vec<github::GithubActivity> {
        self.state
            .github
            .as_ref()
            .map(|g| g.take_activity())
            .unwrap_or_default()
    }

    /// [`revoke_github`](Self::revoke_github) from a thread that is not
    /// the runtime's own (a blocking thread): waits for GitHub's answers.
    pub fn revoke_github_blocking(&self) -> usize {
        let Some(_) = self.state.github.as_ref() else {
            return 0;
        };
        let state = self.state.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            let failed = match state.github.as_ref() {
                Some(g) => g.revoke_all().await,
                None => 0,
            };
            let _ = tx.send(failed);
        });
        // A runtime that is shutting down drops the task: count it failed.
        rx.recv().unwrap_or(1)
    }

    /// As [`Door::revoke_github`], returning (tokens revoked or tried,
    /// how many failed): `moat incident` reports both.
    pub async fn revoke_github_counted(&self) -> (usize, usize) {
        match self.state.github.as_ref() {
            Some(g) => g.revoke_all_counted().await,
            None => (0, 0),
        }
    }

    /// Variables that point proxy-aware clients at the door.
    pub fn client_env() -> Vec<(String, String)> {
        let proxy = format!("http://127.0.0.1:{PROXY_PORT}");
        let no_proxy = "localhost,127.0.0.1".to_string();
        vec![
            ("HTTP_PROXY".into(), proxy.clone()),
            ("HTTPS_PROXY".into(), proxy.clone()),
            ("http_proxy".into(), proxy.clone()),
            ("https_proxy".into(), proxy),
            ("NO_PROXY".into(), no_proxy.clone()),
            ("no_proxy".into(), no_proxy),
        ]
    }
}

impl Drop for Door {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // The last resort: tokens a caller did not revoke (a turn that
        // panicked, a mint after the caller's revoke) are revoked now, in
        // the background, rather than left valid until they expire.
        if self.state.github.is_some() {
            let state = self.state.clone();
            self.rt.spawn(async move {
                if let Some(g) = state.github.as_ref() {
                    g.revoke_all().await;
                }
            });
        }
    }
}
