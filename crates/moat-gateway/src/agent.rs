//! Agents: what runs a turn inside the conversation's sandbox. Today the
//! shell agent (each message is a shell command; its output is the answer);
//! the LLM agents come with the agents issue behind the same trait.
//!
//! Must never: run anything outside the lease it is given, or lose the
//! outcome of a turn (a crashed or cancelled command still gives an answer).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use moat_sandbox::{Lease, RunSpec, Stream};

/// What a turn gets: the new messages (debounced into one turn) and the
/// thread's history since the last turn.
#[derive(Debug, Clone, Default)]
pub struct TurnInput {
    pub messages: Vec<String>,
    pub history: Vec<String>,
}

/// What an agent reports while it works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// Part of the answer, as it is produced.
    Text(String),
    /// What the sandbox is doing, for the status line.
    Status(String),
}

/// How a turn ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnOutcome {
    /// The whole answer to post.
    pub answer: String,
    /// `false` when the command failed, was cancelled or the sandbox died.
    pub ok: bool,
    pub cancelled: bool,
}

/// Stops a running turn from another thread: kills every process of the
/// lease's sandbox (its cgroups), so the blocking run returns.
#[derive(Clone, Default)]
pub struct CancelHandle {
    cancelled: Arc<AtomicBool>,
    cgroups: Arc<Mutex<Vec<PathBuf>>>,
}

impl CancelHandle {
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        let dirs = self.cgroups.lock().map(|d| d.clone()).unwrap_or_default();
        for dir in dirs {
            kill_cgroup(&dir);
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    fn arm(&self, lease: &Lease) {
        if let Ok(mut c) = self.cgroups.lock() {
            *c = lease.cgroup_paths();
        }
        if self.is_cancelled() {
            self.cancel();
        }
    }
}

/// SIGKILL to every process in a cgroup directory (v1 or v2).
fn kill_cgroup(dir: &std::path::Path) {
    if std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Runs a turn in a lease. Blocking: call it on a blocking thread.
pub trait Agent: Send + Sync {
    fn name(&self) -> &'static str;
    fn run_turn(
        &self,
        lease: &mut Lease,
        input: &TurnInput,
        cancel: &CancelHandle,
        events: &mut dyn FnMut(AgentEvent),
    ) -> TurnOutcome;
}

/// Each message is a shell command (`/bin/sh -c`), run in order in the
/// conversation's sandbox; their output, as it comes, is the answer.
pub struct ShellAgent;

/// Largest answer kept (the sandbox's output limit bounds what is read).
const MAX_ANSWER: usize = 256 * 1024;

impl Agent for ShellAgent {
    fn name(&self) -> &'static str {
        "shell"
    }

    fn run_turn(
        &self,
        lease: &mut Lease,
        input: &TurnInput,
        cancel: &CancelHandle,
        events: &mut dyn FnMut(AgentEvent),
    ) -> TurnOutcome {
        let mut answer = String::new();
        let mut ok = true;
        for cmd in &input.messages {
            if cancel.is_cancelled() {
                break;
            }
            if let Err(e) = lease.start() {
                answer.push_str(&format!("moat: the sandbox could not start: {e}\n"));
                ok = false;
                break;
            }
            cancel.arm(lease);
            events(AgentEvent::Status(format!("running: {}", first_line(cmd))));
            let mut sink = |_: Stream, bytes: &[u8]| {
                let text = String::from_utf8_lossy(bytes).into_owned();
                if answer.len() < MAX_ANSWER {
                    answer.push_str(&text);
                }
                events(AgentEvent::Text(text));
            };
            match lease.run(RunSpec::new(["/bin/sh", "-c", cmd.as_str()]), &mut sink) {
                Ok(outcome) => {
                    if let Some(reason) = outcome.reason() {
                        ok = false;
                        let line = if cancel.is_cancelled() {
                            "moat: stopped".to_string()
                        } else {
                            reason
                        };
                        if !answer.is_empty() && !answer.ends_with('\n') {
                            answer.push('\n');
                        }
                        answer.push_str(&line);
                        answer.push('\n');
                        events(AgentEvent::Text(format!("{line}\n")));
                        break;
                    }
                }
                Err(e) => {
                    ok = false;
                    let line = format!("moat: the sandbox could not run the command: {e}\n");
                    answer.push_str(&line);
                    events(AgentEvent::Text(line));
                    break;
                }
            }
        }
        if answer.is_empty() && ok {
            answer.push_str("(no output)");
        }
        TurnOutcome {
            answer,
            ok: ok && !cancel.is_cancelled(),
            cancelled: cancel.is_cancelled(),
        }
    }
}

fn first_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or("");
    if l.chars().count() > 80 {
        format!("{}…", l.chars().take(80).collect::<String>())
    } else {
        l.to_string()
    }
}
