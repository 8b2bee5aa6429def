//! Forks long-lived children (the bwrap supervisor of a sandbox) from one
//! thread that lives as long as the process.
//!
//! A child's `PR_SET_PDEATHSIG` fires when the *thread* that forked it exits,
//! not the process (prctl(2)). A lease starts its sandbox lazily, on whichever
//! thread first runs a command in it: a pool's warmer or a blocking task that
//! ends soon after. Forked there, the sandbox was SIGKILLed as soon as that
//! thread ended, under a lease still in use. Forked here, the signal means
//! what it should: moat itself died.

use std::io;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::OnceLock;

type Job = Box<dyn FnOnce() + Send>;

/// `cmd.spawn()`, run on the spawner thread.
#[allow(
    clippy::expect_used,
    reason = "without a spawner thread no sandbox can start; moat stops with the reason"
)]
pub(crate) fn spawn(mut cmd: Command) -> io::Result<Child> {
    static JOBS: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let jobs = JOBS.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("moat-spawner".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("cannot start the spawner thread");
        tx
    });
    let gone = || io::Error::other("the spawner thread is gone");
    let (tx, rx) = mpsc::sync_channel(1);
    jobs.send(Box::new(move || {
        let _ = tx.send(cmd.spawn());
    }))
    .map_err(|_| gone())?;
    rx.recv().map_err(|_| gone())?
}
