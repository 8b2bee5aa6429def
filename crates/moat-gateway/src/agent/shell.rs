//! The shell agent: each message is a shell command (`/bin/sh -c`), run in
//! order in the conversation's sandbox; their output, as it comes, is the
//! answer. The default agent when no LLM key is configured.
//!
//! Must never: run a command outside the lease it is given.

use moat_sandbox::{Lease, RunSpec, Stream};

use super::{first_line, Agent, AgentEvent, CancelHandle, TurnInput, TurnOutcome};

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
            preformatted: true,
            answer,
            ok: ok && !cancel.is_cancelled(),
            cancelled: cancel.is_cancelled(),
        }
    }
}
